"""Gating functions as tape ops; the math (``g`` and ``g'``) lives in :mod:`pymglu.activations`."""
from __future__ import annotations

from typing import Any

from pymglu import _checks
from pymglu import activations as _act
from pymglu.autograd.function import Function
from pymglu.dtypes import FLOAT_DTYPES, compute_dtype


class Activation(Function):
    """``y = g(x)`` elementwise; backward ``g'(x) * grad``. Computed in float32 (float64 for float64)."""

    def forward(self, x: Any, name: str = "silu") -> Any:
        _act.check_activation(name)
        _checks.check_dtype("x", x, FLOAT_DTYPES)
        self.s = x.astype(compute_dtype(x.dtype), copy=False)
        self.name, self.dtype = name, x.dtype
        return _act.forward(self.s, name).astype(x.dtype, copy=False)

    def backward(self, g: Any) -> tuple[Any]:
        return ((g * _act.derivative(self.s, self.name)).astype(self.dtype, copy=False),)


def activation(x: Any, name: str) -> Any:
    """Apply the gating function ``name`` (one of :data:`pymglu.activations.ACTIVATIONS`) elementwise.

    ``x``: float Tensor of any shape; the result has its shape and dtype.
    """
    return Activation.apply(x, name=name)


def silu(x: Any) -> Any:
    """``x * sigmoid(x)`` elementwise (Swish); same shape and float dtype as ``x``."""
    return Activation.apply(x, name="silu")


def gelu(x: Any) -> Any:
    """Exact (erf-based) GELU ``x * Phi(x)`` elementwise; same shape and float dtype as ``x``."""
    return Activation.apply(x, name="gelu")


def gelu_tanh(x: Any) -> Any:
    """GELU with the tanh approximation, elementwise; same shape and float dtype as ``x``."""
    return Activation.apply(x, name="gelu_tanh")


def relu(x: Any) -> Any:
    """``max(x, 0)`` elementwise (derivative 0 at 0); same shape and float dtype as ``x``."""
    return Activation.apply(x, name="relu")


def sigmoid(x: Any) -> Any:
    """Logistic function ``1 / (1 + exp(-x))`` elementwise; same shape and float dtype as ``x``."""
    return Activation.apply(x, name="sigmoid")
