"""MGLU and GLU forward and backward on arrays: the reference path for every backend.

Notation (DESIGN.md sections 1-2; the paper swaps the letters ``d`` and ``h``):

* ``x``: ``(..., d)`` activations; ``W``: ``(h, d)`` shared weight (``[out, in]``, like a Linear weight);
* ``masks``: ``(n, h, d)`` bool, ``M_i`` marks the elements of ``W`` that feed the gate of route ``i``,
  or the same masks packed as ``(n, h, ceil(d/32))`` uint32 bit-planes (:mod:`pymglu.masks`);
* ``y = sum_i g(s_i) * (t - s_i)`` with ``t = x W^T`` and ``s_i = x (M_i * W)^T``: ``(..., h)``.

The complement trick gives every value stream as ``t - s_i``, so a pass needs ``n + 1`` products;
the backward pass needs ``n + 1`` for ``dx`` and ``n + 1`` for ``dW`` and the mask-logit gradients
(straight-through estimator), which share ``e_i^T x``. Masked copies of ``W`` are built one at a time.

dtypes: float64 is computed in float64; float32, float16 and bfloat16 (``ml_dtypes``) in float32, with
outputs and ``dx``/``dW`` cast back to the input dtype. Works on NumPy and CuPy arrays alike.

On CuPy arrays of dtype float32, float16 or bfloat16 the same functions run the fused GPU path of
:mod:`pymglu.cuda.training` (cuBLAS products in the input dtype with float32 accumulation, fused
elementwise kernels, the cache stored in the input dtype); ``pymglu.cuda.training.disabled()`` turns
it off. float64 CuPy arrays take the reference path below.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from pymglu import _checks, activations, masks as _masks
from pymglu.backend import get_array_module, unwrap
from pymglu.cuda import training as _gpu
from pymglu.dtypes import FLOAT_DTYPES, compute_dtype

__all__ = ["MGLUCache", "mglu", "mglu_forward", "mglu_backward", "glu", "glu_forward", "glu_backward"]


class MGLUCache:
    """What :func:`mglu_backward` needs from the forward pass, in the compute dtype (on the fused GPU
    path: in the input dtype).

    ``t``: ``(N, h)`` full product ``x W^T``; ``s``: ``(n, N, h)`` gate products; ``N`` = tokens.
    Unpacks like a pair (``t, s = cache``). A backward with ``consume_cache=True`` takes the arrays out
    (:meth:`take`), so that each one is freed as soon as the backward is done with it; the cache is empty
    (``t`` and ``s`` are ``None``) afterwards.
    """

    __slots__ = ("t", "s")

    def __init__(self, t: Any, s: Any) -> None:
        self.t, self.s = t, s

    def __iter__(self) -> Iterator[Any]:
        return iter((self.t, self.s))

    def __repr__(self) -> str:
        if self.consumed:
            return "MGLUCache(consumed)"
        return f"MGLUCache(t={_checks.describe(self.t)}, s={_checks.describe(self.s)})"

    @property
    def consumed(self) -> bool:
        """True once a backward with ``consume_cache=True`` has taken the arrays."""
        return self.t is None

    def take(self) -> list[Any]:
        """``[t, s]``, leaving the cache empty; ``ValueError`` when it was taken already."""
        _check_not_consumed(self)
        arrays = [self.t, self.s]
        self.t = self.s = None
        return arrays


def _check_not_consumed(cache: MGLUCache) -> None:
    if cache.consumed:
        raise ValueError("cache: expected the MGLUCache of a forward pass, got one already consumed by a "
                         "backward with consume_cache=True; run the forward again")


def _check_x_w(x: Any, W: Any, w_name: str = "W") -> None:
    _checks.check_dtype("x", x, FLOAT_DTYPES)
    _checks.check_ndim(w_name, W, 2)
    _checks.check_dtype(w_name, W, FLOAT_DTYPES)
    _checks.check_same_dtype(("x", w_name), x, W)
    _checks.check_min_ndim("x", x, 1)
    if x.shape[-1] != W.shape[1]:
        raise ValueError(
            f"x: expected last dim d = {W.shape[1]} (the input width of {w_name}), got {_checks.describe(x)}"
        )


def _check_chunk_tokens(chunk_tokens: Any) -> None:
    if chunk_tokens is not None:
        _checks.check_positive_int("chunk_tokens", chunk_tokens)


def _bool_masks(masks: Any, W: Any) -> Any:
    """Validate ``masks`` against ``W`` and return them as ``(n, h, d)`` bool."""
    h, d = W.shape
    if masks.dtype == np.uint32:
        _masks.check_packed(masks, None, h, d, name="masks")
        return _masks.unpack_masks(masks, d)
    _checks.check_dtype("masks", masks, (np.bool_,))
    _checks.check_shape("masks", masks, (None, h, d))
    if masks.shape[0] < 1:
        raise ValueError(f"masks: expected n_masks >= 1, got {_checks.describe(masks)}")
    return masks


def _flatten(x: Any, ct: np.dtype) -> Any:
    return x.reshape(-1, x.shape[-1]).astype(ct, copy=False)


def _packed_bits(masks: Any, W: Any) -> Any:
    """Validate ``masks`` against ``W`` and return them as C-contiguous ``(n, h, ceil(d/32))`` bit-planes."""
    h, d = W.shape
    xp = get_array_module(masks)
    if masks.dtype == np.uint32:
        _masks.check_packed(masks, None, h, d, name="masks")
        return xp.ascontiguousarray(masks)
    return _masks.pack_masks(_bool_masks(masks, W))


def _rows(a: Any, width: int, dtype: Any) -> Any:
    """``a`` as a C-contiguous ``(N, width)`` matrix of ``dtype`` (for the fused GPU path)."""
    return get_array_module(a).ascontiguousarray(a.reshape(-1, width).astype(dtype, copy=False))


def mglu_forward(x: Any, W: Any, masks: Any, activation: str = "silu", keep_cache: bool = True,
                 chunk_tokens: int | None = None) -> tuple[Any, MGLUCache | None]:
    """MGLU forward that also returns the cache :func:`mglu_backward` needs.

    Args:
        x: ``(..., d)`` float array. W: ``(h, d)``, same dtype and device as ``x``.
        masks: ``(n, h, d)`` bool, or ``(n, h, ceil(d/32))`` uint32 bit-planes, ``n >= 1``.
        activation: one of :data:`pymglu.activations.ACTIVATIONS`.
        keep_cache: ``False`` returns ``None`` for the cache; the fused GPU path then computes ``y``
            ``chunk_tokens`` rows at a time, so that the ``(n + 1)`` products of all rows are never alive
            at once, and :func:`mglu_backward` recomputes them a chunk at a time. The default chunk
            (``pymglu.cuda.training.default_chunk_tokens``) keeps them within SwiGLU's two per row.
    Returns:
        ``y`` of shape ``(..., h)`` in ``x.dtype``, and an :class:`MGLUCache` (or ``None``).
    """
    x, W, masks = unwrap(x), unwrap(W), unwrap(masks)
    activations.check_activation(activation)
    _check_chunk_tokens(chunk_tokens)
    xp = get_array_module(x, W, masks)
    _check_x_w(x, W)
    out_shape = x.shape[:-1] + (W.shape[0],)
    if _gpu.supports(x, W):
        xf, Wc, bits = _rows(x, W.shape[1], x.dtype), xp.ascontiguousarray(W), _packed_bits(masks, W)
        if not keep_cache:
            return _gpu.mglu_forward_chunked(xf, Wc, bits, activation, chunk_tokens).reshape(out_shape), None
        y, (t, s) = _gpu.mglu_forward(xf, Wc, bits, activation)
        return y.reshape(out_shape), MGLUCache(t, s)
    masks = _bool_masks(masks, W)
    ct = compute_dtype(x.dtype)
    xf = _flatten(x, ct)
    Wc = W.astype(ct, copy=False)
    t = xf @ Wc.T
    s = xp.empty((masks.shape[0],) + t.shape, dtype=ct)
    for i, m in enumerate(masks):  # one masked copy of W at a time
        xp.matmul(xf, (Wc * m).T, out=s[i])
    # y = sum_i g(s_i) * (t - s_i), a plane at a time in two reused buffers
    y, gated, value = xp.zeros_like(t), xp.empty_like(t), xp.empty_like(t)
    for s_i in s:
        activations.forward(s_i, activation, out=gated)
        gated *= xp.subtract(t, s_i, out=value)
        y += gated
    return y.astype(x.dtype, copy=False).reshape(out_shape), MGLUCache(t, s) if keep_cache else None


def mglu(x: Any, W: Any, masks: Any, activation: str = "silu") -> Any:
    """``y = sum_i g(x (M_i*W)^T) * x ((1-M_i)*W)^T``: ``(..., h)`` in ``x.dtype``. See :func:`mglu_forward`."""
    return mglu_forward(x, W, masks, activation)[0]


def mglu_backward(
    dy: Any, x: Any, W: Any, masks: Any, activation: str = "silu", cache: MGLUCache | None = None,
    consume_cache: bool = False, chunk_tokens: int | None = None,
) -> tuple[Any, Any, Any]:
    """Gradients of MGLU with the straight-through estimator for the masks.

    Args:
        dy: ``(..., h)`` upstream gradient. x, W, masks, activation: as in :func:`mglu_forward`.
        cache: the forward's cache; recomputed (``n + 1`` products) when ``None``: on the fused GPU path
            ``chunk_tokens`` rows at a time (see :func:`mglu_forward`'s ``keep_cache``), on the reference
            path at once.
        consume_cache: hand ``cache`` over: the backward takes its arrays out (the cache is empty
            afterwards, see :meth:`MGLUCache.take`), the fused GPU path writes gradients over them and
            drops each one as soon as it is dead, so that its memory is freed then (as long as no other
            reference to ``cache.t`` or ``cache.s`` is kept).
    Returns:
        ``dx`` ``(..., d)`` in ``x.dtype``, ``dW`` ``(h, d)`` in ``W.dtype``, and ``dlogits``
        ``(n, h, d)``: ``dlogits_i = W * (e_i^T x)``, the STE gradient of the mask logits, in the compute
        dtype (float32, or float64 for float64 inputs), except on the fused GPU path, where float16 and
        bfloat16 inputs get them in their own dtype, as ``dW``
        (:func:`pymglu.cuda.training.logit_grad_dtype`; float32 within
        ``pymglu.cuda.training.narrow_logit_grads(False)``).
    """
    dy, x, W, masks = unwrap(dy), unwrap(x), unwrap(W), unwrap(masks)
    activations.check_activation(activation)
    _check_chunk_tokens(chunk_tokens)
    xp = get_array_module(dy, x, W, masks)
    _check_x_w(x, W)
    h = W.shape[0]
    _checks.check_dtype("dy", dy, FLOAT_DTYPES)
    _checks.check_shape("dy", dy, tuple(x.shape[:-1]) + (h,))
    if cache is not None:
        _check_not_consumed(cache)
    if _gpu.supports(x, W):
        bits = _packed_bits(masks, W)
        xf, Wc = _rows(x, W.shape[1], x.dtype), xp.ascontiguousarray(W)
        dyf = _rows(dy, h, x.dtype)
        if cache is not None and cache.t.dtype == x.dtype:
            # The list is emptied by the GPU path, which then holds the only references to t and s.
            arrays = cache.take() if consume_cache else [cache.t, cache.s]
            dx, dW, dlogits = _gpu.mglu_backward(dyf, xf, Wc, bits, activation, arrays,
                                                 consume_cache=consume_cache)
        else:
            if cache is not None and consume_cache:
                cache.take()  # a cache of another dtype (the reference path's) is not used: free it first
            dx, dW, dlogits = _gpu.mglu_backward_recompute(dyf, xf, Wc, bits, activation, chunk_tokens)
        return dx.reshape(x.shape), dW, dlogits
    masks = _bool_masks(masks, W)
    if cache is None:
        cache = mglu_forward(x, W, masks, activation)[1]
    ct = compute_dtype(x.dtype)
    xf = _flatten(x, ct)
    dyf = dy.reshape(-1, h).astype(ct, copy=False)
    Wc = W.astype(ct, copy=False)
    t, s = cache.take() if consume_cache else cache
    # e_i = ds_i - dv_i with dv_i = dy * g(s_i) and ds_i = dy * (t - s_i) * g'(s_i), a plane at a time; a
    # handed-over cache takes e_i in place of s_i
    e = s if consume_cache else xp.empty_like(s)
    dv_sum, a, da = xp.zeros_like(t), xp.empty_like(t), xp.empty_like(t)
    for s_i, e_i in zip(s, e):
        activations.forward_and_derivative(s_i, activation, out=(a, da))
        xp.subtract(t, s_i, out=e_i)
        e_i *= da
        e_i *= dyf
        a *= dyf                                   # dv_i
        e_i -= a
        dv_sum += a
    del s, a, da
    dx = dv_sum @ Wc
    dW = dv_sum.T @ xf
    dlogits = xp.empty(masks.shape, dtype=ct)
    for i, m in enumerate(masks):
        masked = Wc * m
        dx += e[i] @ masked
        g = e[i].T @ xf                            # (h, d), shared by dW and dlogits
        dW += g * m
        dlogits[i] = Wc * g
    return (
        dx.astype(x.dtype, copy=False).reshape(x.shape),
        dW.astype(W.dtype, copy=False),
        dlogits,
    )


def glu_forward(x: Any, W_gate: Any, W_value: Any, activation: str = "silu") -> tuple[Any, tuple[Any, Any]]:
    """GLU forward ``g(x Wg^T) * (x Wv^T)``; returns ``y`` ``(..., h)`` and the cache ``(gate, value)``.

    ``W_gate`` and ``W_value`` are ``(h, d)``, same dtype and device as ``x``.
    """
    x, W_gate, W_value = unwrap(x), unwrap(W_gate), unwrap(W_value)
    activations.check_activation(activation)
    get_array_module(x, W_gate, W_value)
    _check_x_w(x, W_gate, "W_gate")
    _check_x_w(x, W_value, "W_value")
    _checks.check_shape("W_value", W_value, W_gate.shape)
    if _gpu.supports(x, W_gate):
        xp = get_array_module(x)
        y, cache = _gpu.glu_forward(_rows(x, W_gate.shape[1], x.dtype), xp.ascontiguousarray(W_gate),
                                    xp.ascontiguousarray(W_value), activation)
        return y.reshape(x.shape[:-1] + (W_gate.shape[0],)), cache
    ct = compute_dtype(x.dtype)
    xf = _flatten(x, ct)
    gate = xf @ W_gate.astype(ct, copy=False).T
    value = xf @ W_value.astype(ct, copy=False).T
    y = activations.forward(gate, activation)
    y *= value
    return y.astype(x.dtype, copy=False).reshape(x.shape[:-1] + (W_gate.shape[0],)), (gate, value)


def glu(x: Any, W_gate: Any, W_value: Any, activation: str = "silu") -> Any:
    """``g(x Wg^T) * (x Wv^T)``: ``(..., h)`` in ``x.dtype``. See :func:`glu_forward`."""
    return glu_forward(x, W_gate, W_value, activation)[0]


def glu_backward(
    dy: Any, x: Any, W_gate: Any, W_value: Any, activation: str = "silu", cache: tuple[Any, Any] | None = None,
    consume_cache: bool = False,
) -> tuple[Any, Any, Any]:
    """Gradients of GLU: ``dx`` ``(..., d)``, ``dW_gate`` and ``dW_value`` ``(h, d)`` in the input dtypes.

    ``consume_cache`` lets the fused GPU path overwrite ``cache`` with the gate and value gradients.
    """
    dy, x, W_gate, W_value = unwrap(dy), unwrap(x), unwrap(W_gate), unwrap(W_value)
    activations.check_activation(activation)
    get_array_module(dy, x, W_gate, W_value)
    _check_x_w(x, W_gate, "W_gate")
    _check_x_w(x, W_value, "W_value")
    h = W_gate.shape[0]
    _checks.check_dtype("dy", dy, FLOAT_DTYPES)
    _checks.check_shape("dy", dy, tuple(x.shape[:-1]) + (h,))
    if _gpu.supports(x, W_gate):
        xp = get_array_module(x)
        xf = _rows(x, W_gate.shape[1], x.dtype)
        Wg, Wv = xp.ascontiguousarray(W_gate), xp.ascontiguousarray(W_value)
        if cache is None or cache[0].dtype != x.dtype:
            cache, consume_cache = _gpu.glu_forward(xf, Wg, Wv, activation)[1], True
        dx, dWg, dWv = _gpu.glu_backward(_rows(dy, h, x.dtype), xf, Wg, Wv, activation, cache,
                                         consume_cache=consume_cache)
        return dx.reshape(x.shape), dWg, dWv
    if cache is None:
        cache = glu_forward(x, W_gate, W_value, activation)[1]
    gate, value = cache
    ct = compute_dtype(x.dtype)
    xf = _flatten(x, ct)
    dyf = dy.reshape(-1, h).astype(ct, copy=False)
    d_value, d_gate = activations.forward_and_derivative(gate, activation)  # g(gate), g'(gate)
    d_value *= dyf
    d_gate *= value
    d_gate *= dyf
    dx = d_gate @ W_gate.astype(ct, copy=False) + d_value @ W_value.astype(ct, copy=False)
    return (
        dx.astype(x.dtype, copy=False).reshape(x.shape),
        (d_gate.T @ xf).astype(W_gate.dtype, copy=False),
        (d_value.T @ xf).astype(W_value.dtype, copy=False),
    )
