"""Argument validation shared by the public API: errors name the argument, what was expected, what came."""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from pymglu import dtypes as _dtypes


def describe(a: Any) -> str:
    """Short text for an array argument: ``float32 array of shape (2, 3) on cpu``."""
    from pymglu.backend import device_of, tensor_data

    a = tensor_data(a)
    if not hasattr(a, "shape"):
        return f"{type(a).__name__} {a!r}"
    if hasattr(a, "__dlpack__") and not hasattr(a, "flags"):  # another library's array: no conversion here
        return f"{type(a).__module__.split('.')[0]} {type(a).__name__} of shape {tuple(a.shape)}, dtype {a.dtype}"
    return f"{_dtypes.name(a.dtype)} array of shape {tuple(a.shape)} on {device_of(a)}"


def check_ndim(name: str, a: Any, ndim: int | Iterable[int]) -> None:
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if not hasattr(a, "shape") or a.ndim not in allowed:
        want = " or ".join(str(n) for n in allowed)
        raise ValueError(f"{name}: expected a {want}-d array, got {describe(a)}")


def check_min_ndim(name: str, a: Any, ndim: int) -> None:
    if not hasattr(a, "shape") or a.ndim < ndim:
        raise ValueError(f"{name}: expected an array with at least {ndim} dims, got {describe(a)}")


def check_shape(name: str, a: Any, shape: tuple[int | None, ...]) -> None:
    """``None`` in ``shape`` matches any size."""
    ok = hasattr(a, "shape") and len(a.shape) == len(shape) and all(
        want is None or want == got for want, got in zip(shape, a.shape)
    )
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {describe(a)}")


def check_dtype(name: str, a: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(np.dtype(d) for d in allowed)
    if not hasattr(a, "dtype") or np.dtype(a.dtype) not in allowed:
        want = ", ".join(_dtypes.name(d) for d in allowed)
        raise TypeError(f"{name}: expected dtype in ({want}), got {describe(a)}")


def check_same_dtype(names: tuple[str, str], a: Any, b: Any) -> None:
    if np.dtype(a.dtype) != np.dtype(b.dtype):
        raise TypeError(
            f"{names[0]} and {names[1]} must share a dtype, got {describe(a)} and {describe(b)}"
        )


def integers_below(dtype: Any, size: int) -> bool:
    """Whether every value an integer ``dtype`` can hold lies in ``[0, size)``.

    Index checks use it to skip reading the values, which on a GPU would wait for the device: ``uint8``
    ids can never leave a table of 256 rows.
    """
    info = np.iinfo(np.dtype(dtype))
    return info.min >= 0 and info.max < size


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_finite(name: str, value: Any, minimum: float | None = None, maximum: float | None = None,
                 strict_min: bool = False) -> float:
    """A finite real number, optionally bounded; returns it as a float."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a real number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if minimum is not None and (f < minimum or (strict_min and f == minimum)):
        op = ">" if strict_min else ">="
        raise ValueError(f"{name}: expected a number {op} {minimum}, got {value!r}")
    if maximum is not None and f > maximum:
        raise ValueError(f"{name}: expected a number <= {maximum}, got {value!r}")
    return f
