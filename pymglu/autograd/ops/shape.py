"""Shape ops: reshape, transpose, indexing (getitem) and concatenation."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pymglu import _checks
from pymglu.autograd.function import Function
from pymglu.backend import get_array_module, unwrap
from pymglu.dtypes import compute_dtype, is_float


class Reshape(Function):
    def forward(self, x: Any, shape: tuple[int, ...] = ()) -> Any:
        self.shape = tuple(x.shape)
        try:
            return x.reshape(shape)
        except (ValueError, TypeError) as e:
            raise ValueError(f"shape: cannot reshape {_checks.describe(x)} into {shape!r} ({e})") from None

    def backward(self, g: Any) -> tuple[Any]:
        return (g.reshape(self.shape),)


class Transpose(Function):
    def forward(self, x: Any, axes: Any = None) -> Any:
        if axes is None:
            axes = tuple(reversed(range(x.ndim)))
        else:
            axes = tuple(axes)
            nd = x.ndim
            ints = all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes)
            if not ints or any(not -nd <= a < nd for a in axes) or sorted(int(a) % nd for a in axes) != list(
                range(nd)
            ):
                raise ValueError(f"axes: expected a permutation of the {nd} axes of {_checks.describe(x)}, got {axes!r}")
            axes = tuple(int(a) % nd for a in axes)
        self.inverse = tuple(int(i) for i in np.argsort(axes))
        return x.transpose(axes)

    def backward(self, g: Any) -> tuple[Any]:
        return (g.transpose(self.inverse),)


def _is_basic(index: tuple[Any, ...]) -> bool:
    """True when ``index`` holds only ints, slices, None and Ellipsis (a view, each element at most once)."""
    return all(
        (isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)))
        or i is None or i is Ellipsis or isinstance(i, slice)
        for i in index
    )


def _as_tuple(index: Any) -> tuple[Any, ...]:
    index = index if isinstance(index, tuple) else (index,)
    return tuple(unwrap(i) for i in index)


def _lists_to_arrays(xp: Any, index: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(xp.asarray(i) if isinstance(i, list) else i for i in index)


class GetItem(Function):
    def forward(self, x: Any, index: Any = ()) -> Any:
        index = _as_tuple(index)
        xp = get_array_module(x, *[i for i in index if hasattr(i, "shape")])
        index = _lists_to_arrays(xp, index)
        for i in index:
            if hasattr(i, "dtype") and np.dtype(i.dtype).kind not in "iub":
                raise IndexError(f"index: arrays used as indices must be integer or bool, got {_checks.describe(i)}")
        try:
            out = x[index]
        except IndexError as e:
            raise IndexError(f"index: {e} (indexing {_checks.describe(x)})") from None
        self.index, self.shape, self.dtype = index, tuple(x.shape), x.dtype
        self.basic = _is_basic(index)
        return out

    def backward(self, g: Any) -> tuple[Any]:
        xp = get_array_module(g)
        if self.basic:  # every element of x is selected at most once: plain assignment
            gx = xp.zeros(self.shape, dtype=self.dtype)
            gx[self.index] = g
            return (gx,)
        # integer or bool arrays may select an element several times: scatter-add
        ct = compute_dtype(self.dtype) if is_float(self.dtype) else self.dtype
        gx = xp.zeros(self.shape, dtype=ct)
        index = self.index
        if xp is not np:  # cupy's ufunc.at wants integer arrays, not bool masks
            index = _bool_to_int(xp, index)
        xp.add.at(gx, index, g.astype(ct, copy=False))
        return (gx.astype(self.dtype, copy=False),)


def _bool_to_int(xp: Any, index: tuple[Any, ...]) -> tuple[Any, ...]:
    out: list[Any] = []
    for i in index:
        if hasattr(i, "dtype") and i.dtype == np.bool_:
            out.extend(xp.nonzero(i))
        else:
            out.append(i)
    return tuple(out)


class Concat(Function):
    def forward(self, *arrays: Any, axis: int = 0) -> Any:
        if not arrays:
            raise ValueError("tensors: expected at least one tensor to concatenate, got none")
        first = arrays[0]
        for k, a in enumerate(arrays):
            if not hasattr(a, "shape"):
                raise TypeError(f"tensors[{k}]: expected a Tensor or array, got {_checks.describe(a)}")
        nd = first.ndim
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not (nd and -nd <= axis < nd):
            raise ValueError(f"axis: expected an int in [-{nd}, {nd}) for {_checks.describe(first)}, got {axis!r}")
        axis = int(axis) % nd
        for k, a in enumerate(arrays[1:], start=1):
            want = tuple(None if i == axis else n for i, n in enumerate(first.shape))
            _checks.check_shape(f"tensors[{k}]", a, want)
            _checks.check_same_dtype(("tensors[0]", f"tensors[{k}]"), first, a)
        xp = get_array_module(*arrays)
        self.axis = axis
        self.bounds = np.cumsum([a.shape[axis] for a in arrays])[:-1].tolist()
        return xp.concatenate(arrays, axis=axis)

    def backward(self, g: Any) -> tuple[Any, ...]:
        xp = get_array_module(g)
        return tuple(xp.split(g, self.bounds, axis=self.axis))


def reshape(x: Any, shape: Any) -> Any:
    """``x`` with a new shape (one entry may be ``-1``); same dtype, same number of elements."""
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    return Reshape.apply(x, shape=tuple(shape))


def transpose(x: Any, axes: Any = None) -> Any:
    """Permute the axes of ``x``: ``axes`` is a permutation of ``range(x.ndim)`` (negatives allowed), or
    ``None`` to reverse them. Same dtype; shape permuted accordingly."""
    return Transpose.apply(x, axes=axes)


def getitem(x: Any, index: Any) -> Any:
    """``x[index]`` with NumPy semantics: ints, slices, ``None``, ``Ellipsis``, and integer or bool arrays
    (or Tensors, or lists) for advanced indexing. Same dtype as ``x``.

    The backward pass scatter-adds (``add.at``) for advanced indices, so an element selected several
    times receives the sum of its gradients; index arrays must live on ``x``'s device.
    """
    return GetItem.apply(x, index=index)


def concat(tensors: Sequence[Any], axis: int = 0) -> Any:
    """Concatenate Tensors along ``axis``.

    All inputs share a dtype, a device, a number of dims, and every size except along ``axis``; the
    result has the sum of their sizes along ``axis``. Gradients are split back into the inputs' shapes.
    """
    if isinstance(tensors, (str, bytes)) or not hasattr(tensors, "__len__"):
        raise TypeError(f"tensors: expected a sequence of Tensors, got {type(tensors).__name__}")
    return Concat.apply(*tensors, axis=axis)
