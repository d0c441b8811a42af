"""Reductions: sum and mean over any set of axes."""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu.autograd.function import Function
from pymglu.autograd.ops._util import normalize_axes
from pymglu.backend import get_array_module
from pymglu.dtypes import compute_dtype, is_float


def _reduce(x: Any, axes: tuple[int, ...], keepdims: bool, mean: bool) -> Any:
    if not is_float(x.dtype):
        return x.mean(axis=axes, keepdims=keepdims) if mean else x.sum(axis=axes, keepdims=keepdims)
    ct = compute_dtype(x.dtype)
    xc = x.astype(ct, copy=False)
    out = xc.mean(axis=axes, keepdims=keepdims) if mean else xc.sum(axis=axes, keepdims=keepdims)
    return get_array_module(x).asarray(out).astype(x.dtype, copy=False)


class _Reduce(Function):
    mean = False

    def forward(self, x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        self.axes = normalize_axes("axis", axis, x.ndim)
        self.shape, self.dtype = tuple(x.shape), x.dtype
        self.count = int(np.prod([x.shape[a] for a in self.axes], dtype=np.int64))
        return _reduce(x, self.axes, bool(keepdims), self.mean)

    def backward(self, g: Any) -> tuple[Any]:
        xp = get_array_module(g)
        kept = tuple(1 if i in self.axes else n for i, n in enumerate(self.shape))
        g = g.reshape(kept)
        if self.mean:
            g = g / max(self.count, 1)
        return (xp.broadcast_to(g, self.shape).astype(self.dtype, copy=True),)


class Sum(_Reduce):
    mean = False


class Mean(_Reduce):
    mean = True


def sum(x: Any, axis: Any = None, keepdims: bool = False) -> Any:  # noqa: A001 - mirrors numpy
    """Sum over ``axis`` (``None``: every axis; an int; or a tuple of ints, negatives allowed).

    ``x``: Tensor of any shape. Returns a Tensor of ``x``'s dtype, shape ``x.shape`` without the reduced
    axes (kept as size 1 with ``keepdims=True``). Low-precision floats are summed in float32.
    """
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """Mean over ``axis``; shapes, dtypes and accumulation as in :func:`sum`."""
    return Mean.apply(x, axis=axis, keepdims=keepdims)
