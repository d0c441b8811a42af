"""DLPack exchange: pymglu Tensors over other libraries' memory, and back, without copies.

``Tensor.__dlpack__`` / ``__dlpack_device__`` export a Tensor's *data* (never its graph: the consumer
gets a plain array that autograd does not track, also for tensors that require a gradient).
:func:`from_dlpack` wraps any DLPack producer (NumPy, CuPy, PyTorch, JAX, a pymglu Tensor) as a Tensor
sharing its memory: CPU memory becomes a NumPy array, CUDA memory a CuPy array (CuPy needed).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu.autograd.tensor import Tensor
from pymglu.backend import cupy_or_none

__all__ = ["from_dlpack"]

_DL_CPU = 1
_DL_CUDA = 2
_DL_CUDA_MANAGED = 13
_DEVICE_NAMES = {1: "CPU", 2: "CUDA", 3: "CUDA host", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI",
                 10: "ROCm", 11: "ROCm host", 13: "CUDA managed", 14: "oneAPI"}


def from_dlpack(obj: Any, requires_grad: bool = False) -> Tensor:
    """A Tensor sharing the memory of ``obj``, any object with ``__dlpack__`` and ``__dlpack_device__``.

    Args:
        obj: the producer (NumPy/CuPy array, PyTorch tensor, JAX array, pymglu Tensor, ...).
        requires_grad: whether the new Tensor is a leaf that requires a gradient.
    Returns:
        A Tensor over a NumPy array (CPU memory) or a CuPy array (CUDA memory); no data is copied.
    Raises:
        TypeError: ``obj`` does not speak DLPack. BufferError: its memory is on a device pymglu cannot
        use (anything but the CPU and CUDA), or on CUDA without CuPy installed.
    """
    if not (hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__")):
        raise TypeError(
            f"obj: expected an object with __dlpack__ and __dlpack_device__ (a NumPy, CuPy, PyTorch or "
            f"JAX array), got {type(obj).__name__}"
        )
    device_type, device_id = (int(v) for v in obj.__dlpack_device__())
    if device_type == _DL_CPU:
        data = np.from_dlpack(obj)
    elif device_type in (_DL_CUDA, _DL_CUDA_MANAGED):
        cp = cupy_or_none()
        if cp is None:
            raise BufferError(
                f"obj: {type(obj).__name__} lives on CUDA device {device_id}, and CuPy is not installed "
                "(install pymglu[cuda12] or pymglu[cuda13]), or move it to the CPU first"
            )
        data = cp.from_dlpack(obj)
    else:
        name = _DEVICE_NAMES.get(device_type, f"DLPack device type {device_type}")
        raise BufferError(
            f"obj: {type(obj).__name__} lives on {name} device {device_id}; pymglu works on the CPU "
            "(NumPy) and CUDA (CuPy): copy it to one of them first"
        )
    return Tensor(data, requires_grad=requires_grad)
