"""MGLU layers as ``torch.nn.Module``s: ``(..., d) -> (..., h)``, trained by torch, computed by pymglu.

Parameters (the names and shapes of :mod:`pymglu.nn.mglu`, so state dicts carry over key for key):

* ``W`` ``(h, d)`` in the layer's dtype, initialised ``N(0, 1) * d ** -0.5``;
* ``mask_logits`` ``(n_masks, h, d)`` float32 whatever the layer's dtype, initialised
  ``0.01 * N(0, 1)`` (the paper's choice); the masks are ``mask_logits > 0`` and the logits learn
  through the straight-through estimator. Leave them out of weight decay (decay pulls every logit to
  0, where the masks flip at random): give the optimizer ``[{"params": decayed}, {"params":
  [m.mask_logits ...], "weight_decay": 0.0}]``.

Forward: :func:`pymglu.torch.function.mglu` (the autograd Function, or FlashMGLU for CUDA decode calls
without autograd, with the packed weights cached per layer).
"""
from __future__ import annotations

from typing import Any

import torch

from pymglu import _checks, activations
from pymglu.torch._bridge import FLOAT_DTYPES
from pymglu.torch._flash import FlashCache
from pymglu.torch.function import mglu

__all__ = ["MGLU", "SwiMGLU", "GeMGLU", "ReMGLU"]

_GELU = {"none": "gelu", "tanh": "gelu_tanh"}


class MGLU(torch.nn.Module):
    """Masked gated linear unit ``y = sum_i g(x (M_i*W)^T) * x ((1-M_i)*W)^T``, ``M_i = mask_logits_i > 0``.

    Args:
        d: input (model) width; h: hidden width; n_masks: number of masks (integers >= 1).
        activation: gating function, one of :data:`pymglu.activations.ACTIVATIONS`.
        device: where the parameters live (``"cpu"`` or a CUDA device).
        dtype: dtype of ``W`` and of the inputs: torch.float64/float32/float16/bfloat16 (default
            ``torch.get_default_dtype()``); ``mask_logits`` is always float32.
        generator: optional ``torch.Generator`` for the initialisation.
    """

    def __init__(self, d: int, h: int, n_masks: int = 1, activation: str = "sigmoid", *,
                 device: Any = None, dtype: torch.dtype | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.d = _checks.check_positive_int("d", d)
        self.h = _checks.check_positive_int("h", h)
        self.n_masks = _checks.check_positive_int("n_masks", n_masks)
        self.activation = activations.check_activation(activation)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype!r}")
        self.W = torch.nn.Parameter(torch.empty(self.h, self.d, device=device, dtype=dtype))
        self.mask_logits = torch.nn.Parameter(
            torch.empty(self.n_masks, self.h, self.d, device=device, dtype=torch.float32)
        )
        self.flash_cache = FlashCache()
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``W ~ N(0, 1/d)``, ``mask_logits ~ 0.01 * N(0, 1)``."""
        with torch.no_grad():
            self.W.normal_(0.0, self.d ** -0.5, generator=generator)
            self.mask_logits.normal_(0.0, 0.01, generator=generator)
        self.flash_cache.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., d)`` in the layer's dtype, on its device -> ``(..., h)``."""
        return mglu(x, self.W, self.mask_logits, self.activation, flash_cache=self.flash_cache)

    def masks(self) -> torch.Tensor:
        """The current boolean masks ``(n_masks, h, d)``."""
        return self.mask_logits.detach() > 0

    def extra_repr(self) -> str:
        return (f"d={self.d}, h={self.h}, n_masks={self.n_masks}, activation={self.activation!r}, "
                f"dtype={self.W.dtype}")


class SwiMGLU(MGLU):
    """MGLU with SiLU (Swish) gating, the drop-in for SwiGLU (see :class:`MGLU`)."""

    def __init__(self, d: int, h: int, n_masks: int = 1, **kwargs: Any) -> None:
        super().__init__(d, h, n_masks, activation="silu", **kwargs)


class GeMGLU(MGLU):
    """MGLU with GELU gating; ``approximate="none"`` (erf, default) or ``"tanh"`` (see :class:`MGLU`)."""

    def __init__(self, d: int, h: int, n_masks: int = 1, approximate: str = "none", **kwargs: Any) -> None:
        if approximate not in _GELU:
            raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
        super().__init__(d, h, n_masks, activation=_GELU[approximate], **kwargs)


class ReMGLU(MGLU):
    """MGLU with ReLU gating (see :class:`MGLU`)."""

    def __init__(self, d: int, h: int, n_masks: int = 1, **kwargs: Any) -> None:
        super().__init__(d, h, n_masks, activation="relu", **kwargs)
