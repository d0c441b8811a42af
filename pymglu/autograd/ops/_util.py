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
