"""DLPack basics on the CPU: zero-copy both ways between NumPy and pymglu Tensors."""
import numpy as np
import pytest

import pymglu
from pymglu.autograd import Tensor


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
