"""The fused GPU paths of RMSNorm, rotary embeddings and causal attention (pymglu.cuda.tape_ops), gpu-marked.

Fresh random inputs rounded to the tested dtype; values and gradients are compared by relative error
with float64 NumPy references of each op's formula on the same rounded values, over ragged shapes. A
second check runs the op's expression path on the same CuPy arrays (inside
``pymglu.cuda.training.disabled()``) to show the fused path was the one tested.
"""
import math

import numpy as np
import pytest

from pymglu.autograd import Tensor, ops
from pymglu.backend import gpu_available
from pymglu.dtypes import bfloat16, float16, float32

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA device"),
]

DTYPES = [float32, float16, bfloat16]
IDS = ["fp32", "fp16", "bf16"]
#: one rounding to the dtype plus float32 arithmetic
TOL = {np.dtype(float32): 1e-5, np.dtype(float16): 2e-3, np.dtype(bfloat16): 1.5e-2}


def rel_err(got, want):
    import cupy as cp

    got = cp.asnumpy(got).astype(np.float64)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def run_op(fn, arrays, g_host):
    """Forward and backward on CuPy copies; returns the output and the gradients."""
    import cupy as cp

    ts = [Tensor(cp.asarray(a), requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.backward(cp.asarray(g_host))
    return out.data, [t.grad for t in ts]


def spy_kernel(monkeypatch):
    from pymglu.cuda import tape_ops

    names = []
    real = tape_ops._function

    def spy(kernel, dtype):
        names.append(kernel)
        return real(kernel, dtype)

    monkeypatch.setattr(tape_ops, "_function", spy)
    return names


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(3, 5, 33), (7, 1024), (2, 4097), (1, 1)])
def test_rms_norm_matches_float64(dtype, shape, monkeypatch):
    used = spy_kernel(monkeypatch)
    rng = np.random.default_rng(shape[-1])
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    w = (1 + 0.3 * rng.standard_normal(shape[-1])).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    out, (dx, dw) = run_op(lambda a, b: ops.rms_norm(a, b, eps=1e-6), [x, w], g)
    assert used == ["rms_norm_fwd", "rms_norm_bwd"]
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    r = 1 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-6)
    xhat = x64 * r
    gx = g64 * w64
    want_dx = r * (gx - xhat * (gx * xhat).mean(-1, keepdims=True))
    want_dw = (g64 * xhat).reshape(-1, shape[-1]).sum(0)
    tol = TOL[np.dtype(dtype)]
    assert out.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert rel_err(out, xhat * w64) < tol
    if shape[-1] > 1:  # with one element per row xhat is +-1 and dx vanishes
        assert rel_err(dx, want_dx) < 4 * tol
    assert rel_err(dw, want_dw) < 4 * tol


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape, offset", [((2, 3, 7, 8), 0), ((1, 2, 33, 64), 100), ((5, 130), 7)])
def test_rope_matches_float64(dtype, shape, offset, monkeypatch):
    import cupy as cp

    used = spy_kernel(monkeypatch)
    rng = np.random.default_rng(len(shape) + offset)
    T, Dh = shape[-2], shape[-1]
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    pos = np.arange(offset, offset + T)
    out, (dx,) = run_op(lambda a: ops.rope(a, cp.asarray(pos)), [x], g)
    assert used == ["rope", "rope"]
    half = Dh // 2
    theta = pos[:, None] * 10000.0 ** (-np.arange(half) * 2.0 / Dh)
    c, s = np.cos(theta), np.sin(theta)

    def rotate(v, sign):
        a, b = v[..., :half], v[..., half:]
        return np.concatenate([a * c - b * sign * s, a * sign * s + b * c], axis=-1)

    tol = TOL[np.dtype(dtype)]
    assert rel_err(out, rotate(x.astype(np.float64), 1.0)) < tol
    assert rel_err(dx, rotate(g.astype(np.float64), -1.0)) < tol


def attention64(q, k, v, scale):
    Tq, Tk = q.shape[2], k.shape[2]
    s = q @ k.swapaxes(-1, -2) * scale
    visible = np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + (Tk - Tq)
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("B, H, Tq, Tk, Dh", [(2, 3, 37, 37, 16), (1, 2, 5, 40, 32), (2, 1, 130, 130, 64)])
def test_attention_matches_float64(dtype, B, H, Tq, Tk, Dh, monkeypatch):
    used = spy_kernel(monkeypatch)
    rng = np.random.default_rng(Tq * Tk)
    q = rng.standard_normal((B, H, Tq, Dh)).astype(dtype)
    k = rng.standard_normal((B, H, Tk, Dh)).astype(dtype)
    v = rng.standard_normal((B, H, Tk, Dh)).astype(dtype)
    g = rng.standard_normal((B, H, Tq, Dh)).astype(dtype)
    out, (dq, dk, dv) = run_op(lambda a, b, c: ops.causal_self_attention(a, b, c), [q, k, v], g)
    assert used == ["causal_softmax", "causal_softmax_bwd"]
    scale = 1 / math.sqrt(Dh)
    q64, k64, v64, g64 = (a.astype(np.float64) for a in (q, k, v, g))
    p = attention64(q64, k64, v64, scale)
    dp = g64 @ v64.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    tol = 2 * TOL[np.dtype(dtype)]  # P and dS are rounded to the dtype as operands of the products
    assert out.dtype == dtype
    assert rel_err(out, p @ v64) < tol
    assert rel_err(dv, p.swapaxes(-1, -2) @ g64) < tol
    assert rel_err(dq, ds @ k64) < tol
    assert rel_err(dk, ds.swapaxes(-1, -2) @ q64) < tol


def test_float64_attention_and_the_disabled_switch_keep_the_expression_path(monkeypatch):
    import cupy as cp

    from pymglu.cuda import training

    used = spy_kernel(monkeypatch)
    rng = np.random.default_rng(9)
    q = Tensor(cp.asarray(rng.standard_normal((1, 2, 6, 8))))
    ops.causal_self_attention(q, q, q)
    x = Tensor(cp.asarray(rng.standard_normal((4, 16)).astype(bfloat16)))
    with training.disabled():
        ops.rms_norm(x, Tensor(cp.ones(16, dtype=bfloat16)))
        ops.rope(x, cp.arange(4))
        ops.causal_self_attention(*(Tensor(cp.asarray(rng.standard_normal((1, 1, 3, 8)).astype(bfloat16))),) * 3)
    assert used == []
