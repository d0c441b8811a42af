"""pymglu.cuda.masked_gemm, the masked product on sm_90 (gpu-marked; skipped on other devices): against
float64 at ragged shapes, against apply_mask + cuBLAS, inside a CUDA graph, in the training forward, and on
bad input. Outputs are poisoned with NaN first; a guard row past the output must stay NaN."""
import numpy as np
import pytest

from masked_gemm_helpers import DTYPES, PYTESTMARK, TOL, needs_sm90, rel_err  # noqa: F401 (fixture)
from pymglu import masks as mask_ops
from pymglu.dtypes import bfloat16, float16

pytestmark = PYTESTMARK


def case(rng, T, H, K, dtype):
    x = rng.standard_normal((T, K), dtype=np.float32).astype(dtype)
    W = (rng.standard_normal((H, K), dtype=np.float32) * K ** -0.5).astype(dtype)
    mask = rng.random((H, K)) < 0.5
    return x, W, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,K", [(1, 8, 8), (37, 136, 72), (300, 392, 200), (513, 264, 1000), (256, 128, 64),
                                   (1100, 1032, 136)])
def test_matches_float64_at_ragged_shapes(T, H, K, dtype):
    import cupy as cp

    from pymglu.cuda import masked_gemm

    rng = np.random.default_rng(T * 7 + H + K)
    x, W, mask = case(rng, T, H, K, dtype)
    bits = mask_ops.pack_masks(cp.asarray(mask))
    guarded = cp.full((T + 1, H), np.nan, dtype=dtype)
    out = masked_gemm.masked_product(cp.asarray(x), cp.asarray(W), bits, guarded[:T])
    want = x.astype(np.float64) @ (W.astype(np.float64) * mask).T
    assert rel_err(cp.asnumpy(out), want) < TOL[np.dtype(dtype)]
    assert bool(cp.isnan(guarded[T]).all()), "the kernel wrote past the output's last row"


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_apply_mask_and_cublas_with_many_tiles_per_block(dtype):
    import cupy as cp

    from pymglu.cuda import masked_gemm, training
    from pymglu.cuda.gemm import gemm

    T, H, K = 2048, 4096, 1024  # 8 x 32 tiles, about two per block on 132 SMs
    rng = np.random.default_rng(1)
    x, W, mask = case(rng, T, H, K, dtype)
    xg, Wg = cp.asarray(x), cp.asarray(W)
    bits = mask_ops.pack_masks(cp.asarray(mask))
    want = gemm(xg, training.apply_mask(Wg, bits, cp.empty_like(Wg)), cp.empty((T, H), dtype=np.float32),
                trans_b=True)
    out = masked_gemm.masked_product(xg, Wg, bits, cp.full((T, H), np.nan, dtype=dtype))
    assert rel_err(cp.asnumpy(out), cp.asnumpy(want).astype(np.float64)) < TOL[np.dtype(dtype)]


def test_replays_in_a_cuda_graph_with_new_inputs():
    import cupy as cp

    from pymglu.cuda import masked_gemm

    T, H, K = 300, 264, 200
    rng = np.random.default_rng(2)
    x, W, mask = case(rng, T, H, K, bfloat16)
    xg, Wg = cp.asarray(x), cp.asarray(W)
    bits = mask_ops.pack_masks(cp.asarray(mask))
    out = cp.full((T, H), np.nan, dtype=bfloat16)
    masked_gemm.masked_product(xg, Wg, bits, out)  # compiled and warm before the capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        masked_gemm.masked_product(xg, Wg, bits, out)
        graph = stream.end_capture()
    x2 = rng.standard_normal((T, K), dtype=np.float32).astype(bfloat16)
    xg[...] = cp.asarray(x2)
    out.fill(np.nan)
    graph.launch(stream)
    stream.synchronize()
    want = x2.astype(np.float64) @ (W.astype(np.float64) * mask).T
    assert rel_err(cp.asnumpy(out), want) < TOL[np.dtype(bfloat16)]


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_training_forward_equals_the_apply_mask_path(activation):
    import cupy as cp

    from pymglu.cuda import masked_gemm, training

    N, d, h, n = 384, 256, 520, 4
    rng = np.random.default_rng(3)
    x, W, _ = case(rng, N, h, d, bfloat16)
    logits = cp.asarray(rng.standard_normal((n, h, d), dtype=np.float32))
    bits = mask_ops.pack_masks(logits > 0)
    xg, Wg = cp.asarray(x), cp.asarray(W)
    assert masked_gemm.usable(xg, Wg, bits[0], cp.empty((N, h), dtype=bfloat16))
    y, (t, s) = training.mglu_forward(xg, Wg, bits, activation)
    with masked_gemm.disabled():
        y_ref, (t_ref, s_ref) = training.mglu_forward(xg, Wg, bits, activation)
    as64 = lambda a: cp.asnumpy(a).astype(np.float64)  # noqa: E731
    assert rel_err(as64(s), as64(s_ref)) < 6e-3
    assert rel_err(as64(y), as64(y_ref)) < 2e-2
    assert np.array_equal(cp.asnumpy(t), cp.asnumpy(t_ref))


def test_training_runs_the_kernel_up_to_max_tokens_only():
    """``usable``: the kernel serves products of at most ``MAX_TOKENS`` rows; longer ones go to ``apply_mask``
    + cuBLAS (stop 37's bound, independent of ``d``), and ``disabled()`` turns it off at any length."""
    import cupy as cp

    from pymglu.cuda import masked_gemm

    d, h = 64, 32
    W = cp.ones((h, d), dtype=bfloat16)
    bits = cp.zeros((h, d // 32), dtype=np.uint32)
    for rows, expected in ((1, True), (masked_gemm.MAX_TOKENS, True), (masked_gemm.MAX_TOKENS + 1, False)):
        x = cp.ones((rows, d), dtype=bfloat16)
        out = cp.empty((rows, h), dtype=bfloat16)
        assert masked_gemm.usable(x, W, bits, out) is expected, rows
        with masked_gemm.disabled():
            assert not masked_gemm.usable(x, W, bits, out)


def test_bad_input_names_the_argument():
    import cupy as cp

    from pymglu.cuda import masked_gemm

    x = cp.ones((16, 64), dtype=bfloat16)
    W = cp.ones((32, 64), dtype=bfloat16)
    bits = cp.zeros((32, 2), dtype=np.uint32)
    out = cp.zeros((16, 32), dtype=bfloat16)
    with pytest.raises(ValueError, match="bits"):
        masked_gemm.masked_product(x, W, bits[:, :1], out)
    with pytest.raises(ValueError, match="out"):
        masked_gemm.masked_product(x, W, bits, out[:, :16])
    with pytest.raises(TypeError, match="x"):
        masked_gemm.masked_product(x.astype(np.float32), W, bits, out)
    with pytest.raises(TypeError, match="out"):
        masked_gemm.masked_product(x, W, bits, out.astype(float16))
    x12, W12 = cp.ones((16, 12), dtype=bfloat16), cp.ones((32, 12), dtype=bfloat16)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        masked_gemm.masked_product(x12, W12, cp.zeros((32, 1), dtype=np.uint32), out)
    assert float(out.sum()) == 0.0  # nothing launched
