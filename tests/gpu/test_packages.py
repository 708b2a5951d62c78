"""AOTInductor CUDA packages, each loaded through `omnicompile.load_package` (``reexec=True``) in a fresh
interpreter: ``python -X faulthandler`` prints the Python stack of a crash, which cannot take pytest
down, and where the loader's in-process libstdc++ fix is not enough the child restarts itself with
libstdc++ preloaded (docs/EXPORT.md, "Loading on CUDA"). Each child runs at most ``CHILD_TIMEOUT_S``.

- A bare Linear + ReLU package (no omnicompile code inside): equal to the module.
- The built-in ``llama-tiny`` (bf16) exported with a dynamic sequence length, dense and sparse, run at
  two lengths, one ending in a partial block: the dense package equals the eager model, the sparse one
  the model compiled by the ``omnisparse`` backend with the same config. The sparse package's
  attention calls (the op: its length is dynamic) all ran sparse; the dense package holds its
  attention as aten ops (`passes.inline_attention`), so no op call is recorded. Random weights give
  flat attention, so the sparse config caps the budget (``max_blocks``) and turns the density
  fallback off: the check is about the package, not the method's accuracy.

Tolerances: ``tests.helpers.REL_TOL`` of the dtype (relative L2 error). Diagnostics of a loader crash:
scripts/gpu_check_aoti_runtime.py, scripts/gpu_diagnose_aoti.py. How to run: tests/gpu/__init__.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import omnicompile
from omnicompile import OmniSparseConfig
from omnicompile.demos.models import build_model
from omnicompile.export import export
from tests.gpu import ON_CUDA
from tests.helpers import REL_TOL, rel_error

pytestmark = ON_CUDA

CHILD_TIMEOUT_S = 300
CONFIGS = {
    "dense": OmniSparseConfig(mode="dense"),
    "sparse": OmniSparseConfig(min_seq_len=1024, max_blocks=8, dense_fallback_density=1.0),
}
LENGTHS = (2048, 4100)
RECORDED = {"dense": [], "sparse": ["sparse"]}  # the paths the op calls record, per mode

# Runs in a fresh interpreter: argv = package, calls file ([(args, kwargs)]), results file.
_LOADER = textwrap.dedent(
    """
    import sys, torch
    import omnicompile
    from omnicompile.recording import recording
    package, calls, results = sys.argv[1:]
    calls = torch.load(calls)  # on the device: its context exists before the package loads
    model = omnicompile.load_package(package, reexec=True)
    outputs, decisions = [], []
    for args, kwargs in calls:
        with torch.no_grad(), recording(measure=False) as recorder:
            out = model(*args, **kwargs)
        outputs.append((out if isinstance(out, torch.Tensor) else out["logits"]).float().cpu())
        decisions.append(sorted({run.decision for run in recorder.runs}))
    torch.save({"outputs": outputs, "decisions": decisions}, results)
    """
)


def _run_package(path: str | Path, calls: list[tuple[tuple, dict]], work: Path) -> dict:
    """Load ``path`` in a fresh interpreter (cwd ``work``: at the repository root ``import omnicompile``
    would find the source folder) and run each call; its outputs (float32, CPU) and decisions."""
    calls_file, results = work / "calls.pt", work / "results.pt"
    torch.save(calls, calls_file)
    child = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", _LOADER, str(path), str(calls_file), str(results)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert child.returncode == 0, f"loader exited with {child.returncode}:\n{child.stderr[-4000:]}"
    return torch.load(results)


def test_bare_package_loads_and_runs(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).cuda()
    x = torch.randn(2, 8, 16, device="cuda")
    program = torch.export.export(module, (x,))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "bare.pt2"))
    (got,) = _run_package(path, [((x,), {})], tmp_path)["outputs"]
    with torch.no_grad():
        assert rel_error(got, module(x).cpu()) < REL_TOL[torch.float32]


def _ids(length: int) -> torch.Tensor:
    return torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(length)).cuda()


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return build_model("llama-tiny", dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_exported_llama_matches_the_model_at_two_lengths(mode, llama, tmp_path):
    seq = torch.export.Dim("seq", min=64, max=8192)
    example = {"input_ids": _ids(1024), "use_cache": False}
    path = export(llama, example, tmp_path / f"{mode}.pt2", CONFIGS[mode], dynamic={"input_ids": {1: seq}})
    calls = [((), {"input_ids": _ids(n), "use_cache": False}) for n in LENGTHS]
    result = _run_package(path, calls, tmp_path)
    assert result["decisions"] == [RECORDED[mode]] * len(LENGTHS)
    model = llama
    if mode == "sparse":
        model = torch.compile(llama, backend=omnicompile.backend(CONFIGS[mode]), dynamic=True)
    with torch.no_grad():
        for (_, kwargs), got in zip(calls, result["outputs"]):
            assert rel_error(got, model(**kwargs).logits.cpu()) < REL_TOL[torch.bfloat16]
