"""FlashMGLU (:mod:`pymglu.cuda.flash_mglu`) for CUDA torch tensors: decode calls without autograd.

The kernel reads ``W`` and the masks in its own inference format (``pack_weights``), built from
``W`` and the bit-planes of ``mask_logits > 0``. :class:`FlashCache` keeps that format between calls
and rebuilds it when ``W`` or ``mask_logits`` changed: its key is each tensor's storage address and
torch's version counter (``Tensor._version``, bumped by every in-place write: optimizer steps,
``copy_``, ``load_state_dict``), so checking it costs nothing per call.
"""
from __future__ import annotations

from typing import Any

import torch

from pymglu import masks as _masks
from pymglu.backend import gpu_available
from pymglu.torch._bridge import as_array, on_torch_stream, to_torch

__all__ = ["FLASH_DTYPES", "MAX_TOKENS", "MAX_MASKS", "FlashCache", "applies", "forward"]

FLASH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TOKENS = 16  # pymglu.cuda.flash_mglu.MAX_TOKENS, without importing it on CPU-only machines
MAX_MASKS = 16   # pymglu.cuda.flash_mglu.MAX_MASKS


def applies(x: torch.Tensor, n_masks: int, tokens: int) -> bool:
    """Whether a call without autograd on ``x`` goes to FlashMGLU: CUDA, 1 to 16 tokens, a kernel
    dtype, at most 16 masks, and CuPy with a usable GPU."""
    return (x.device.type == "cuda" and x.dtype in FLASH_DTYPES and 1 <= tokens <= MAX_TOKENS
            and n_masks <= MAX_MASKS and gpu_available())


def _key(W: torch.Tensor, mask_logits: torch.Tensor) -> tuple[Any, ...] | None:
    """What identifies the packed weights, or ``None`` when it cannot be known (inference tensors,
    created under ``torch.inference_mode()``, have no version counter: then every call repacks)."""
    try:
        versions = (W._version, mask_logits._version)
    except RuntimeError:
        return None
    return (W.device, W.dtype, W.data_ptr(), tuple(W.shape), mask_logits.data_ptr(), tuple(mask_logits.shape),
            versions)


class FlashCache:
    """FlashMGLU's packed weights for one ``(W, mask_logits)`` pair, rebuilt when either changes."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.weights: Any = None

    def get(self, W: torch.Tensor, mask_logits: torch.Tensor) -> Any:
        """The ``FlashMGLUWeights`` of ``W`` and ``mask_logits > 0`` (call inside :func:`on_torch_stream`)."""
        key = _key(W, mask_logits)
        if key is None or self.weights is None or key != self.key:
            self.weights = pack(W, mask_logits)
            self.key = key
        return self.weights

    def clear(self) -> None:
        self.key = None
        self.weights = None


def pack(W: torch.Tensor, mask_logits: torch.Tensor) -> Any:
    """Build FlashMGLU's inference format from CUDA tensors ``W`` ``(h, d)`` and ``mask_logits``
    ``(n, h, d)`` (call inside :func:`on_torch_stream`)."""
    from pymglu.cuda import flash_mglu as fm

    planes = _masks.pack_masks(as_array(mask_logits, "mask_logits") > 0)
    return fm.pack_weights(as_array(W, "W"), planes)


def forward(x: torch.Tensor, W: torch.Tensor, mask_logits: torch.Tensor, activation: str,
            cache: FlashCache | None) -> torch.Tensor:
    """FlashMGLU on torch's current stream: ``(..., d)`` -> ``(..., h)`` in ``x``'s dtype, no graph."""
    from pymglu.cuda import flash_mglu as fm

    with on_torch_stream(x.device):
        weights = cache.get(W, mask_logits) if cache is not None else pack(W, mask_logits)
        y = fm.flash_mglu(as_array(x, "x"), weights, None, activation)
        return to_torch(y, "y")
