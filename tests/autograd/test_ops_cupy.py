"""Every autograd op on CuPy arrays: same values and gradients as on NumPy (gpu-marked, skipped without one)."""
import numpy as np
import pytest

from pymglu.autograd import Tensor, ops
from pymglu.backend import gpu_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA device"),
]


def run_both(fn, arrays, fixed=(), seed=0):
    """Forward + backward of ``fn`` on NumPy and on CuPy; returns both (output, grads) in NumPy."""
    import cupy as cp

    results = []
    for xp in (np, cp):
        ts = [Tensor(xp.asarray(a), requires_grad=True) for a in arrays]
        fx = [xp.asarray(f) if isinstance(f, np.ndarray) else f for f in fixed]
        out = fn(*ts, *fx)
        u = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
        out.backward(xp.asarray(u))
        assert out.device == ("cpu" if xp is np else "cuda:0")
        results.append((out.numpy(), [cp.asnumpy(t.grad) if t.grad is not None else None for t in ts]))
    return results


def assert_same(results, rtol):
    (o_np, g_np), (o_cp, g_cp) = results
    np.testing.assert_allclose(o_cp, o_np, rtol=rtol, atol=rtol)
    for a, b in zip(g_cp, g_np):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)


R = np.random.default_rng(0)
X = R.standard_normal((2, 3, 8))
CASES = {
    "arith": (lambda a, b: (a * b - a / (b * b + 1.0) + (-a)) @ b.transpose((0, 2, 1)), [X, R.standard_normal((2, 3, 8))], ()),
    "sum_mean": (lambda a: a.sum(axis=(0, 2), keepdims=True) * a.mean(axis=-1, keepdims=True), [X], ()),
    "shape": (lambda a: ops.concat([a.reshape(6, 8).T, a[:, :, ::2].reshape(8, 3)], axis=1), [X], ()),
    "getitem_adv": (lambda a, i: a[i, :, i], [X], (np.array([1, 1, 0]),)),
    "getitem_bool": (lambda a, m: a[m], [X], (X > 0.2,)),
    "exp_log": (lambda a: ops.log(ops.exp(a) + 1.0), [X], ()),
    "activations": (lambda a: ops.silu(a) + ops.gelu(a) + ops.gelu_tanh(a) + ops.relu(a) + ops.sigmoid(a), [X], ()),
    "embedding": (lambda w, i: ops.embedding(w, i), [R.standard_normal((10, 4))], (np.array([[1, 9, 1], [0, 1, 2]]),)),
    "rms_norm": (lambda a, w: ops.rms_norm(a, w), [X, R.standard_normal(8)], ()),
    "cross_entropy": (lambda z, t: ops.softmax_cross_entropy(z, t), [X], (np.array([[0, 7, -100], [3, 3, 1]]),)),
    "attention": (lambda q, k, v: ops.causal_self_attention(q, k, v), [R.standard_normal((2, 2, 3, 4)), R.standard_normal((2, 2, 5, 4)), R.standard_normal((2, 2, 5, 4))], ()),
    "mglu": (lambda x, W, L: ops.mglu(x, W, L, activation="gelu"), [X, R.standard_normal((5, 8)), R.standard_normal((3, 5, 8))], ()),
    "glu": (lambda x, Wg, Wv: ops.glu(x, Wg, Wv), [X, R.standard_normal((5, 8)), R.standard_normal((5, 8))], ()),
    "rope": (lambda a, p: ops.rope(a, p, base=100.0), [R.standard_normal((2, 2, 3, 6))], (np.array([4, 5, 6]),)),
}


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-10), (np.float32, 2e-4)])
@pytest.mark.parametrize("name", list(CASES))
def test_op_on_cupy_matches_numpy(name, dtype, rtol):
    fn, arrays, fixed = CASES[name]
    assert_same(run_both(fn, [a.astype(dtype) for a in arrays], fixed), rtol)


def test_dropout_on_cupy():
    import cupy as cp

    x = Tensor(cp.ones((256, 256), dtype=cp.float32), requires_grad=True)
    out = ops.dropout(x, 0.25, rng=7)
    again = ops.dropout(Tensor(cp.ones((256, 256), dtype=cp.float32)), 0.25, rng=cp.random.default_rng(7))
    assert isinstance(out.data, cp.ndarray)
    cp.testing.assert_array_equal(out.data, again.data)
    vals = set(cp.asnumpy(cp.unique(out.data)).tolist())
    assert vals == {0.0, np.float32(1 / 0.75)}
    assert abs(float((out.data != 0).mean()) - 0.75) < 0.01
    out.backward(cp.ones((256, 256), dtype=cp.float32))
    cp.testing.assert_array_equal(x.grad, out.data)
    with pytest.raises(TypeError, match="a NumPy Generator would draw on the host"):
        ops.dropout(x, 0.25, rng=np.random.default_rng(0))


def test_mixing_numpy_and_cupy_raises():
    import cupy as cp

    from pymglu.backend import DeviceMismatchError

    with pytest.raises(DeviceMismatchError):
        ops.add(Tensor(np.ones(3)), Tensor(cp.ones(3)))
    with pytest.raises(DeviceMismatchError):
        ops.embedding(Tensor(cp.ones((3, 2))), np.array([0, 1]))
