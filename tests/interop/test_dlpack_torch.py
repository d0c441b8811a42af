"""DLPack between PyTorch CPU tensors and pymglu: zero-copy by pointer equality, both directions,
bfloat16 included, and the errors for what cannot cross."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pymglu  # noqa: E402
from pymglu.autograd import Tensor  # noqa: E402
from pymglu.dtypes import bfloat16  # noqa: E402
from pymglu.torch import as_array, to_torch  # noqa: E402

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _filled(dtype, shape=(3, 5)):
    return (torch.arange(15).reshape(shape) % 7 - 3).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_to_pymglu_is_zero_copy(dtype):
    t = _filled(dtype)
    p = pymglu.from_dlpack(t)
    assert _address(p.data) == t.data_ptr()
    expected_dtype = bfloat16 if dtype == torch.bfloat16 else t.numpy().dtype
    assert p.dtype == expected_dtype and p.shape == (3, 5)
    np.testing.assert_array_equal(np.asarray(p.data, dtype=np.float64), t.to(torch.float64).numpy())
    t[0, 0] = 1  # shared memory: a write on one side shows on the other
    assert p.data[0, 0] == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pymglu_to_torch_is_zero_copy_and_round_trips(dtype):
    t = _filled(dtype)
    a = as_array(t)
    back = to_torch(Tensor(a))
    assert back.data_ptr() == t.data_ptr() == _address(a)
    assert back.dtype == dtype and torch.equal(back, t)


def test_bfloat16_bits_survive_both_ways():
    bits = torch.tensor([0x3F80, 0xC2F7, 0x0001, 0x7F80, 0xFF80, 0x7FC1], dtype=torch.int32).to(torch.uint16)
    t = bits.view(torch.bfloat16)  # 1, -123.5, smallest subnormal, +inf, -inf, a NaN payload
    a = pymglu.from_dlpack(t).data
    assert a.dtype == bfloat16 and _address(a) == t.data_ptr()
    np.testing.assert_array_equal(a.view(np.uint16), bits.numpy())
    np.testing.assert_array_equal(to_torch(a).view(torch.uint16).numpy(), bits.numpy())


def test_strides_are_kept_both_ways():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    view = base.t()[::2]  # (3, 4), strides (2, 6) elements
    a = pymglu.from_dlpack(view).data
    assert a.strides == (8, 24) and np.shares_memory(a, base.numpy())
    np.testing.assert_array_equal(a, view.numpy())
    back = to_torch(a)
    assert back.stride() == view.stride() and back.data_ptr() == view.data_ptr()


def test_copy_true_gives_separate_writable_memory():
    t = torch.ones(4)
    c = pymglu.from_dlpack(t, copy=True).data
    assert _address(c) != t.data_ptr()
    c[0] = 5
    assert t[0] == 1


def test_requires_grad_tensors_are_refused_with_advice():
    t = torch.ones(3, requires_grad=True)
    with pytest.raises(BufferError, match=r"obj: torch.Tensor \(torch.float32, shape \(3,\), device cpu\) requires "
                                          r"grad.*obj.detach\(\)"):
        pymglu.from_dlpack(t)
    assert _address(pymglu.from_dlpack(t.detach()).data) == t.data_ptr()


def test_meta_and_conjugated_tensors_are_refused_naming_the_tensor():
    with pytest.raises(BufferError, match=r"obj: torch.Tensor \(torch.float32, shape \(2,\), device meta\) cannot be "
                                          r"shared through DLPack .*move it"):
        pymglu.from_dlpack(torch.empty(2, device="meta"))
    with pytest.raises(BufferError, match="torch.Tensor .*complex64.*conjugate bit"):
        pymglu.from_dlpack(torch.ones(2, dtype=torch.complex64).conj())
    with pytest.raises(BufferError, match=r"x: torch.float32 tensor of shape \(2,\) on meta: pymglu.torch runs on "
                                          r"'cpu' and 'cuda'"):
        as_array(torch.empty(2, device="meta"))


def test_to_torch_refuses_what_torch_would_mishandle():
    ro = np.ones(3)
    ro.flags.writeable = False
    with pytest.raises(BufferError, match=r"x: read-only NumPy array .*pass x.copy\(\)"):
        to_torch(ro)
    with pytest.raises(BufferError, match="negative strides"):
        to_torch(np.arange(4.0)[::-1])  # torch.from_dlpack would abort the process
    with pytest.raises(TypeError, match="x: expected a NumPy or CuPy array"):
        to_torch([1.0, 2.0])
