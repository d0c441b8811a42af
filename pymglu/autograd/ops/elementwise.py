"""Elementwise exp and log."""
from __future__ import annotations

from typing import Any

from pymglu import _checks
from pymglu.autograd.function import Function
from pymglu.backend import get_array_module
from pymglu.dtypes import FLOAT_DTYPES, compute_dtype


class Exp(Function):
    def forward(self, x: Any) -> Any:
        _checks.check_dtype("x", x, FLOAT_DTYPES)
        xp = get_array_module(x)
        self.out = xp.exp(x.astype(compute_dtype(x.dtype), copy=False))
        self.dtype = x.dtype
        return self.out.astype(x.dtype, copy=False)

    def backward(self, g: Any) -> tuple[Any]:
        return ((g * self.out).astype(self.dtype, copy=False),)


class Log(Function):
    def forward(self, x: Any) -> Any:
        _checks.check_dtype("x", x, FLOAT_DTYPES)
        xp = get_array_module(x)
        self.x = x.astype(compute_dtype(x.dtype), copy=False)
        self.dtype = x.dtype
        return xp.log(self.x).astype(x.dtype, copy=False)

    def backward(self, g: Any) -> tuple[Any]:
        return ((g / self.x).astype(self.dtype, copy=False),)


def exp(x: Any) -> Any:
    """``e**x`` elementwise: same shape and float dtype as ``x`` (low precision computed in float32)."""
    return Exp.apply(x)


def log(x: Any) -> Any:
    """Natural logarithm elementwise: same shape and float dtype as ``x``; ``log(0) = -inf`` and a
    negative input gives NaN (NumPy emits its usual RuntimeWarning)."""
    return Log.apply(x)
