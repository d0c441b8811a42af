"""Matrix product with NumPy ``@`` semantics for operands of 2 or more dims (batched, broadcast).

float16/bfloat16 operands are multiplied in float32 and the result (and each gradient) is cast back to
the operands' dtype, so that a low-precision layer stays in its dtype. On CuPy, a float32, float16 or
bfloat16 product whose second operand is a matrix (a ``Linear`` layer's ``x @ W^T``, any leading dims of
``x``) runs as one cuBLAS GEMM with float32 accumulation (:func:`pymglu.cuda.gemm.gemm`; 16-bit operands
on the tensor cores): the same products of the same values, summed in float32 and rounded once, without
float32 copies of 16-bit operands; its gradients likewise, the weight gradient as one GEMM over all rows.
Unlike ``cupy.matmul``, that call can be captured in a CUDA graph (:class:`pymglu.models.GraphTrainStep`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks
from pymglu.autograd.function import Function
from pymglu.autograd.ops._util import unbroadcast
from pymglu.backend import is_cupy_array
from pymglu.dtypes import bfloat16, compute_dtype, float16, float32

_GEMM_DTYPES = (np.dtype(float32), np.dtype(float16), np.dtype(bfloat16))


def _product(a: Any, b: Any) -> Any:
    """``a @ b`` computed in the compute dtype of ``a``'s dtype, returned in ``a``'s dtype. A matrix ``b``
    takes every row of ``a (..., m, k)`` in one product (NumPy's ``@`` would run one small product per
    leading index: about twice the time at a Linear layer's shapes)."""
    ct = compute_dtype(a.dtype)
    ac, bc = a.astype(ct, copy=False), b.astype(ct, copy=False)
    if b.ndim == 2 and a.ndim > 2:
        out = (ac.reshape(-1, a.shape[-1]) @ bc).reshape(a.shape[:-1] + (b.shape[1],))
    else:
        out = ac @ bc
    return out.astype(a.dtype, copy=False)


def _weight_grad(a: Any, g: Any) -> Any:
    """``a^T g`` summed over every leading index of ``a (..., m, k)`` and ``g (..., m, n)``: ``(k, n)``, the
    gradient of a matrix ``b`` in ``a @ b``, as one product over all rows."""
    return _product(a.reshape(-1, a.shape[-1]).T, g.reshape(-1, g.shape[-1]))


def _on_cublas(a: Any, b: Any) -> bool:
    """Whether ``a @ b`` takes the :func:`pymglu.cuda.gemm.gemm` path: CuPy, float32/float16/bfloat16,
    ``b`` a matrix."""
    if not (b.ndim == 2 and is_cupy_array(a) and is_cupy_array(b) and np.dtype(a.dtype) in _GEMM_DTYPES):
        return False  # NumPy and float64 calls never import the CUDA path
    from pymglu.cuda import training

    return training.ENABLED


def _operand(m: Any) -> tuple[Any, bool]:
    """``(c, transposed)`` with ``c`` C-contiguous and ``m == (c.T if transposed else c)``; copies only
    when ``m`` is neither C- nor F-contiguous."""
    if m.flags.c_contiguous:
        return m, False
    if m.T.flags.c_contiguous:
        return m.T, True
    import cupy as cp

    return cp.ascontiguousarray(m), False


def _rows(a: Any) -> Any:
    """``a (..., k)`` as a C-contiguous ``(rows, k)`` matrix (a view when ``a`` is C-contiguous)."""
    import cupy as cp

    return cp.ascontiguousarray(a).reshape(-1, a.shape[-1])


def _gemm_product(a: Any, b: Any) -> Any:
    """``a (..., m, k) @ b (k, n)`` on cuBLAS, in ``a``'s dtype."""
    import cupy as cp

    from pymglu.cuda.gemm import gemm

    if a.ndim == 2:
        A, ta = _operand(a)
    else:
        A, ta = _rows(a), False
    B, tb = _operand(b)
    out = cp.empty(a.shape[:-1] + (b.shape[1],), dtype=a.dtype)
    gemm(A, B, out.reshape(-1, b.shape[1]), trans_a=ta, trans_b=tb)
    return out


def _gemm_grads(a: Any, b: Any, g: Any, need_a: bool, need_b: bool) -> tuple[Any, Any]:
    """``g @ b^T`` (shape of ``a``) and ``a^T g`` summed over every leading dim (shape of ``b``)."""
    import cupy as cp

    from pymglu.cuda.gemm import gemm

    G = _rows(g)
    da = db = None
    if need_a:
        B, tb = _operand(b)
        da = cp.empty(a.shape, dtype=a.dtype)
        gemm(G, B, da.reshape(-1, a.shape[-1]), trans_b=not tb)
    if need_b:
        if a.ndim == 2:
            A, ta = _operand(a)
        else:
            A, ta = _rows(a), False
        B, tb = _operand(b)
        if tb:  # b = B^T (a weight used transposed): write g^T a in B's layout and return its transpose
            dB = cp.empty(B.shape, dtype=b.dtype)
            gemm(G, A, dB, trans_a=True, trans_b=ta)
            db = dB.T
        else:  # a^T g, with a = A or A^T
            db = cp.empty(b.shape, dtype=b.dtype)
            gemm(A, G, db, trans_a=not ta)
    return da, db


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
        if _on_cublas(a, b):
            return _gemm_product(a, b)
        return _product(a, b)

    def backward(self, g: Any) -> tuple[Any, Any]:
        a, b = self.a, self.b
        g = g.astype(a.dtype, copy=False)
        if _on_cublas(a, b):
            return _gemm_grads(a, b, g, self.needs_input_grad[0], self.needs_input_grad[1])
        da = unbroadcast(_product(g, b.swapaxes(-1, -2)), a.shape) if self.needs_input_grad[0] else None
        db = None
        if self.needs_input_grad[1]:
            db = (_weight_grad(a, g) if b.ndim == 2 and a.ndim > 2
                  else unbroadcast(_product(a.swapaxes(-1, -2), g), b.shape))
        return da, db


def matmul(a: Any, b: Any) -> Any:
    """``a @ b`` for arrays of at least 2 dims: ``(..., m, k) @ (..., k, n) -> (..., m, n)``."""
    return MatMul.apply(a, b)
