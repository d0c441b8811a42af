"""exp and log: values against math, gradients, dtypes."""
import math

import numpy as np
import pytest

from pymglu import dtypes
from pymglu.autograd import Tensor, check_grads, ops


@pytest.mark.parametrize("shape", [(7,), (2, 3, 5), ()])
def test_exp_log(shape):
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal(shape)
    pos = rng.uniform(0.2, 5.0, shape)
    np.testing.assert_allclose(ops.exp(Tensor(x)).data, np.vectorize(math.exp)(x), rtol=1e-15)
    np.testing.assert_allclose(ops.log(Tensor(pos)).data, np.vectorize(math.log)(pos), rtol=1e-15, atol=1e-16)
    check_grads(ops.exp, [x])
    check_grads(ops.log, [pos])
    check_grads(lambda a: a.exp().log() * a.log().exp(), [pos])


@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16, dtypes.bfloat16])
def test_low_precision(dtype):
    x = Tensor(np.linspace(0.5, 3.0, 11).astype(dtype), requires_grad=True)
    y = ops.log(ops.exp(x))
    assert y.dtype == dtype
    np.testing.assert_allclose(y.data.astype(np.float64), x.data.astype(np.float64), rtol=2e-2)
    y.backward(np.ones(11, dtype=dtype))
    assert x.grad.dtype == dtype
    np.testing.assert_allclose(x.grad.astype(np.float64), 1.0, rtol=3e-2)


def test_dtype_errors():
    with pytest.raises(TypeError, match=r"x: expected dtype in \(.*\), got int64 array"):
        ops.exp(np.arange(3))
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.log(np.arange(3))
