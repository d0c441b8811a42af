"""sum and mean over axes: values against explicit loops, gradients, dtypes and axis errors."""
import itertools

import numpy as np
import pytest

from pymglu import dtypes
from pymglu.autograd import Tensor, check_grads, ops


def loop_reduce(x, axes, keepdims, mean):
    axes = tuple(sorted(a % x.ndim for a in axes)) if x.ndim else ()
    out_shape = tuple(1 if i in axes else n for i, n in enumerate(x.shape))
    out = np.zeros(out_shape)
    for idx in np.ndindex(x.shape):
        out[tuple(0 if i in axes else j for i, j in enumerate(idx))] += x[idx]
    if mean:
        out /= max(int(np.prod([x.shape[a] for a in axes])), 1)
    return out if keepdims else out.reshape([n for i, n in enumerate(x.shape) if i not in axes])


CASES = [((2, 3, 4), None), ((2, 3, 4), 1), ((2, 3, 4), -1), ((2, 3, 4), (0, 2)), ((5,), 0), ((3, 1, 2), (-3, 1)), ((), None)]


@pytest.mark.parametrize("mean, keepdims", list(itertools.product([False, True], [False, True])))
@pytest.mark.parametrize("shape, axis", CASES)
def test_sum_mean(shape, axis, mean, keepdims):
    rng = np.random.default_rng(len(shape) * 7 + (0 if axis is None else 1) + 3 * mean + keepdims)
    x = rng.standard_normal(shape)
    f = ops.mean if mean else ops.sum
    out = f(Tensor(x), axis=axis, keepdims=keepdims)
    axes = tuple(range(len(shape))) if axis is None else ((axis,) if isinstance(axis, int) else axis)
    np.testing.assert_allclose(out.data, loop_reduce(x, axes, keepdims, mean), rtol=1e-13, atol=1e-14)
    check_grads(lambda a: f(a, axis=axis, keepdims=keepdims), [x])


def test_methods_and_gradient_values():
    x = Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    x.mean(axis=0).sum().backward()
    np.testing.assert_array_equal(x.grad, np.full((2, 3), 0.5))
    assert x.grad.flags.writeable  # a real array, not a read-only broadcast view


@pytest.mark.parametrize("dtype", [dtypes.float16, dtypes.bfloat16])
def test_low_precision_sum_accumulates_in_float32(dtype):
    x = np.full(4096, 1.0, dtype=dtype)  # a float16/bfloat16 running sum would stall far below 4096
    x[0] = 0.5
    s = ops.sum(Tensor(x))
    assert s.dtype == dtype
    assert float(s.data.astype(np.float64)) == pytest.approx(4095.5, rel=4e-3)
    assert float(ops.mean(Tensor(x)).data.astype(np.float64)) == pytest.approx(4095.5 / 4096, rel=4e-3)


def test_integer_sum_without_grad():
    out = ops.sum(Tensor(np.arange(5)))
    assert int(out.data) == 10 and not out.requires_grad


def test_axis_errors():
    x = Tensor(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="axis: axis 2 is out of range for an array of 2 dims"):
        ops.sum(x, axis=2)
    with pytest.raises(ValueError, match="axis: repeated axis"):
        ops.mean(x, axis=(1, -1))
    with pytest.raises(TypeError, match="axis: expected None, an int or a sequence of ints"):
        ops.sum(x, axis=1.5)
