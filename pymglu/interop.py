"""DLPack exchange: pymglu Tensors over other libraries' memory, and back, without copies.

* :func:`from_dlpack` wraps any DLPack producer (NumPy, CuPy, PyTorch, JAX, a pymglu Tensor) as a Tensor
  sharing its memory: CPU memory becomes a NumPy array, CUDA memory a CuPy array (CuPy needed).
  :func:`array_from_dlpack` does the same and returns the bare array.
* ``Tensor.__dlpack__`` / ``__dlpack_device__`` export a Tensor's *data* (never its graph: the consumer
  gets a plain array that autograd does not track, also for tensors that require a gradient).
  :func:`export` is the exporter to use for bfloat16 data, which NumPy cannot export by itself.

Rules, for every producer:

* **bfloat16** travels as its ``uint16`` bit patterns and is viewed back as ``ml_dtypes.bfloat16``
  (:mod:`pymglu._dlpack`); no copy either way.
* **streams** (CUDA): the consumer passes the stream it will use and the producer makes that stream
  wait for its pending work (the DLPack protocol). pymglu consumes on CuPy's *current* stream, which
  ``cupy.from_dlpack`` passes on; to consume on a PyTorch stream, enter
  ``cupy.cuda.ExternalStream(torch_stream.cuda_stream)`` first (``pymglu.torch`` does this for you).
* **strides** are kept (non-contiguous and negatively strided NumPy/CuPy views import as such); on
  export, negative strides are refused, because consumers mishandle them (PyTorch 2.13 aborts the
  process).
* **read-only** memory (JAX arrays, read-only NumPy arrays) imports read-only, and pymglu never writes
  to it: an optimizer step on a Parameter over it gives the Parameter a new array (which no longer
  shares the producer's memory) instead of writing in place. ``copy=True`` gives a writable copy.
* ``copy``: ``None`` or ``False`` never copy (pymglu's import is always zero-copy); ``True`` returns a
  fresh C-contiguous copy.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks, _dlpack
from pymglu.autograd.tensor import Tensor
from pymglu.backend import cupy_or_none, is_cupy_array, tensor_data
from pymglu.dtypes import bfloat16

__all__ = ["from_dlpack", "array_from_dlpack", "export", "describe_object"]

_DL_CPU = 1
_DL_CUDA = 2
_DL_CUDA_MANAGED = 13
_DEVICE_NAMES = {1: "CPU", 2: "CUDA", 3: "CUDA host", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI",
                 10: "ROCm", 11: "ROCm host", 13: "CUDA managed", 14: "oneAPI"}


def describe_object(obj: Any) -> str:
    """``torch.Tensor (torch.float32, shape (3, 4), device cpu)``: the producer's class and what it holds."""
    cls = type(obj)
    parts = [str(getattr(obj, attr)) for attr in ("dtype",) if hasattr(obj, attr)]
    if hasattr(obj, "shape"):
        parts.append(f"shape {tuple(obj.shape)}")
    device = getattr(obj, "device", None)
    if device is not None and not callable(device):
        parts.append(f"device {device}")
    extra = f" ({', '.join(parts)})" if parts else ""
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}{extra}"


def _is_bfloat16(obj: Any) -> bool:
    """Whether ``obj`` holds bfloat16 (``torch.bfloat16``, JAX's or ml_dtypes' ``bfloat16``)."""
    return str(getattr(obj, "dtype", "")).rsplit(".", 1)[-1] == "bfloat16"


def _device(obj: Any, name: str) -> tuple[int, int]:
    try:
        device_type, device_id = (int(v) for v in obj.__dlpack_device__())
    except Exception as e:  # e.g. torch's 'meta' device: ValueError("Unknown device type meta for Dlpack")
        raise BufferError(
            f"{name}: {describe_object(obj)} cannot be shared through DLPack ({type(e).__name__}: {e}); "
            "pymglu works on CPU (NumPy) and CUDA (CuPy) memory: move it to one of them first"
        ) from e
    return device_type, device_id


def _consumer(obj: Any, name: str, device_type: int, device_id: int) -> Any:
    """``numpy.from_dlpack`` or ``cupy.from_dlpack`` for the device, or a BufferError naming ``obj``."""
    if device_type == _DL_CPU:
        return np.from_dlpack
    if device_type in (_DL_CUDA, _DL_CUDA_MANAGED):
        cp = cupy_or_none()
        if cp is None:
            raise BufferError(
                f"{name}: {describe_object(obj)} lives on CUDA device {device_id}, and CuPy is not installed "
                "(install pymglu[cuda12] or pymglu[cuda13]), or move it to the CPU first"
            )
        return cp.from_dlpack
    label = _DEVICE_NAMES.get(device_type, f"DLPack device type {device_type}")
    raise BufferError(
        f"{name}: {describe_object(obj)} lives on {label} device {device_id}; pymglu works on the CPU "
        "(NumPy) and CUDA (CuPy): copy it to one of them first"
    )


def array_from_dlpack(obj: Any, *, copy: bool | None = None, name: str = "obj") -> Any:
    """The memory of the DLPack producer ``obj`` as a NumPy (CPU) or CuPy (CUDA) array.

    Args:
        obj: any object with ``__dlpack__`` and ``__dlpack_device__``; a pymglu Tensor gives its data.
        copy: ``None``/``False``: zero-copy (always possible here); ``True``: a C-contiguous copy.
        name: the argument name used in error messages.
    Returns:
        An array of ``obj``'s dtype (``ml_dtypes.bfloat16`` for bfloat16), shape and strides.
    Raises:
        TypeError: no DLPack methods, or a bad ``copy``. BufferError: unsupported device, or the producer
        refuses to export (a PyTorch tensor that requires grad, a conjugated tensor, ...).
    """
    if copy not in (None, True, False):
        raise TypeError(f"copy: expected None, True or False, got {copy!r}")
    if not (hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__")):
        raise TypeError(
            f"{name}: expected an object with __dlpack__ and __dlpack_device__ (a NumPy, CuPy, PyTorch or "
            f"JAX array), got {type(obj).__name__}"
        )
    if getattr(obj, "requires_grad", False) is True and not getattr(obj, "_is_pymglu_tensor", False):
        raise BufferError(
            f"{name}: {describe_object(obj)} requires grad, and PyTorch does not export such tensors; pass "
            f"{name}.detach() (same memory; torch autograd does not see what pymglu computes from it), or use "
            "pymglu.torch, whose autograd Function gives torch the gradients"
        )
    own = tensor_data(obj)
    bf16 = _is_bfloat16(obj)
    if bf16 and (isinstance(own, np.ndarray) or is_cupy_array(own)):
        data = own.view()  # NumPy cannot export bfloat16; our own array needs no exchange
    else:
        consume = _consumer(obj, name, *_device(obj, name))
        producer = _dlpack.Retagged(obj, _dlpack.BFLOAT16, _dlpack.UINT16) if bf16 else obj
        try:
            data = consume(producer)
        except (BufferError, RuntimeError, TypeError, ValueError) as e:
            raise BufferError(
                f"{name}: {describe_object(obj)} cannot be shared through DLPack: {type(e).__name__}: {e}"
            ) from e
        if bf16:
            data = data.view(bfloat16)
    return data.copy() if copy else data


def from_dlpack(obj: Any, requires_grad: bool = False, *, copy: bool | None = None) -> Tensor:
    """A Tensor sharing the memory of ``obj``, any object with ``__dlpack__`` and ``__dlpack_device__``.

    Args:
        obj: the producer (NumPy/CuPy array, PyTorch tensor, JAX array, pymglu Tensor, ...).
        requires_grad: whether the new Tensor is a leaf that requires a gradient.
        copy: ``None``/``False`` (default): no data is copied; ``True``: the Tensor gets a writable copy.
    Returns:
        A Tensor over a NumPy array (CPU memory) or a CuPy array (CUDA memory, on CuPy's current stream).
    Raises:
        TypeError: ``obj`` does not speak DLPack. BufferError: its memory is on a device pymglu cannot
        use (anything but the CPU and CUDA), on CUDA without CuPy installed, or the producer refuses
        to export it (e.g. a PyTorch tensor that requires grad: pass ``tensor.detach()``).
    """
    return Tensor(array_from_dlpack(obj, copy=copy), requires_grad=requires_grad)


class _Exporter:
    """DLPack producer over a NumPy/CuPy array (see :func:`export`)."""

    def __init__(self, array: Any, name: str) -> None:
        self.array = array
        self.name = name
        self.dtype = array.dtype
        self.shape = tuple(array.shape)

    def __dlpack__(self, **kwargs: Any) -> Any:
        a = self.array
        try:
            if np.dtype(a.dtype) == bfloat16:
                return _dlpack.retag(a.view(np.uint16).__dlpack__(**kwargs), _dlpack.UINT16, _dlpack.BFLOAT16)
            return a.__dlpack__(**kwargs)
        except BufferError as e:
            hint = ""
            if not getattr(getattr(a, "flags", None), "writeable", True):
                hint = ("; read-only arrays export only to consumers that ask for DLPack >= 1.0 (NumPy, "
                        f"PyTorch), not to JAX: export {self.name}.copy()")
            reason = str(e).rstrip(".")
            raise BufferError(
                f"{self.name}: {_checks.describe(a)} cannot be exported through DLPack: {reason}{hint}"
            ) from e

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.array.__dlpack_device__()


def export(x: Any, name: str = "x") -> Any:
    """A DLPack producer over the memory of ``x`` (a NumPy/CuPy array or a pymglu Tensor's data).

    Unlike the array's own ``__dlpack__`` it also exports ``ml_dtypes.bfloat16`` (as DLPack bfloat16),
    and it refuses negative strides. Hand it to any consumer: ``torch.from_dlpack(export(x))``,
    ``jax.numpy.from_dlpack(export(x))``. Stream and version keywords are passed through to NumPy/CuPy.

    Raises:
        TypeError: ``x`` is not a NumPy/CuPy array or Tensor. BufferError: negative strides.
    """
    a = tensor_data(x)
    if not (isinstance(a, np.ndarray) or is_cupy_array(a)):
        raise TypeError(f"{name}: expected a NumPy or CuPy array or a pymglu Tensor, got {type(x).__name__}")
    if any(s < 0 for s in a.strides):
        raise BufferError(
            f"{name}: {_checks.describe(a)} has negative strides {tuple(a.strides)}, which DLPack consumers "
            f"mishandle (PyTorch 2.13 aborts the process); export a copy: ascontiguousarray({name})"
        )
    return _Exporter(a, name)
