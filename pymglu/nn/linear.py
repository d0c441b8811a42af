"""``Linear``: ``y = x W^T (+ b)``."""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks
from pymglu.autograd import ops
from pymglu.autograd.tensor import Tensor
from pymglu.dtypes import float32
from pymglu.nn import _init
from pymglu.nn.module import Module, Parameter

__all__ = ["Linear"]


class Linear(Module):
    """Affine map ``(..., d_in) -> (..., d_out)``.

    Args:
        d_in, d_out: input and output widths (integers >= 1).
        bias: add a learned bias ``(d_out,)`` (zeros at start).
        dtype: parameter dtype (float64, float32, float16 or bfloat16); inputs must share it.
        rng: seed or ``numpy.random.Generator`` for the initialisation.

    Parameters: ``weight`` ``(d_out, d_in)`` (the ``[out, in]`` layout), initialised
    ``N(0, 1) * d_in ** -0.5``; ``bias`` ``(d_out,)`` when ``bias=True``. Created on the CPU.
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = False, dtype: Any = float32, rng: Any = None) -> None:
        super().__init__()
        self.d_in = _checks.check_positive_int("d_in", d_in)
        self.d_out = _checks.check_positive_int("d_out", d_out)
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {bias!r}")
        self.dtype = _init.check_float_dtype(dtype)
        gen = _init.resolve_rng(rng)
        self.weight = Parameter(_init.normal(gen, (self.d_out, self.d_in), self.d_in ** -0.5, self.dtype))
        if bias:
            self.bias = Parameter(np.zeros(self.d_out, dtype=self.dtype))

    def forward(self, x: Any) -> Tensor:
        """``x`` ``(..., d_in)`` in the layer's dtype -> Tensor ``(..., d_out)``."""
        x = _init.as_tensor(x)
        _init.check_input("x", x, self.d_in, self.dtype, "d_in")
        flat = x.reshape(1, self.d_in) if x.ndim == 1 else x
        y = ops.matmul(flat, ops.transpose(self.weight))
        if "bias" in self._parameters:
            y = ops.add(y, self._parameters["bias"])
        return y.reshape(self.d_out) if x.ndim == 1 else y

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, bias={'bias' in self._parameters}, dtype={self.dtype.name}"
