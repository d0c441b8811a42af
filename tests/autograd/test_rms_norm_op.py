"""rms_norm(x, weight, eps): values against a float64 formula, gradients, dtypes and errors."""
import numpy as np
import pytest

from pymglu import dtypes
from pymglu.autograd import Tensor, check_grads, ops


def reference(x, w, eps):
    x = x.astype(np.float64)
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        out[idx] = row / np.sqrt(np.sum(row ** 2) / row.size + eps) * w.astype(np.float64)
    return out


@pytest.mark.parametrize("shape, eps, seed", [((5, 8), 1e-6, 0), ((2, 3, 37), 1e-2, 1), ((1,), 0.5, 2), ((4, 1, 3), 0.0, 3)])
def test_rms_norm_values_and_grads(shape, eps, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3
    w = rng.standard_normal(shape[-1])
    out = ops.rms_norm(Tensor(x), Tensor(w), eps=eps)
    np.testing.assert_allclose(out.data, reference(x, w, eps), rtol=1e-12, atol=1e-12)
    check_grads(lambda a, b: ops.rms_norm(a, b, eps=eps), [x, w], rtol=1e-6)
    check_grads(lambda a: ops.rms_norm(a, w, eps=eps), [x], rtol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(dtypes.float32, 1e-6), (dtypes.float16, 2e-3), (dtypes.bfloat16, 1e-2)])
def test_rms_norm_low_precision(dtype, tol):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 16)).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(16)).astype(dtype)
    xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    out = ops.rms_norm(xt, wt)
    assert out.dtype == dtype
    np.testing.assert_allclose(out.data.astype(np.float64), reference(x, w, 1e-6), rtol=tol, atol=tol)
    g = rng.standard_normal((6, 16)).astype(dtype)
    out.backward(g)
    assert xt.grad.dtype == dtype and wt.grad.dtype == dtype
    # Same gradients as the float64 computation, up to rounding of the inputs' dtype.
    x64, w64 = Tensor(x.astype(np.float64), requires_grad=True), Tensor(w.astype(np.float64), requires_grad=True)
    ops.rms_norm(x64, w64).backward(g.astype(np.float64))
    np.testing.assert_allclose(xt.grad.astype(np.float64), x64.grad, rtol=10 * tol, atol=10 * tol)
    np.testing.assert_allclose(wt.grad.astype(np.float64), w64.grad, rtol=10 * tol, atol=10 * tol)


def test_rms_norm_large_values_do_not_overflow_in_float16():
    x = np.full((2, 8), 3000.0, dtype=np.float16)  # x**2 overflows float16, not float32
    out = ops.rms_norm(Tensor(x), Tensor(np.ones(8, dtype=np.float16)))
    np.testing.assert_allclose(out.data.astype(np.float64), 1.0, rtol=1e-3)


def test_rms_norm_errors():
    x = Tensor(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"weight: expected shape \(4\), got float64 array of shape \(3,\)"):
        ops.rms_norm(x, np.ones(3))
    with pytest.raises(TypeError, match="x and weight must share a dtype"):
        ops.rms_norm(x, np.ones(4, dtype=np.float32))
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.rms_norm(np.zeros((2, 4), dtype=np.int64), np.ones(4))
    with pytest.raises(ValueError, match="eps: expected a finite number"):
        ops.rms_norm(x, np.ones(4), eps=float("nan"))
    with pytest.raises(ValueError, match="eps: expected a number >= 0"):
        ops.rms_norm(x, np.ones(4), eps=-1.0)


def test_rms_norm_eps_must_be_a_number():
    with pytest.raises(TypeError, match="eps: expected a real number, got '1e-6'"):
        ops.rms_norm(Tensor(np.ones((2, 4))), np.ones(4), eps="1e-6")
