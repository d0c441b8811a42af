"""MGLU and GLU as tape ops: forward against explicit masked matmuls, finite-difference gradients of x
and W, and the straight-through gradient of the mask logits against its closed form."""
import numpy as np
import pytest

from pymglu import dtypes
from pymglu.autograd import Tensor, check_grads, ops
from pymglu.masks import pack_masks

ACTS = ["silu", "gelu", "gelu_tanh", "relu", "sigmoid"]


def explicit_mglu(x, W, masks, g):
    """sum_i g(x (M_i*W)^T) * x ((1-M_i)*W)^T with two separate masked matmuls per mask."""
    y = 0.0
    for M in masks:
        gate_w = np.where(M, W, 0.0)
        value_w = np.where(M, 0.0, W)
        y = y + g(x @ gate_w.T) * (x @ value_w.T)
    return y


def random_inputs(rng, lead, d, h, n):
    x = rng.standard_normal(lead + (d,))
    W = rng.standard_normal((h, d)) / np.sqrt(d)
    logits = 0.01 * rng.standard_normal((n, h, d))
    return x, W, logits


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("act", ACTS)
def test_mglu_grads_x_and_w(act, n, ref_act):
    rng = np.random.default_rng(ACTS.index(act) * 10 + n)
    x, W, logits = random_inputs(rng, (2, 3), 37, 19, n)
    y = ops.mglu(Tensor(x), Tensor(W), Tensor(logits), activation=act)
    assert y.shape == (2, 3, 19)
    np.testing.assert_allclose(y.data, explicit_mglu(x, W, logits > 0, ref_act[act][0]), rtol=1e-11, atol=1e-12)
    check_grads(lambda a, b: ops.mglu(a, b, logits, activation=act), [x, W], rtol=1e-6)
    check_grads(lambda a: ops.mglu(a, W, logits, activation=act), [x], rtol=1e-6)
    check_grads(lambda b: ops.mglu(x, b, logits, activation=act), [W], rtol=1e-6)


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_mglu_recompute_gives_the_same_values_and_gradients(act):
    """recompute=True keeps no cache; the backward recomputes it and must give what the cached path gives,
    also through a retained graph run twice."""
    rng = np.random.default_rng(7)
    x, W, logits = random_inputs(rng, (3, 5), 37, 19, 3)
    dy = rng.standard_normal((3, 5, 19))
    results = []
    for recompute in (False, True):
        xt, Wt, lt = Tensor(x, requires_grad=True), Tensor(W, requires_grad=True), Tensor(logits, requires_grad=True)
        y = ops.mglu(xt, Wt, lt, activation=act, recompute=recompute)
        assert (y._creator.cache is None) == recompute
        (y * Tensor(dy)).sum().backward(retain_graph=True)
        first = [xt.grad.copy(), Wt.grad.copy(), lt.grad.copy()]
        (y * Tensor(dy)).sum().backward()
        np.testing.assert_allclose(xt.grad, 2 * first[0], rtol=1e-12)  # the retained graph ran again
        results.append((y.data, *first))
    for cached, recomputed in zip(*results):
        np.testing.assert_allclose(recomputed, cached, rtol=1e-12, atol=1e-14)


def closed_form_dlogits(x, W, masks, dy, g, dg):
    """dL_i = W * (e_i^T x), e_i = dy*(t - s_i)*g'(s_i) - dy*g(s_i), from explicit per-mask products."""
    xf, dyf = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    t = xf @ W.T
    out = []
    for M in masks:
        s = xf @ np.where(M, W, 0.0).T
        e = dyf * (t - s) * dg(s) - dyf * g(s)
        out.append(W * (e.T @ xf))
    return np.stack(out)


def relaxed_mglu(x, W, soft_masks, g):
    """MGLU with real-valued masks: the function the STE differentiates (gate M*W, value (1-M)*W)."""
    y = 0.0
    for M in soft_masks:
        y = y + g(x @ (M * W).T) * (x @ ((1.0 - M) * W).T)
    return y


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("act", ACTS)
def test_mglu_mask_logit_gradient_is_the_ste_closed_form(act, n, ref_act):
    rng = np.random.default_rng(100 + ACTS.index(act) * 10 + n)
    x, W, logits = random_inputs(rng, (2, 3), 37, 19, n)
    dy = rng.standard_normal((2, 3, 19))
    tx, tW, tl = (Tensor(a, requires_grad=True) for a in (x, W, logits))
    ops.mglu(tx, tW, tl, activation=act).backward(dy)
    g, dg = ref_act[act]
    expected = closed_form_dlogits(x, W, logits > 0, dy, g, dg)
    assert tl.grad.shape == logits.shape and tl.grad.dtype == np.float64
    np.testing.assert_allclose(tl.grad, expected, rtol=1e-10, atol=1e-12)
    assert np.abs(tl.grad).max() > 1e-3  # not trivially zero
    # The same number is the derivative of the relaxed (real-valued mask) MGLU at the binary masks:
    # check a few entries by central differences on the relaxed function.
    masks = (logits > 0).astype(np.float64)
    for i, r, c in [(0, 0, 0), (n - 1, 18, 36), (n // 2, 7, 11)]:
        eps = 1e-6
        plus, minus = masks.copy(), masks.copy()
        plus[i, r, c] += eps
        minus[i, r, c] -= eps
        fd = ((relaxed_mglu(x, W, plus, g) - relaxed_mglu(x, W, minus, g)) * dy).sum() / (2 * eps)
        if act == "relu" and np.any(np.abs(x.reshape(-1, 37) @ (masks[i] * W)[r]) < 1e-4):
            continue  # at a kink
        assert tl.grad[i, r, c] == pytest.approx(fd, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("n", range(1, 17))
def test_mglu_forward_matches_masked_matmul_loop(n, ref_act):
    rng = np.random.default_rng(200 + n)
    x, W, logits = random_inputs(rng, (5,), 13, 9, n)
    logits[rng.random(logits.shape) < 0.1] = 0.0  # exactly 0 is "not in the gate" (M = logits > 0)
    masks = logits > 0
    y = ops.mglu(Tensor(x), Tensor(W), Tensor(logits), activation="silu")
    expected = np.zeros((5, 9))
    for i in range(n):  # element-by-element loops, no matrix products
        for tok in range(5):
            for r in range(9):
                s = sum(x[tok, c] * W[r, c] for c in range(13) if masks[i, r, c])
                v = sum(x[tok, c] * W[r, c] for c in range(13) if not masks[i, r, c])
                expected[tok, r] += ref_act["silu"][0](s) * v
    np.testing.assert_allclose(y.data, expected, rtol=1e-12, atol=1e-13)
    # fixed masks, as bool or as packed bit-planes, give the same output and no mask gradient
    for fixed in (masks, pack_masks(masks)):
        tx = Tensor(x, requires_grad=True)
        out = ops.mglu(tx, Tensor(W), fixed, activation="silu")
        np.testing.assert_array_equal(out.data, y.data)
        out.backward(np.ones((5, 9)))
        assert tx.grad.shape == x.shape


def test_mglu_without_leading_dims_and_single_token():
    rng = np.random.default_rng(300)
    x, W, logits = random_inputs(rng, (), 6, 4, 3)
    y = ops.mglu(Tensor(x), Tensor(W), Tensor(logits))
    assert y.shape == (4,)
    check_grads(lambda a, b: ops.mglu(a, b, logits), [x, W])


@pytest.mark.parametrize("dtype, tol", [(dtypes.float32, 1e-5), (dtypes.float16, 1e-2), (dtypes.bfloat16, 5e-2)])
def test_mglu_low_precision(dtype, tol, ref_act):
    rng = np.random.default_rng(400)
    x, W, logits = random_inputs(rng, (4,), 32, 16, 2)
    xl, Wl = x.astype(dtype), W.astype(dtype)
    tx, tW, tl = Tensor(xl, requires_grad=True), Tensor(Wl, requires_grad=True), Tensor(logits.astype(np.float32), requires_grad=True)
    y = ops.mglu(tx, tW, tl)
    assert y.dtype == dtype
    ref = explicit_mglu(xl.astype(np.float64), Wl.astype(np.float64), logits > 0, ref_act["silu"][0])
    np.testing.assert_allclose(y.data.astype(np.float64), ref, rtol=tol, atol=tol)
    y.backward(np.ones(y.shape, dtype=dtype))
    assert tx.grad.dtype == dtype and tW.grad.dtype == dtype and tl.grad.dtype == np.float32


def test_mglu_errors():
    x, W = np.zeros((2, 5)), np.zeros((3, 5))
    with pytest.raises(ValueError, match=r"x: expected last dim d = 5"):
        ops.mglu(np.zeros((2, 4)), W, np.zeros((1, 3, 5)))
    with pytest.raises(ValueError, match=r"masks: expected shape \(\*, 3, 5\)"):
        ops.mglu(x, W, np.zeros((1, 3, 4), dtype=bool))
    with pytest.raises(ValueError, match="activation: expected one of"):
        ops.mglu(x, W, np.zeros((1, 3, 5)), activation="tanh")
    with pytest.raises(ValueError, match="chunk_tokens: expected an integer >= 1, got 0"):
        ops.mglu(x, W, np.zeros((1, 3, 5)), recompute=True, chunk_tokens=0)


def explicit_glu(x, Wg, Wv, g):
    return g(x @ Wg.T) * (x @ Wv.T)


@pytest.mark.parametrize("act", ACTS)
def test_glu_op(act, ref_act):
    rng = np.random.default_rng(500 + ACTS.index(act))
    x = rng.standard_normal((2, 3, 37))
    Wg, Wv = rng.standard_normal((19, 37)) / 6, rng.standard_normal((19, 37)) / 6
    y = ops.glu(Tensor(x), Tensor(Wg), Tensor(Wv), activation=act)
    np.testing.assert_allclose(y.data, explicit_glu(x, Wg, Wv, ref_act[act][0]), rtol=1e-11, atol=1e-12)
    check_grads(lambda a, b, c: ops.glu(a, b, c, activation=act), [x, Wg, Wv], rtol=1e-6)
    check_grads(lambda b: ops.glu(x, b, Wv, activation=act), [Wg], rtol=1e-6)


def test_glu_errors():
    with pytest.raises(ValueError, match=r"W_value: expected shape \(3, 5\)"):
        ops.glu(np.zeros((2, 5)), np.zeros((3, 5)), np.zeros((4, 5)))
    with pytest.raises(TypeError, match="x and W_gate must share a dtype"):
        ops.glu(np.zeros((2, 5), dtype=np.float32), np.zeros((3, 5)), np.zeros((3, 5)))


def test_consumed_cache_is_emptied_and_refused_a_second_time():
    """consume_cache=True hands the cache over: the same gradients, an empty cache afterwards, and a clear
    error (nothing computed) when the emptied cache is passed again."""
    from pymglu import functional

    rng = np.random.default_rng(11)
    x, W, logits = random_inputs(rng, (4,), 13, 9, 3)
    dy = rng.standard_normal((4, 9))
    masks = logits > 0
    y, cache = functional.mglu_forward(x, W, masks, "silu")
    t, s = cache  # unpacks like a pair
    assert t.shape == (4, 9) and s.shape == (3, 4, 9) and not cache.consumed
    kept = functional.mglu_backward(dy, x, W, masks, "silu", cache)
    assert cache.t is t and cache.s is s
    consumed = functional.mglu_backward(dy, x, W, masks, "silu", cache, consume_cache=True)
    for k, c in zip(kept, consumed):
        np.testing.assert_array_equal(k, c)
    assert cache.consumed and cache.t is None and cache.s is None and "consumed" in repr(cache)
    with pytest.raises(ValueError, match="cache: .*already consumed by a backward with consume_cache=True"):
        functional.mglu_backward(dy, x, W, masks, "silu", cache)
    with pytest.raises(ValueError, match="already consumed"):
        cache.take()


def test_packed_bits_passed_with_the_logits_give_the_same_values_and_gradients():
    rng = np.random.default_rng(11)
    x, W, logits = random_inputs(rng, (5,), 37, 6, 3)
    outs = []
    for packed in (None, pack_masks(logits)):
        tx, tW, tl = Tensor(x, requires_grad=True), Tensor(W, requires_grad=True), Tensor(logits, requires_grad=True)
        y = ops.mglu(tx, tW, tl, activation="silu", packed=packed)
        (y * y).sum().backward()
        outs.append((y.data, tx.grad, tW.grad, tl.grad))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    assert np.abs(outs[0][3]).max() > 0


@pytest.mark.parametrize("bad", [np.zeros((3, 6, 1), dtype=np.uint32), np.zeros((3, 6, 2), dtype=np.int32),
                                 np.zeros((2, 6, 2), dtype=np.uint32)])
def test_packed_bits_of_another_shape_or_dtype_are_refused(bad):
    rng = np.random.default_rng(12)
    x, W, logits = random_inputs(rng, (4,), 37, 6, 3)
    with pytest.raises(ValueError, match=r"packed: expected uint32 bit-planes of shape \(3, 6, 2\)"):
        ops.mglu(Tensor(x), Tensor(W), Tensor(logits), packed=bad)


def test_logit_gradients_keep_16_bits_only_for_float32_logits():
    """The op hands float32 logits the 16-bit logit gradients of the GPU path as they are (no widening pass);
    every other mix is cast to the logits' dtype."""
    from pymglu.autograd.ops.gated import _logit_grad

    g16 = np.arange(6, dtype=np.float32).reshape(2, 3).astype(dtypes.bfloat16)
    assert _logit_grad(g16, np.float32) is g16
    g32 = g16.astype(np.float32)
    assert _logit_grad(g32, np.float32) is g32
    assert _logit_grad(g32, dtypes.bfloat16).dtype == dtypes.bfloat16
    assert _logit_grad(g16, dtypes.float16).dtype == dtypes.float16
    assert _logit_grad(g32, np.float64).dtype == np.float64
