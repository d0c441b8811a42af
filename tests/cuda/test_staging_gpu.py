"""``pymglu.cuda.staging.AlternatingUploads``: the values arrive, the host never runs more than two calls
ahead of the stream, and a wrong shape is refused (gpu-marked)."""
import numpy as np
import pytest

from pymglu.backend import gpu_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA device"),
]


def test_uploads_arrive_through_the_two_buffer_sets_in_turn():
    import cupy as cp

    from pymglu.cuda.staging import AlternatingUploads

    rng = np.random.default_rng(0)
    uploads, stream = AlternatingUploads(), cp.cuda.Stream(non_blocking=True)
    ids = cp.full((3, 7), -1, dtype=np.int64)
    table = cp.full((5, 4), np.nan, dtype=np.float32)
    seen, sent = [], []
    for _ in range(6):
        x, t = rng.integers(0, 1000, size=(3, 7)), rng.standard_normal((5, 4)).astype(np.float32)
        uploads.upload(((ids, x), (table, t)), stream)
        sent.append((x, t))
        with stream:
            seen.append((ids.copy(), table.copy()))  # ordered after the upload on the same stream
    stream.synchronize()
    for (got_x, got_t), (x, t) in zip(seen, sent):
        np.testing.assert_array_equal(cp.asnumpy(got_x), x)
        np.testing.assert_array_equal(cp.asnumpy(got_t), t)


def test_a_buffer_set_is_reused_only_after_its_last_uploads_ran():
    """Behind a kernel that spins for ~50 ms, the third call must wait for the first call's copies: the
    host returns from the first two at once and from the third only once the stream has moved on."""
    import time

    import cupy as cp

    from pymglu.cuda.staging import AlternatingUploads

    spin = cp.RawKernel(r'''
    extern "C" __global__ void spin(long long cycles) {
        const long long start = clock64();
        while (clock64() - start < cycles) {}
    }''', "spin")
    uploads, stream = AlternatingUploads(), cp.cuda.Stream(non_blocking=True)
    dst = cp.zeros(4, dtype=np.float32)
    with stream:
        spin((1,), (1,), (np.int64(100_000_000),))  # about 50 ms at 2 GHz
    t0 = time.perf_counter()
    uploads.upload(((dst, np.ones(4, np.float32)),), stream)
    uploads.upload(((dst, np.full(4, 2, np.float32)),), stream)
    quick = time.perf_counter() - t0
    uploads.upload(((dst, np.full(4, 3, np.float32)),), stream)
    waited = time.perf_counter() - t0
    stream.synchronize()
    assert quick < 0.02 < waited
    np.testing.assert_array_equal(cp.asnumpy(dst), 3)


def test_a_wrong_shape_is_refused():
    import cupy as cp

    from pymglu.cuda.staging import AlternatingUploads

    dst = cp.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"expected host values of shape \(2, 3\), got \(3, 2\)"):
        AlternatingUploads().upload(((dst, np.zeros((3, 2), np.float32)),), cp.cuda.Stream())
