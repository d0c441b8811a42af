"""The fused GPU training path of MGLU and GLU: cuBLAS products plus the kernels of ``mglu_train.cu``.

:mod:`pymglu.functional` calls these functions for CuPy arrays of dtype float32, float16 or bfloat16
(when :data:`ENABLED`); they compute what its reference path computes, with these differences, which
are the point of the path:

* the products run on cuBLAS in the input dtype (tensor cores for float16/bfloat16) with float32
  accumulation; ``t``, ``s_i`` (and GLU's gate and value) are stored in the input dtype, as PyTorch
  stores a SwiGLU's activations; the elementwise math is float32 in fused kernels;
* ``dx`` and ``dW`` are accumulated over the ``n + 1`` products in float32 buffers and rounded once;
  the mask-logit gradients of float16/bfloat16 inputs are computed in float32 and stored in the input
  dtype (:data:`NARROW_LOGIT_GRADS`), not in float32;
* the mask enters as bit-planes ``(n, h, ceil(d/32))`` uint32; the masked weights ``M_i * W`` are built
  by one kernel into a reused buffer, two at a time from one read of ``W`` when ``n > 2``
  (:data:`MASKED_AT_ONCE`), else one at a time (never ``n`` masked copies at once); on an sm_90 GPU the
  forward's masked products and the backward's ``dx`` (all ``n + 1`` products in one accumulator) run in
  :mod:`pymglu.cuda.masked_gemm` instead, which applies the mask inside the product and builds no copy,
  where :func:`pymglu.cuda.masked_gemm.usable` and :func:`~pymglu.cuda.masked_gemm.usable_dx` allow it;
* the backward may overwrite the forward cache in place (``consume_cache=True``): ``e_i`` replaces
  ``s_i`` and ``sum_i dv_i`` replaces ``t``, instead of being allocated next to them, and when the cache
  is handed over as a list it drops ``t`` before the ``G_i`` are allocated and ``s`` before the
  weight-gradient pass, so that the pool can reuse their memory;
* to trade products for memory, :func:`mglu_forward_chunked` keeps no cache and
  :func:`mglu_backward_recompute` recomputes it a chunk of tokens at a time (``4(n + 1)`` products per
  step instead of ``3(n + 1)``; by default chunks small enough that their ``(n + 1)`` activations per
  row take no more than SwiGLU's cache of two per row).

Per pass that is ``n + 1`` products in the forward, ``n + 1`` for ``dx`` and ``n + 1`` for ``dW`` and the
mask-logit gradients (which share ``e_i^T x``), i.e. ``3(n + 1)`` against SwiGLU's 6.
Shapes: ``x`` ``(N, d)``, ``W`` ``(h, d)``, ``bits`` ``(n, h, ceil(d/32))``, ``y`` ``(N, h)``.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any

import numpy as np

from pymglu import _checks
from pymglu import cuda as _cuda
from pymglu.backend import is_cupy_array
from pymglu.cuda import masked_gemm
from pymglu.cuda.gemm import gemm, gemm_batched
from pymglu.dtypes import float32

__all__ = [
    "ENABLED", "NARROW_LOGIT_GRADS", "disabled", "narrow_logit_grads", "logit_grad_dtype", "supports",
    "kernel_names", "apply_mask",
    "mglu_forward", "mglu_backward", "mglu_forward_chunked", "mglu_backward_recompute", "default_chunk_tokens",
    "glu_forward", "glu_backward",
]

#: Whether :mod:`pymglu.functional` uses this path for CuPy float32/float16/bfloat16 arrays (and the
#: ``MatMul`` tape op its cuBLAS products for float16/bfloat16 ones).
ENABLED = True

_SOURCE = "mglu_train.cu"
_CUDA_TYPES = _cuda.CUDA_TYPE_NAMES
_ACTIVATION_CODES = _cuda.ACTIVATION_CODES
_KERNELS = ("apply_mask", "mglu_epilogue_fwd", "mglu_epilogue_bwd", "mglu_weight_grads", "narrow_float32",
            "glu_epilogue_fwd", "glu_epilogue_bwd")
_THREADS = 256
#: the n products G_i = e_i^T x in one strided-batched cuBLAS call (else one call each); a switch for the
#: benchmark's comparison of the two (benchmarks/train_layer.py --unbatched-too)
_BATCHED_LOGIT_PRODUCTS = True

#: Whether the backward of float16/bfloat16 inputs writes the ``G_i = e_i^T x`` products and the mask-logit
#: gradients ``W * G_i`` in the input dtype, as ``dW`` is (float32 accumulation inside the products), instead
#: of float32: half the bytes of the products' outputs and of the weight-gradient pass, and half the memory
#: of the logit gradients (docs/train_layer_history.md, "Stop 35"). :func:`narrow_logit_grads` switches it.
NARROW_LOGIT_GRADS = True


def disabled() -> contextlib.AbstractContextManager:
    """Within the block, :mod:`pymglu.functional` runs its reference path on CuPy arrays too."""
    return _cuda.switched_off(sys.modules[__name__])


def narrow_logit_grads(on: bool = True) -> contextlib.AbstractContextManager:
    """Within the block, :data:`NARROW_LOGIT_GRADS` is ``on``; the previous value comes back afterwards."""
    return _cuda.switched(sys.modules[__name__], "NARROW_LOGIT_GRADS", bool(on))


def logit_grad_dtype(dtype: Any) -> np.dtype:
    """The dtype of the mask-logit gradients of this path for inputs of ``dtype``: ``dtype`` itself for
    float16/bfloat16 while :data:`NARROW_LOGIT_GRADS` is on, else float32."""
    return np.dtype(dtype) if NARROW_LOGIT_GRADS else float32


def supports(*arrays: Any) -> bool:
    """True when this path serves these arrays: enabled, all CuPy, dtype float32/float16/bfloat16."""
    return ENABLED and all(is_cupy_array(a) for a in arrays) and np.dtype(arrays[0].dtype) in _CUDA_TYPES


def _wide_vec(dtype: np.dtype) -> int:
    """Elements of ``dtype`` in 16 bytes."""
    return 16 // np.dtype(dtype).itemsize


def _name(kernel: str, dtype: Any, vec: int) -> str:
    return f"pymglu::{kernel}<{_CUDA_TYPES[np.dtype(dtype)]}, {vec}>"


def kernel_names() -> list[str]:
    """Every template instance this module can launch (for compile checks)."""
    names = []
    for dt in _CUDA_TYPES:
        for kernel in _KERNELS:
            if kernel == "mglu_weight_grads":
                for g_dtype in dict.fromkeys((float32, np.dtype(dt))):
                    names += [_weight_grads_name(dt, g_dtype, v) for v in _weight_grads_vecs(g_dtype)]
                continue
            vecs = (4, 1) if kernel == "narrow_float32" else (_wide_vec(dt), 1)
            names += [_name(kernel, dt, v) for v in vecs]
        names += [_flat_mask_name(dt, _wide_vec(dt), c) for c in _FLAT_MASK_COUNTS]
    return names


#: plane counts of the ``apply_mask_flat`` instances (``d % 32 == 0``; other counts take ``apply_mask``)
_FLAT_MASK_COUNTS = (1, 2)


def _flat_mask_name(dtype: Any, vec: int, count: int) -> str:
    return f"pymglu::apply_mask_flat<{_CUDA_TYPES[np.dtype(dtype)]}, {vec}, {count}>"


def _weight_grads_name(dtype: Any, g_dtype: Any, vec: int) -> str:
    return (f"pymglu::mglu_weight_grads<{_CUDA_TYPES[np.dtype(dtype)]}, {_CUDA_TYPES[np.dtype(g_dtype)]}, "
            f"{vec}>")


def _weight_grads_vecs(g_dtype: Any) -> tuple[int, int]:
    """Vector widths of the weight-gradient pass: 16 bytes of the logit gradients (at most 8 elements, so
    that a chunk stays inside one mask word), else one element."""
    return (min(_wide_vec(g_dtype), 8), 1)


def _launch(kernel: str, dtype: Any, vec: int, work_items: int, args: tuple, name: str | None = None) -> None:
    if work_items == 0:
        return
    fn = _cuda.get_function(_SOURCE, name or _name(kernel, dtype, vec))
    sms = _cuda.multiprocessor_count()
    blocks = min(-(-work_items // _THREADS), sms * 16)
    fn((blocks,), (_THREADS,), args)


def _i32(v: int) -> np.int32:
    return np.int32(v)


def _elementwise_vec(dtype: Any, length: int) -> int:
    wide = _wide_vec(dtype)
    return wide if length % wide == 0 else 1


def _check_contiguous(name: str, a: Any) -> None:
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array, got {_checks.describe(a)} with strides {a.strides}")


def apply_mask(W: Any, bits: Any, out: Any) -> Any:
    """``out = M * W`` for one bit-plane ``bits`` ``(h, ceil(d/32))`` uint32 into ``out`` ``(h, d)``, or
    ``out[p] = M_p * W`` for ``k`` planes ``(k, h, ceil(d/32))`` into ``(k, h, d)``, reading ``W`` once;
    ``W`` ``(h, d)`` and ``out`` of one dtype (float32, float16 or bfloat16), all three C-contiguous
    CuPy arrays. Bad arguments raise ``ValueError``/``TypeError`` naming the argument, before any launch."""
    _checks.check_ndim("W", W, 2)
    _checks.check_dtype("W", W, _CUDA_TYPES)
    h, d = W.shape
    _checks.check_ndim("bits", bits, (2, 3))
    _checks.check_dtype("bits", bits, (np.uint32,))
    count = 1 if bits.ndim == 2 else bits.shape[0]
    lead = () if bits.ndim == 2 else (count,)
    _checks.check_shape("bits", bits, lead + (h, -(-d // 32)))
    _checks.check_shape("out", out, lead + (h, d))
    _checks.check_same_dtype(("W", "out"), W, out)
    for name, a in (("W", W), ("bits", bits), ("out", out)):
        _check_contiguous(name, a)
    return _apply_mask(W, bits, out)


def _apply_mask(W: Any, bits: Any, out: Any) -> Any:
    """:func:`apply_mask` without its checks, for this module's own calls: ``out`` is made here, ``W`` and
    ``bits`` passed :func:`_check_weight_and_bits` at the entry."""
    h, d = W.shape
    count = 1 if bits.ndim == 2 else bits.shape[0]
    vec = _wide_vec(W.dtype) if d % _wide_vec(W.dtype) == 0 else 1
    if d % 32 == 0 and count in _FLAT_MASK_COUNTS:  # rows are whole mask words: no division per chunk
        _launch("apply_mask_flat", W.dtype, vec, h * (d // vec), (W, bits, out, np.int64(h * d)),
                name=_flat_mask_name(W.dtype, vec, count))
    else:
        _launch("apply_mask", W.dtype, vec, h * (d // vec),
                (W, bits, out, _i32(count), _i32(h), _i32(d), _i32(bits.shape[-1])))
    return out


def narrow(src: Any, dtype: Any) -> Any:
    """``src`` (float32, C-contiguous) rounded to ``dtype`` (float32, float16 or bfloat16) in a new array
    (``src`` itself when ``dtype`` is float32): one vectorised pass, as the backward rounds its float32
    ``dx`` accumulator."""
    _checks.check_dtype("src", src, (float32,))
    _check_contiguous("src", src)
    if np.dtype(dtype) not in _CUDA_TYPES:
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {np.dtype(dtype)}")
    return _narrow(src, dtype)


def _narrow(src: Any, dtype: Any) -> Any:
    """:func:`narrow` without its checks, for this module's own float32 accumulators."""
    if np.dtype(dtype) == float32:
        return src
    import cupy as cp

    out = cp.empty(src.shape, dtype=dtype)
    vec = 4 if src.size % 4 == 0 else 1
    _launch("narrow_float32", dtype, vec, src.size // vec, (src, out, np.int64(src.size)))
    return out


#: Masked weights built per pass over ``W`` when a layer has more than two masks: at most this many
#: masked copies of ``W`` are alive at once (never ``n``), and ``apply_mask`` reads ``W`` once for them.
MASKED_AT_ONCE = 2


def _masked_groups(n: int) -> list[slice]:
    """The masks whose weights one ``apply_mask`` call builds together (one at a time for ``n <= 2``)."""
    size = MASKED_AT_ONCE if n > MASKED_AT_ONCE else 1
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _masked_buffer(W: Any, n: int) -> Any:
    import cupy as cp

    size = MASKED_AT_ONCE if n > MASKED_AT_ONCE else 1
    return cp.empty((size,) + W.shape, dtype=W.dtype)


def _check_weight_and_bits(W: Any, bits: Any) -> None:
    """What the masked-weight kernel needs of ``W`` and ``bits`` (once per layer call, not per launch)."""
    _checks.check_ndim("W", W, 2)
    _checks.check_dtype("W", W, _CUDA_TYPES)
    _checks.check_dtype("bits", bits, (np.uint32,))
    _checks.check_shape("bits", bits, (None, W.shape[0], -(-W.shape[1] // 32)))
    for name, a in (("W", W), ("bits", bits)):
        _check_contiguous(name, a)


def mglu_forward(x: Any, W: Any, bits: Any, activation: str) -> tuple[Any, tuple[Any, Any]]:
    """``y`` ``(N, h)`` in ``x.dtype`` and the cache ``(t (N, h), s (n, N, h))`` in ``x.dtype``.

    ``x`` ``(N, d)`` and ``W`` ``(h, d)`` C-contiguous, same dtype; ``bits`` ``(n, h, ceil(d/32))`` uint32.
    """
    _check_weight_and_bits(W, bits)
    import cupy as cp

    N = x.shape[0]
    h = W.shape[0]
    n = bits.shape[0]
    t = gemm(x, W, cp.empty((N, h), dtype=x.dtype), trans_b=True)
    s = cp.empty((n, N, h), dtype=x.dtype)
    if masked_gemm.usable(x, W, bits[0], s[0]):
        for i in range(n):  # the mask applied inside the product: no masked copy of W
            masked_gemm.launch_unchecked(x, W, bits[i], s[i])
    else:
        masked = _masked_buffer(W, n)
        for group in _masked_groups(n):
            built = _apply_mask(W, bits[group], masked[: group.stop - group.start])
            for j, i in enumerate(range(group.start, group.stop)):
                gemm(x, built[j], s[i], trans_b=True)
        del masked, built
    y = cp.empty((N, h), dtype=x.dtype)
    nh = N * h
    vec = _elementwise_vec(x.dtype, nh)
    _launch("mglu_epilogue_fwd", x.dtype, vec, nh // vec,
            (t, s, y, _i32(n), np.int64(nh), _i32(_ACTIVATION_CODES[activation])))
    return y, (t, s)


def mglu_backward(dy: Any, x: Any, W: Any, bits: Any, activation: str, cache: tuple[Any, Any] | list[Any],
                  consume_cache: bool = False) -> tuple[Any, Any, Any]:
    """``dx`` ``(N, d)`` in ``x.dtype``, ``dW`` ``(h, d)`` in ``W.dtype``, ``dlogits`` ``(n, h, d)`` in
    :func:`logit_grad_dtype` of ``x.dtype``.

    ``dy`` ``(N, h)`` C-contiguous in ``x.dtype``; ``cache`` ``(t, s)`` from :func:`mglu_forward`. With
    ``consume_cache`` the gradients ``e_i`` overwrite ``s`` (the cache cannot be used again); a ``cache``
    given as a list ``[t, s]`` is also emptied, and ``t`` and ``s`` are then dropped as soon as they are
    dead, which frees them if the caller keeps no other reference.
    """
    dx, dW_acc, dlogits = _backward_products(dy, x, W, bits, activation, cache, consume_cache,
                                             logit_dtype=logit_grad_dtype(x.dtype))
    return dx, _weight_grads(W, bits, dW_acc, dlogits), dlogits


def default_chunk_tokens(n_rows: int, n_masks: int) -> int:
    """Rows per chunk of :func:`mglu_forward_chunked` and :func:`mglu_backward_recompute` when none is
    given: the fewest chunks whose ``(n + 1)`` activations per row fit in SwiGLU's two per row over all
    rows, i.e. ``ceil(n_rows / ceil((n + 1) / 2))`` (one chunk for ``n = 1``)."""
    chunks = -(-(n_masks + 1) // 2)
    return max(1, -(-n_rows // chunks))


def mglu_forward_chunked(x: Any, W: Any, bits: Any, activation: str, chunk_tokens: int | None = None) -> Any:
    """``y`` ``(N, h)`` of :func:`mglu_forward` without its cache, ``chunk_tokens`` rows at a time, so that
    at most ``(n + 1) * chunk_tokens * h`` activations are alive (default :func:`default_chunk_tokens`)."""
    import cupy as cp

    y = cp.empty((x.shape[0], W.shape[0]), dtype=x.dtype)
    for rows in _token_chunks(x.shape[0], bits.shape[0], chunk_tokens):
        y[rows] = mglu_forward(x[rows], W, bits, activation)[0]
    return y


def mglu_backward_recompute(dy: Any, x: Any, W: Any, bits: Any, activation: str,
                            chunk_tokens: int | None = None) -> tuple[Any, Any, Any]:
    """:func:`mglu_backward` without a cache: ``t`` and ``s_i`` are recomputed ``chunk_tokens`` rows at a
    time (``n + 1`` more products per pass), and the weight and logit gradients of the chunks are summed
    in place (``dW`` in float32, the ``G_i`` in :func:`logit_grad_dtype`: each chunk's product adds into
    them in float32 and rounds once), so at most ``(n + 1) * chunk_tokens * h`` activations are alive."""
    import cupy as cp

    dx = cp.empty(x.shape, dtype=x.dtype)
    dW_acc = dlogits = None
    for rows in _token_chunks(x.shape[0], bits.shape[0], chunk_tokens):
        cache = list(mglu_forward(x[rows], W, bits, activation)[1])
        dx[rows], dW_acc, dlogits = _backward_products(dy[rows], x[rows], W, bits, activation, cache, True,
                                                       dW_acc, dlogits, logit_grad_dtype(x.dtype))
    return dx, _weight_grads(W, bits, dW_acc, dlogits), dlogits


def _token_chunks(n_rows: int, n_masks: int, chunk_tokens: int | None) -> list[slice]:
    step = (default_chunk_tokens(n_rows, n_masks) if chunk_tokens is None
            else _checks.check_positive_int("chunk_tokens", chunk_tokens))
    return [slice(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


def _backward_products(dy: Any, x: Any, W: Any, bits: Any, activation: str, cache: tuple[Any, Any] | list[Any],
                       consume_cache: bool, dW_acc: Any = None, G: Any = None,
                       logit_dtype: Any = float32) -> tuple[Any, Any, Any]:
    """The products of the backward for the rows of ``x``: ``dx`` (in ``x.dtype``), ``dW_acc =
    (sum_i dv_i)^T x`` ``(h, d)`` float32 and ``G_i = e_i^T x`` ``(n, h, d)`` in ``logit_dtype``, allocated
    after ``dx``'s float32 buffer is freed, or added into the given ``dW_acc`` and ``G``. A consumed ``cache`` list is
    emptied: ``t`` (then holding ``sum_i dv_i``) is dropped before ``G`` is allocated, ``s`` (then
    holding the ``e_i``) after the last product."""
    _check_weight_and_bits(W, bits)
    import cupy as cp

    t, s = cache
    if consume_cache and isinstance(cache, list):
        cache.clear()
    N, d = x.shape
    h = W.shape[0]
    n = bits.shape[0]
    nh = N * h
    e = s if consume_cache else cp.empty_like(s)
    # t is read before dv_sum is written at each element, so dv_sum may take t's place.
    dv_sum = t if consume_cache else cp.empty((N, h), dtype=x.dtype)
    vec = _elementwise_vec(x.dtype, nh)
    _launch("mglu_epilogue_bwd", x.dtype, vec, nh // vec,
            (dy, t, s, e, dv_sum, _i32(n), np.int64(nh), _i32(_ACTIVATION_CODES[activation])))

    # dx = (sum_i dv_i) W + sum_i e_i (M_i * W), accumulated in float32 and rounded once.
    if masked_gemm.usable_dx(dv_sum, e, W):  # one kernel, the masks on W^T's fragments, no masked copy
        bits_t = masked_gemm.transpose_bits(bits, cp.empty((n, d, -(-h // 32)), dtype=np.uint32))
        dx = masked_gemm.launch_dx_unchecked(dv_sum, e, W, bits_t, cp.empty((N, d), dtype=x.dtype))
        del bits_t
    else:
        dx = _dx_by_cublas(dv_sum, e, W, bits)  # before the weight gradients: its float32 buffer is freed

    accumulate = dW_acc is not None
    if not accumulate:
        dW_acc = cp.empty((h, d), dtype=float32)
    gemm(dv_sum, x, dW_acc, trans_a=True, accumulate=accumulate)
    del dv_sum, t  # with a handed-over cache, the pool reuses t's memory for G
    if not accumulate:
        G = cp.empty((n, h, d), dtype=logit_dtype)
    if _BATCHED_LOGIT_PRODUCTS:  # one strided-batched call, x shared: fewer partial waves than n calls
        gemm_batched(e, x, G, trans_a=True, accumulate=accumulate)
    else:
        for i in range(n):
            gemm(e[i], x, G[i], trans_a=True, accumulate=accumulate)
    return dx, dW_acc, G


def _dx_by_cublas(dv_sum: Any, e: Any, W: Any, bits: Any) -> Any:
    """``dx = dv_sum W + sum_i e_i (M_i * W)`` ``(N, d)`` in ``dv_sum.dtype`` on cuBLAS: the ``n + 1``
    products accumulated in a float32 buffer, the masked weights built :data:`MASKED_AT_ONCE` at a time,
    one rounding at the end (the float32 buffer is free on return). ``dv_sum`` ``(N, h)``, ``e``
    ``(n, N, h)``, ``W`` ``(h, d)`` and ``bits`` ``(n, h, ceil(d/32))`` as checked by the callers."""
    import cupy as cp

    n = bits.shape[0]
    dx = gemm(dv_sum, W, cp.empty((dv_sum.shape[0], W.shape[1]), dtype=float32))
    masked = _masked_buffer(W, n)
    for group in _masked_groups(n):
        built = _apply_mask(W, bits[group], masked[: group.stop - group.start])
        for j, i in enumerate(range(group.start, group.stop)):
            gemm(e[i], built[j], dx, accumulate=True)
    del masked, built
    return _narrow(dx, dv_sum.dtype)


def _weight_grads(W: Any, bits: Any, dW_acc: Any, G: Any) -> Any:
    """``dW = dW_acc + sum_i M_i * G_i`` (returned in ``W.dtype``) and ``G_i <- W * G_i`` in place (the
    logit gradients, in ``G.dtype``: float32 or ``W.dtype``): one pass over all planes."""
    import cupy as cp

    h, d = W.shape
    dW = dW_acc if W.dtype == float32 else cp.empty_like(W)
    wvec = next(v for v in _weight_grads_vecs(G.dtype) if d % v == 0)
    _launch("mglu_weight_grads", W.dtype, wvec, h * (d // wvec),
            (G, W, bits, dW_acc, dW, _i32(bits.shape[0]), _i32(h), _i32(d), _i32(bits.shape[-1])),
            name=_weight_grads_name(W.dtype, G.dtype, wvec))
    return dW


def glu_forward(x: Any, W_gate: Any, W_value: Any, activation: str) -> tuple[Any, tuple[Any, Any]]:
    """``y`` ``(N, h)`` and the cache ``(gate, value)``, each ``(N, h)``, all in ``x.dtype``."""
    import cupy as cp

    N = x.shape[0]
    h = W_gate.shape[0]
    gate = gemm(x, W_gate, cp.empty((N, h), dtype=x.dtype), trans_b=True)
    value = gemm(x, W_value, cp.empty((N, h), dtype=x.dtype), trans_b=True)
    y = cp.empty((N, h), dtype=x.dtype)
    nh = N * h
    vec = _elementwise_vec(x.dtype, nh)
    _launch("glu_epilogue_fwd", x.dtype, vec, nh // vec,
            (gate, value, y, np.int64(nh), _i32(_ACTIVATION_CODES[activation])))
    return y, (gate, value)


def glu_backward(dy: Any, x: Any, W_gate: Any, W_value: Any, activation: str, cache: tuple[Any, Any],
                 consume_cache: bool = False) -> tuple[Any, Any, Any]:
    """``dx`` ``(N, d)``, ``dW_gate`` and ``dW_value`` ``(h, d)``, in the input dtypes."""
    import cupy as cp

    gate, value = cache
    N, d = x.shape
    nh = gate.size
    d_gate = gate if consume_cache else cp.empty_like(gate)
    d_value = value if consume_cache else cp.empty_like(value)
    vec = _elementwise_vec(x.dtype, nh)
    _launch("glu_epilogue_bwd", x.dtype, vec, nh // vec,
            (dy, gate, value, d_gate, d_value, np.int64(nh), _i32(_ACTIVATION_CODES[activation])))
    dx = gemm(d_gate, W_gate, cp.empty((N, d), dtype=float32))
    gemm(d_value, W_value, dx, accumulate=True)
    dW_gate = gemm(d_gate, x, cp.empty_like(W_gate), trans_a=True)
    dW_value = gemm(d_value, x, cp.empty_like(W_value), trans_a=True)
    return _narrow(dx, x.dtype), dW_gate, dW_value
