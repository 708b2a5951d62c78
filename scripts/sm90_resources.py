"""Registers, spills and shared memory of the Triton kernels' default configs on sm_90, without a GPU.

    python scripts/sm90_resources.py

Compiles each kernel with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (bf16, causal, the
runtime's specialisations: unit head-dim strides, 16-byte-divisible pointers and strides) at the
launch config the wrappers pick for head dims 64, 80, 96, 128, 256 (with and without a window), and
reads REG / STACK (spill) from ``cuobjdump -res-usage`` of the cubin (both ship in the triton wheel).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from omnicompile.kernels.decode import triton_decode  # noqa: E402
from omnicompile.kernels.decode.launch import row_tile  # noqa: E402
from omnicompile.kernels.estimation import launch as estimation_launch  # noqa: E402
from omnicompile.kernels.estimation import triton_composite, triton_probe  # noqa: E402
from omnicompile.kernels.sparse_attention import launch as attention_launch  # noqa: E402
from omnicompile.kernels.sparse_attention import triton_bwd, triton_fwd  # noqa: E402
from omnicompile.kernels.triton_utils import head_dim_pad  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
FP32_SCALARS = {"qk_scale", "scale", "mask_floor", "softcap"}
FP32_POINTERS = {"LSE", "LSE2", "DELTA", "DK32", "DV32", "AHAT", "STATS", "OUT", "MID_O", "MID_LSE"}
INT_POINTERS = {"KV_NUM", "KV_IDX", "ORDER", "Q_NUM", "Q_IDX", "OFFSETS", "LENGTHS", "TAIL_LENGTH"}
INT_SCALARS = {"KV_HEADS", "BATCH_KV_HEADS"}
# Stride tuples (`*_strides`: 4 strides, `num_strides` 3) whose last stride is 1 (the head dim).
UNIT_LAST_STRIDE = {"q_strides", "k_strides", "v_strides", "do_strides", "dq_strides"}


def resources(fn, constexprs: dict, num_warps: int, num_stages: int) -> str:
    """'REG r, spill s B, smem m KB' of ``fn`` compiled for sm_90."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name == "sizes":  # a Triton tuple of the row probe's 5 sizes
            signature[name] = ("i32",) * 5
            continue
        if name.endswith("_strides"):  # a Triton tuple of strides
            size = 3 if name == "num_strides" else 4
            unit = name in UNIT_LAST_STRIDE
            signature[name] = tuple("constexpr" if unit and j == size - 1 else "i32" for j in range(size))
            for j in range(size):
                if unit and j == size - 1:
                    constexprs[(index, j)] = 1
                else:
                    attrs[(index, j)] = [["tt.divisibility", 16]]
            continue
        is_stride = name.startswith("s") and "_" in name and name != "split_len"
        unit_stride = is_stride and (name.endswith("d") or name in ("stride_aj", "stride_mj"))
        if name in constexprs or unit_stride:
            constexprs.setdefault(name, 1)
            signature[name] = "constexpr"
            continue
        if name.isupper() and name not in INT_SCALARS:
            kind = "fp32" if name in FP32_POINTERS else "i32" if name in INT_POINTERS else "bf16"
            signature[name] = "*" + kind
        else:
            signature[name] = "fp32" if name in FP32_SCALARS else "i32"
        if signature[name].startswith("*") or is_stride:
            attrs[(index,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return f"REG {match[1]}, spill {match[2]} B, smem {compiled.metadata.shared // 1024} KB"


def main() -> None:
    for dim in (64, 80, 96, 128, 256):
        pad = head_dim_pad(dim)
        for windowed in (False, True):
            cfg = attention_launch.default_launch(64, torch.bfloat16, False, dim)
            const = dict(
                GROUP=3,
                HEAD_DIM=dim,
                HEAD_DIM_PAD=pad,
                SPARSE_BLOCK=64,
                BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n,
                IS_CAUSAL=True,
                WINDOWED=windowed,
                MASK_KIND=0,
                SOFTCAP=False,
                FP32_DOT=False,
                ORDERED=False,
                TMA=False,  # the pointer-load build (TMA descriptors need tensordesc signatures)
            )
            print(
                f"D {dim} fwd window={windowed} {cfg}:",
                resources(triton_fwd.sparse_fwd_kernel, const, cfg.num_warps, cfg.num_stages),
            )
            est = estimation_launch.default_launch(dim, windowed)
            const = dict(
                GQA=3,
                GROUP=16,
                PER_BLOCK=4,
                BLOCK_U=est.block_u,
                BLOCK_W=est.block_w,
                HEAD_DIM=dim,
                HEAD_DIM_PAD=pad,
                IS_CAUSAL=True,
                WINDOWED=windowed,
                SOFTCAP=False,
                FP32_DOT=False,
            )
            print(
                f"D {dim} estimator window={windowed} {est}:",
                resources(triton_composite.composite_kernel, const, est.num_warps, est.num_stages),
            )
            probe = estimation_launch.default_launch(dim, windowed)
            const = dict(
                GQA=3,
                BLOCK_SIZE=64,
                BLOCK_R=probe.block_r,
                BLOCK_N=probe.block_n,
                HEAD_DIM=dim,
                HEAD_DIM_PAD=pad,
                IS_CAUSAL=True,
                WINDOWED=windowed,
                SOFTCAP=False,
                FP32_DOT=False,
            )
            for mass in (False, True):
                print(
                    f"D {dim} row probe mass={mass} window={windowed} {probe}:",
                    resources(
                        triton_probe.probe_kernel,
                        dict(const, SPLITS_PAD=32, MIX=True, MASS=mass),
                        probe.num_warps,
                        probe.num_stages,
                    ),
                )
        tiles = attention_launch.default_backward_launch(dim)
        for fn, block_m, block_n in (
            (triton_bwd.dq_kernel, tiles.dq_block_m, tiles.dq_block_n),
            (triton_bwd.dkdv_kernel, tiles.dkdv_block_m, tiles.dkdv_block_n),
        ):
            const = dict(
                GROUP=3,
                BLOCK=64,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                HEAD_DIM=dim,
                HEAD_DIM_PAD=pad,
                IS_CAUSAL=True,
                MASK_KIND=0,
                SOFTCAP=False,
                FP32_DOT=False,
            )
            print(
                f"D {dim} {fn.__name__} {block_m}x{block_n}:",
                resources(fn, const, tiles.num_warps, tiles.num_stages),
            )
        block_m = row_tile(64, dim)
        const = dict(HEAD_DIM=dim, BLOCK_D=pad, BLOCK_M=block_m, BLOCK_N=64, FP32_DOT=False)
        print(f"D {dim} decode {block_m} rows:", resources(triton_decode.split_kernel, const, 4, 3))


if __name__ == "__main__":
    main()
