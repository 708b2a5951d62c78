"""Pieces shared by the Triton kernels: interpreter detection, the fp32-dot rule, the tile dot, the
base-2 constants, the head-dim support check, the score constexprs of a launch, the launch itself
(`run_kernel`: traceable inside a ``torch.library.triton_op``), host TMA descriptors
(`tma_descriptors`) and the online-softmax primitives (one step, the normaliser, the finish), in
base 2 as FlashAttention and FlashInfer's ``state_merge`` /
``state_normalize``."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2) == 1 / LOG2E: log(x) == log2(x) * LN2
# The same constants for jit code, which reads no plain float global.
LOG2E_JIT = tl.constexpr(LOG2E)
LN2_JIT = tl.constexpr(LN2)
# Head dims the prefill kernels (forward, backward, fused estimator) and decode run: multiples of 16
# up to 256, i.e. 64, 80, 96, 128, 256 of the common models. Non-powers of two are padded to the
# next power of two (`head_dim_pad`) with masked loads and stores on the head dim.
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def run_kernel(kernel: triton.JITFunction, grid: tuple[int, ...], *args: object, **kwargs: object) -> None:
    """``kernel[grid](*args, **kwargs)``, traceable inside a ``torch.library.triton_op`` body.

    Plain tensors launch the kernel directly (no higher-order-op dispatch: it costs host time).
    Tensor subclasses are what tracing passes (fake and functional tensors: ``torch.export``,
    AOTInductor, a fake-tensor mode): the launch goes through ``torch.library.wrap_triton``, which
    records it as a graph node that Inductor compiles (and runs real subclasses too). Under the
    interpreter a launch on fake tensors does nothing: interpreted kernels have no Triton code to
    compile, fake tensors no data, and the outputs' shapes are their allocations'.
    """
    values = (*args, *kwargs.values())
    if any(type(a) is not torch.Tensor and isinstance(a, torch.Tensor) for a in values):
        if not interpreting():
            kernel = torch.library.wrap_triton(kernel)
        elif any(isinstance(a, torch.Tensor) and is_fake(a) for a in values):
            return
    kernel[grid](*args, **kwargs)


def tma_descriptors(
    tensors: tuple[torch.Tensor, ...], rows: int, cols: int
) -> tuple[TensorDescriptor, ...] | None:
    """Host TMA descriptors of 4-D [B, H, S, D] tensors, a [1, 1, rows, cols] tile each (columns past
    D and rows past S read as zeros), or None where TMA cannot take them: a GPU before sm_90, a traced
    (fake or functional) tensor, a last stride other than 1, other strides or the base not 16-byte
    aligned (the kernels then load through pointers)."""
    if any(type(t) is not torch.Tensor for t in tensors):
        return None
    if not interpreting() and any(
        t.device.type != "cuda" or torch.cuda.get_device_capability(t.device)[0] < 9 for t in tensors
    ):
        return None
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return None
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, cols]) for t in tensors)


def needs_fp32_dot(dtype: torch.dtype) -> bool:
    """Whether `tile_dot` must take the exact fp32 path for inputs of ``dtype``: fp32 inputs, and
    bf16 under the interpreter, whose bf16 ``tl.dot`` is wrong (Triton 3.9). bf16 products are
    exact in fp32, so that path computes what the tensor cores do."""
    return dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16)


def head_dim_reason(*dims: int) -> str | None:
    """None when the head dims ``dims`` (of q, k, v, ...) are equal multiples of 16 in [16,
    ``MAX_HEAD_DIM``], else the reason they are not."""
    dim = dims[0]
    if any(d != dim for d in dims):
        return f"head dims {', '.join(map(str, dims))} differ"
    if dim % 16 or not 16 <= dim <= MAX_HEAD_DIM:
        return f"head dim {dim}: needs a multiple of 16 in [16, {MAX_HEAD_DIM}]"
    return None


DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def qk_reason(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """None when a kernel over q [B, H, Sq, D] and k [B, Hkv, Skv, D] can run on their device, dtype,
    head dim and head counts (the checks every Triton kernel here shares), else the reason."""
    if q.device.type != "cuda" and not interpreting():
        return f"device {q.device.type} needs CUDA (or TRITON_INTERPRET=1)"
    if q.dtype not in DTYPES or q.dtype != k.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}: need one of bf16, fp16, fp32"
    if q.dtype == torch.float32 and not interpreting():
        return "fp32 on CUDA: the kernel's exact-fp32 path serves the interpreter"
    reason = head_dim_reason(q.shape[-1], k.shape[-1])
    if reason is not None:
        return reason
    if q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads"
    return None


def head_dim_pad(head_dim: int) -> int:
    """The power-of-two width of a kernel's head-dim ``tl.arange`` (>= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def score_constexprs(
    q: torch.Tensor, is_causal: bool, window: int | None, softcap: float | None
) -> dict[str, int | bool]:
    """The constexprs of a kernel's scores of queries ``q`` [..., D]: HEAD_DIM, HEAD_DIM_PAD,
    IS_CAUSAL, WINDOWED, SOFTCAP and FP32_DOT (the estimation kernels' launch arguments)."""
    head_dim = q.shape[-1]
    return {
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": head_dim_pad(head_dim),
        "IS_CAUSAL": is_causal,
        "WINDOWED": window is not None,
        "SOFTCAP": softcap is not None,
        "FP32_DOT": needs_fp32_dot(q.dtype),
    }


@triton.jit
def as_fp32(x):
    """A float scalar argument as fp32. AOTInductor types a Python float it passes to a user kernel
    fp64 (torch's ``_use_fp64_for_unbacked_floats``), which would make the online statistics
    derived from it fp64 and fail the loops' type check."""
    return tl.cast(x, tl.float32)


@triton.jit
def tile_dot(a, b, acc, FP32_DOT: tl.constexpr):
    """``a @ b (+ acc)`` with fp32 accumulation; FP32_DOT (`needs_fp32_dot`): in exact fp32."""
    if FP32_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def soft_cap(s, cap):
    """``(cap * t, t)`` with t = tanh(s / cap), elementwise, for finite scores s and cap > 0 in one unit
    (base 2: the cap times log2(e); tanh(s / cap) is the same in either unit). t comes from one exp2:
    1 - 2 / (exp2(2 log2(e) s / cap) + 1), exact to ~1e-7 absolute, and +-1 where exp2 saturates.
    (libdevice's tanh does not run under the interpreter.)"""
    t = 1.0 - 2.0 / (tl.math.exp2(s * (2.0 * LOG2E_JIT / cap)) + 1.0)
    return cap * t, t


@triton.jit
def softmax_step(m_i, s, s_scale, MASKED: tl.constexpr):
    """One online-softmax step of the rows' running base-2 max ``m_i`` [rows] over the scores
    ``s * s_scale`` [rows, keys] (log2 units): ``(m_new, p, alpha)``, the new max, p = exp2(s * s_scale -
    m_new) [rows, keys] and alpha = exp2(m_i - m_new) [rows], the factor that rescales what was summed
    before. ``s_scale`` >= 0 (it scales the row max: one multiply-add per score); callers with scaled
    scores pass 1.0. MASKED: s may hold -inf, and a row with nothing seen yet keeps m = -inf and is
    shifted by 0 (p = alpha = 0, no NaN)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * s_scale)
    if MASKED:
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    p = tl.math.exp2(s * s_scale - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    return m_new, p, alpha


@triton.jit
def online_stats(m_i, l_i, s):
    """`softmax_step` keeping the rows' running max ``m_i`` and sum ``l_i`` only, over scores ``s``
    [rows, keys] (log2 units, -inf where masked): ``(m_new, l_new)``."""
    m_new, p, alpha = softmax_step(m_i, s, 1.0, True)
    return m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def normaliser(m_i, l_i):
    """``(m_shift, inv_l)`` with ``exp2(s - m_shift) * inv_l`` the rows' probabilities; rows that saw no
    key get 0 (shift by +inf, scale by 0)."""
    seen = l_i > 0.0
    m_shift = tl.where(seen, m_i, float("inf"))
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    return m_shift, inv_l


@triton.jit
def softmax_finish(acc, m_i, l_i):
    """``(out, lse)`` of the rows' running state: out = acc / l_i [rows, D] and the natural-log
    log-sum-exp (m_i + log2 l_i) * ln 2 [rows]; rows that saw no key get out 0 and lse -inf."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2_JIT, float("-inf"))
    return out, lse
