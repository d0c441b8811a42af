"""Helpers shared by the ops: un-broadcasting gradients and reading arrays out of arguments."""
from __future__ import annotations

from typing import Any

from pymglu.backend import get_array_module


def unbroadcast(grad: Any, shape: tuple[int, ...]) -> Any:
    """Sum ``grad`` over the axes that broadcasting added or stretched, giving an array of ``shape``."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)


def shape_of(a: Any) -> tuple[int, ...]:
    """Shape of an array argument; ``()`` for Python scalars."""
    return tuple(getattr(a, "shape", ()))


def as_array_like(a: Any, like: Any) -> Any:
    """``a`` as an array of ``like``'s module (Python scalars stay scalars)."""
    if hasattr(a, "shape"):
        return a
    return get_array_module(like).asarray(a, dtype=like.dtype) if hasattr(like, "dtype") else a


def normalize_axes(name: str, axis: Any, ndim: int) -> tuple[int, ...]:
    """``axis`` (``None``, an int or a sequence of ints) as sorted non-negative axes of an ``ndim``-d array.

    Raises ValueError naming ``name`` for an axis out of range or given twice, TypeError for a non-integer.
    """
    import numpy as np

    if axis is None:
        return tuple(range(ndim))
    items = (axis,) if isinstance(axis, (int, np.integer)) else axis
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"{name}: expected None, an int or a sequence of ints, got {axis!r}") from None
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"{name}: expected None, an int or a sequence of ints, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}: axis {a} is out of range for an array of {ndim} dims")
        out.append(int(a) % ndim if ndim else 0)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: repeated axis in {axis!r}")
    return tuple(sorted(out))


def real_number(name: str, value: Any, **bounds: Any) -> float:
    """:func:`pymglu._checks.check_finite` that also refuses strings (``float("0.5")`` would accept them)."""
    from pymglu import _checks

    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    return _checks.check_finite(name, value, **bounds)
