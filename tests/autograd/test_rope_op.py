"""rope: values against complex rotations, gradients, relative-position property, dtypes, errors."""
import numpy as np
import pytest

from pymglu import dtypes
from pymglu.autograd import Tensor, check_grads, ops


def reference(x, positions, base):
    """Pair (j, j + Dh/2) as the complex number a + ib, multiplied by exp(i * pos * base^(-2j/Dh))."""
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    theta = np.array(positions, dtype=np.float64)[:, None] * base ** (-2.0 * np.arange(half) / x.shape[-1])
    r = z * np.exp(1j * theta)
    return np.concatenate([r.real, r.imag], axis=-1)


@pytest.mark.parametrize("shape, positions, base", [
    ((2, 3, 5, 8), [0, 1, 2, 3, 4], 10000.0),
    ((1, 2, 1, 4), [17], 10000.0),        # one decoding step at position 17
    ((4, 6), [3, 9, 2, 0], 50.0),         # 2-d input, unordered positions
    ((2, 1, 3, 2), [100000, 5, 7], 10.0),  # large position, Dh = 2
])
def test_values_and_grads(shape, positions, base):
    rng = np.random.default_rng(len(shape) * 10 + shape[-1])
    x = rng.standard_normal(shape)
    out = ops.rope(Tensor(x), np.array(positions), base=base)
    assert out.shape == shape and out.dtype == np.float64
    np.testing.assert_allclose(out.data, reference(x, positions, base), rtol=1e-12, atol=1e-12)
    check_grads(lambda t: ops.rope(t, np.array(positions), base=base), [x])


def test_rotation_preserves_norms_and_position_zero_is_identity():
    x = np.random.default_rng(1).standard_normal((3, 4, 16))
    out = ops.rope(Tensor(x), np.arange(4)).data
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)
    np.testing.assert_array_equal(out[:, 0], x[:, 0])
    assert not np.allclose(out[:, 1:], x[:, 1:])


def test_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((1, 8)), rng.standard_normal((1, 8))

    def score(m, n):
        return float((ops.rope(Tensor(q), [m]).data @ ops.rope(Tensor(k), [n]).data.T)[0, 0])

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-10)
    assert score(0, 5) == pytest.approx(score(20, 25), rel=1e-10)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def test_list_positions_and_backward_reaches_x():
    x = Tensor(np.random.default_rng(3).standard_normal((2, 3, 4)), requires_grad=True)
    out = ops.rope(x, [5, 6, 7])
    out.backward(out.data)  # d(|y|^2 / 2)/dx = R^T R x = x
    np.testing.assert_allclose(x.grad, x.data, rtol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-6), (dtypes.float16, 2e-3), (dtypes.bfloat16, 2e-2)])
def test_low_precision_keeps_dtype(dtype, tol):
    x = np.random.default_rng(4).standard_normal((2, 5, 6))
    t = Tensor(x.astype(dtype), requires_grad=True)
    out = ops.rope(t, np.arange(10, 15))
    assert out.dtype == dtype
    np.testing.assert_allclose(out.data.astype(np.float64), reference(x.astype(dtype).astype(np.float64),
                                                                      range(10, 15), 10000.0), rtol=tol, atol=tol)
    out.backward(np.ones(out.shape, dtype=dtype))
    assert t.grad.dtype == dtype


def test_bad_input():
    x = Tensor(np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="even last dim"):
        ops.rope(x, np.arange(3))
    x = Tensor(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="positions"):
        ops.rope(x, np.arange(4))
    with pytest.raises(TypeError, match="positions: expected an integer array"):
        ops.rope(x, np.arange(3.0))
    with pytest.raises(ValueError, match="base"):
        ops.rope(x, np.arange(3), base=0.0)
    with pytest.raises(TypeError, match="x"):
        ops.rope(Tensor(np.zeros((3, 4), dtype=np.int64)), np.arange(3))
    with pytest.raises(ValueError, match="x"):
        ops.rope(Tensor(np.zeros(4)), np.arange(1))
