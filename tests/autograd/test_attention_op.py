"""causal_self_attention: values against per-query loops, gradients, KV-cache offsets, dtypes, errors."""
import math

import numpy as np
import pytest

from pymglu import dtypes
from pymglu.autograd import Tensor, check_grads, ops


def reference(q, k, v, scale=None):
    B, H, Tq, Dh = q.shape
    Tk = k.shape[2]
    scale = 1 / math.sqrt(Dh) if scale is None else scale
    out = np.zeros((B, H, Tq, v.shape[3]))
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                visible = range(Tk - Tq + i + 1)
                scores = [scale * float(np.dot(q[b, h, i], k[b, h, j])) for j in visible]
                m = max(scores)
                w = [math.exp(s - m) for s in scores]
                out[b, h, i] = sum(wj * v[b, h, j] for wj, j in zip(w, visible)) / sum(w)
    return out


@pytest.mark.parametrize(
    "B, H, Tq, Tk, Dh, Dv, scale",
    [(2, 3, 5, 5, 4, 4, None), (1, 2, 1, 6, 3, 3, None), (2, 1, 3, 7, 5, 2, 0.7), (1, 1, 1, 1, 2, 2, None), (1, 2, 4, 4, 8, 8, -0.3)],
)
def test_values_and_grads(B, H, Tq, Tk, Dh, Dv, scale):
    rng = np.random.default_rng(B * 100 + Tq * 10 + Tk)
    q, k = rng.standard_normal((B, H, Tq, Dh)), rng.standard_normal((B, H, Tk, Dh))
    v = rng.standard_normal((B, H, Tk, Dv))
    out = ops.causal_self_attention(Tensor(q), Tensor(k), Tensor(v), scale=scale)
    assert out.shape == (B, H, Tq, Dv)
    np.testing.assert_allclose(out.data, reference(q, k, v, scale), rtol=1e-12, atol=1e-13)
    f = lambda a, b, c: ops.causal_self_attention(a, b, c, scale=scale)  # noqa: E731
    check_grads(f, [q, k, v])
    check_grads(lambda a: f(a, k, v), [q])
    check_grads(lambda b: f(q, b, v), [k])


def test_kv_cache_step_matches_full_sequence():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 2, 6, 4)) for _ in range(3))
    full = ops.causal_self_attention(Tensor(q), Tensor(k), Tensor(v)).data
    for t in range(1, 7):  # decoding step t: the newest query against the first t keys
        step = ops.causal_self_attention(Tensor(q[:, :, t - 1:t]), Tensor(k[:, :, :t]), Tensor(v[:, :, :t])).data
        np.testing.assert_allclose(step, full[:, :, t - 1:t], rtol=1e-13, atol=1e-14)
    last3 = ops.causal_self_attention(Tensor(q[:, :, 3:]), Tensor(k), Tensor(v)).data
    np.testing.assert_allclose(last3, full[:, :, 3:], rtol=1e-13, atol=1e-14)


def test_future_keys_do_not_matter():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 1, 4, 3)) for _ in range(3))
    kt, vt = Tensor(k, requires_grad=True), Tensor(v, requires_grad=True)
    out = ops.causal_self_attention(Tensor(q), kt, vt)
    out.backward(np.concatenate([np.ones((1, 1, 2, 3)), np.zeros((1, 1, 2, 3))], axis=2))
    # only queries 0 and 1 carry gradient, so keys and values 2 and 3 get none
    assert np.all(kt.grad[:, :, 2:] == 0) and np.all(vt.grad[:, :, 2:] == 0)
    assert np.any(kt.grad[:, :, 1] != 0) and np.any(vt.grad[:, :, :2] != 0)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 3] += 100.0
    v2[:, :, 3] -= 50.0
    out2 = ops.causal_self_attention(Tensor(q), Tensor(k2), Tensor(v2))
    np.testing.assert_array_equal(out2.data[:, :, :3], out.data[:, :, :3])


def test_large_scores_are_stable():
    q = np.full((1, 1, 3, 2), 300.0)
    k = np.array([[[[300.0, 300.0], [-300.0, -300.0], [300.0, 300.0]]]])
    v = np.arange(6.0).reshape(1, 1, 3, 2)
    qt = Tensor(q, requires_grad=True)
    out = ops.causal_self_attention(qt, Tensor(k), Tensor(v))
    np.testing.assert_allclose(out.data[0, 0], [v[0, 0, 0], v[0, 0, 0], (v[0, 0, 0] + v[0, 0, 2]) / 2], atol=1e-12)
    out.backward(np.ones(out.shape))
    assert np.all(np.isfinite(qt.grad))


@pytest.mark.parametrize("dtype, tol", [(dtypes.float32, 1e-5), (dtypes.float16, 5e-3), (dtypes.bfloat16, 3e-2)])
def test_low_precision(dtype, tol):
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 2, 5, 8)).astype(dtype) for _ in range(3))
    qt = Tensor(q, requires_grad=True)
    out = ops.causal_self_attention(qt, Tensor(k), Tensor(v))
    assert out.dtype == dtype
    ref = reference(*(a.astype(np.float64) for a in (q, k, v)))
    np.testing.assert_allclose(out.data.astype(np.float64), ref, rtol=tol, atol=tol)
    out.backward(np.ones(out.shape, dtype=dtype))
    assert qt.grad.dtype == dtype


def test_errors():
    q = np.zeros((1, 2, 3, 4))
    with pytest.raises(ValueError, match="q: expected a 4-d array, got float64 array of shape \\(2, 3, 4\\)"):
        ops.causal_self_attention(q[0], q, q)
    with pytest.raises(ValueError, match=r"k: expected shape \(1, 2, \*, 4\), got float64 array of shape \(1, 2, 3, 5\)"):
        ops.causal_self_attention(q, np.zeros((1, 2, 3, 5)), q)
    with pytest.raises(ValueError, match=r"v: expected shape \(1, 2, 3, \*\)"):
        ops.causal_self_attention(q, q, np.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match="q: expected at most as many positions as k"):
        ops.causal_self_attention(q, q[:, :, :2], q[:, :, :2])
    with pytest.raises(TypeError, match="q and k must share a dtype"):
        ops.causal_self_attention(q, q.astype(np.float32), q)
    with pytest.raises(ValueError, match="scale: expected a finite number"):
        ops.causal_self_attention(q, q, q, scale=float("inf"))
