"""Does this machine's torch load and run AOTInductor CUDA packages at all? (GPU diagnostic; that packages
load through `omnicompile.load_package` and run correctly is tests/gpu/test_packages.py.)

Isolates the crash of the export check (its packages died with SIGSEGV inside ``aoti_load_package``
on the H200 image, torch 2.11+cu130) from omnicompile: two tiny packages
without any omnicompile code are compiled here and loaded in fresh interpreters
(``python -X faulthandler``, so a crash prints the Python stack):
- ``plain``: Linear + ReLU, static shapes;
- ``custom_op``: the same with a Python custom op of the omnisparse op's schema shape
  (``Tensor?``, ``str``, ``bool``, ``float?`` arguments, a tuple of two tensors out) and a dynamic
  dimension, which AOTInductor calls back through its proxy executor, as it does our op.
If ``plain`` fails too, the crash is the environment's, not the export path's.

Variants of ``plain`` (``--cases``) probe for a way around a loader crash: ``aoti_load_package``
with ``device_index=0``, a package with ``aot_inductor.embed_kernel_binary``, and the deprecated
bare ``.so`` path (``torch._inductor.aot_compile`` + ``torch._export.aot_load``).
`scripts/gpu_diagnose_aoti.py` reuses `build` and `load_and_run` (whose ``"omnicompile"`` way loads
through `omnicompile.load_package`) to find the crash's cause.

Usage: ``python3 scripts/gpu_check_aoti_runtime.py [--device cuda] [--timeout 300] [--cases ...]``;
prints one line per case (ok or FAILED, exit status, elapsed seconds, the child's output) and exits
1 if any failed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


@torch.library.custom_op("omnicompile_check::twice", mutates_args=())
def twice(
    x: torch.Tensor, mask: torch.Tensor | None, tag: str, flag: bool, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2 x, zeros over the last dim)``: a Python op AOTInductor cannot compile, only call back."""
    return (x * 2).contiguous(), x.new_zeros(x.shape[:-1], dtype=torch.float32)


@twice.register_fake
def _twice_fake(x, mask, tag, flag, scale):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


class Plain(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).relu()


class WithCustomOp(Plain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, zeros = torch.ops.omnicompile_check.twice(self.linear(x), None, "tag", True, None)
        return y.sum(-1) + zeros


# case -> (model, ways to build and load it); "package" ways go through aoti_compile_and_package with
# these Inductor configs and aoti_load_package with these keywords, "legacy_so" through the deprecated
# torch._inductor.aot_compile (a bare .so) and torch._export.aot_load.
CASES = {
    "plain": ("plain", "package", {}, {}),
    "plain_device_index_0": ("plain", "package", {}, {"device_index": 0}),
    "plain_embed_kernel_binary": ("plain", "package", {"aot_inductor.embed_kernel_binary": True}, {}),
    "plain_legacy_so": ("plain", "legacy_so", {}, {}),
    "custom_op": ("custom_op", "package", {}, {}),
}


def load_and_run(path: str, device: str, seq: int, way: str, load_kwargs: dict) -> None:
    """Child side: start the device, load the artifact, run it on [2, seq, 16], print progress (flushed).

    The device starts before loading (a CUDA context exists when the loader runs), timed apart from
    the load.
    """
    if way == "omnicompile":
        import omnicompile  # imported before the clock starts, as a user would
    start = time.perf_counter()
    torch.zeros(1, device=device)
    print(f"{device} ready in {time.perf_counter() - start:.1f} s; loading", flush=True)
    start = time.perf_counter()
    if way == "legacy_so":
        model = torch._export.aot_load(path, device)
    elif way == "omnicompile":
        model = omnicompile.load_package(path, **load_kwargs)
    else:
        model = torch._inductor.aoti_load_package(path, **load_kwargs)
    print(f"loaded in {time.perf_counter() - start:.1f} s", flush=True)
    out = model(torch.randn(2, seq, 16, device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"ran, output {tuple(out.shape)}", flush=True)


def build(name: str, device: str, work: str) -> tuple[str, int]:
    """Export and compile case ``name``; returns (artifact path, sequence length to run it at)."""
    model_name, way, configs, _ = CASES[name]
    x = torch.randn(2, 8, 16, device=device)
    if model_name == "plain":  # static: run at the exported shape
        module, dynamic, seq = Plain(), None, 8
    else:
        module, dynamic, seq = WithCustomOp(), ({1: torch.export.Dim("seq", min=2, max=64)},), 12
    program = torch.export.export(module.to(device), (x,), dynamic_shapes=dynamic)
    if way == "legacy_so":
        return torch._inductor.aot_compile(program.module(), (x,)), seq
    package = f"{work}/{name}.pt2"
    return torch._inductor.aoti_compile_and_package(
        program, package_path=package, inductor_configs=configs
    ), seq


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per child")
    parser.add_argument("--cases", nargs="+", default=["plain", "custom_op"], choices=list(CASES))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {args.device}", flush=True)
    failed = False
    with tempfile.TemporaryDirectory() as work:
        for name in args.cases:
            start = time.perf_counter()
            path, seq = build(name, args.device, work)
            print(f"{name}: built in {time.perf_counter() - start:.1f} s", flush=True)
            _, way, _, load_kwargs = CASES[name]
            child = (
                f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                "import gpu_check_aoti_runtime as check; "
                f"check.load_and_run({path!r}, {args.device!r}, {seq}, {way!r}, {load_kwargs!r})"
            )
            start = time.perf_counter()
            # Under gdb (when installed) a crash prints the native stack too.
            gdb = (
                ["gdb", "-q", "-batch", "-iex", "set auto-load off", "-ex", "run", "-ex", "bt 30", "--args"]
                if shutil.which("gdb")
                else []
            )
            try:
                result = subprocess.run(
                    [*gdb, sys.executable, "-X", "faulthandler", "-c", child],
                    cwd=work,
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                )
                status, stdout, stderr = result.returncode, result.stdout, result.stderr
            except subprocess.TimeoutExpired as timeout:
                status, stdout, stderr = "timeout", timeout.stdout or "", timeout.stderr or ""
                stdout, stderr = (s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr))
            ok = "ran, output" in stdout and (status == 0 or bool(gdb))  # gdb's status is not the child's
            print(
                f"{name}: {'ok' if ok else 'FAILED'}, child exit {status} "
                f"after {time.perf_counter() - start:.1f} s;"
                f" output:\n{stdout.strip()[-4000:]}",
                flush=True,
            )
            if not ok:
                failed = True
                print(f"{name}: child stderr (end):\n{stderr.strip()[-3000:]}", flush=True)
    print("FAILED" if failed else "all cases loaded and ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
