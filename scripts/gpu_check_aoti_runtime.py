"""Does this machine's torch load and run AOTInductor CUDA packages at all? (GPU; not a CI test.)

Isolates the crash of `scripts/gpu_check_export.py` (both its packages died with SIGSEGV inside
``aoti_load_package`` on the H200 image, torch 2.11+cu130) from omnicompile: two tiny packages
without any omnicompile code are compiled here and loaded in fresh interpreters
(``python -X faulthandler``, so a crash prints the Python stack):
- ``plain``: Linear + ReLU, static shapes;
- ``custom_op``: the same with a Python custom op of the omnisparse op's schema shape
  (``Tensor?``, ``str``, ``bool``, ``float?`` arguments, a tuple of two tensors out) and a dynamic
  dimension, which AOTInductor calls back through its proxy executor, as it does our op.
If ``plain`` fails too, the crash is the environment's, not the export path's.

Usage: ``python3 scripts/gpu_check_aoti_runtime.py [--device cuda] [--timeout 300]``; prints one
line per package (exit status, elapsed seconds, the child's output) and exits 1 if any failed.
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


def load_and_run(path: str, device: str, seq: int) -> None:
    """Child side: start the device, load the package, run it on [2, seq, 16], print progress (flushed).

    The device starts before loading (a CUDA context exists when the loader runs), timed apart from
    the load.
    """
    start = time.perf_counter()
    torch.zeros(1, device=device)
    print(f"{device} ready in {time.perf_counter() - start:.1f} s; loading", flush=True)
    start = time.perf_counter()
    model = torch._inductor.aoti_load_package(path)
    print(f"loaded in {time.perf_counter() - start:.1f} s", flush=True)
    out = model(torch.randn(2, seq, 16, device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"ran, output {tuple(out.shape)}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per child")
    parser.add_argument("--packages", nargs="+", default=["plain", "custom_op"], choices=["plain", "custom_op"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {args.device}", flush=True)
    x = torch.randn(2, 8, 16, device=args.device)
    packages = {
        "plain": (Plain(), None, 8),  # static: run at the exported shape
        "custom_op": (WithCustomOp(), ({1: torch.export.Dim("seq", min=2, max=64)},), 12),
    }
    failed = False
    with tempfile.TemporaryDirectory() as work:
        for name in args.packages:
            module, dynamic, seq = packages[name]
            start = time.perf_counter()
            program = torch.export.export(module.to(args.device), (x,), dynamic_shapes=dynamic)
            path = torch._inductor.aoti_compile_and_package(program, package_path=f"{work}/{name}.pt2")
            print(f"{name}: packaged in {time.perf_counter() - start:.1f} s", flush=True)
            child = (
                f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"import gpu_check_aoti_runtime as check; check.load_and_run({path!r}, {args.device!r}, {seq})"
            )
            start = time.perf_counter()
            # Under gdb (when installed) a crash prints the native stack too.
            gdb = ["gdb", "-q", "-batch", "-iex", "set auto-load off", "-ex", "run", "-ex", "bt 30", "--args"] if shutil.which("gdb") else []
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
            print(f"{name}: child exit {status} after {time.perf_counter() - start:.1f} s; output:\n"
                  f"{stdout.strip()[-4000:]}", flush=True)
            if "ran, output" not in stdout or (status != 0 and not gdb):  # gdb's status is not the child's
                failed = True
                print(f"{name}: child stderr (end):\n{stderr.strip()[-4000:]}", flush=True)
    print("FAILED" if failed else "all packages loaded and ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
