"""Argument checks and weight initialisation shared by the layers (internal)."""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks, dtypes as _dtypes
from pymglu.autograd.tensor import Tensor


def check_float_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """``dtype`` as a NumPy dtype, which must be float64, float32, float16 or bfloat16."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt not in _dtypes.FLOAT_DTYPES:
        allowed = ", ".join(_dtypes.name(d) for d in _dtypes.FLOAT_DTYPES)
        raise TypeError(f"{name}: expected one of ({allowed}), got {dtype!r}")
    return dt


def resolve_rng(rng: Any) -> np.random.Generator:
    """``None`` -> a fresh generator, an int -> a seeded one, a ``numpy.random.Generator`` as is."""
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0:
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng: expected None, a seed (int >= 0) or a numpy.random.Generator, got {rng!r}")


def normal(rng: np.random.Generator, shape: tuple[int, ...], std: float, dtype: np.dtype) -> np.ndarray:
    """``std * N(0, 1)`` samples of ``shape`` (drawn in float64, then cast to ``dtype``) on the CPU."""
    return (rng.standard_normal(shape) * std).astype(dtype)


def check_gelu_approximate(approximate: Any) -> str:
    """``"none"`` -> ``"gelu"`` (erf), ``"tanh"`` -> ``"gelu_tanh"``."""
    if approximate == "none":
        return "gelu"
    if approximate == "tanh":
        return "gelu_tanh"
    raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")


def as_tensor(x: Any) -> Tensor:
    """``x`` if it is a Tensor, else a Tensor wrapping the array (no copy, no gradient)."""
    return x if isinstance(x, Tensor) else Tensor(x)


def check_input(name: str, x: Tensor, width: int, dtype: np.dtype, width_name: str) -> None:
    """``x`` must be a float array of the layer's dtype whose last dim is ``width``."""
    if x.ndim < 1 or x.shape[-1] != width:
        raise ValueError(f"{name}: expected last dim {width_name} = {width}, got {_checks.describe(x.data)}")
    if np.dtype(x.dtype) != dtype:
        raise TypeError(
            f"{name}: expected dtype {_dtypes.name(dtype)} (the layer's), got {_checks.describe(x.data)}"
        )
