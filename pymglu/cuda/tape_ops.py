"""Fused GPU paths of tape ops: RMSNorm, rotary embeddings and causal attention (``tape_ops.cu``).

The ops of :mod:`pymglu.autograd.ops` call these for CuPy arrays of dtype float32, float16 or bfloat16
while :data:`pymglu.cuda.training.ENABLED` is set, and run their
array-expression path otherwise (float64, NumPy, or inside :func:`pymglu.cuda.training.disabled`).
Each computes the op's formula (see the op's docstring) in float32, in one kernel per pass instead of a
chain of CuPy expressions; what differs from the expression path is stated per function.

Shapes are those of the ops; every array argument must be C-contiguous (the functions make contiguous
copies of inputs that are not).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import cuda as _cuda
from pymglu.backend import is_cupy_array
from pymglu.dtypes import float32

__all__ = ["supports", "norm_supports", "kernel_names", "rms_norm_forward", "rms_norm_backward", "rope",
           "attention_supports", "attention_forward", "attention_backward"]

_SOURCE = "tape_ops.cu"
_CUDA_TYPES = _cuda.CUDA_TYPE_NAMES
_KERNELS = ("rms_norm_fwd", "rms_norm_bwd", "rope", "causal_softmax", "causal_softmax_bwd")
#: largest row length the RMSNorm backward keeps in shared memory (its per-block weight-gradient sums)
MAX_NORM_WIDTH = 12 * 1024


def _enabled() -> bool:
    from pymglu.cuda import training

    return training.ENABLED


def supports(*arrays: Any) -> bool:
    """True when the fused kernels serve these arrays: enabled, all CuPy, float32/float16/bfloat16."""
    return _enabled() and all(is_cupy_array(a) for a in arrays) and np.dtype(arrays[0].dtype) in _CUDA_TYPES


def attention_supports(q: Any, k: Any, v: Any) -> bool:
    """True when :func:`attention_forward` serves these: enabled, CuPy, float32/float16/bfloat16."""
    return _enabled() and all(is_cupy_array(a) for a in (q, k, v)) and np.dtype(q.dtype) in _CUDA_TYPES


def _name(kernel: str, dtype: Any) -> str:
    return f"pymglu::{kernel}<{_CUDA_TYPES[np.dtype(dtype)]}>"


def kernel_names() -> list[str]:
    """Every template instance this module can launch (for compile checks)."""
    return [_name(k, dt) for k in _KERNELS for dt in _CUDA_TYPES]


def _function(kernel: str, dtype: Any) -> Any:
    name = _name(kernel, dtype)
    return _cuda.get_function(_SOURCE, name)


def _sms() -> int:
    return _cuda.multiprocessor_count()


def _row_threads(width: int) -> int:
    """Threads of a one-row-per-block kernel: a multiple of 32, at most 1024, about 4 elements each."""
    return int(min(1024, max(32, ((width + 3) // 4 + 31) // 32 * 32)))


def _contiguous(a: Any) -> Any:
    import cupy as cp

    return cp.ascontiguousarray(a)


# ----------------------------------------------------------------------------- RMSNorm
def norm_supports(x: Any, weight: Any) -> bool:
    """True when the fused RMSNorm serves ``x (..., D)``: :func:`supports` and ``1 <= D <=``
    :data:`MAX_NORM_WIDTH`."""
    return supports(x, weight) and 1 <= x.shape[-1] <= MAX_NORM_WIDTH


def rms_norm_forward(x: Any, weight: Any, eps: float) -> tuple[Any, Any]:
    """``y`` ``(..., D)`` in ``x.dtype`` and ``r`` ``(rows,)`` float32, ``r = 1 / sqrt(mean(x^2) + eps)``
    per row. The backward recomputes ``x * r`` from ``x`` and ``r`` instead of storing it."""
    import cupy as cp

    x = _contiguous(x)
    D = x.shape[-1]
    rows = x.size // D if D else 0
    y = cp.empty_like(x)
    r = cp.empty(rows, dtype=np.float32)
    if rows:
        _function("rms_norm_fwd", x.dtype)((min(rows, _sms() * 8),), (_row_threads(D),),
                                          (x, _contiguous(weight), y, r, np.int64(rows), np.int32(D), np.float32(eps)))
    return y, r


def rms_norm_backward(g: Any, x: Any, weight: Any, r: Any, need_x: bool, need_weight: bool) -> tuple[Any, Any]:
    """``dx`` (``x``'s shape and dtype, or ``None``) and ``dweight`` (``(D,)`` in ``weight.dtype``, or
    ``None``) of :func:`rms_norm_forward`. The weight gradient sums each block's rows in float32, then
    the blocks' partial sums."""
    import cupy as cp

    x, g = _contiguous(x), _contiguous(g)
    D = x.shape[-1]
    rows = x.size // D if D else 0
    dx = cp.empty_like(x) if need_x else None
    blocks = max(1, min(rows, _sms() * 4))
    partial = cp.empty((blocks, D), dtype=np.float32)
    if rows:
        _function("rms_norm_bwd", x.dtype)((blocks,), (_row_threads(D),),
                                          (x, _contiguous(weight), r, g, dx if dx is not None else np.uintp(0),
                                           partial, np.int64(rows), np.int32(D)), shared_mem=4 * D)
    else:
        partial.fill(0)
    dw = partial.sum(axis=0).astype(weight.dtype) if need_weight else None
    return dx, dw


# ----------------------------------------------------------------------------- rotary embeddings
_inv_freq_cache: dict[tuple[int, int, float], Any] = {}


def _device_inv_freq(inv_freq: np.ndarray, base: float) -> Any:
    """``inv_freq`` on the current device, uploaded once per (device, length, base)."""
    import cupy as cp

    key = (cp.cuda.Device().id, len(inv_freq), float(base))
    cached = _inv_freq_cache.get(key)
    if cached is None:
        cached = _inv_freq_cache[key] = cp.asarray(np.ascontiguousarray(inv_freq, dtype=np.float64))
    return cached


def rope(x: Any, positions: Any, inv_freq: np.ndarray, base: float, inverse: bool) -> Any:
    """``x`` ``(..., T, Dh)`` rotated pair by pair (``(j, j + Dh/2)``) by ``positions[t] * inv_freq[j]``
    (by its negative when ``inverse``), in ``x.dtype``. ``positions`` ``(T,)`` integer CuPy array,
    ``inv_freq`` ``(Dh/2,)`` float64 NumPy, ``base ** (-2 j / Dh)`` (cached on the device under
    ``base``). The angles are formed and their cosine and sine taken in float64, as the op's expression
    path does, per element instead of once per position."""
    import cupy as cp

    x = _contiguous(x)
    T, Dh = x.shape[-2], x.shape[-1]
    half = Dh // 2
    out = cp.empty_like(x)
    pairs = x.size // 2
    if pairs:
        pos = cp.ascontiguousarray(positions, dtype=np.int64)
        freq = _device_inv_freq(inv_freq, base)
        blocks = min(-(-pairs // 256), _sms() * 16)
        _function("rope", x.dtype)((blocks,), (256,), (x, out, pos, freq, np.int64(pairs), np.int32(T),
                                                      np.int32(half), np.int32(1 if inverse else 0)))
    return out


# ----------------------------------------------------------------------------- causal attention
def attention_forward(q: Any, k: Any, v: Any, scale: float) -> tuple[Any, Any]:
    """``out`` ``(B, H, Tq, Dv)`` in ``q.dtype`` and the probabilities ``P`` ``(B, H, Tq, Tk)`` in
    ``q.dtype`` (kept for the backward).

    ``S = q k^T`` is one batched cuBLAS product (float32 out), the scaled, masked softmax one kernel that
    writes ``P`` in the inputs' dtype, and ``out = P v`` a batched product with float32 accumulation.
    Unlike the expression path, ``P`` of 16-bit inputs is rounded to 16 bits before ``P v`` (as
    flash-attention kernels do), and it is stored in 16 bits.
    """
    import cupy as cp

    from pymglu.cuda.gemm import gemm_batched

    B, H, Tq, Dh = q.shape
    Tk, Dv = k.shape[2], v.shape[3]
    bh = B * H
    q3 = _contiguous(q).reshape(bh, Tq, Dh)
    k3 = _contiguous(k).reshape(bh, Tk, Dh)
    v3 = _contiguous(v).reshape(bh, Tk, Dv)
    s = gemm_batched(q3, k3, cp.empty((bh, Tq, Tk), dtype=float32), trans_b=True)
    p = cp.empty((bh, Tq, Tk), dtype=q.dtype)
    rows = bh * Tq
    if rows and Tk:
        _function("causal_softmax", q.dtype)((min(rows, _sms() * 16),), (_row_threads(Tk),),
                                             (s, p, np.int64(rows), np.int32(Tq), np.int32(Tk), np.float32(scale)))
    del s
    out = gemm_batched(p, v3, cp.empty((bh, Tq, Dv), dtype=q.dtype))
    return out.reshape(B, H, Tq, Dv), p.reshape(B, H, Tq, Tk)


def attention_backward(g: Any, q: Any, k: Any, v: Any, p: Any, scale: float,
                       needs: tuple[bool, bool, bool]) -> tuple[Any, Any, Any]:
    """``dq``, ``dk``, ``dv`` (``None`` where ``needs`` is false) of :func:`attention_forward`, in the
    inputs' dtype: ``dv = P^T dO``, ``dP = dO v^T`` (float32), ``dS = P (dP - rowsum(dP P)) scale`` (one
    kernel, rounded to the inputs' dtype as the operand of the two products), ``dq = dS k``, ``dk = dS^T q``."""
    import cupy as cp

    from pymglu.cuda.gemm import gemm_batched

    B, H, Tq, Dh = q.shape
    Tk, Dv = k.shape[2], v.shape[3]
    bh = B * H
    g3 = _contiguous(g).astype(q.dtype, copy=False).reshape(bh, Tq, Dv)
    p3 = p.reshape(bh, Tq, Tk)
    need_q, need_k, need_v = needs
    dq = dk = dv = None
    if need_v:
        dv = gemm_batched(p3, g3, cp.empty((bh, Tk, Dv), dtype=q.dtype), trans_a=True).reshape(B, H, Tk, Dv)
    if need_q or need_k:
        dp = gemm_batched(g3, _contiguous(v).reshape(bh, Tk, Dv), cp.empty((bh, Tq, Tk), dtype=float32), trans_b=True)
        ds = cp.empty((bh, Tq, Tk), dtype=q.dtype)
        rows = bh * Tq
        if rows and Tk:
            _function("causal_softmax_bwd", q.dtype)((min(rows, _sms() * 16),), (_row_threads(Tk),),
                                                     (p3, dp, ds, np.int64(rows), np.int32(Tk), np.float32(scale)))
        del dp
        if need_q:
            dq = gemm_batched(ds, _contiguous(k).reshape(bh, Tk, Dh), cp.empty((bh, Tq, Dh), dtype=q.dtype))
            dq = dq.reshape(B, H, Tq, Dh)
        if need_k:
            dk = gemm_batched(ds, _contiguous(q).reshape(bh, Tq, Dh), cp.empty((bh, Tk, Dh), dtype=q.dtype),
                              trans_a=True).reshape(B, H, Tk, Dh)
    return dq, dk, dv
