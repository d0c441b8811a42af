"""The fused GPU training path (pymglu.cuda.training) against the float64 CPU reference (gpu-marked).

Every check draws fresh random inputs, rounds them to the tested dtype, and compares with
:mod:`pymglu.functional` run in float64 on NumPy copies of the same rounded values, by relative error
over the whole array. Outputs the kernels write into caller buffers are poisoned first.
"""
import contextlib

import numpy as np
import pytest

from pymglu import functional, masks as mask_ops
from pymglu.backend import gpu_available
from pymglu.dtypes import bfloat16, float16, float32

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA device"),
]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "sigmoid")
#: relative-error bounds: products in the dtype with float32 accumulation, t and s_i stored in the dtype
TOL = {np.dtype(float32): 2e-5, np.dtype(float16): 4e-3, np.dtype(bfloat16): 3e-2}


def rel_err(got, want):
    import cupy as cp

    got = cp.asnumpy(got).astype(np.float64) if not isinstance(got, np.ndarray) else got.astype(np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got))
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@contextlib.contextmanager
def used_high_water():
    """The most bytes of the default pool in use at once while the block runs, above those in use when it
    starts (``mem["grown"]`` afterwards). It counts allocations, not the pool's size, so free blocks the
    pool keeps from earlier tests (a chunk pinned by one small live array) cannot hide them."""
    import cupy as cp

    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    mem = {"start": pool.used_bytes()}
    mem["peak"] = mem["start"]

    def tracking_malloc(size):
        block = pool.malloc(size)
        mem["peak"] = max(mem["peak"], pool.used_bytes())
        return block

    cp.cuda.set_allocator(tracking_malloc)
    try:
        yield mem
    finally:
        cp.cuda.set_allocator(pool.malloc)
    mem["grown"] = mem["peak"] - mem["start"]


def rounded(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("dtype", [float32, float16, bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("out_fp32, accumulate", [(False, False), (True, False), (True, True)])
def test_gemm_matches_float64(dtype, trans_a, trans_b, out_fp32, accumulate):
    import cupy as cp
    from pymglu.cuda.gemm import gemm

    rng = np.random.default_rng()
    M, K, N = 37, 129, 65
    a = rounded(rng, (K, M) if trans_a else (M, K), dtype)
    b = rounded(rng, (N, K) if trans_b else (K, N), dtype)
    out_dtype = float32 if out_fp32 else dtype
    start = rounded(rng, (M, N), out_dtype)
    out = cp.asarray(start) if accumulate else cp.full((M, N), np.nan, dtype=out_dtype)
    gemm(cp.asarray(a), cp.asarray(b), out, trans_a=trans_a, trans_b=trans_b, accumulate=accumulate)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    want = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    if accumulate:
        want = want + start.astype(np.float64)
    assert rel_err(out, want) < TOL[np.dtype(dtype)] / 4


@pytest.mark.parametrize("dtype", [float32, float16, bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("shared_b", [False, True], ids=["batched-b", "shared-b"])
@pytest.mark.parametrize("out_fp32, accumulate", [(False, False), (True, False), (False, True)])
def test_gemm_batched_matches_float64(dtype, trans_a, trans_b, shared_b, out_fp32, accumulate):
    """Strided-batched products, ``b`` one per product or one shared by all (stride 0, the G_i = e_i^T x of
    the backward), overwriting a poisoned output or adding into it."""
    import cupy as cp
    from pymglu.cuda.gemm import gemm_batched

    rng = np.random.default_rng()
    batch, M, K, N = 3, 37, 129, 65
    a = rounded(rng, (batch,) + ((K, M) if trans_a else (M, K)), dtype)
    b = rounded(rng, (() if shared_b else (batch,)) + ((N, K) if trans_b else (K, N)), dtype)
    out_dtype = float32 if out_fp32 else dtype
    start = rounded(rng, (batch, M, N), out_dtype)
    out = cp.asarray(start) if accumulate else cp.full((batch, M, N), np.nan, dtype=out_dtype)
    gemm_batched(cp.asarray(a), cp.asarray(b), out, trans_a=trans_a, trans_b=trans_b, accumulate=accumulate)
    a64 = a.astype(np.float64)
    b64 = np.broadcast_to(b.astype(np.float64), (batch,) + b.shape[-2:])
    want = (a64.transpose(0, 2, 1) if trans_a else a64) @ (b64.transpose(0, 2, 1) if trans_b else b64)
    if accumulate:
        want = want + start.astype(np.float64)
    assert rel_err(out, want) < TOL[np.dtype(dtype)] / 4


def test_gemm_batched_refuses_bad_operands():
    import cupy as cp
    from pymglu.cuda.gemm import gemm_batched

    a = cp.ones((2, 4, 8), dtype=float32)
    out = cp.full((2, 4, 3), 7.0, dtype=float32)
    with pytest.raises(ValueError, match="b: expected 2 matrices"):
        gemm_batched(a, cp.ones((3, 8, 3), dtype=float32), out)
    with pytest.raises(ValueError, match="b: expected 2 matrices"):
        gemm_batched(a, cp.ones((7, 3), dtype=float32), out)
    with pytest.raises(ValueError, match="b: expected a 2 or 3-d array"):
        gemm_batched(a, cp.ones(8, dtype=float32), out)
    with pytest.raises(ValueError, match="out: expected shape"):
        gemm_batched(a, cp.ones((8, 3), dtype=float32), cp.empty((2, 3, 4), dtype=float32))
    assert bool(cp.all(out == 7.0))


def test_logit_products_batched_or_not_agree():
    """The backward's n products G_i = e_i^T x as one strided-batched call (the default) or n calls."""
    import cupy as cp
    from pymglu.cuda import switched, training

    rng = np.random.default_rng()
    x, W, logits, dy = _mglu_case(rng, (70,), 96, 130, 3, bfloat16)
    xg, Wg, bits, dyg = cp.asarray(x), cp.asarray(W), mask_ops.pack_masks(cp.asarray(logits)), cp.asarray(dy)
    _, cache = functional.mglu_forward(xg, Wg, bits, "silu")
    batched = functional.mglu_backward(dyg, xg, Wg, bits, "silu", cache)
    assert training._BATCHED_LOGIT_PRODUCTS
    with switched(training, "_BATCHED_LOGIT_PRODUCTS", False):
        single = functional.mglu_backward(dyg, xg, Wg, bits, "silu", cache)
    assert training._BATCHED_LOGIT_PRODUCTS
    for name, got, want in zip(("dx", "dW", "dlogits"), batched, single):
        assert rel_err(got, cp.asnumpy(want).astype(np.float64)) < 1e-2, name


def test_gemm_refuses_bad_operands():
    import cupy as cp
    from pymglu.cuda.gemm import gemm

    a = cp.ones((4, 8), dtype=float32)
    with pytest.raises(ValueError, match="b: expected 8 rows"):
        gemm(a, cp.ones((7, 3), dtype=float32), cp.empty((4, 3), dtype=float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        gemm(a, cp.ones((3, 8), dtype=float32).T, cp.empty((4, 3), dtype=float32))
    with pytest.raises(TypeError, match="out: expected"):
        gemm(a, cp.ones((8, 3), dtype=float32), cp.empty((4, 3), dtype=float16))
    with pytest.raises(ValueError, match="out: expected shape"):
        gemm(a, cp.ones((8, 3), dtype=float32), cp.empty((3, 4), dtype=float32))


@pytest.mark.parametrize("dtype", [float32, float16, bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("h, d", [(5, 8), (33, 1000), (17, 777), (64, 4096), (33, 96), (7, 32)])
@pytest.mark.parametrize("planes", [None, 1, 2, 3], ids=["plane", "1of1", "2", "3"])
def test_apply_mask_is_exact(dtype, h, d, planes):
    """Both kernels: ``apply_mask_flat`` (``d % 32 == 0``, one or two planes) and ``apply_mask`` (the rest)."""
    import cupy as cp
    from pymglu.cuda import training

    rng = np.random.default_rng()
    W = rounded(rng, (h, d), dtype)
    bits = mask_ops.pack_masks(rng.random((planes or 1, h, d)) < 0.5)
    out = cp.full(((planes,) if planes else ()) + (h, d), np.nan, dtype=dtype)
    training.apply_mask(cp.asarray(W), cp.asarray(bits if planes else bits[0]), out)
    want = W * mask_ops.unpack_masks(bits, d)
    got = cp.asnumpy(out).reshape(want.shape)
    np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))  # -0.0 == 0.0


@pytest.mark.parametrize("dtype", [float16, bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(7, 5), (64, 1000), (3, 4097)])
def test_narrow_rounds_as_astype(dtype, shape):
    import cupy as cp
    from pymglu.cuda import training

    rng = np.random.default_rng()
    src = rng.standard_normal(shape).astype(np.float32) * np.float32(1e3)
    src.flat[:3] = [np.inf, -np.inf, 3e38]  # out of float16's range: rounds to +-inf as NumPy's cast does
    got = cp.asnumpy(training.narrow(cp.asarray(src), dtype))
    assert got.dtype == dtype and got.shape == shape
    with np.errstate(over="ignore"):  # float16's overflow to inf is the expected rounding here
        want = src.astype(dtype)
    np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))
    same = cp.asarray(src)
    assert training.narrow(same, float32) is same


def _mglu_case(rng, lead, d, h, n, dtype):
    x = rounded(rng, lead + (d,), dtype)
    W = rounded(rng, (h, d), dtype, scale=d ** -0.5)
    logits = rng.standard_normal((n, h, d)).astype(np.float32)
    dy = rounded(rng, lead + (h,), dtype)
    return x, W, logits, dy


SHAPES = [((6,), 64, 48), ((37,), 1000, 777), ((2, 3), 33, 96), ((1,), 4095, 97)]


@pytest.mark.parametrize("dtype", [float32, float16, bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("lead, d, h", SHAPES, ids=[f"{s[0]}x{s[1]}x{s[2]}" for s in SHAPES])
def test_mglu_forward_backward_match_float64(dtype, n, lead, d, h):
    import cupy as cp

    rng = np.random.default_rng()
    activation = ACTIVATIONS[rng.integers(len(ACTIVATIONS))]
    x, W, logits, dy = _mglu_case(rng, lead, d, h, n, dtype)
    masks = logits > 0
    y64, _ = functional.mglu_forward(x.astype(np.float64), W.astype(np.float64), masks, activation)
    dx64, dW64, dl64 = functional.mglu_backward(dy.astype(np.float64), x.astype(np.float64),
                                                W.astype(np.float64), masks, activation)

    xg, Wg, bits = cp.asarray(x), cp.asarray(W), mask_ops.pack_masks(cp.asarray(logits))
    y, cache = functional.mglu_forward(xg, Wg, bits, activation)
    assert y.dtype == dtype and cache.t.dtype == dtype and cache.s.shape == (n, int(np.prod(lead)), h)
    dx, dW, dl = functional.mglu_backward(cp.asarray(dy), xg, Wg, bits, activation, cache)
    assert (dx.dtype, dW.dtype, dl.dtype) == (np.dtype(dtype),) * 3  # the logit gradients as dW (stop 35)
    tol = TOL[np.dtype(dtype)] * (3 if activation == "relu" else 1)  # ReLU': a rounded s_i may cross 0
    for name, got, want in (("y", y, y64), ("dx", dx, dx64), ("dW", dW, dW64), ("dlogits", dl, dl64)):
        assert rel_err(got, want) < tol, (name, activation, rel_err(got, want))


@pytest.mark.parametrize("dtype", [float32, float16, bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("lead, d, h", SHAPES, ids=[f"{s[0]}x{s[1]}x{s[2]}" for s in SHAPES])
def test_logit_grads_in_float32_when_switched_off(dtype, n, lead, d, h):
    """``narrow_logit_grads(False)``: the logit gradients in float32 (the pass 4-wide or 1-wide, against the
    default's 8-wide or 1-wide: ``d`` a multiple of 8 or not), both within the dtype's tolerance of float64;
    ``dx`` the same bits either way; the previous setting back afterwards."""
    import cupy as cp

    from pymglu.cuda import training

    rng = np.random.default_rng()
    activation = ACTIVATIONS[rng.integers(len(ACTIVATIONS))]
    x, W, logits, dy = _mglu_case(rng, lead, d, h, n, dtype)
    masks = logits > 0
    dx64, dW64, dl64 = functional.mglu_backward(dy.astype(np.float64), x.astype(np.float64),
                                                W.astype(np.float64), masks, activation)
    xg, Wg, bits, dyg = cp.asarray(x), cp.asarray(W), mask_ops.pack_masks(cp.asarray(logits)), cp.asarray(dy)
    _, cache = functional.mglu_forward(xg, Wg, bits, activation)
    narrow = functional.mglu_backward(dyg, xg, Wg, bits, activation, cache)
    assert training.NARROW_LOGIT_GRADS is True
    with training.narrow_logit_grads(False):
        wide = functional.mglu_backward(dyg, xg, Wg, bits, activation, cache)
        assert training.logit_grad_dtype(dtype) == np.float32
    assert training.NARROW_LOGIT_GRADS is True and training.logit_grad_dtype(dtype) == np.dtype(dtype)
    assert (wide[0].dtype, wide[1].dtype, wide[2].dtype) == (np.dtype(dtype), np.dtype(dtype), np.dtype(np.float32))
    assert narrow[2].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(cp.asnumpy(wide[0]), cp.asnumpy(narrow[0]))
    tol = TOL[np.dtype(dtype)] * (3 if activation == "relu" else 1)
    for grads in (wide, narrow):
        for name, got, want in zip(("dx", "dW", "dlogits"), grads, (dx64, dW64, dl64)):
            assert rel_err(got, want) < tol, (name, activation, rel_err(got, want))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_and_consumed_cache(activation):
    import cupy as cp

    rng = np.random.default_rng()
    x, W, logits, dy = _mglu_case(rng, (9,), 72, 40, 4, bfloat16)
    masks = logits > 0
    want = functional.mglu_backward(dy.astype(np.float64), x.astype(np.float64), W.astype(np.float64), masks,
                                    activation)
    xg, Wg, bits = cp.asarray(x), cp.asarray(W), mask_ops.pack_masks(cp.asarray(masks))
    _, cache = functional.mglu_forward(xg, Wg, bits, activation)
    kept = functional.mglu_backward(cp.asarray(dy), xg, Wg, bits, activation, cache)
    consumed = functional.mglu_backward(cp.asarray(dy), xg, Wg, bits, activation, cache, consume_cache=True)
    for k, c, w in zip(kept, consumed, want):
        np.testing.assert_array_equal(cp.asnumpy(k), cp.asnumpy(c))  # same bits either way
        assert rel_err(k, w) < 3 * TOL[np.dtype(bfloat16)]


@pytest.mark.parametrize("dtype", [float32, float16, bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_glu_forward_backward_match_float64(dtype, activation):
    import cupy as cp

    rng = np.random.default_rng()
    N, d, h = 29, 300, 131
    x, dy = rounded(rng, (N, d), dtype), rounded(rng, (N, h), dtype)
    Wg, Wv = rounded(rng, (h, d), dtype, d ** -0.5), rounded(rng, (h, d), dtype, d ** -0.5)
    f64 = [a.astype(np.float64) for a in (dy, x, Wg, Wv)]
    y64 = functional.glu(*f64[1:], activation)
    grads64 = functional.glu_backward(*f64, activation)
    y, cache = functional.glu_forward(cp.asarray(x), cp.asarray(Wg), cp.asarray(Wv), activation)
    grads = functional.glu_backward(cp.asarray(dy), cp.asarray(x), cp.asarray(Wg), cp.asarray(Wv), activation,
                                    cache, consume_cache=True)
    tol = TOL[np.dtype(dtype)] * (3 if activation == "relu" else 1)
    assert rel_err(y, y64) < tol
    for got, want in zip(grads, grads64):
        assert rel_err(got, want) < tol


@pytest.mark.parametrize("dtype", [float32, bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows, chunk", [(37, 8), (64, 64), (5, 1000)])
def test_recompute_in_chunks_matches_the_cached_path(dtype, rows, chunk):
    """keep_cache=False + a backward without cache: the chunked recompute against the cached path and
    against float64, with chunks that do and do not divide the rows; a bad chunk size is refused."""
    import cupy as cp

    rng = np.random.default_rng()
    n, d, h = 3, 200, 72
    activation = ACTIVATIONS[rng.integers(len(ACTIVATIONS))]
    x, W, logits, dy = _mglu_case(rng, (rows,), d, h, n, dtype)
    masks = logits > 0
    want = functional.mglu_backward(dy.astype(np.float64), x.astype(np.float64), W.astype(np.float64), masks,
                                    activation)
    xg, Wg, dyg, bits = cp.asarray(x), cp.asarray(W), cp.asarray(dy), mask_ops.pack_masks(cp.asarray(masks))
    y_cached, cache = functional.mglu_forward(xg, Wg, bits, activation)
    cached = functional.mglu_backward(dyg, xg, Wg, bits, activation, cache, consume_cache=True)
    y, none = functional.mglu_forward(xg, Wg, bits, activation, keep_cache=False, chunk_tokens=chunk)
    assert none is None
    # cuBLAS may sum in another order for fewer rows, and the chunks' weight gradients add in float32
    same = 1e-6 if dtype == float32 else 4e-3
    assert rel_err(y, cp.asnumpy(y_cached).astype(np.float64)) < same
    got = functional.mglu_backward(dyg, xg, Wg, bits, activation, None, chunk_tokens=chunk)
    tol = TOL[np.dtype(dtype)] * (3 if activation == "relu" else 1)
    for name, g, c, w in zip(("dx", "dW", "dlogits"), got, cached, want):
        # the bfloat16 logit gradients are rounded once per chunk on the recompute path, once on the cached one
        close = 1e-2 if (name == "dlogits" and dtype != float32) else same
        assert rel_err(g, cp.asnumpy(c).astype(np.float64)) < close, name
        assert rel_err(g, w) < tol, (name, activation)
    with pytest.raises(ValueError, match="chunk_tokens: expected an integer >= 1, got 0"):
        functional.mglu_forward(xg, Wg, bits, activation, keep_cache=False, chunk_tokens=0)


def test_recompute_keeps_the_activations_of_one_chunk():
    """With the cache, a step holds (n + 1) * N * h activations; recomputing in chunks of C rows holds
    (n + 1) * C * h: the pool's high-water mark must drop by most of the difference."""
    import cupy as cp

    n, h, d, N, chunk = 4, 512, 256, 4096, 512
    rng = np.random.default_rng()
    x, W, logits, dy = _mglu_case(rng, (N,), d, h, n, bfloat16)
    xg, Wg, dyg = cp.asarray(x), cp.asarray(W), cp.asarray(dy)
    bits = mask_ops.pack_masks(cp.asarray(logits))

    def high_water(keep):
        with used_high_water() as mem:
            _, cache = functional.mglu_forward(xg, Wg, bits, "silu", keep_cache=keep, chunk_tokens=chunk)
            grads = functional.mglu_backward(dyg, xg, Wg, bits, "silu", cache, consume_cache=True,
                                             chunk_tokens=chunk)
            del cache, grads
        return mem["grown"]

    saved = high_water(True) - high_water(False)
    activations = (n + 1) * (N - chunk) * h * 2
    assert saved > 0.8 * activations, (saved, activations)


def test_peak_memory_holds_at_most_two_masked_weights():
    """n masked copies of W would add n * W bytes to the pool's high-water mark; the path adds at most
    training.MASKED_AT_ONCE (two)."""
    import cupy as cp

    n, h, d, N = 8, 1024, 1024, 16
    rng = np.random.default_rng()
    x, W, logits, dy = _mglu_case(rng, (N,), d, h, n, bfloat16)
    xg, Wg, dyg = cp.asarray(x), cp.asarray(W), cp.asarray(dy)
    bits = mask_ops.pack_masks(cp.asarray(logits))
    with used_high_water() as mem:
        _, cache = functional.mglu_forward(xg, Wg, bits, "silu")
        dx, dW, dl = functional.mglu_backward(dyg, xg, Wg, bits, "silu", cache, consume_cache=True)
    grown = mem["grown"]
    w_bytes = h * d * 2
    from pymglu.cuda import training

    # outputs: dlogits (n h d fp32) + dW (bf16) + the float32 dW accumulator + two masked W, plus activations
    bound = dl.nbytes + dW.nbytes + h * d * 4 + training.MASKED_AT_ONCE * w_bytes + (1 << 20)
    assert grown <= bound, (grown, bound)
    assert bound < grown + (n - training.MASKED_AT_ONCE) * w_bytes  # the check can fail: n copies would not fit


def test_handed_over_cache_is_freed_before_the_logit_gradients():
    """With consume_cache=True the backward drops t before it allocates G (n h d, float32 here): at h >> d the
    pool's high-water mark during the backward must stay far below what keeping t would add, and the
    gradients must equal those of a backward that keeps the cache."""
    from pymglu.cuda import training

    with training.narrow_logit_grads(False):  # G sized below; what is freed when does not depend on its dtype
        _check_cache_freed_before_logit_gradients()


def _check_cache_freed_before_logit_gradients():
    import cupy as cp

    n, h, d, N = 4, 8192, 256, 2048
    rng = np.random.default_rng()
    x, W, logits, dy = _mglu_case(rng, (N,), d, h, n, bfloat16)
    xg, Wg, dyg = cp.asarray(x), cp.asarray(W), cp.asarray(dy)
    bits = mask_ops.pack_masks(cp.asarray(logits))
    _, cache = functional.mglu_forward(xg, Wg, bits, "silu")
    kept = functional.mglu_backward(dyg, xg, Wg, bits, "silu", cache)
    pool = cp.get_default_memory_pool()
    peak = [0]

    def tracking_malloc(size):
        mem = pool.malloc(size)
        peak[0] = max(peak[0], pool.used_bytes())
        return mem

    cp.cuda.Device().synchronize()
    start = pool.used_bytes()  # the cache is alive here
    cp.cuda.set_allocator(tracking_malloc)
    try:
        consumed = functional.mglu_backward(dyg, xg, Wg, bits, "silu", cache, consume_cache=True)
    finally:
        cp.cuda.set_allocator(pool.malloc)
    assert cache.consumed and consumed[2].dtype == np.float32
    for k, c in zip(kept, consumed):
        np.testing.assert_array_equal(cp.asnumpy(k), cp.asnumpy(c))
    t_bytes, G_bytes = N * h * 2, n * h * d * 4
    kept_t_peak = N * d * 2 + h * d * 4 + G_bytes  # dx, dW_acc and G on top of the live cache
    assert kept_t_peak > 0.8 * t_bytes + (N * d * 6 + h * d * 2)  # the check can fail: t dominates
    grown = peak[0] - start
    assert grown < kept_t_peak - 0.8 * t_bytes, (grown, kept_t_peak, t_bytes)


def test_reference_path_can_be_forced():
    import cupy as cp
    from pymglu.cuda import training

    rng = np.random.default_rng()
    x, W, logits, _ = _mglu_case(rng, (4,), 32, 16, 2, bfloat16)
    with training.disabled():
        y_ref, cache = functional.mglu_forward(cp.asarray(x), cp.asarray(W), cp.asarray(logits > 0), "silu")
    assert cache.t.dtype == np.float32  # the reference path's compute dtype
    y_fast, cache = functional.mglu_forward(cp.asarray(x), cp.asarray(W), cp.asarray(logits > 0), "silu")
    assert cache.t.dtype == bfloat16 and training.ENABLED
    assert rel_err(y_fast, cp.asnumpy(y_ref).astype(np.float64)) < TOL[np.dtype(bfloat16)]


def test_mglu_layer_trains_on_gpu_like_cpu():
    """The same float32 model trained on NumPy and on CuPy (fused path) follows the same loss curve."""
    from pymglu.models import Transformer, TransformerConfig
    from pymglu.models.data import split_corpus
    from pymglu.models.training import Trainer, TrainSettings

    data = np.frombuffer(("the quick brown fox jumps over the lazy dog. " * 200).encode(), dtype=np.uint8)
    train, val = split_corpus(data, 32)
    curves = {}
    for device in ("cpu", "cuda"):
        config = TransformerConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, ffn_kind="swimglu", n_masks=4,
                                   max_seq_len=32)
        model = Transformer(config, rng=0).to(device)
        settings = TrainSettings(steps=30, batch_size=8, lr=1e-2, warmup_steps=3, eval_every=0, eval_batches=2,
                                 seed=0)
        curves[device] = np.array(Trainer(model, settings, train, val).run(progress=False, log=None).train_loss)
    np.testing.assert_allclose(curves["cuda"], curves["cpu"], rtol=2e-3)
    assert curves["cuda"][-5:].mean() < 0.7 * curves["cuda"][:5].mean()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["swiglu", "swimglu"])
def test_16bit_training_tracks_float32(kind, dtype):
    """bfloat16, and float16 with the dynamic loss scaler, track the float32 run: the loss curves (smoothed over 5 steps) stay within
    10% of the float32 loss drop of each other at every step, and within 5% at the end.

    (The text is one sentence repeated, so every run memorises it and ends near a loss of 0.02: a relative
    bound on so small a final loss would measure the rounding noise of the last steps, not the training.)"""
    from pymglu.models import Transformer, TransformerConfig
    from pymglu.models.data import split_corpus
    from pymglu.models.training import Trainer, TrainSettings

    data = np.frombuffer(("pack my box with five dozen liquor jugs. " * 300).encode(), dtype=np.uint8)
    train, val = split_corpus(data, 32)
    curves = {}
    for run_dtype in ("float32", dtype):
        config = TransformerConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128, ffn_kind=kind, max_seq_len=32,
                                   dtype=run_dtype)
        settings = TrainSettings(steps=60, batch_size=8, lr=1e-2, warmup_steps=5, eval_every=0, eval_batches=4,
                                 seed=1)
        trainer = Trainer(Transformer(config, rng=1).to("cuda"), settings, train, val)
        history = trainer.run(progress=False, log=None)
        assert (trainer.scaler is not None) == (run_dtype == "float16")
        curves[run_dtype] = np.convolve(np.asarray(history.train_loss, dtype=np.float64), np.ones(5) / 5, "valid")
    ref, low = curves["float32"], curves[dtype]
    drop = ref[0] - ref[-1]
    assert drop > 0.5 * ref[0], "the float32 run must learn for the comparison to mean anything"
    assert np.all(np.isfinite(low)) and np.max(np.abs(low - ref)) < 0.1 * drop, (ref[::10], low[::10])
    assert abs(low[-1] - ref[-1]) < 0.05 * drop
