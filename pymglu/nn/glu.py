"""GLU-family layers: ``y = g(x Wg^T) * (x Wv^T)`` with two separate weights (the baselines)."""
from __future__ import annotations

from typing import Any

from pymglu import _checks, activations
from pymglu.autograd import ops
from pymglu.autograd.tensor import Tensor
from pymglu.dtypes import float32
from pymglu.nn import _init
from pymglu.nn.module import Module, Parameter

__all__ = ["GLU", "SwiGLU", "GeGLU", "ReGLU"]


class GLU(Module):
    """Gated linear unit ``(..., d) -> (..., h)``.

    Args:
        d: input (model) width; h: hidden width (integers >= 1).
        activation: gating function, one of :data:`pymglu.activations.ACTIVATIONS` (``"sigmoid"``: the
            original GLU).
        dtype: parameter dtype; inputs must share it. rng: seed or ``numpy.random.Generator``.

    Parameters ``W_gate`` and ``W_value``, each ``(h, d)``, initialised ``N(0, 1) * d ** -0.5``.
    """

    def __init__(self, d: int, h: int, activation: str = "sigmoid", dtype: Any = float32, rng: Any = None) -> None:
        super().__init__()
        self.d = _checks.check_positive_int("d", d)
        self.h = _checks.check_positive_int("h", h)
        self.activation = activations.check_activation(activation)
        self.dtype = _init.check_float_dtype(dtype)
        gen = _init.resolve_rng(rng)
        self.W_gate = Parameter(_init.normal(gen, (self.h, self.d), self.d ** -0.5, self.dtype))
        self.W_value = Parameter(_init.normal(gen, (self.h, self.d), self.d ** -0.5, self.dtype))

    def forward(self, x: Any) -> Tensor:
        """``x`` ``(..., d)`` -> Tensor ``(..., h)``."""
        x = _init.as_tensor(x)
        _init.check_input("x", x, self.d, self.dtype, "d")
        return ops.glu(x, self.W_gate, self.W_value, activation=self.activation)

    def extra_repr(self) -> str:
        return f"d={self.d}, h={self.h}, activation={self.activation!r}, dtype={self.dtype.name}"


class SwiGLU(GLU):
    """GLU with SiLU gating (see :class:`GLU`)."""

    def __init__(self, d: int, h: int, dtype: Any = float32, rng: Any = None) -> None:
        super().__init__(d, h, activation="silu", dtype=dtype, rng=rng)


class GeGLU(GLU):
    """GLU with GELU gating; ``approximate="none"`` (erf, default) or ``"tanh"`` (see :class:`GLU`)."""

    def __init__(self, d: int, h: int, approximate: str = "none", dtype: Any = float32, rng: Any = None) -> None:
        super().__init__(d, h, activation=_init.check_gelu_approximate(approximate), dtype=dtype, rng=rng)


class ReGLU(GLU):
    """GLU with ReLU gating (see :class:`GLU`)."""

    def __init__(self, d: int, h: int, dtype: Any = float32, rng: Any = None) -> None:
        super().__init__(d, h, activation="relu", dtype=dtype, rng=rng)
