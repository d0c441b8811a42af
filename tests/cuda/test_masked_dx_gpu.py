"""pymglu.cuda.masked_gemm's backward kernels on sm_90 (gpu-marked; skipped on other devices): the bit-plane
transpose against NumPy, ``dx = dv W + sum_i e_i (M_i W)`` against float64 at ragged shapes and against
apply_mask + cuBLAS, inside a CUDA graph, in the training backward, and on bad input. Outputs are poisoned
with NaN first; a guard row past the output must stay NaN."""
import numpy as np
import pytest

from masked_gemm_helpers import DTYPES, PYTESTMARK, TOL, needs_sm90, rel_err  # noqa: F401 (fixture)
from pymglu import masks as mask_ops
from pymglu.dtypes import bfloat16, float16

pytestmark = PYTESTMARK


def case(rng, T, h, d, n, dtype):
    dv = rng.standard_normal((T, h), dtype=np.float32).astype(dtype)
    e = rng.standard_normal((n, T, h), dtype=np.float32).astype(dtype)
    W = (rng.standard_normal((h, d), dtype=np.float32) * h ** -0.5).astype(dtype)
    mask = rng.random((n, h, d)) < 0.5
    return dv, e, W, mask


def reference(dv, e, W, mask):
    W64 = W.astype(np.float64)
    out = dv.astype(np.float64) @ W64
    for i in range(e.shape[0]):
        out += e[i].astype(np.float64) @ (W64 * mask[i])
    return out


@pytest.mark.parametrize("n,R,C", [(1, 1, 1), (2, 33, 70), (3, 300, 257), (1, 256, 256), (2, 1000, 520)])
def test_transpose_bits_matches_numpy(n, R, C):
    import cupy as cp

    from pymglu.cuda import masked_gemm

    mask = np.random.default_rng(R + C).random((n, R, C)) < 0.5
    bits = mask_ops.pack_masks(cp.asarray(mask))
    size = n * C * -(-R // 32)
    buf = cp.full(size + 64, 0xDEADBEEF, dtype=np.uint32)  # a guard past the output
    got = masked_gemm.transpose_bits(bits, buf[:size].reshape(n, C, -(-R // 32)))
    want = mask_ops.pack_masks(np.ascontiguousarray(mask.transpose(0, 2, 1)))
    np.testing.assert_array_equal(cp.asnumpy(got), want)
    assert bool((buf[size:] == 0xDEADBEEF).all()), "the kernel wrote past the output"


def test_transpose_bits_allocates_whole_words_of_columns():
    import cupy as cp

    from pymglu.cuda import masked_gemm

    mask = np.random.default_rng(5).random((2, 40, 50)) < 0.5
    got = masked_gemm.transpose_bits(mask_ops.pack_masks(cp.asarray(mask)))
    assert got.shape == (2, 64, 2)
    want = mask_ops.pack_masks(np.ascontiguousarray(mask.transpose(0, 2, 1)))
    np.testing.assert_array_equal(cp.asnumpy(got[:, :50]), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,h,d,n", [(1, 8, 8, 1), (37, 136, 72, 2), (300, 392, 200, 3), (513, 264, 1000, 1),
                                     (256, 128, 128, 4), (1100, 1032, 136, 2)])
def test_dx_matches_float64_at_ragged_shapes(T, h, d, n, dtype):
    import cupy as cp

    from pymglu.cuda import masked_gemm

    rng = np.random.default_rng(T * 7 + h + d + n)
    dv, e, W, mask = case(rng, T, h, d, n, dtype)
    bits = mask_ops.pack_masks(cp.asarray(mask))
    guarded = cp.full((T + 1, d), np.nan, dtype=dtype)
    out = masked_gemm.masked_dx(cp.asarray(dv), cp.asarray(e), cp.asarray(W), bits, guarded[:T])
    assert rel_err(cp.asnumpy(out), reference(dv, e, W, mask)) < TOL[np.dtype(dtype)]
    assert bool(cp.isnan(guarded[T]).all()), "the kernel wrote past the output's last row"


def test_dx_masks_each_product_with_its_own_plane():
    """B_i nonzero only on the rows k = i (mod n) of W, W in {-1, 0, 1}: every sum is an exact small
    integer, so a plane swapped, shifted or applied to the wrong product changes the output."""
    import cupy as cp

    from pymglu.cuda import masked_gemm

    T, h, d, n = 256, 192, 128, 3
    rng = np.random.default_rng(9)
    dv = np.zeros((T, h), dtype=np.float32)
    dv[:, ::7] = 1.0  # the unmasked product too
    e = np.zeros((n, T, h), dtype=np.float32)
    for i in range(n):
        e[i, :, i::n] = 1.0
    dv, e = dv.astype(bfloat16), e.astype(bfloat16)
    W = rng.integers(-1, 2, size=(h, d)).astype(np.float32).astype(bfloat16)
    mask = rng.random((n, h, d)) < 0.5
    out = masked_gemm.masked_dx(cp.asarray(dv), cp.asarray(e), cp.asarray(W), mask_ops.pack_masks(cp.asarray(mask)),
                                cp.full((T, d), np.nan, dtype=bfloat16))
    want = reference(dv, e, W, mask)
    assert np.abs(want).max() <= 256  # integers bfloat16 holds exactly
    np.testing.assert_array_equal(cp.asnumpy(out).astype(np.float64), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dx_matches_apply_mask_and_cublas_with_many_tiles_per_block(dtype):
    import cupy as cp

    from pymglu.cuda import training
    from pymglu.cuda import masked_gemm
    from pymglu.cuda.gemm import gemm

    T, h, d, n = 2048, 1024, 4096, 4  # 32 x 8 tiles, about two per block on 132 SMs
    rng = np.random.default_rng(1)
    dv, e, W, mask = case(rng, T, h, d, n, dtype)
    dvg, eg, Wg = cp.asarray(dv), cp.asarray(e), cp.asarray(W)
    bits = mask_ops.pack_masks(cp.asarray(mask))
    want = gemm(dvg, Wg, cp.empty((T, d), dtype=np.float32))
    for i in range(n):
        gemm(eg[i], training.apply_mask(Wg, bits[i:i + 1], cp.empty_like(Wg[None]))[0], want, accumulate=True)
    out = masked_gemm.masked_dx(dvg, eg, Wg, bits, cp.full((T, d), np.nan, dtype=dtype))
    assert rel_err(cp.asnumpy(out), cp.asnumpy(want).astype(np.float64)) < TOL[np.dtype(dtype)]


def test_dx_replays_in_a_cuda_graph_with_new_inputs():
    import cupy as cp

    from pymglu.cuda import masked_gemm

    T, h, d, n = 300, 264, 200, 2
    rng = np.random.default_rng(2)
    dv, e, W, mask = case(rng, T, h, d, n, bfloat16)
    dvg, eg, Wg = cp.asarray(dv), cp.asarray(e), cp.asarray(W)
    bits = mask_ops.pack_masks(cp.asarray(mask))
    out = cp.full((T, d), np.nan, dtype=bfloat16)
    masked_gemm.masked_dx(dvg, eg, Wg, bits, out)  # compiled and warm before the capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        masked_gemm.masked_dx(dvg, eg, Wg, bits, out)
        graph = stream.end_capture()
    dv2, e2, _, mask2 = case(rng, T, h, d, n, bfloat16)
    dvg[...] = cp.asarray(dv2)
    eg[...] = cp.asarray(e2)
    bits[...] = mask_ops.pack_masks(cp.asarray(mask2))
    out.fill(np.nan)
    graph.launch(stream)
    stream.synchronize()
    assert rel_err(cp.asnumpy(out), reference(dv2, e2, W, mask2)) < TOL[np.dtype(bfloat16)]


@pytest.mark.parametrize("consume", [False, True])
def test_training_backward_equals_the_apply_mask_path(consume):
    import cupy as cp

    from pymglu.cuda import masked_gemm, training

    N, d, h, n = 384, 256, 520, 4
    rng = np.random.default_rng(3)
    x = cp.asarray(rng.standard_normal((N, d), dtype=np.float32).astype(bfloat16))
    W = cp.asarray((rng.standard_normal((h, d), dtype=np.float32) * d ** -0.5).astype(bfloat16))
    dy = cp.asarray(rng.standard_normal((N, h), dtype=np.float32).astype(bfloat16))
    bits = mask_ops.pack_masks(cp.asarray(rng.standard_normal((n, h, d), dtype=np.float32)) > 0)
    _, (t, s) = training.mglu_forward(x, W, bits, "silu")
    cache = lambda: [t.copy(), s.copy()] if consume else (t, s)  # noqa: E731
    dx_ref, dW_ref, dl_ref = None, None, None
    with masked_gemm.dx_kernel(False):
        dx_ref, dW_ref, dl_ref = training.mglu_backward(dy, x, W, bits, "silu", cache(), consume_cache=consume)
    with masked_gemm.dx_kernel():
        assert masked_gemm.usable_dx(dy, s, W)
        dx, dW, dl = training.mglu_backward(dy, x, W, bits, "silu", cache(), consume_cache=consume)
    assert not masked_gemm.usable_dx(dy, s, W)  # off again, the default
    as64 = lambda a: cp.asnumpy(a).astype(np.float64)  # noqa: E731
    assert rel_err(as64(dx), as64(dx_ref)) < 6e-3
    assert np.array_equal(cp.asnumpy(dW), cp.asnumpy(dW_ref))
    assert np.array_equal(cp.asnumpy(dl), cp.asnumpy(dl_ref))


def test_bad_input_names_the_argument():
    import cupy as cp

    from pymglu.cuda import masked_gemm

    T, h, d, n = 16, 64, 32, 2
    dv = cp.ones((T, h), dtype=bfloat16)
    e = cp.ones((n, T, h), dtype=bfloat16)
    W = cp.ones((h, d), dtype=bfloat16)
    bits = cp.zeros((n, h, 1), dtype=np.uint32)
    out = cp.zeros((T, d), dtype=bfloat16)
    with pytest.raises(ValueError, match="bits"):
        masked_gemm.masked_dx(dv, e, W, bits[:1], out)
    with pytest.raises(ValueError, match="e"):
        masked_gemm.masked_dx(dv, e[:, :8], W, bits, out)
    with pytest.raises(ValueError, match="W"):
        masked_gemm.masked_dx(dv, e, W[:32], bits, out)
    with pytest.raises(ValueError, match="out"):
        masked_gemm.masked_dx(dv, e, W, bits, out[:, :16])
    with pytest.raises(TypeError, match="e"):
        masked_gemm.masked_dx(dv, e.astype(float16), W, bits, out)
    with pytest.raises(TypeError, match="dv"):
        masked_gemm.masked_dx(dv.astype(np.float32), e, W, bits, out)
    W12 = cp.ones((h, 12), dtype=bfloat16)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        masked_gemm.masked_dx(dv, e, W12, bits, cp.zeros((T, 12), dtype=bfloat16))
    with pytest.raises(ValueError, match="out"):
        masked_gemm.transpose_bits(bits, cp.zeros((n, 64, 2), dtype=np.uint32))
    with pytest.raises(TypeError, match="bits"):
        masked_gemm.transpose_bits(bits.astype(np.int32))
    assert float(out.sum()) == 0.0  # nothing launched
