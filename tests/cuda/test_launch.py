"""The argument packing of pymglu.cuda.launch (the PDL launcher), without a GPU."""
import ctypes

import numpy as np
import pytest

from pymglu.cuda import launch


class _FakeDeviceArray:
    """Stands in for a CuPy array: the launcher only reads ``.data.ptr``."""

    class _Memory:
        def __init__(self, ptr):
            self.ptr = ptr

    def __init__(self, ptr):
        self.data = self._Memory(ptr)


def test_kernel_params_point_at_each_argument_in_its_c_type():
    args = (_FakeDeviceArray(0x7F0012345600), np.int32(-7), np.uint32(3_000_000_000), np.int64(-(2**40)),
            np.float32(1.5))
    pointers, holders = launch.kernel_params(args)
    assert len(holders) == 5
    assert ctypes.c_void_p.from_address(pointers[0]).value == 0x7F0012345600
    assert ctypes.c_int32.from_address(pointers[1]).value == -7
    assert ctypes.c_uint32.from_address(pointers[2]).value == 3_000_000_000
    assert ctypes.c_int64.from_address(pointers[3]).value == -(2**40)
    assert ctypes.c_float.from_address(pointers[4]).value == 1.5


@pytest.mark.parametrize("bad", [7, 1.0, np.int16(1), np.zeros(3), "x"])
def test_kernel_params_refuse_arguments_of_unknown_type(bad):
    with pytest.raises(TypeError, match=r"args\[1\]: expected a CuPy array or a NumPy scalar"):
        launch.kernel_params((np.int32(1), bad))


def test_function_handle_reads_the_compiled_kernel_of_a_raw_kernel():
    class _Function:
        ptr = 0xABC

    class _RawKernel:
        kernel = _Function()

    assert launch.function_handle(_RawKernel()) == 0xABC
    assert launch.function_handle(_Function()) == 0xABC
    with pytest.raises(TypeError, match="function: expected a cupy RawKernel"):
        launch.function_handle(object())
