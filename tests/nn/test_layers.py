"""Linear, Embedding, RMSNorm, the GLU family and FeedForward: shapes, values, gradients, argument checks."""
from __future__ import annotations

import numpy as np
import pytest

from pymglu import functional
from pymglu.autograd import Tensor
from pymglu.dtypes import bfloat16
from pymglu.nn import (
    FEEDFORWARD_KINDS, GLU, MGLU, Embedding, FeedForward, GeGLU, GeMGLU, Linear, ReGLU, ReMGLU, RMSNorm,
    SwiGLU, SwiMGLU,
)


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def test_linear_values_and_shapes():
    rng = np.random.default_rng(0)
    lin = Linear(5, 3, bias=True, dtype=np.float64, rng=1)
    assert lin.weight.shape == (3, 5) and lin.bias.shape == (3,)
    np.testing.assert_array_equal(lin.bias.data, 0.0)
    lin.bias.data = randn(rng, 3, dtype=np.float64)
    x = randn(rng, 2, 4, 5, dtype=np.float64)
    y = lin(x)
    assert y.shape == (2, 4, 3)
    np.testing.assert_allclose(y.data, x @ lin.weight.data.T + lin.bias.data, rtol=1e-12)
    y1 = lin(x[0, 0])
    assert y1.shape == (3,)
    np.testing.assert_allclose(y1.data, y.data[0, 0], rtol=1e-12)
    assert [n for n, _ in Linear(5, 3).named_parameters()] == ["weight"]


def test_linear_init_scale():
    w = Linear(400, 300, rng=0).weight.data
    assert abs(w.std() - 400 ** -0.5) < 0.05 * 400 ** -0.5
    assert w.dtype == np.float32
    np.testing.assert_array_equal(Linear(4, 3, rng=5).weight.data, Linear(4, 3, rng=5).weight.data)


def test_linear_gradients_reach_parameters():
    rng = np.random.default_rng(1)
    lin = Linear(4, 3, bias=True, dtype=np.float64, rng=2)
    x = randn(rng, 6, 4, dtype=np.float64)
    g = randn(rng, 6, 3, dtype=np.float64)
    lin(x).backward(g)
    np.testing.assert_allclose(lin.weight.grad, g.T @ x, rtol=1e-12)
    np.testing.assert_allclose(lin.bias.grad, g.sum(axis=0), rtol=1e-12)


def test_embedding_and_rmsnorm():
    rng = np.random.default_rng(2)
    emb = Embedding(11, 6, rng=0)
    ids = np.array([[1, 10, 3], [0, 1, 1]])
    out = emb(ids)
    assert out.shape == (2, 3, 6)
    np.testing.assert_array_equal(out.data, emb.weight.data[ids])
    norm = RMSNorm(6, eps=1e-5)
    np.testing.assert_array_equal(norm.weight.data, 1.0)
    norm.weight.data = randn(rng, 6)
    x = randn(rng, 2, 3, 6)
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * norm.weight.data
    np.testing.assert_allclose(norm(x).data, want, rtol=1e-5)


@pytest.mark.parametrize(
    "cls, kwargs, activation",
    [(GLU, {}, "sigmoid"), (SwiGLU, {}, "silu"), (GeGLU, {}, "gelu"), (GeGLU, {"approximate": "tanh"}, "gelu_tanh"),
     (ReGLU, {}, "relu"), (GLU, {"activation": "silu"}, "silu")],
)
def test_glu_family_matches_functional(cls, kwargs, activation):
    rng = np.random.default_rng(3)
    layer = cls(6, 10, dtype=np.float64, rng=4, **kwargs)
    assert layer.activation == activation
    assert layer.W_gate.shape == layer.W_value.shape == (10, 6)
    x = randn(rng, 3, 2, 6, dtype=np.float64)
    y = layer(x)
    assert y.shape == (3, 2, 10)
    np.testing.assert_array_equal(y.data, functional.glu(x, layer.W_gate.data, layer.W_value.data, activation))


@pytest.mark.parametrize("kind", FEEDFORWARD_KINDS)
def test_feedforward_kinds(kind):
    rng = np.random.default_rng(5)
    n_masks = 2 if "mglu" in kind else None
    ff = FeedForward(6, 12, kind=kind, n_masks=n_masks, rng=0)
    assert ff.down.weight.shape == (6, 12)
    x = Tensor(randn(rng, 2, 3, 6))
    y = ff(x)
    assert y.shape == (2, 3, 6) and y.dtype == np.float32
    y.backward(np.ones(y.shape, dtype=np.float32))
    for name, p in ff.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    if n_masks:
        assert isinstance(ff.up, MGLU) and ff.up.mask_logits.shape == (2, 12, 6)


def test_feedforward_plain_matches_formula():
    rng = np.random.default_rng(6)
    ff = FeedForward(4, 8, kind="relu", dtype=np.float64, rng=1)
    x = randn(rng, 5, 4, dtype=np.float64)
    want = np.maximum(x @ ff.up.weight.data.T, 0) @ ff.down.weight.data.T
    np.testing.assert_allclose(ff(x).data, want, rtol=1e-12)
    gem = FeedForward(4, 8, kind="gemglu", approximate="tanh", rng=1)
    assert isinstance(gem.up, GeMGLU) and gem.up.activation == "gelu_tanh"
    assert FeedForward(4, 8, kind="mglu", rng=1).up.activation == "sigmoid"
    assert isinstance(FeedForward(4, 8, kind="remglu", n_masks=3, rng=1).up, ReMGLU)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Linear(0, 3), "d_in"),
        (lambda: Linear(3, 2.5), "d_out"),
        (lambda: Linear(3, True), "d_out"),
        (lambda: Linear(3, 4, bias=1), "bias"),
        (lambda: Linear(3, 4, dtype=np.int32), "dtype"),
        (lambda: Linear(3, 4, rng="seed"), "rng"),
        (lambda: Embedding(-1, 4), "V"),
        (lambda: Embedding(4, "4"), "D"),
        (lambda: Embedding(4, 4, init_std=0.0), "init_std"),
        (lambda: Embedding(4, 4, init_std=float("nan")), "init_std"),
        (lambda: RMSNorm(0), "D"),
        (lambda: RMSNorm(4, eps=-1e-6), "eps"),
        (lambda: RMSNorm(4, eps=float("inf")), "eps"),
        (lambda: RMSNorm(4, dtype="int8"), "dtype"),
        (lambda: GLU(4, 0), "h"),
        (lambda: GLU(4, 4, activation="tanh"), "activation"),
        (lambda: GeGLU(4, 4, approximate="fast"), "approximate"),
        (lambda: SwiGLU(None, 4), "d"),
        (lambda: MGLU(4, 4, n_masks=0), "n_masks"),
        (lambda: MGLU(4, 4, n_masks=1.5), "n_masks"),
        (lambda: SwiMGLU(4, 4, n_masks="2"), "n_masks"),
        (lambda: ReMGLU(4, 4, n_masks=-3), "n_masks"),
        (lambda: MGLU(4, 4, activation="swish"), "activation"),
        (lambda: GeMGLU(4, 4, approximate=True), "approximate"),
        (lambda: SwiMGLU(4, 4, dtype="float8"), "dtype"),
        (lambda: FeedForward(4, 8, kind="moe"), "swiglu"),
        (lambda: FeedForward(4, 8, kind="swiglu", n_masks=2), "n_masks"),
        (lambda: FeedForward(4, 8, kind="swimglu", n_masks=0), "n_masks"),
        (lambda: FeedForward(4, -8), "h"),
    ],
)
def test_constructor_rejects_bad_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_forward_rejects_bad_inputs():
    x_bad_width = np.zeros((2, 5), dtype=np.float32)
    x_bad_dtype = np.zeros((2, 4), dtype=np.float64)
    for layer in (Linear(4, 3), RMSNorm(4), SwiGLU(4, 6), SwiMGLU(4, 6)):
        with pytest.raises(ValueError, match="last dim"):
            layer(x_bad_width)
        with pytest.raises(TypeError, match="float32"):
            layer(x_bad_dtype)
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        Embedding(11, 3)(np.array([3, 11]))


def test_bfloat16_layers_keep_their_dtype():
    rng = np.random.default_rng(7)
    x = randn(rng, 3, 8).astype(bfloat16)
    for layer in (SwiGLU(8, 16, dtype=bfloat16, rng=0), SwiMGLU(8, 16, n_masks=2, dtype=bfloat16, rng=0),
                  RMSNorm(8, dtype=bfloat16)):
        y = layer(x)
        assert y.dtype == bfloat16
    m = SwiMGLU(8, 16, dtype=bfloat16, rng=0)
    assert m.W.dtype == bfloat16 and m.mask_logits.dtype == np.float32
