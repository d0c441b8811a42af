"""DLPack capsules at the C level: read the tensor a capsule describes, and retag its dtype.

NumPy has no bfloat16, so ``numpy.from_dlpack`` refuses a bfloat16 capsule and NumPy cannot export an
``ml_dtypes.bfloat16`` array. pymglu moves bfloat16 data through DLPack as its ``uint16`` bit patterns
instead, without copying anything: a :class:`Retagged` producer forwards every ``__dlpack__`` call to
the real producer and rewrites the dtype field of the capsule it gets back (bfloat16 -> uint16 on
import, uint16 -> bfloat16 on export) before the consumer reads it. The capsule is unconsumed while we
hold it, so it is ours to edit; the producer's deleter never reads the dtype.

Layouts (``dlpack.h``, DLPack 0.8 and 1.x): a ``"dltensor"`` capsule points to a ``DLManagedTensor``
(``DLTensor`` first), a ``"dltensor_versioned"`` capsule to a ``DLManagedTensorVersioned``
(version, manager context, deleter, flags, then the ``DLTensor``).
"""
from __future__ import annotations

import ctypes
from typing import Any

__all__ = ["BFLOAT16", "UINT16", "Retagged", "capsule_tensor", "dtype_of", "retag"]

#: ``(code, bits, lanes)`` of ``DLDataType``: kDLUInt = 1, kDLBfloat = 4.
UINT16 = (1, 16, 1)
BFLOAT16 = (4, 16, 1)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    """``DLTensor``: data pointer, device, ndim, dtype, shape, strides (in elements), byte offset."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", _DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.argtypes = [ctypes.py_object]
_capsule_name.restype = ctypes.c_char_p
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_pointer.restype = ctypes.c_void_p
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_is_valid.restype = ctypes.c_int

_LAYOUTS = {b"dltensor": _DLManagedTensor, b"dltensor_versioned": _DLManagedTensorVersioned}


def capsule_tensor(capsule: Any) -> DLTensor:
    """The ``DLTensor`` inside an unconsumed DLPack capsule (a view into the capsule's memory: valid
    while the capsule lives). Raises ``BufferError`` for anything else (a used capsule included)."""
    name = None
    if type(capsule).__name__ == "PyCapsule":
        name = _capsule_name(capsule)
    if name not in _LAYOUTS or not _capsule_is_valid(capsule, name):
        raise BufferError(
            f"expected an unconsumed DLPack capsule ('dltensor' or 'dltensor_versioned'), got "
            f"{type(capsule).__name__} named {name!r}"
        )
    return _LAYOUTS[name].from_address(_capsule_pointer(capsule, name)).dl_tensor


def dtype_of(capsule: Any) -> tuple[int, int, int]:
    """``(code, bits, lanes)`` of the tensor in ``capsule``."""
    dt = capsule_tensor(capsule).dtype
    return int(dt.code), int(dt.bits), int(dt.lanes)


def retag(capsule: Any, src: tuple[int, int, int], dst: tuple[int, int, int]) -> Any:
    """Rewrite the dtype of the tensor in ``capsule`` from ``src`` to ``dst`` (same bits) and return the
    capsule. Raises ``BufferError`` when its dtype is not ``src``."""
    if src[1:] != dst[1:]:
        raise ValueError(f"retag: {src} and {dst} differ in bits or lanes; only the type code may change")
    dt = capsule_tensor(capsule).dtype
    got = (int(dt.code), int(dt.bits), int(dt.lanes))
    if got != src:
        raise BufferError(f"expected a capsule of DLPack dtype (code, bits, lanes) = {src}, got {got}")
    dt.code = dst[0]
    return capsule


class Retagged:
    """A DLPack producer over ``producer`` whose capsules carry ``dst`` where ``producer``'s carry ``src``.

    Every keyword of ``__dlpack__`` (``stream``, ``max_version``, ``dl_device``, ``copy``) is passed on
    unchanged, so the consumer's stream semantics and version handshake reach the real producer.
    """

    def __init__(self, producer: Any, src: tuple[int, int, int], dst: tuple[int, int, int]) -> None:
        self.producer = producer
        self.src = src
        self.dst = dst

    def __dlpack__(self, **kwargs: Any) -> Any:
        return retag(self.producer.__dlpack__(**kwargs), self.src, self.dst)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.producer.__dlpack_device__()
