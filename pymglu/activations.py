"""Gating functions ``g`` and their derivatives ``g'``, on any array module (NumPy or CuPy).

Names: ``"silu"`` (Swish, SwiGLU/SwiMGLU), ``"gelu"`` (exact, erf-based), ``"gelu_tanh"`` (tanh
approximation), ``"relu"``, ``"sigmoid"`` (the original GLU/MGLU). Inputs are float32 or float64 arrays;
results keep their dtype.
"""
from __future__ import annotations

import math
from typing import Any

from pymglu.backend import get_array_module

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "sigmoid")

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_K = math.sqrt(2.0 / math.pi)
_TANH_C = 0.044715


def check_activation(name: Any) -> str:
    """Return ``name`` if it names a gating function, else raise a ValueError listing the choices."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")
    return name


def _erf(xp: Any, z: Any) -> Any:
    if xp.__name__ == "numpy":
        from scipy.special import erf
    else:
        from cupyx.scipy.special import erf
    return erf(z)


def sigmoid(s: Any) -> Any:
    """Logistic function, written through tanh so that it never overflows."""
    xp = get_array_module(s)
    return 0.5 * (1.0 + xp.tanh(0.5 * s))


def forward(s: Any, name: str) -> Any:
    """``g(s)`` for the gating function ``name``."""
    xp = get_array_module(s)
    if name == "silu":
        return s * sigmoid(s)
    if name == "gelu":
        return 0.5 * s * (1.0 + _erf(xp, s * _SQRT_HALF))
    if name == "gelu_tanh":
        return 0.5 * s * (1.0 + xp.tanh(_TANH_K * (s + _TANH_C * s * s * s)))
    if name == "relu":
        return xp.maximum(s, 0)
    if name == "sigmoid":
        return sigmoid(s)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def derivative(s: Any, name: str) -> Any:
    """``g'(s)`` for the gating function ``name`` (ReLU: 0 at s = 0)."""
    xp = get_array_module(s)
    if name == "silu":
        sig = sigmoid(s)
        return sig * (1.0 + s * (1.0 - sig))
    if name == "gelu":
        return 0.5 * (1.0 + _erf(xp, s * _SQRT_HALF)) + s * _INV_SQRT_2PI * xp.exp(-0.5 * s * s)
    if name == "gelu_tanh":
        th = xp.tanh(_TANH_K * (s + _TANH_C * s * s * s))
        return 0.5 * (1.0 + th) + 0.5 * s * (1.0 - th * th) * _TANH_K * (1.0 + 3.0 * _TANH_C * s * s)
    if name == "relu":
        return (s > 0).astype(s.dtype)
    if name == "sigmoid":
        sig = sigmoid(s)
        return sig * (1.0 - sig)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def forward_and_derivative(s: Any, name: str) -> tuple[Any, Any]:
    """``(g(s), g'(s))`` in one pass, sharing the sigmoid, erf or tanh that both need."""
    xp = get_array_module(s)
    if name == "silu":
        sig = sigmoid(s)
        return s * sig, sig * (1.0 + s * (1.0 - sig))
    if name == "sigmoid":
        sig = sigmoid(s)
        return sig, sig * (1.0 - sig)
    if name == "gelu":
        cdf = 0.5 * (1.0 + _erf(xp, s * _SQRT_HALF))
        return s * cdf, cdf + s * _INV_SQRT_2PI * xp.exp(-0.5 * s * s)
    if name == "gelu_tanh":
        th = xp.tanh(_TANH_K * (s + _TANH_C * s * s * s))
        return (0.5 * s * (1.0 + th),
                0.5 * (1.0 + th) + 0.5 * s * (1.0 - th * th) * _TANH_K * (1.0 + 3.0 * _TANH_C * s * s))
    return forward(s, name), derivative(s, name)
