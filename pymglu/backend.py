"""Array-module dispatch: NumPy on the CPU, CuPy on CUDA devices.

The array module always follows the inputs. Nothing here moves data between devices: mixing NumPy and
CuPy arrays (or CuPy arrays on different devices) in one call raises :class:`DeviceMismatchError`.
CuPy is optional; importing pymglu never imports it eagerly, and its absence is never an import error.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, NoReturn

import numpy as np

__all__ = [
    "DeviceMismatchError",
    "cupy_or_none",
    "gpu_available",
    "is_cupy_array",
    "get_array_module",
    "device_of",
    "to_numpy",
    "unwrap",
]


class DeviceMismatchError(ValueError):
    """Raised when the arrays of one call live on different devices (CPU vs GPU, or two GPUs)."""


_cupy: ModuleType | None = None
_cupy_checked = False


def cupy_or_none() -> ModuleType | None:
    """Return the ``cupy`` module when it imports, else ``None`` (never raises)."""
    global _cupy, _cupy_checked
    if not _cupy_checked:
        _cupy_checked = True
        try:
            import cupy  # noqa: F401  (optional dependency)

            _cupy = cupy
        except Exception:  # ImportError, or a broken CUDA install
            _cupy = None
    return _cupy


def gpu_available() -> bool:
    """True when CuPy imports and at least one CUDA device is usable."""
    cp = cupy_or_none()
    if cp is None:
        return False
    try:
        return bool(cp.cuda.is_available())
    except Exception:
        return False


def is_cupy_array(x: Any) -> bool:
    """True for a ``cupy.ndarray``; looks only at already-imported modules, so it never imports CuPy."""
    cupy = sys.modules.get("cupy")  # None when absent, or when blocked with sys.modules["cupy"] = None
    return cupy is not None and isinstance(x, cupy.ndarray)


def tensor_data(x: Any) -> Any:
    """The array inside a pymglu ``Tensor`` (or ``Parameter``); anything else is returned unchanged."""
    data = getattr(x, "_is_pymglu_tensor", False) and x.data
    return data if data is not False else x


def unwrap(x: Any) -> Any:
    """What pymglu computes on for an argument ``x``: the array inside a pymglu ``Tensor``; for a DLPack
    producer of another library (a PyTorch tensor, a JAX array, ...) a zero-copy NumPy (CPU) or CuPy
    (CUDA) array over its memory (:func:`pymglu.interop.array_from_dlpack`, which raises a clear
    ``BufferError`` for what cannot be shared); anything else unchanged."""
    kind = type(x)
    if kind is np.ndarray:  # the common cases first: every op and helper calls this on every argument
        return x
    cupy = sys.modules.get("cupy")
    if cupy is not None and kind is cupy.ndarray:
        return x
    data = tensor_data(x)
    if data is not x:
        return data
    if not isinstance(x, (np.ndarray, np.generic)) and hasattr(x, "__dlpack__") and not is_cupy_array(x):
        from pymglu.interop import array_from_dlpack

        return array_from_dlpack(x, name=type(x).__name__)
    return x


def device_of(x: Any) -> str:
    """``"cpu"`` for NumPy arrays and scalars, ``"cuda:<id>"`` for CuPy arrays."""
    if type(x) is np.ndarray:
        return "cpu"
    x = unwrap(x)
    if is_cupy_array(x):
        return f"cuda:{x.device.id}"
    return "cpu"


def get_array_module(*arrays: Any) -> ModuleType:
    """The array module (``numpy`` or ``cupy``) that all array arguments share.

    ``None`` and Python scalars are ignored. Raises :class:`DeviceMismatchError` naming the devices
    when CPU and GPU arrays (or arrays on two GPUs) are mixed.
    """
    first = None  # the device of the first array
    for a in arrays:  # the common case, one device, without building the error's listing
        a = unwrap(a)
        if a is None or isinstance(a, (int, float, bool, complex, np.generic)):
            continue
        device = device_of(a)
        if first is None:
            first = device
        elif device != first:
            _mismatch(arrays)
    return np if first is None or first == "cpu" else sys.modules["cupy"]


def _mismatch(arrays: tuple[Any, ...]) -> NoReturn:
    """Raise :class:`DeviceMismatchError` naming where each device's first argument sits."""
    devices: dict[str, int] = {}
    for position, a in enumerate(arrays):
        a = unwrap(a)
        if a is None or isinstance(a, (int, float, bool, complex, np.generic)):
            continue
        devices.setdefault(device_of(a), position)
    listing = ", ".join(f"argument {pos} on {dev}" for dev, pos in devices.items())
    raise DeviceMismatchError(
        f"arrays of one call must live on one device, got {listing}; "
        "move them explicitly (pymglu never transfers data implicitly)"
    )


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy (or view, on the CPU) of an array, Tensor or CuPy array."""
    x = unwrap(x)
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)
