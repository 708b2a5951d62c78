"""GPU check of `omnicompile.export` (rerun on any CUDA machine; not a CI test, which has no GPU).

Exports the built-in ``llama-tiny`` (bf16, CUDA) twice with a dynamic sequence length, dense and
sparse, loads each package with `omnicompile.load_package` in a fresh interpreter (``python -X
faulthandler``: a crash prints the Python stack) and runs it at two lengths, one ending in a partial
block. ``reexec=True``: where the loader's in-process libstdc++ fix is not enough, the interpreter
restarts itself with libstdc++ preloaded (docs/EXPORT.md, "Loading on CUDA"; its log says so).
Checks:
- the dense package equals the eager model (bf16 tolerance);
- the sparse package equals the same model compiled by the ``omnisparse`` backend with the same
  config, and every attention call inside the package ran the sparse path (our Triton kernels).
Random weights give flat attention, so the config caps the budget (``max_blocks``) and turns the
density fallback off: the check is about the package, not the method's accuracy.

Usage: ``python3 scripts/gpu_check_export.py [--out DIR]``; prints one line per check and exits 1 if
any fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

import omnicompile
from omnicompile import OmniSparseConfig
from omnicompile.demos.models import build_model
from omnicompile.export import export
from omnicompile.metrics import relative_error

CONFIGS = {
    "dense": OmniSparseConfig(mode="dense"),
    "sparse": OmniSparseConfig(min_seq_len=1024, max_blocks=8, dense_fallback_density=1.0),
}
LENGTHS = (2048, 4100)
TOL = 2e-2  # bf16 logits, two implementations of the same computation

_LOADER = textwrap.dedent(
    """
    import sys, torch
    import omnicompile
    from omnicompile.recording import recording
    package, inputs, outputs = sys.argv[1:]
    inputs = torch.load(inputs)  # on the device: its context exists before the package loads
    print("loading", package, flush=True)
    model = omnicompile.load_package(package, reexec=True)
    print("loaded", flush=True)
    logits, decisions = [], []
    for ids in inputs:
        with torch.no_grad(), recording(measure=False) as recorder:
            logits.append(model(input_ids=ids, use_cache=False)["logits"].float().cpu())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        decisions.append(sorted({run.decision for run in recorder.runs}))
        print("ran", ids.shape[1], decisions[-1], flush=True)
    torch.save({"logits": logits, "decisions": decisions}, outputs)
    """
)


def _ids(length: int, device: str) -> torch.Tensor:
    return torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(length)).to(device)


def _reference(model: torch.nn.Module, mode: str, device: str) -> list[torch.Tensor]:
    if mode == "sparse":
        model = torch.compile(model, backend=omnicompile.backend(CONFIGS[mode]), dynamic=True)
    with torch.no_grad():
        return [model(input_ids=_ids(n, device), use_cache=False).logits.float().cpu() for n in LENGTHS]


def check(mode: str, model: torch.nn.Module, work: Path, device: str) -> list[str]:
    """Export, load in a fresh process, compare; returns failure lines (empty = passed)."""
    seq = torch.export.Dim("seq", min=64, max=8192)
    path = export(
        model,
        {"input_ids": _ids(1024, device), "use_cache": False},
        work / f"{mode}.pt2",
        CONFIGS[mode],
        dynamic={"input_ids": {1: seq}},
    )
    inputs, outputs = work / f"{mode}.inputs.pt", work / f"{mode}.outputs.pt"
    torch.save([_ids(n, device) for n in LENGTHS], inputs)
    # cwd=work: from the repository root, `import omnicompile` would find the source folder, which
    # lacks the installed package's `omnicompile.passes` / `omnicompile.kernels` mapping.
    child = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", _LOADER, str(path), str(inputs), str(outputs)],
        timeout=600,
        cwd=work,
        check=False,
    )
    if child.returncode != 0:
        return [f"{mode}: loader exited with {child.returncode}"]
    result = torch.load(outputs)
    failures = []
    references = _reference(model, mode, device)
    for length, got, want, ran in zip(LENGTHS, result["logits"], references, result["decisions"]):
        err = relative_error(got, want)
        print(
            f"{mode} package S={length}: rel err {err:.2e} vs {'compiled' if mode == 'sparse' else 'eager'}, "
            f"attention ran {ran}",
            flush=True,
        )
        if err > TOL or ran != [mode]:
            failures.append(f"{mode} S={length}: rel err {err:.2e}, ran {ran}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="keep packages here (default: a temp dir)")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script itself (slow)")
    args = parser.parse_args()
    model = build_model("llama-tiny", dtype=torch.bfloat16, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.out or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        failures = [line for mode in CONFIGS for line in check(mode, model, work, args.device)]
    print(
        "FAILED:\n  " + "\n  ".join(failures) if failures else f"export on {args.device}: all checks passed"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
