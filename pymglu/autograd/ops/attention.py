"""Causal scaled-dot-product self-attention as one Function with a hand-written backward."""
from __future__ import annotations

import math
from typing import Any

from pymglu import _checks
from pymglu.autograd.function import Function
from pymglu.autograd.ops._util import real_number
from pymglu.backend import get_array_module
from pymglu.cuda import tape_ops
from pymglu.dtypes import FLOAT_DTYPES, compute_dtype


def causal_mask(xp: Any, t_q: int, t_k: int) -> Any:
    """``(t_q, t_k)`` bool, True where query ``i`` (absolute position ``t_k - t_q + i``) may see key ``j``."""
    offset = t_k - t_q
    return xp.arange(t_k)[None, :] <= (xp.arange(t_q)[:, None] + offset)


class CausalSelfAttention(Function):
    """``out = softmax(mask(q k^T * scale)) v`` per batch and head.

    On CuPy with float32/float16/bfloat16 inputs the products run on cuBLAS (batched, float32
    accumulation) around one softmax kernel per pass, and the probabilities are kept in the inputs' dtype
    (:func:`pymglu.cuda.tape_ops.attention_forward`); elsewhere the expression path below, in float32
    (float64 for float64).

    Backward, with ``P`` the attention probabilities and ``dO`` the upstream gradient::

        dv = P^T dO      dP = dO v^T      dS = P * (dP - rowsum(dP * P))
        dq = dS k * scale                 dk = dS^T q * scale
    """

    def forward(self, q: Any, k: Any, v: Any, scale: Any = None) -> Any:
        for name, a in (("q", q), ("k", k), ("v", v)):
            _checks.check_ndim(name, a, 4)
            _checks.check_dtype(name, a, FLOAT_DTYPES)
        _checks.check_same_dtype(("q", "k"), q, k)
        _checks.check_same_dtype(("q", "v"), q, v)
        B, H, Tq, Dh = q.shape
        _checks.check_shape("k", k, (B, H, None, Dh))
        Tk = k.shape[2]
        _checks.check_shape("v", v, (B, H, Tk, None))
        if Tq > Tk:
            raise ValueError(
                f"q: expected at most as many positions as k ({Tk}), got {_checks.describe(q)}; "
                "queries are the last T_q of the T_k key positions"
            )
        scale = 1.0 / math.sqrt(Dh) if scale is None else real_number("scale", scale)
        xp = get_array_module(q, k, v)
        self.fused = tape_ops.attention_supports(q, k, v)
        if self.fused:  # batched cuBLAS products and one softmax kernel per pass
            out, self.p = tape_ops.attention_forward(q, k, v, scale)
            self.q, self.k, self.v, self.scale, self.dtype = q, k, v, scale, q.dtype
            return out
        ct = compute_dtype(q.dtype)
        qc, kc, vc = (a.astype(ct, copy=False) for a in (q, k, v))
        s = (qc @ kc.swapaxes(-1, -2)) * scale
        s = xp.where(causal_mask(xp, Tq, Tk), s, -xp.inf)
        s = s - s.max(axis=-1, keepdims=True) if Tk else s
        p = xp.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        self.q, self.k, self.v, self.p, self.scale, self.dtype = qc, kc, vc, p, scale, q.dtype
        return (p @ vc).astype(q.dtype, copy=False)

    def backward(self, g: Any) -> tuple[Any, Any, Any]:
        if self.fused:
            return tape_ops.attention_backward(g, self.q, self.k, self.v, self.p, self.scale, self.needs_input_grad)
        p, dt = self.p, self.dtype
        gc = g.astype(p.dtype, copy=False)
        need_q, need_k, need_v = self.needs_input_grad
        dv = (p.swapaxes(-1, -2) @ gc).astype(dt, copy=False) if need_v else None
        dq = dk = None
        if need_q or need_k:
            dp = gc @ self.v.swapaxes(-1, -2)
            ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * self.scale
            dq = (ds @ self.k).astype(dt, copy=False) if need_q else None
            dk = (ds.swapaxes(-1, -2) @ self.q).astype(dt, copy=False) if need_k else None
        return dq, dk, dv


def causal_self_attention(q: Any, k: Any, v: Any, scale: float | None = None) -> Any:
    """Causal softmax attention of every head, in one tape op.

    Args:
        q: ``(B, H, T_q, Dh)`` float Tensor (float64, float32, float16 or bfloat16).
        k: ``(B, H, T_k, Dh)``, ``T_k >= T_q``; v: ``(B, H, T_k, Dv)`` (usually ``Dv = Dh``); same dtype
            and device as ``q``.
        scale: multiplies ``q k^T`` before the softmax; default ``1 / sqrt(Dh)``.
    Returns:
        ``(B, H, T_q, Dv)`` Tensor in ``q``'s dtype; computed in float32 (float64 for float64), with the
        row maximum subtracted before the exponential.

    The queries are the *last* ``T_q`` positions of the ``T_k`` keys: query ``i`` sits at position
    ``T_k - T_q + i`` and attends to keys ``0 .. T_k - T_q + i``. With ``T_q == T_k`` this is ordinary
    causal self-attention; with ``T_q < T_k`` it is a decoding step against a KV cache holding the
    earlier positions (e.g. ``T_q = 1``: the new token sees every cached key and itself).
    """
    return CausalSelfAttention.apply(q, k, v, scale=scale)
