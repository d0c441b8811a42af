"""embedding(weight, ids): forward gather, scatter-add backward, and argument errors."""
import numpy as np
import pytest

from pymglu import dtypes
from pymglu.autograd import Tensor, check_grads, ops


@pytest.mark.parametrize("V, D, ids_shape, seed", [(7, 5, (11,), 0), (3, 4, (2, 3, 4), 1), (13, 1, (), 2)])
def test_embedding_forward_and_grad(V, D, ids_shape, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((V, D))
    ids = rng.integers(0, V, size=ids_shape)
    out = ops.embedding(Tensor(W), ids)
    assert out.shape == ids_shape + (D,)
    expected = np.stack([W[i] for i in ids.reshape(-1)]).reshape(ids_shape + (D,))
    np.testing.assert_array_equal(out.data, expected)
    check_grads(lambda w: ops.embedding(w, ids), [W])


def test_embedding_grad_adds_repeated_ids():
    rng = np.random.default_rng(3)
    W = Tensor(rng.standard_normal((5, 3)), requires_grad=True)
    ids = np.array([[4, 1, 4], [4, 0, 1]])
    g = rng.standard_normal((2, 3, 3))
    ops.embedding(W, ids).backward(g)
    expected = np.zeros((5, 3))
    for (a, b), row in np.ndenumerate(ids):
        expected[row] += g[a, b]
    np.testing.assert_allclose(W.grad, expected, rtol=1e-14, atol=1e-14)
    assert np.all(W.grad[[2, 3]] == 0)  # rows never looked up get no gradient


@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16, dtypes.bfloat16])
def test_embedding_low_precision_keeps_dtype(dtype):
    rng = np.random.default_rng(4)
    W = Tensor(rng.standard_normal((6, 4)).astype(dtype), requires_grad=True)
    ids = np.array([1, 1, 1, 5, 2])
    out = ops.embedding(W, ids)
    assert out.dtype == dtype
    out.backward(np.ones(out.shape, dtype=dtype))
    assert W.grad.dtype == dtype
    np.testing.assert_allclose(W.grad.astype(np.float64)[:, 0], [0, 3, 1, 0, 0, 1])


def test_embedding_accepts_lists_and_integer_tensors():
    W = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(ops.embedding(Tensor(W), [[3], [0]]).data, W[[[3], [0]]])
    np.testing.assert_array_equal(ops.embedding(W, Tensor(np.array([2], dtype=np.uint8))).data, W[[2]])


def test_embedding_errors_name_ids():
    W = Tensor(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"ids: expected every value in \[0, 4\), got values in \[0, 4\]"):
        ops.embedding(W, np.array([0, 4]))
    with pytest.raises(ValueError, match=r"ids: .*\[-1, 2\]"):
        ops.embedding(W, np.array([2, -1]))
    with pytest.raises(TypeError, match="ids: expected an integer array, got float64"):
        ops.embedding(W, np.array([1.0]))
    with pytest.raises(TypeError, match="ids: expected an integer array, got bool"):
        ops.embedding(W, np.array([True]))
    with pytest.raises(ValueError, match="weight: expected a 2-d array"):
        ops.embedding(Tensor(np.zeros(4)), np.array([0]))
    with pytest.raises(TypeError, match="weight: expected dtype"):
        ops.embedding(np.zeros((4, 3), dtype=np.int32), np.array([0]))


class _UnreadableIds(np.ndarray):
    """Ids whose values may not be read on the host (what would wait for a GPU)."""

    def min(self, *a, **k):
        raise AssertionError("ids read back")

    max = min


def test_uint8_ids_of_a_256_row_table_are_not_read_back():
    rng = np.random.default_rng(6)
    W = rng.standard_normal((256, 3))
    raw = rng.integers(0, 256, size=(2, 9)).astype(np.uint8)
    out = ops.embedding(Tensor(W), raw.view(_UnreadableIds))
    np.testing.assert_array_equal(np.asarray(out.data), W[raw])
    with pytest.raises(AssertionError, match="ids read back"):  # a smaller table still checks them
        ops.embedding(Tensor(W[:255]), raw.view(_UnreadableIds))
