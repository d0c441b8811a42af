"""MGLU and GLU as single tape ops; the math lives in :mod:`pymglu.functional`."""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks, functional, masks as _masks
from pymglu.autograd.function import Function
from pymglu.backend import device_of, is_cupy_array
from pymglu.dtypes import LOW_PRECISION_DTYPES


class MGLU(Function):
    """``y = sum_i g(x (M_i*W)^T) * x ((1-M_i)*W)^T`` with ``M_i = logits_i > 0``.

    The third input is either float mask logits ``(n, h, d)`` (trainable through the straight-through
    estimator) or fixed masks: bool ``(n, h, d)`` or uint32 bit-planes ``(n, h, ceil(d/32))``.
    With ``recompute`` the forward keeps no ``t``/``s_i`` and the backward recomputes them (on the GPU a
    chunk of ``chunk_tokens`` rows at a time): ``n + 1`` more products for ``n + 1`` fewer stored
    activations per token (:func:`pymglu.functional.mglu_forward`).
    On CuPy, logits and bool masks are packed into bit-planes once per call (the fused GPU path reads
    bits), unless the caller passes the bit-planes of the logits as ``packed`` (an MGLU layer passes the
    ones it keeps for its current logits); on NumPy they are thresholded into bool masks.
    """

    def forward(self, x: Any, W: Any, masks_or_logits: Any, activation: str = "silu", recompute: bool = False,
                chunk_tokens: int | None = None, packed: Any = None) -> Any:
        self.is_logits = np.dtype(masks_or_logits.dtype).kind == "f" or masks_or_logits.dtype.name == "bfloat16"
        if packed is not None:
            _check_packed(packed, masks_or_logits)
            masks = packed
            if self.is_logits:
                self.logits_dtype = masks_or_logits.dtype
        elif self.is_logits:
            self.logits_dtype = masks_or_logits.dtype
            masks = _masks.pack_masks(masks_or_logits) if is_cupy_array(masks_or_logits) else masks_or_logits > 0
        else:
            masks = masks_or_logits
        y, cache = functional.mglu_forward(x, W, masks, activation, keep_cache=not recompute,
                                           chunk_tokens=chunk_tokens)
        self.x, self.W, self.masks, self.activation, self.cache = x, W, masks, activation, cache
        self.chunk_tokens = chunk_tokens
        return y

    def backward(self, g: Any) -> tuple[Any, Any, Any]:
        dx, dW, dlogits = functional.mglu_backward(g, self.x, self.W, self.masks, self.activation, self.cache,
                                                   consume_cache=not self.graph_retained,
                                                   chunk_tokens=self.chunk_tokens)
        return dx, dW, _logit_grad(dlogits, self.logits_dtype) if self.is_logits else None


class GLU(Function):
    """``y = g(x Wg^T) * (x Wv^T)``."""

    def forward(self, x: Any, W_gate: Any, W_value: Any, activation: str = "silu") -> Any:
        y, cache = functional.glu_forward(x, W_gate, W_value, activation)
        self.x, self.W_gate, self.W_value, self.activation, self.cache = x, W_gate, W_value, activation, cache
        return y

    def backward(self, g: Any) -> tuple[Any, Any, Any]:
        return functional.glu_backward(g, self.x, self.W_gate, self.W_value, self.activation, self.cache,
                                       consume_cache=not self.graph_retained)


def _logit_grad(dlogits: Any, logits_dtype: Any) -> Any:
    """The logit gradient in the logits' dtype, except that float32 logits take the float16/bfloat16
    gradients of the fused GPU path as they are: the optimizers compute in float32 from either, and a cast
    here would be one more pass over ``n h d`` values (the tape accumulates repeated gradients of a leaf in
    its own dtype, :class:`pymglu.autograd.Tensor`)."""
    if np.dtype(logits_dtype) == np.float32 and dlogits.dtype in LOW_PRECISION_DTYPES:
        return dlogits
    return dlogits.astype(logits_dtype, copy=False)


def _check_packed(packed: Any, masks_or_logits: Any) -> None:
    """``packed`` must be the uint32 bit-planes ``(n, h, ceil(d/32))`` of ``masks_or_logits (n, h, d)``,
    on the same device."""
    shape = tuple(masks_or_logits.shape)
    want = shape[:-1] + (-(-shape[-1] // 32),) if shape else ()
    if (getattr(packed, "dtype", None) != np.uint32 or tuple(packed.shape) != want
            or is_cupy_array(packed) != is_cupy_array(masks_or_logits)
            or (is_cupy_array(packed) and packed.device.id != masks_or_logits.device.id)):
        raise ValueError(
            f"packed: expected uint32 bit-planes of shape {want} on the device of the mask logits "
            f"({device_of(masks_or_logits)}), got {_checks.describe(packed)} on {device_of(packed)}"
        )


def mglu(x: Any, W: Any, masks_or_logits: Any, activation: str = "silu", recompute: bool = False,
         chunk_tokens: int | None = None, packed: Any = None) -> Any:
    """MGLU on Tensors: ``x`` ``(..., d)``, ``W`` ``(h, d)``, mask logits ``(n, h, d)`` (or fixed masks).

    Returns a Tensor of shape ``(..., h)`` in ``x``'s dtype. See :func:`pymglu.functional.mglu`;
    ``recompute`` and ``chunk_tokens``: see :class:`MGLU`. ``packed``: the bit-planes
    ``(n, h, ceil(d/32))`` uint32 of ``masks_or_logits > 0`` when the caller already has them (the
    caller vouches that they match); the gradient still flows to the logits.
    """
    return MGLU.apply(x, W, masks_or_logits, activation=activation, recompute=recompute, chunk_tokens=chunk_tokens,
                      packed=packed)


def glu(x: Any, W_gate: Any, W_value: Any, activation: str = "silu") -> Any:
    """GLU on Tensors: ``g(x Wg^T) * (x Wv^T)``, ``(..., h)``. See :func:`pymglu.functional.glu`."""
    return GLU.apply(x, W_gate, W_value, activation=activation)
