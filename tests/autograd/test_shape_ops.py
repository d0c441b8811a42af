"""reshape, transpose, getitem (basic and advanced, with scatter-add backward) and concat."""
import numpy as np
import pytest

from pymglu import dtypes
from pymglu.autograd import Tensor, check_grads, ops


@pytest.mark.parametrize("shape, new", [((2, 3, 4), (4, 6)), ((2, 3, 4), (-1,)), ((6,), (1, 2, 1, 3)), ((5, 1), (5,))])
def test_reshape(shape, new):
    x = np.random.default_rng(len(new)).standard_normal(shape)
    out = ops.reshape(Tensor(x), new)
    np.testing.assert_array_equal(out.data.ravel(), x.ravel())
    assert out.shape == np.empty(shape).reshape(new).shape
    check_grads(lambda a: ops.reshape(a, new), [x])
    check_grads(lambda a: a.reshape(*new), [x])


@pytest.mark.parametrize("shape, axes", [((2, 3, 4), None), ((2, 3, 4), (2, 0, 1)), ((2, 3, 4, 5), (-1, 1, 0, 2)), ((3, 5), (1, 0))])
def test_transpose(shape, axes):
    x = np.random.default_rng(len(shape)).standard_normal(shape)
    out = ops.transpose(Tensor(x), axes)
    perm = tuple(reversed(range(len(shape)))) if axes is None else tuple(a % len(shape) for a in axes)
    for idx in np.ndindex(x.shape):
        assert out.data[tuple(idx[p] for p in perm)] == x[idx]
    check_grads(lambda a: ops.transpose(a, axes), [x])
    check_grads(lambda a: a.T if axes is None else a.transpose(*axes), [x])


INDICES = [
    (1,),
    (slice(None, None, -2), Ellipsis, None),
    (slice(1, 3), 2, slice(None)),
    (np.array([3, 0, 3, 3]),),                         # repeated rows
    (slice(None), np.array([[0, 1], [1, 1]]), np.array([4, 4])),  # broadcast integer arrays, repeats
    (np.array([0, 2, 2]), Ellipsis, np.array([1, 1, 0])),
    ([1, 1, 0],),                                       # a list
    (np.array([True, False, True, True]),),            # a bool mask
    (-1, np.array([-1, -3, -1])),                       # negative integer arrays
]


@pytest.mark.parametrize("index", INDICES, ids=range(len(INDICES)))
def test_getitem(index):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 5))
    out = ops.getitem(Tensor(x), index)
    np.testing.assert_array_equal(out.data, x[index])
    check_grads(lambda a: ops.getitem(a, index), [x])
    # the gradient counts how many times each element was selected
    t = Tensor(x, requires_grad=True)
    t[index].backward(np.ones(x[index].shape))
    counts = np.zeros(x.shape)
    flat = np.arange(x.size).reshape(x.shape)[index].ravel()
    for k in flat:
        counts.flat[k] += 1
    np.testing.assert_array_equal(t.grad, counts)


def test_getitem_bool_mask_of_self_and_tensor_index():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 4))
    check_grads(lambda a: a[x > 0.3], [x])
    idx = Tensor(np.array([5, 5, 1]))
    np.testing.assert_array_equal(ops.getitem(Tensor(x), idx).data, x[[5, 5, 1]])


def test_getitem_low_precision_scatter_add():
    x = Tensor(np.zeros(3, dtype=dtypes.bfloat16), requires_grad=True)
    x[np.array([0, 0, 0, 2])].backward(np.ones(4, dtype=dtypes.bfloat16))
    assert x.grad.dtype == dtypes.bfloat16
    np.testing.assert_array_equal(x.grad.astype(np.float64), [3, 0, 1])


def test_getitem_errors_name_index():
    x = Tensor(np.zeros((2, 3)))
    with pytest.raises(IndexError, match=r"index: .*out of bounds.*\(indexing float64 array of shape \(2, 3\)"):
        x[np.array([0, 2])]
    with pytest.raises(IndexError, match="index: arrays used as indices must be integer or bool"):
        x[np.array([0.0])]


@pytest.mark.parametrize("shapes, axis", [([(2, 3), (4, 3)], 0), ([(2, 3, 1), (2, 3, 4), (2, 3, 2)], -1), ([(5,)], 0), ([(2, 1, 3), (2, 2, 3)], 1)])
def test_concat(shapes, axis):
    rng = np.random.default_rng(len(shapes))
    arrays = [rng.standard_normal(s) for s in shapes]
    out = ops.concat([Tensor(a) for a in arrays], axis=axis)
    np.testing.assert_array_equal(out.data, np.concatenate(arrays, axis=axis))
    check_grads(lambda *ts: ops.concat(list(ts), axis=axis), arrays)


def test_concat_same_tensor_twice_and_errors():
    a = Tensor(np.arange(3.0), requires_grad=True)
    out = ops.concat([a, a * 2.0], axis=0)
    out.backward(np.arange(6.0))
    np.testing.assert_array_equal(a.grad, np.arange(3.0) + 2 * np.arange(3.0, 6.0))
    with pytest.raises(ValueError, match=r"tensors\[1\]: expected shape \(2, \*\), got float64 array of shape \(3, 3\)"):
        ops.concat([np.zeros((2, 3)), np.zeros((3, 3))], axis=1)
    with pytest.raises(TypeError, match=r"tensors\[0\] and tensors\[1\] must share a dtype"):
        ops.concat([np.zeros(2), np.zeros(2, dtype=np.float32)])
    with pytest.raises(ValueError, match="tensors: expected at least one tensor"):
        ops.concat([])
    with pytest.raises(ValueError, match="axis: expected an int in"):
        ops.concat([np.zeros(2)], axis=1)


def test_reshape_transpose_errors():
    x = Tensor(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"shape: cannot reshape float64 array of shape \(2, 3\) on cpu into \(4,\)"):
        ops.reshape(x, (4,))
    for bad in [(0, 0), (0,), (0, 2), (0, 1.0)]:
        with pytest.raises(ValueError, match="axes: expected a permutation of the 2 axes"):
            ops.transpose(x, bad)
