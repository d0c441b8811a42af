"""``Embedding``: a ``(V, D)`` table looked up by integer ids."""
from __future__ import annotations

from typing import Any

from pymglu import _checks
from pymglu.autograd import ops
from pymglu.autograd.tensor import Tensor
from pymglu.dtypes import float32
from pymglu.nn import _init
from pymglu.nn.module import Module, Parameter

__all__ = ["Embedding"]


class Embedding(Module):
    """Token embedding.

    Args:
        V: vocabulary size; D: embedding width (integers >= 1).
        dtype: table dtype (float64, float32, float16 or bfloat16).
        init_std: standard deviation of the ``N(0, init_std^2)`` initialisation (finite, > 0).
        rng: seed or ``numpy.random.Generator``.

    Parameter ``weight`` ``(V, D)``. ``forward(ids)`` maps integer ids ``(...)`` (values in ``[0, V)``)
    to ``(..., D)`` in the table's dtype.
    """

    def __init__(self, V: int, D: int, dtype: Any = float32, init_std: float = 1.0, rng: Any = None) -> None:
        super().__init__()
        self.V = _checks.check_positive_int("V", V)
        self.D = _checks.check_positive_int("D", D)
        self.dtype = _init.check_float_dtype(dtype)
        std = _checks.check_finite("init_std", init_std, minimum=0.0, strict_min=True)
        self.weight = Parameter(_init.normal(_init.resolve_rng(rng), (self.V, self.D), std, self.dtype))

    def forward(self, ids: Any) -> Tensor:
        """Integer ids ``(...)`` -> Tensor ``(..., D)``."""
        return ops.embedding(self.weight, ids)

    def extra_repr(self) -> str:
        return f"V={self.V}, D={self.D}, dtype={self.dtype.name}"
