"""DLPack on the CPU without other frameworks: zero-copy both ways between NumPy and pymglu Tensors,
bfloat16 through retagged capsules, copy / read-only / stride rules, errors."""
import numpy as np
import pytest

import pymglu
from pymglu import _dlpack
from pymglu.autograd import Tensor
from pymglu.dtypes import bfloat16
from pymglu.interop import array_from_dlpack, export


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.bool_])
def test_from_dlpack_shares_numpy_memory(dtype):
    a = (np.random.default_rng(0).standard_normal((3, 5)) > 0).astype(dtype)
    t = pymglu.from_dlpack(a)
    assert isinstance(t, Tensor) and t.shape == (3, 5) and t.dtype == a.dtype
    assert _address(t.data) == _address(a)
    a[0, 0] = 1
    assert t.data[0, 0] == 1


def test_tensor_exports_its_data_zero_copy_and_round_trips():
    t = Tensor(np.random.default_rng(1).standard_normal((4, 2)), requires_grad=True)
    assert t.__dlpack_device__() == (1, 0)
    a = np.from_dlpack(t)
    assert _address(a) == _address(t.data)
    back = pymglu.from_dlpack(t, requires_grad=True)
    assert _address(back.data) == _address(t.data) and back.requires_grad and back.is_leaf
    (back * back).sum().backward()
    np.testing.assert_allclose(back.grad, 2 * t.data)


def test_strided_views_keep_their_strides():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = base[:, ::2]
    t = pymglu.from_dlpack(view)
    np.testing.assert_array_equal(t.data, view)
    assert _address(t.data) == _address(view)


def test_non_dlpack_objects_and_foreign_devices_are_refused():
    with pytest.raises(TypeError, match="obj: expected an object with __dlpack__"):
        pymglu.from_dlpack([1.0, 2.0])

    class OnMetal:
        def __dlpack__(self, **kwargs):
            raise AssertionError("must not be called")

        def __dlpack_device__(self):
            return (8, 0)

    with pytest.raises(BufferError, match="Metal device 0"):
        pymglu.from_dlpack(OnMetal())


def test_negative_strides_import_as_views():
    base = np.arange(6, dtype=np.float64)
    t = pymglu.from_dlpack(base[::-1])
    assert t.data.strides == (-8,)
    np.testing.assert_array_equal(t.data, base[::-1])


def test_copy_flag():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    same = pymglu.from_dlpack(a, copy=False)
    assert _address(same.data) == _address(a)
    fresh = pymglu.from_dlpack(a[:, ::2], copy=True)
    assert fresh.data.flags.c_contiguous and fresh.data.flags.writeable
    assert not np.shares_memory(fresh.data, a)
    np.testing.assert_array_equal(fresh.data, a[:, ::2])
    with pytest.raises(TypeError, match="copy: expected None, True or False"):
        pymglu.from_dlpack(a, copy="yes")


def test_read_only_memory_stays_read_only_and_copy_makes_it_writable():
    a = np.ones(4, dtype=np.float32)
    a.flags.writeable = False
    t = pymglu.from_dlpack(a)
    assert not t.data.flags.writeable and _address(t.data) == _address(a)
    assert pymglu.from_dlpack(a, copy=True).data.flags.writeable


def test_bfloat16_numpy_arrays_and_tensors_import_without_copies():
    a = np.arange(6, dtype=np.float32).astype(bfloat16).reshape(2, 3)
    for obj in (a, Tensor(a)):
        t = pymglu.from_dlpack(obj)
        assert t.dtype == bfloat16 and _address(t.data) == _address(a)


def test_export_gives_bfloat16_capsules_and_refuses_negative_strides():
    a = np.arange(6, dtype=np.float32).astype(bfloat16)
    producer = export(Tensor(a))
    assert producer.__dlpack_device__() == (1, 0)
    assert _dlpack.dtype_of(producer.__dlpack__(max_version=(1, 0))) == _dlpack.BFLOAT16
    back = array_from_dlpack(producer)  # through the capsule: bfloat16 -> uint16 -> bfloat16 view
    assert back.dtype == bfloat16 and _address(back) == _address(a)
    np.testing.assert_array_equal(back.astype(np.float32), np.arange(6, dtype=np.float32))
    with pytest.raises(BufferError, match=r"x: float64 array of shape \(4,\) on cpu has negative strides"):
        export(np.arange(4.0)[::-1])
    with pytest.raises(TypeError, match="x: expected a NumPy or CuPy array"):
        export([1.0])


def test_retag_checks_the_capsule_dtype():
    cap = np.zeros(3, dtype=np.float32).__dlpack__()
    assert _dlpack.dtype_of(cap) == (2, 32, 1)  # kDLFloat, 32 bits
    with pytest.raises(BufferError, match=r"expected a capsule of DLPack dtype .* \(4, 16, 1\), got \(2, 32, 1\)"):
        _dlpack.retag(cap, _dlpack.BFLOAT16, _dlpack.UINT16)
    with pytest.raises(BufferError, match="expected an unconsumed DLPack capsule"):
        _dlpack.capsule_tensor(object())
    cap = np.zeros(3, dtype=np.uint16).__dlpack__()
    np.from_dlpack(_Capsule(cap))  # consumes it (renamed 'used_dltensor')
    with pytest.raises(BufferError, match="used_dltensor"):
        _dlpack.capsule_tensor(cap)


class _Capsule:
    """A producer handing out one prepared capsule."""

    def __init__(self, capsule):
        self.capsule = capsule

    def __dlpack__(self, **kwargs):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)


def test_producer_errors_are_reraised_naming_the_object():
    class Refuses:
        dtype = "float32"
        shape = (2,)

        def __dlpack__(self, **kwargs):
            raise BufferError("no export today")

        def __dlpack_device__(self):
            return (1, 0)

    with pytest.raises(BufferError, match=r"obj: .*Refuses \(float32, shape \(2,\)\) cannot be shared .*no export"):
        pymglu.from_dlpack(Refuses())


def test_tensor_dlpack_exports_bfloat16_and_refuses_negative_strides():
    a = np.arange(6, dtype=np.float32).astype(bfloat16)
    back = pymglu.from_dlpack(Tensor(a))
    assert back.dtype == bfloat16 and _address(back.data) == _address(a)
    with pytest.raises(BufferError, match="negative strides"):
        Tensor(np.arange(4.0)[::-1]).__dlpack__()
