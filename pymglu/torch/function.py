"""MGLU as a ``torch.autograd.Function`` over pymglu's reference forward and backward, through DLPack.

Shapes (pymglu's letters, see :mod:`pymglu.nn.mglu`): ``x`` ``(..., d)``, ``W`` ``(h, d)``,
``mask_logits`` ``(n, h, d)``, output ``(..., h)``; ``M_i = mask_logits_i > 0``.

The function hands torch's memory to :func:`pymglu.functional.mglu_forward` / ``mglu_backward`` as
NumPy arrays (CPU tensors) or CuPy arrays (CUDA tensors, on torch's current stream), and wraps the
results back as torch tensors; nothing is copied at the boundary. The mask-logit gradient is the
straight-through estimator ``dL/dlogits_i = dL/dM_i`` (DESIGN.md, docs/math.md).

dtypes: ``x`` and ``W`` share one of float64, float32, float16, bfloat16 (float64 is computed in
float64, the rest in float32); ``mask_logits`` is any of them (float32 in the modules), and its
gradient comes back in its dtype.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from pymglu import activations
from pymglu import functional as F
from pymglu.torch import _flash
from pymglu.torch._bridge import as_array, check_same_device, check_tensor, describe, on_torch_stream, to_torch

__all__ = ["MGLUFunction", "mglu"]


class MGLUFunction(torch.autograd.Function):
    """``MGLUFunction.apply(x, W, mask_logits, activation) -> y``; differentiable in all three tensors.

    Use :func:`mglu`, which validates the inputs and picks FlashMGLU for CUDA decode calls. The
    forward keeps ``t = x W^T`` and the ``n`` gate products for the backward pass (``(n + 1) N h``
    values in the compute dtype) and the masks it used; double backward is not supported.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor, mask_logits: torch.Tensor,
                activation: str) -> torch.Tensor:
        with on_torch_stream(x.device):
            xa, Wa = as_array(x, "x"), as_array(W, "W")
            masks = as_array(mask_logits, "mask_logits") > 0
            y, cache = F.mglu_forward(xa, Wa, masks, activation)
            out = to_torch(y, "y")
        ctx.save_for_backward(x, W, mask_logits)
        ctx.pymglu_state = (masks, cache, activation)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, W, mask_logits = ctx.saved_tensors
        masks, cache, activation = ctx.pymglu_state  # kept: backward may run again (retain_graph=True)
        need_x, need_w, need_logits = ctx.needs_input_grad[:3]
        with on_torch_stream(dy.device):
            dx, dW, dlogits = F.mglu_backward(
                as_array(dy.to(x.dtype), "dy"), as_array(x, "x"), as_array(W, "W"), masks, activation, cache
            )
            grads = (
                to_torch(dx, "dx") if need_x else None,
                to_torch(dW, "dW") if need_w else None,
                to_torch(dlogits, "dlogits").to(mask_logits.dtype) if need_logits else None,
            )
        return (*grads, None)


def _check(x: Any, W: Any, mask_logits: Any, activation: str) -> None:
    activations.check_activation(activation)
    check_tensor("x", x)
    check_tensor("W", W)
    check_tensor("mask_logits", mask_logits)
    if W.dtype != x.dtype:
        raise TypeError(f"x and W must share a dtype, got x: {describe(x)} and W: {describe(W)}")
    if W.dim() != 2:
        raise ValueError(f"W: expected a 2-d (h, d) tensor, got {describe(W)}")
    if mask_logits.dim() != 3 or tuple(mask_logits.shape[1:]) != tuple(W.shape) or mask_logits.shape[0] < 1:
        raise ValueError(
            f"mask_logits: expected shape (n_masks >= 1, {W.shape[0]}, {W.shape[1]}) to match W, got "
            f"{describe(mask_logits)}"
        )
    if x.dim() < 1 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"x: expected last dim d = {W.shape[1]} (the input width of W), got {describe(x)}")
    check_same_device({"x": x, "W": W, "mask_logits": mask_logits})


def mglu(x: torch.Tensor, W: torch.Tensor, mask_logits: torch.Tensor, activation: str = "silu", *,
         flash_cache: "_flash.FlashCache | None" = None) -> torch.Tensor:
    """``y = sum_i g(x (M_i*W)^T) * x ((1-M_i)*W)^T`` with ``M_i = mask_logits_i > 0``, on torch tensors.

    Args:
        x: ``(..., d)`` CPU or CUDA tensor, float64/float32/float16/bfloat16. Any strides.
        W: ``(h, d)``, dtype and device of ``x``.
        mask_logits: ``(n, h, d)`` float tensor on the same device (gradients by the straight-through
            estimator).
        activation: ``"silu"``, ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or ``"sigmoid"``.
        flash_cache: a :class:`pymglu.torch._flash.FlashCache` that keeps FlashMGLU's packed weights
            between calls (the modules pass theirs); without it, a FlashMGLU call packs them anew.
    Returns:
        ``(..., h)`` tensor in ``x``'s dtype. With autograd recording (grad mode on and any input
        requiring grad) it comes from :class:`MGLUFunction`; on CUDA without recording, calls of at
        most 16 tokens (float16/bfloat16/float32, at most 16 masks) run the FlashMGLU decode kernel.
    Raises:
        TypeError (dtypes, non-tensors), ValueError (shapes, activation), DeviceMismatchError,
        BufferError (a device other than CPU/CUDA, or CUDA without CuPy).
    """
    _check(x, W, mask_logits, activation)
    recording = torch.is_grad_enabled() and (x.requires_grad or W.requires_grad or mask_logits.requires_grad)
    tokens = math.prod(x.shape[:-1])
    if not recording and _flash.applies(x, int(mask_logits.shape[0]), tokens):
        return _flash.forward(x, W, mask_logits, activation, flash_cache)
    return MGLUFunction.apply(x, W, mask_logits, activation)
