"""Rotary position embeddings (RoPE) as one Function with a hand-written backward.

Pairing convention ("rotate half"): with ``half = Dh / 2``, element ``j`` and element ``j + half`` of the
last axis form pair ``j``, rotated by the angle ``position * base ** (-2 j / Dh)``. The rotation of a pair
``(a, b)`` by ``theta`` is ``(a cos - b sin, a sin + b cos)``; its backward pass rotates the gradient by
``-theta`` (a rotation's transpose is its inverse).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks
from pymglu.autograd.function import Function
from pymglu.autograd.ops._util import real_number
from pymglu.backend import get_array_module, unwrap
from pymglu.cuda import tape_ops
from pymglu.dtypes import FLOAT_DTYPES, compute_dtype


def rope_angles(xp: Any, positions: Any, head_dim: int, base: float, dtype: Any) -> tuple[Any, Any]:
    """``cos`` and ``sin`` of the rotation angles, each ``(T, head_dim / 2)`` in ``dtype``.

    The angles ``positions[t] * base ** (-2 j / head_dim)`` are formed in float64 before the cosine, so
    that large positions keep their precision in float32 models.
    """
    angles = positions.astype(np.float64)[:, None] * xp.asarray(inverse_frequencies(head_dim, base))[None, :]
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


def inverse_frequencies(head_dim: int, base: float) -> np.ndarray:
    """``base ** (-2 j / head_dim)`` for ``j < head_dim / 2``, float64 (NumPy)."""
    return base ** (-np.arange(head_dim // 2, dtype=np.float64) * 2.0 / head_dim)


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    """Rotate every pair ``(x[..., j], x[..., j + half])`` by the angle whose cosine/sine are given."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    out = get_array_module(x).empty_like(x)
    out[..., :half] = a * cos - b * sin
    out[..., half:] = a * sin + b * cos
    return out


class Rope(Function):
    """``y = R(positions) x`` pair by pair; backward ``dx = R(positions)^T dy`` (rotation by ``-theta``)."""

    def forward(self, x: Any, positions: Any, base: float = 10000.0) -> Any:
        _checks.check_dtype("x", x, FLOAT_DTYPES)
        _checks.check_min_ndim("x", x, 2)
        T, Dh = x.shape[-2], x.shape[-1]
        if Dh % 2:
            raise ValueError(f"x: expected an even last dim (pairs of features are rotated), got {_checks.describe(x)}")
        if not hasattr(positions, "dtype") or np.dtype(positions.dtype).kind not in "iu":
            raise TypeError(f"positions: expected an integer array, got {_checks.describe(positions)}")
        _checks.check_shape("positions", positions, (T,))
        base = real_number("base", base, minimum=0.0, strict_min=True)
        xp = get_array_module(x, positions)
        self.dtype = x.dtype
        self.fused = tape_ops.supports(x, positions)
        if self.fused:  # one kernel; the angles are formed per element, nothing is kept but them
            self.positions, self.inv_freq, self.base = positions, inverse_frequencies(Dh, base), base
            return tape_ops.rope(x, positions, self.inv_freq, base, inverse=False)
        ct = compute_dtype(x.dtype)
        self.cos, self.sin = rope_angles(xp, positions, Dh, base, ct)
        return _rotate(x.astype(ct, copy=False), self.cos, self.sin).astype(x.dtype, copy=False)

    def backward(self, g: Any) -> tuple[Any, None]:
        if self.fused:
            return tape_ops.rope(g.astype(self.dtype, copy=False), self.positions, self.inv_freq, self.base,
                                 inverse=True), None
        gc = g.astype(self.cos.dtype, copy=False)
        return _rotate(gc, self.cos, -self.sin).astype(self.dtype, copy=False), None


def rope(x: Any, positions: Any, base: float = 10000.0) -> Any:
    """Rotary position embedding of queries or keys.

    Args:
        x: ``(..., T, Dh)`` float Tensor (float64, float32, float16 or bfloat16), ``Dh`` even; usually
            ``(B, H, T, Dh)`` queries or keys.
        positions: integer array (or list, or integer Tensor) of shape ``(T,)``: the absolute position of
            each of the ``T`` rows (``arange(offset, offset + T)`` when decoding after ``offset`` cached
            tokens); same device as ``x``. Never differentiated.
        base: the frequency base (> 0); pair ``j`` turns by ``position * base ** (-2 j / Dh)``.
    Returns:
        ``(..., T, Dh)`` Tensor in ``x``'s dtype (computed in float32 for low-precision inputs, float64
        for float64). Pairs are ``(j, j + Dh / 2)`` (see the module docstring).
    """
    raw = unwrap(positions)
    if isinstance(raw, (list, tuple, range)):
        raw = get_array_module(unwrap(x)).asarray(list(raw), dtype=np.int64)
    return Rope.apply(x, raw, base=base)
