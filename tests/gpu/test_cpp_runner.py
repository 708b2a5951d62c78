"""The C++ runner (``cpp/run_package``, `omnicompile.cpp_runner`) on CUDA packages that run without
Python, against the model in Python.

- ``llama-tiny`` (bf16) exported sparse with static shapes (S = 2048): both attention calls take the
  Triton route (`passes.inline_attention`: the triton op ``omnisparse::sparse_attention``, its kernels
  compiled into the package), so nothing of ours is needed at run time; the runner's logits equal the
  model compiled by the ``omnisparse`` backend with the same config.
- The same model exported dense with a dynamic length: attention is aten SDPA in the package; the
  runner's logits at 4100 tokens equal the eager model's.

Tolerance: ``tests.helpers.REL_TOL[torch.bfloat16]`` (relative L2). The runner is a process of its own;
where it dies by a signal, it runs again with libstdc++ preloaded (docs/EXPORT.md, "Loading on
CUDA") and the test warns that it needed that. Building it needs cmake and a C++ compiler (else it
skips saying so); without the CUDA toolkit torch's CMake config fails and `build_runner` builds
against torch's folders instead.
How to run: scripts/gpu_check_cpp_runner.sh.
"""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import omnicompile
from omnicompile import OmniSparseConfig
from omnicompile.cpp_runner import build_runner, run_package, toolchain_reason
from omnicompile.demos.models import build_model
from omnicompile.export import export, export_program
from omnicompile.loading import preload_env
from tests.gpu import ON_CUDA
from tests.helpers import REL_TOL, rel_error

pytestmark = ON_CUDA

SOURCE = Path(__file__).resolve().parents[2] / "cpp" / "run_package"
SPARSE = OmniSparseConfig(min_seq_len=1024, max_blocks=8, dense_fallback_density=1.0)


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Path:
    reason = toolchain_reason(SOURCE)
    if reason is not None:
        pytest.skip(f"cannot build the C++ runner: {reason}")
    try:
        return build_runner(tmp_path_factory.mktemp("run_package_build"), SOURCE, jobs=8)
    except subprocess.CalledProcessError as error:
        pytest.fail(f"building run_package failed:\n{error.stdout[-4000:]}\n{error.stderr[-4000:]}")


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return build_model("llama-tiny", dtype=torch.bfloat16, device="cuda")


def _ids(length: int) -> torch.Tensor:
    return torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(length)).cuda()


def _run(runner: Path, package: Path, inputs: list[torch.Tensor], work: Path) -> torch.Tensor:
    """The runner's first output, plainly or, where it dies by a signal, with libstdc++ preloaded."""
    try:
        return run_package(runner, package, inputs, work)[0]
    except subprocess.CalledProcessError as error:
        if error.returncode >= 0:
            pytest.fail(f"run_package exited with {error.returncode}:\n{error.stderr[-4000:]}")
        warnings.warn(f"run_package died by signal {-error.returncode} without LD_PRELOAD; retrying with it")
        return run_package(runner, package, inputs, work, env=preload_env())[0]


def test_sparse_static_package_runs_in_cpp(runner, llama, tmp_path):
    example = {"input_ids": _ids(2048), "use_cache": False}
    exported = export_program(llama, example, SPARSE, inline=True)
    assert [record.route for record in exported.inlined] == ["triton", "triton"], exported.inlined
    package = torch._inductor.aoti_compile_and_package(exported.program, package_path=str(tmp_path / "s.pt2"))
    got = _run(runner, Path(package), [example["input_ids"]], tmp_path)
    compiled = torch.compile(llama, backend=omnicompile.backend(SPARSE))
    with torch.no_grad():
        want = compiled(**example).logits.float().cpu()
    assert rel_error(got.float(), want) < REL_TOL[torch.bfloat16]


def test_dense_dynamic_package_runs_in_cpp(runner, llama, tmp_path):
    seq = torch.export.Dim("seq", min=64, max=8192)
    example = {"input_ids": _ids(1024), "use_cache": False}
    config = OmniSparseConfig(mode="dense")
    package = export(llama, example, tmp_path / "d.pt2", config, dynamic={"input_ids": {1: seq}})
    ids = _ids(4100)
    got = _run(runner, package, [ids], tmp_path)
    with torch.no_grad():
        want = llama(input_ids=ids, use_cache=False).logits.float().cpu()
    assert rel_error(got.float(), want) < REL_TOL[torch.bfloat16]
