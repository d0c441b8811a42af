"""dropout: inverted scaling, reproducible masks, gradients through the mask, identity paths, errors."""
import numpy as np
import pytest

from pymglu import dtypes
from pymglu.autograd import Tensor, check_grads, ops


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_inverted_dropout(p):
    x = np.random.default_rng(0).uniform(1.0, 2.0, (200, 300))
    out = ops.dropout(Tensor(x), p, rng=np.random.default_rng(1)).data
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / (1 - p), rtol=1e-15)
    frac = kept.mean()
    assert abs(frac - (1 - p)) < 5 * np.sqrt(p * (1 - p) / x.size)  # within 5 standard deviations
    assert abs(out.mean() / x.mean() - 1) < 0.05  # expectation preserved


def test_same_seed_same_mask_and_grad_uses_the_mask():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 5))
    a = ops.dropout(Tensor(x), 0.4, rng=123).data
    b = ops.dropout(Tensor(x), 0.4, rng=np.random.default_rng(123)).data
    np.testing.assert_array_equal(a, b)
    c = ops.dropout(Tensor(x), 0.4, rng=124).data
    assert not np.array_equal(a != 0, c != 0)
    t = Tensor(x, requires_grad=True)
    ops.dropout(t, 0.4, rng=123).backward(np.ones((4, 5)))
    np.testing.assert_array_equal(t.grad, np.where(a != 0, 1 / 0.6, 0.0))
    check_grads(lambda u: ops.dropout(u, 0.4, rng=7), [x])  # a fixed seed makes the function deterministic


def test_identity_when_not_training_or_p_zero():
    x = Tensor(np.random.default_rng(3).standard_normal((3, 3)), requires_grad=True)
    assert ops.dropout(x, 0.5, training=False) is x
    assert ops.dropout(x, 0.0) is x
    y = ops.dropout(np.ones(3), 0.5, training=False)
    assert isinstance(y, Tensor) and np.array_equal(y.data, np.ones(3))


@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16, dtypes.bfloat16])
def test_keeps_dtype(dtype):
    x = Tensor(np.ones((8, 8), dtype=dtype), requires_grad=True)
    out = ops.dropout(x, 0.5, rng=0)
    assert out.dtype == dtype
    assert set(np.unique(out.data.astype(np.float64))) <= {0.0, 2.0}
    out.backward(np.ones((8, 8), dtype=dtype))
    assert x.grad.dtype == dtype
    np.testing.assert_array_equal(x.grad.astype(np.float64), out.data.astype(np.float64))


def test_errors():
    x = Tensor(np.ones(4))
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="p: expected"):
            ops.dropout(x, bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="p: expected a finite number"):
            ops.dropout(x, bad)
    with pytest.raises(TypeError, match="p: expected a real number"):
        ops.dropout(x, "0.5")
    with pytest.raises(TypeError, match="rng: expected None, an int seed or a numpy.random.Generator"):
        ops.dropout(x, 0.5, rng=np.random.RandomState(0))
    with pytest.raises(TypeError, match="rng: expected"):
        ops.dropout(x, 0.5, rng=True)
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.dropout(np.ones(4, dtype=np.int32), 0.5)
