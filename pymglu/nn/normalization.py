"""``RMSNorm``: root-mean-square normalisation over the last axis with a learned scale."""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks
from pymglu.autograd import ops
from pymglu.autograd.tensor import Tensor
from pymglu.dtypes import float32
from pymglu.nn import _init
from pymglu.nn.module import Module, Parameter

__all__ = ["RMSNorm"]


class RMSNorm(Module):
    """``y = x / sqrt(mean(x^2, -1) + eps) * weight``.

    Args:
        D: normalised width (integer >= 1). eps: finite number >= 0.
        dtype: parameter dtype; inputs ``(..., D)`` must share it.

    Parameter ``weight`` ``(D,)``, ones at start.
    """

    def __init__(self, D: int, eps: float = 1e-6, dtype: Any = float32) -> None:
        super().__init__()
        self.D = _checks.check_positive_int("D", D)
        self.eps = _checks.check_finite("eps", eps, minimum=0.0)
        self.dtype = _init.check_float_dtype(dtype)
        self.weight = Parameter(np.ones(self.D, dtype=self.dtype), decay=False)

    def forward(self, x: Any) -> Tensor:
        """``x`` ``(..., D)`` -> Tensor ``(..., D)`` in the same dtype."""
        x = _init.as_tensor(x)
        _init.check_input("x", x, self.D, self.dtype, "D")
        return ops.rms_norm(x, self.weight, eps=self.eps)

    def extra_repr(self) -> str:
        return f"D={self.D}, eps={self.eps}, dtype={self.dtype.name}"
