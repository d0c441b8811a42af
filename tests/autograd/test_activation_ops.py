"""silu, gelu, gelu_tanh, relu, sigmoid as tape ops: values against scalar formulas, gradients, dtypes."""
import numpy as np
import pytest

from pymglu import dtypes
from pymglu.autograd import Tensor, check_grads, ops

NAMES = ["silu", "gelu", "gelu_tanh", "relu", "sigmoid"]


@pytest.mark.parametrize("shape", [(3, 7), (2, 1, 5)])
@pytest.mark.parametrize("name", NAMES)
def test_activation_values_and_grads(name, shape, ref_act):
    rng = np.random.default_rng(NAMES.index(name) * 10 + len(shape))
    x = rng.standard_normal(shape) * 2.5
    x[np.abs(x) < 1e-3] = 0.5  # keep finite differences away from relu's kink
    g, dg = ref_act[name]
    for out in (getattr(ops, name)(Tensor(x)), ops.activation(Tensor(x), name)):
        np.testing.assert_allclose(out.data, g(x), rtol=1e-12, atol=1e-15)
    check_grads(getattr(ops, name), [x])
    t = Tensor(x, requires_grad=True)
    u = rng.standard_normal(shape)
    getattr(ops, name)(t).backward(u)
    np.testing.assert_allclose(t.grad, u * dg(x), rtol=1e-11, atol=1e-14)


def test_extreme_inputs_stay_finite():
    x = np.array([-800.0, -40.0, 0.0, 40.0, 800.0])
    for name in NAMES:
        t = Tensor(x, requires_grad=True)
        out = ops.activation(t, name)
        out.backward(np.ones(5))
        assert np.all(np.isfinite(out.data)) and np.all(np.isfinite(t.grad)), name
    np.testing.assert_allclose(ops.sigmoid(Tensor(x)).data, [0, 0, 0.5, 1, 1], atol=1e-17)


@pytest.mark.parametrize("dtype, tol", [(dtypes.float32, 1e-6), (dtypes.float16, 2e-3), (dtypes.bfloat16, 1e-2)])
def test_low_precision(dtype, tol, ref_act):
    x = np.linspace(-4, 4, 17).astype(dtype)
    for name in NAMES:
        t = Tensor(x, requires_grad=True)
        out = getattr(ops, name)(t)
        assert out.dtype == dtype
        x64 = x.astype(np.float64)
        np.testing.assert_allclose(out.data.astype(np.float64), ref_act[name][0](x64), rtol=tol, atol=tol)
        out.backward(np.ones(17, dtype=dtype))
        assert t.grad.dtype == dtype
        np.testing.assert_allclose(t.grad.astype(np.float64), ref_act[name][1](x64), rtol=tol, atol=tol)


def test_errors():
    with pytest.raises(ValueError, match="activation: expected one of"):
        ops.activation(Tensor(np.zeros(2)), "swish")
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.silu(np.arange(3))


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh", "relu", "sigmoid"])
def test_forward_and_derivative_equal_the_separate_functions(name):
    from pymglu import activations

    s = np.random.default_rng(3).standard_normal((4, 7)) * 3
    value, slope = activations.forward_and_derivative(s, name)
    np.testing.assert_array_equal(value, activations.forward(s, name))
    np.testing.assert_allclose(slope, activations.derivative(s, name), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", NAMES)
def test_results_written_into_out_equal_the_allocated_ones(name, dtype):
    """``out=`` (the planes of the MGLU reference path) changes where the results go, not their bits; the
    buffers hold NaN first, so a value left unwritten fails."""
    from pymglu import activations

    s = (np.random.default_rng(5).standard_normal((6, 9)) * 3).astype(dtype)
    value = np.full_like(s, np.nan)
    assert activations.forward(s, name, out=value) is value
    np.testing.assert_array_equal(value, activations.forward(s, name))
    pair = (np.full_like(s, np.nan), np.full_like(s, np.nan))
    got = activations.forward_and_derivative(s, name, out=pair)
    assert got[0] is pair[0] and got[1] is pair[1]
    want = activations.forward_and_derivative(s, name)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(ValueError, match="out: expected a buffer of shape"):
        activations.forward(s, name, out=s)  # silu would read s after writing sigmoid(s) over it
    with pytest.raises(ValueError, match=r"out\[1\]: expected a buffer of shape \(6, 9\)"):
        activations.forward_and_derivative(s, name, out=(value, np.empty((9, 6), dtype)))
    with pytest.raises(ValueError, match="two different buffers"):
        activations.forward_and_derivative(s, name, out=(value, value))
