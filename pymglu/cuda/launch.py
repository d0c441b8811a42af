"""Kernel launches with programmatic dependent launch (PDL), for kernels compiled by CuPy.

CuPy's ``RawKernel``/``RawModule`` functions launch through ``cuLaunchKernel``, which takes no launch
attributes. :func:`launch` launches such a function through ``cuLaunchKernelEx`` (``cuda.bindings``,
which the ``cuda12``/``cuda13`` extras install with numba-cuda) with the attribute
``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION``: the kernel may then start while the kernel
before it on the stream is still running, once every block of that kernel has executed
``griddepcontrol.launch_dependents`` (``pdl_launch_dependents`` in ``common.cuh``) or exited.

A kernel launched so must execute ``griddepcontrol.wait`` (``pdl_wait``) before it touches anything the
kernels before it may write: what it does before the wait runs concurrently with them. pymglu's kernels
that accept PDL read only their weights before the wait, so PDL is correct only while no kernel still
in flight on the stream writes those weights (static weights, as in decoding).

The launch is captured by CUDA graph capture like any other (a programmatic edge in the graph). On a
device of compute capability below 9.0 there is no PDL: :func:`pdl_supported` says so and callers
launch normally there.
"""
from __future__ import annotations

import ctypes
import functools
import struct
from typing import Any, Sequence

import numpy as np

__all__ = ["pdl_supported", "launch", "kernel_params", "function_handle"]

#: struct format of each scalar parameter type; every argument takes one 8-byte slot of the buffer
#: (little-endian: a 4-byte value sits at the start of its slot, where the driver reads it).
_SCALAR_FORMATS = {
    np.dtype(np.int32): "<i",
    np.dtype(np.uint32): "<I",
    np.dtype(np.int64): "<q",
    np.dtype(np.uint64): "<Q",
    np.dtype(np.float32): "<f",
    np.dtype(np.float64): "<d",
}


@functools.lru_cache(maxsize=None)
def pdl_supported(device_id: int) -> bool:
    """True when device ``device_id`` (CuPy's numbering) has compute capability 9.0 or newer, where
    ``griddepcontrol`` and programmatic stream serialization exist."""
    from pymglu.backend import cupy_or_none

    cp = cupy_or_none()
    if cp is None:
        return False
    major = int(cp.cuda.Device(device_id).compute_capability) // 10
    return major >= 9


def kernel_params(args: Sequence[Any]) -> tuple[ctypes.Array, ctypes.Array]:
    """The ``void**`` array ``cuLaunchKernelEx`` takes for ``args``, and the buffer of values it points
    into (keep both alive until the launch returns).

    Args:
        args: CuPy arrays (passed as their device pointers) and NumPy scalars of the kernel's parameter
            types (int32, uint32, int64, uint64, float32, float64), in the kernel's parameter order.
    """
    values = (ctypes.c_uint64 * max(1, len(args)))()
    base = ctypes.addressof(values)
    for i, a in enumerate(args):
        data = getattr(a, "data", None)
        if hasattr(data, "ptr"):
            values[i] = int(data.ptr)
        elif isinstance(a, np.generic) and a.dtype in _SCALAR_FORMATS:
            struct.pack_into(_SCALAR_FORMATS[a.dtype], values, 8 * i, a.item())
        else:
            raise TypeError(
                f"args[{i}]: expected a CuPy array or a NumPy scalar of "
                f"{sorted(t.name for t in _SCALAR_FORMATS)}, got {type(a).__name__}"
            )
    pointers = (ctypes.c_void_p * max(1, len(args)))(*range(base, base + 8 * len(args), 8))
    return pointers, values


def function_handle(function: Any) -> int:
    """The ``CUfunction`` handle of a CuPy kernel: a ``RawKernel`` (what ``RawModule.get_function``
    returns; compiled for the current device on first use) or a ``cupy.cuda.function.Function``."""
    compiled = getattr(function, "kernel", function)  # RawKernel.kernel: the Function of the current device
    ptr = getattr(compiled, "ptr", None)
    if ptr is None:
        raise TypeError(f"function: expected a cupy RawKernel or cupy.cuda.function.Function, got {type(function).__name__}")
    return int(ptr)


@functools.lru_cache(maxsize=256)
def _config(grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int, stream_ptr: int) -> Any:
    """The ``CUlaunchConfig`` of one launch shape on one stream, with the PDL attribute (built once)."""
    from cuda.bindings import driver

    attr = driver.CUlaunchAttribute()
    attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    config = driver.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = grid
    config.blockDimX, config.blockDimY, config.blockDimZ = block
    config.sharedMemBytes = shared_mem
    config.hStream = driver.CUstream(stream_ptr)
    config.attrs = [attr]
    config.numAttrs = 1
    return config


def launch(function: Any, grid: tuple[int, ...], block: tuple[int, ...], args: Sequence[Any], *,
           shared_mem: int = 0, stream: Any = None) -> None:
    """Launch a CuPy ``Function`` (``RawModule.get_function``) with programmatic stream serialization.

    Args:
        function: the kernel, compiled for the current device.
        grid, block: launch dimensions (1 to 3 entries each).
        args: the kernel's arguments (see :func:`kernel_params`).
        shared_mem: dynamic shared memory per block in bytes.
        stream: a ``cupy.cuda.Stream``; CuPy's current stream when ``None``.
    Raises:
        RuntimeError: the driver refused the launch (its error name and message).
    """
    from cuda.bindings import driver

    from pymglu.backend import cupy_or_none

    cp = cupy_or_none()
    stream = cp.cuda.get_current_stream() if stream is None else stream
    grid3 = tuple(int(v) for v in grid) + (1,) * (3 - len(grid))
    block3 = tuple(int(v) for v in block) + (1,) * (3 - len(block))
    config = _config(grid3, block3, int(shared_mem), int(stream.ptr))
    pointers, values = kernel_params(args)
    (err,) = driver.cuLaunchKernelEx(config, driver.CUfunction(function_handle(function)), ctypes.addressof(pointers), 0)
    del values
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        _, text = driver.cuGetErrorString(err)
        raise RuntimeError(f"cuLaunchKernelEx (programmatic dependent launch) failed: {name!r}: {text!r}")
