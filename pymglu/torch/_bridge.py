"""torch.Tensor <-> NumPy/CuPy arrays through DLPack, zero-copy, with torch-worded checks.

* :func:`as_array`: the memory of a CPU or CUDA ``torch.Tensor`` as a NumPy or CuPy array (detached
  first: torch refuses to export tensors that require grad). Strides are kept, so non-contiguous
  tensors (slices, transposes, expanded gradients) are read where they are; NumPy/CuPy copy
  internally where a product needs contiguous operands, as torch's own kernels do.
* :func:`to_torch`: a ``torch.Tensor`` over a NumPy/CuPy array or pymglu Tensor (bfloat16 included).
* :func:`on_torch_stream`: run CuPy work on torch's current CUDA stream, so that no cross-stream
  synchronization is needed in either direction.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch

from pymglu.backend import DeviceMismatchError, cupy_or_none, unwrap
from pymglu.interop import array_from_dlpack, export

__all__ = ["FLOAT_DTYPES", "describe", "check_tensor", "check_same_device", "as_array", "to_torch",
           "on_torch_stream"]

#: torch dtypes pymglu computes with (float64 in float64, the others in float32).
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_DEVICES = ("cpu", "cuda")


def describe(t: Any) -> str:
    """``torch.float32 tensor of shape (2, 3) on cpu`` (or the type of a non-tensor)."""
    if not isinstance(t, torch.Tensor):
        return f"{type(t).__name__} {t!r}"[:120]
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def check_tensor(name: str, t: Any, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    """Raise unless ``t`` is a ``torch.Tensor`` on the CPU or CUDA with a dtype in ``dtypes``.

    TypeError for a non-tensor or a wrong dtype; BufferError for another device (``meta``, ``mps``,
    ``xla``, ...), which DLPack cannot hand to NumPy or CuPy.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {describe(t)}")
    if t.device.type not in _DEVICES:
        raise BufferError(
            f"{name}: {describe(t)}: pymglu.torch runs on 'cpu' and 'cuda' tensors (NumPy and CuPy "
            f"memory); move it with {name}.to('cpu') or {name}.to('cuda')"
        )
    if t.dtype not in dtypes:
        want = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected a torch.Tensor of dtype {want}, got {describe(t)}")


def check_same_device(named: dict[str, torch.Tensor]) -> torch.device:
    """The one device of all tensors in ``named``, else DeviceMismatchError listing them."""
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {t.device}" for k, t in named.items())
        raise DeviceMismatchError(f"expected tensors on one device, got {listing}")
    return devices.pop()


def as_array(t: torch.Tensor, name: str = "x") -> Any:
    """A NumPy (CPU) or CuPy (CUDA) array over the memory of ``t`` (detached), same dtype, shape and
    strides; bfloat16 comes as ``ml_dtypes.bfloat16``. On CUDA, call it inside :func:`on_torch_stream`."""
    check_tensor(name, t, dtypes=tuple(FLOAT_DTYPES) + (torch.bool, torch.uint8, torch.int32, torch.int64))
    return array_from_dlpack(t.detach(), name=name)


def to_torch(x: Any, name: str = "x") -> torch.Tensor:
    """A ``torch.Tensor`` sharing the memory of a NumPy/CuPy array or pymglu Tensor (bfloat16 included).

    Raises BufferError for read-only arrays (``torch.from_dlpack`` would return a *writable* alias of
    memory its owner declared immutable, e.g. a JAX buffer: pass ``x.copy()``) and for negative strides
    (PyTorch 2.13 aborts the process on them: pass a contiguous copy).
    """
    a = unwrap(x)
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        raise BufferError(
            f"{name}: read-only NumPy array of shape {a.shape}: torch tensors are always writable, and "
            f"torch.from_dlpack would alias it anyway; pass {name}.copy()"
        )
    return torch.from_dlpack(export(a, name))


@contextlib.contextmanager
def on_torch_stream(device: torch.device) -> Iterator[None]:
    """Make CuPy's current device and stream those torch uses now on ``device`` (no-op on the CPU).

    Inside, DLPack exchanges in both directions pass the same stream, so producers need not
    synchronize, and pymglu's kernels queue behind torch's pending work on that stream.
    """
    if device.type != "cuda":
        yield
        return
    cp = cupy_or_none()
    if cp is None:
        raise BufferError(
            f"pymglu.torch: tensors on {device} need CuPy (install pymglu[cuda12] or pymglu[cuda13])"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)
    with cp.cuda.Device(index):
        if stream.cuda_stream == 0:  # torch's legacy default stream is CuPy's null stream too
            with cp.cuda.Stream.null:
                yield
        else:
            with external_stream(cp, stream.cuda_stream, index):
                yield


def external_stream(cp: Any, ptr: int, device_id: int) -> Any:
    """A CuPy stream object over the CUDA stream ``ptr`` (owned by someone else, e.g. torch).

    CuPy 14 deprecates ``cupy.cuda.ExternalStream`` in favour of ``Stream.from_external``, which takes an
    object speaking the ``__cuda_stream__`` protocol; until that path has run on a GPU here, the
    established class is used and its deprecation warning is silenced at this one place.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(ptr, device_id)
