"""add, sub, mul, div, neg and matmul: values, broadcasting gradients, operator overloads."""
import zlib

import numpy as np
import pytest

from pymglu.autograd import Tensor, check_grads, ops

SHAPE_PAIRS = [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((5, 1, 3), (1, 4, 1)), ((), (2, 3)), ((2, 1), (3, 2, 5))]


@pytest.mark.parametrize("a_shape, b_shape", SHAPE_PAIRS)
@pytest.mark.parametrize("name", ["add", "sub", "mul", "div"])
def test_binary_ops(name, a_shape, b_shape):
    rng = np.random.default_rng(zlib.crc32(repr((name, a_shape, b_shape)).encode()))
    a = rng.standard_normal(a_shape)
    b = rng.uniform(0.5, 2.0, b_shape) * rng.choice([-1.0, 1.0], b_shape)  # away from 0 for div
    out = getattr(ops, name)(Tensor(a), Tensor(b))
    expected = {"add": a + b, "sub": a - b, "mul": a * b, "div": a / b}[name]
    np.testing.assert_allclose(out.data, expected, rtol=1e-15)
    check_grads(getattr(ops, name), [a, b])
    check_grads(lambda x: getattr(ops, name)(x, b), [a])
    check_grads(lambda y: getattr(ops, name)(a, y), [b])


def test_scalar_operands_and_overloads():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 2))
    f = lambda x: (2.0 - x) * 3.0 / (x * x + 1.0) + (-x) / 4.0 + 1.0 / (x * x + 2.0)  # noqa: E731
    out = f(Tensor(a))
    np.testing.assert_allclose(out.data, (2.0 - a) * 3.0 / (a * a + 1.0) - a / 4.0 + 1.0 / (a * a + 2.0), rtol=1e-14)
    check_grads(f, [a])
    # an ndarray on the left dispatches to the Tensor's reflected operator
    t = Tensor(a, requires_grad=True)
    r = np.ones((3, 2)) - t
    assert isinstance(r, Tensor) and r.requires_grad
    r.backward(np.ones((3, 2)))
    np.testing.assert_array_equal(t.grad, -np.ones((3, 2)))


@pytest.mark.parametrize("a_shape, b_shape", [((3, 4), (4, 5)), ((2, 3, 4), (4, 2)), ((2, 1, 3, 4), (5, 4, 1)), ((7, 1), (1, 3)),
                                              ((3, 2, 5, 4), (4, 3))])
def test_matmul(a_shape, b_shape):
    rng = np.random.default_rng(len(a_shape) * 10 + len(b_shape))
    a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    out = ops.matmul(Tensor(a), Tensor(b))
    # explicit triple loop over the broadcast batch
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    A, B = np.broadcast_to(a, batch + a.shape[-2:]), np.broadcast_to(b, batch + b.shape[-2:])
    ref = np.zeros(batch + (a.shape[-2], b.shape[-1]))
    for idx in np.ndindex(batch):
        for i in range(a.shape[-2]):
            for j in range(b.shape[-1]):
                ref[idx + (i, j)] = sum(A[idx + (i, k)] * B[idx + (k, j)] for k in range(a.shape[-1]))
    np.testing.assert_allclose(out.data, ref, rtol=1e-12, atol=1e-12)
    check_grads(ops.matmul, [a, b])
    check_grads(lambda x, y: x @ y, [a, b])


def test_matmul_by_a_matrix_takes_strided_operands():
    """A Linear layer's product: ``x (..., m, k)`` (here a transposed, non-contiguous view) times ``W^T``
    (a transposed view), computed over all rows at once; values and both gradients against float64 loops."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 4, 3, 5)).swapaxes(1, 2)  # (2, 3, 4, 5), not C-contiguous
    W = rng.standard_normal((6, 5))
    g = rng.standard_normal((2, 3, 4, 6))
    tx, tW = Tensor(x, requires_grad=True), Tensor(W, requires_grad=True)
    out = ops.matmul(tx, tW.T)
    np.testing.assert_allclose(out.data, np.einsum("abik,jk->abij", x, W), rtol=1e-12, atol=1e-12)
    out.backward(g)
    np.testing.assert_allclose(tx.grad, np.einsum("abij,jk->abik", g, W), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tW.grad, np.einsum("abij,abik->jk", g, x), rtol=1e-12, atol=1e-12)


def test_matmul_errors_name_shapes():
    with pytest.raises(ValueError, match=r"a's last dim must equal b's second-to-last.*\(2, 3\).*\(4, 5\)"):
        ops.matmul(np.zeros((2, 3)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="a: expected an array with at least 2 dims"):
        ops.matmul(np.zeros(3), np.zeros((3, 5)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_matmul_keeps_low_precision_dtype_in_value_and_gradients(dtype):
    from pymglu import dtypes

    dt = getattr(dtypes, dtype)
    rng = np.random.default_rng(11)
    a64, b64 = rng.standard_normal((3, 5)), rng.standard_normal((5, 4))
    a, b = Tensor(a64.astype(dt), requires_grad=True), Tensor(b64.astype(dt), requires_grad=True)
    y = ops.matmul(a, b)
    assert y.dtype == dt
    ref = a.data.astype(np.float64) @ b.data.astype(np.float64)
    assert np.linalg.norm(y.data.astype(np.float64) - ref) / np.linalg.norm(ref) < 1e-2
    y.backward(np.ones((3, 4), dtype=dt))
    assert a.grad.dtype == dt and b.grad.dtype == dt
    np.testing.assert_allclose(a.grad.astype(np.float64), np.ones((3, 4)) @ b.data.astype(np.float64).T, rtol=1e-2)
    with pytest.raises(TypeError, match="a and b must share a dtype"):
        ops.matmul(a, Tensor(b64))
