"""RMSNorm as one Function with a hand-written backward."""
from __future__ import annotations

from typing import Any

from pymglu import _checks
from pymglu.autograd.function import Function
from pymglu.autograd.ops._util import real_number
from pymglu.backend import get_array_module
from pymglu.cuda import tape_ops
from pymglu.dtypes import FLOAT_DTYPES, compute_dtype


class RMSNorm(Function):
    """``y = x / sqrt(mean(x^2, -1) + eps) * weight``, computed in float32 (float64 for float64).

    On CuPy (float32, float16, bfloat16) each pass is one kernel (:mod:`pymglu.cuda.tape_ops`).

    Backward, with ``r = (mean(x^2) + eps)^(-1/2)``, ``xhat = x r`` and ``gx = g * weight``::

        dx      = r * (gx - xhat * mean(gx * xhat, -1))
        dweight = sum over leading dims of g * xhat
    """

    def forward(self, x: Any, weight: Any, eps: float = 1e-6) -> Any:
        _checks.check_dtype("x", x, FLOAT_DTYPES)
        _checks.check_min_ndim("x", x, 1)
        _checks.check_dtype("weight", weight, FLOAT_DTYPES)
        _checks.check_shape("weight", weight, (x.shape[-1],))
        _checks.check_same_dtype(("x", "weight"), x, weight)
        eps = real_number("eps", eps, minimum=0.0)
        self.x_dtype, self.w_dtype, self.w_shape = x.dtype, weight.dtype, tuple(weight.shape)
        self.fused = tape_ops.norm_supports(x, weight)
        if self.fused:  # one kernel per pass; keeps x and r, not xhat
            y, self.r = tape_ops.rms_norm_forward(x, weight, eps)
            self.x, self.weight = x, weight
            return y
        xp = get_array_module(x, weight)
        ct = compute_dtype(x.dtype)
        xc = x.astype(ct, copy=False)
        wc = weight.astype(ct, copy=False)
        r = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
        xhat = xc * r
        self.r, self.xhat, self.wc = r, xhat, wc
        return (xhat * wc).astype(x.dtype, copy=False)

    def backward(self, g: Any) -> tuple[Any, Any]:
        if self.fused:
            return tape_ops.rms_norm_backward(g.astype(self.x_dtype, copy=False), self.x, self.weight, self.r,
                                              self.needs_input_grad[0], self.needs_input_grad[1])
        r, xhat = self.r, self.xhat
        gc = g.astype(r.dtype, copy=False)
        dx = dw = None
        if self.needs_input_grad[0]:
            gx = gc * self.wc
            dx = (r * (gx - xhat * (gx * xhat).mean(axis=-1, keepdims=True))).astype(self.x_dtype, copy=False)
        if self.needs_input_grad[1]:
            dw = (gc * xhat).reshape(-1, self.w_shape[0]).sum(axis=0).astype(self.w_dtype, copy=False)
        return dx, dw


def rms_norm(x: Any, weight: Any, eps: float = 1e-6) -> Any:
    """Root-mean-square normalisation over the last axis, scaled by ``weight``.

    Args:
        x: ``(..., D)`` float Tensor (float64, float32, float16 or bfloat16).
        weight: ``(D,)`` Tensor, same dtype and device as ``x``.
        eps: finite number >= 0 added to the mean square.
    Returns:
        ``x / sqrt(mean(x**2, axis=-1) + eps) * weight``: ``(..., D)`` in ``x``'s dtype, computed in float32
        for low-precision inputs and float64 for float64 ones.
    """
    return RMSNorm.apply(x, weight, eps=eps)
