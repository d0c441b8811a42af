"""Matrix product with NumPy ``@`` semantics for operands of 2 or more dims (batched, broadcast).

float16/bfloat16 operands are multiplied in float32 and the result (and each gradient) is cast back to
the operands' dtype, so that a low-precision layer stays in its dtype.
"""
from __future__ import annotations

from typing import Any

from pymglu import _checks
from pymglu.autograd.function import Function
from pymglu.autograd.ops._util import unbroadcast
from pymglu.dtypes import compute_dtype


def _product(a: Any, b: Any) -> Any:
    """``a @ b`` computed in the compute dtype of ``a``'s dtype, returned in ``a``'s dtype."""
    ct = compute_dtype(a.dtype)
    return (a.astype(ct, copy=False) @ b.astype(ct, copy=False)).astype(a.dtype, copy=False)


class MatMul(Function):
    def forward(self, a: Any, b: Any) -> Any:
        _checks.check_min_ndim("a", a, 2)
        _checks.check_min_ndim("b", b, 2)
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(
                f"matmul: a's last dim must equal b's second-to-last, got {_checks.describe(a)} "
                f"and {_checks.describe(b)}"
            )
        _checks.check_same_dtype(("a", "b"), a, b)
        self.a, self.b = a, b
        return _product(a, b)

    def backward(self, g: Any) -> tuple[Any, Any]:
        a, b = self.a, self.b
        g = g.astype(a.dtype, copy=False)
        da = unbroadcast(_product(g, b.swapaxes(-1, -2)), a.shape) if self.needs_input_grad[0] else None
        db = unbroadcast(_product(a.swapaxes(-1, -2), g), b.shape) if self.needs_input_grad[1] else None
        return da, db


def matmul(a: Any, b: Any) -> Any:
    """``a @ b`` for arrays of at least 2 dims: ``(..., m, k) @ (..., k, n) -> (..., m, n)``."""
    return MatMul.apply(a, b)
