"""The device-side token sampler (pymglu.cuda.decode_sample) against a float64 host reference, gpu-marked.

The reference is :func:`pymglu.models.generation.choose_next`'s rule on the same logits (rounded to the
tested dtype) and the same float32 uniform draw. The sampler sums in float32, so where a draw lies within
float32 rounding of a boundary between two tokens either side is accepted; everywhere else the token must
be the reference's. Outputs are poisoned before each launch.
"""
import numpy as np
import pytest

from pymglu.backend import gpu_available
from pymglu.dtypes import bfloat16, float16, float32

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA device"),
]


def reference(logits, r, temperature, top_k):
    """Per row: the reference token and the relative distance of the draw to the nearest cdf boundary."""
    z = logits.astype(np.float64) / temperature
    V = z.shape[-1]
    tokens, margins = [], []
    for row, u in zip(z, r):
        keep = np.ones(V, dtype=bool)
        if top_k is not None and top_k < V:
            keep = row >= np.partition(row, -top_k)[-top_k]
        p = np.where(keep, np.exp(row - row.max()), 0.0)
        cdf = np.cumsum(p)
        target = float(u) * cdf[-1]
        tokens.append(min(int((cdf <= target).sum()), V - 1))
        margins.append(float(np.min(np.abs(cdf[keep] - target))) / cdf[-1])
    return np.array(tokens), np.array(margins), keep


def launch(logits, r, temperature, top_k, column=0, after_advance=False):
    import cupy as cp

    from pymglu.cuda.decode_sample import Sampler

    B, V = logits.shape
    uniforms = cp.full((column + 2, B), np.nan, dtype=np.float32)
    uniforms[column] = cp.asarray(r, dtype=np.float32)
    ids = cp.full((B,), -7, dtype=np.int32)
    history = cp.full((B, column + 3), -7, dtype=np.int32)
    state = cp.asarray([123, column + (1 if after_advance else 0)], dtype=np.int32)
    Sampler(logits.dtype)(cp.asarray(logits), uniforms, cp.asarray([1.0 / temperature], dtype=np.float32),
                          cp.asarray([V if top_k is None else top_k], dtype=np.int32), ids, history, state,
                          after_advance)
    ids, history = cp.asnumpy(ids), cp.asnumpy(history)
    np.testing.assert_array_equal(history[:, column], ids)
    assert (np.delete(history, column, axis=1) == -7).all()  # no other column written
    return ids


CASES = [  # (vocab, temperature, top_k)
    (97, 1.0, None), (256, 0.7, 40), (256, 2.0, 1), (1000, 1.3, 999), (1000, 0.5, 1000), (50257, 0.9, 50),
    (33, 1.0, 5), (3001, 1.1, 2000),
]


@pytest.mark.parametrize("dtype", [float32, float16, bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("vocab, temperature, top_k", CASES)
def test_sampler_draws_the_reference_token(dtype, vocab, temperature, top_k):
    rng = np.random.default_rng(vocab + int(100 * temperature))
    B = 8
    logits = (rng.standard_normal((B, vocab)) * 3).astype(dtype)
    r = rng.random(B).astype(np.float32)
    r[0], r[1] = 0.0, np.float32(1.0) - np.float32(2.0 ** -24)  # the first and the last kept token
    got = launch(logits, r, temperature, top_k)
    want, margin, _ = reference(logits, r, temperature, top_k)
    close = margin < 1e-5
    assert (got == want)[~close].all(), (got, want)
    assert not close.all()
    for row, tok in zip(logits.astype(np.float64), got):  # every choice is among the kept tokens
        if top_k is not None and top_k < vocab:
            assert row[tok] >= np.partition(row, -top_k)[-top_k]


def test_ties_at_the_kth_value_are_all_kept_and_draws_cover_them():
    """Logits on a coarse grid, so that many share the k-th largest value: a sweep of draws must reach every
    token the reference keeps, and no other."""
    rng = np.random.default_rng(4)
    V, k = 200, 7
    logits = np.round(rng.standard_normal((1, V)) * 2).astype(bfloat16)
    kept = np.flatnonzero(logits[0].astype(np.float64) >= np.partition(logits[0].astype(np.float64), -k)[-k])
    assert kept.size > k  # ties at the threshold
    seen = set()
    for u in np.linspace(0.0, 0.999999, 301, dtype=np.float32):
        got = launch(logits, np.array([u]), 0.3, k)
        want, margin, _ = reference(logits, np.array([u]), 0.3, k)
        assert got[0] in kept
        if margin[0] > 1e-5:
            assert got[0] == want[0]
        seen.add(int(got[0]))
    p = np.exp(logits[0, kept].astype(np.float64) / 0.3)
    likely = kept[p / p.sum() > 1 / 150]  # tokens whose share of the draws exceeds two grid steps
    assert set(likely.tolist()) <= seen


def test_the_column_follows_the_state():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((3, 64)).astype(float32)
    r = rng.random(3).astype(np.float32)
    a = launch(logits, r, 1.0, None, column=4)
    b = launch(logits, r, 1.0, None, column=4, after_advance=True)  # state[1] = 5, one past the column
    np.testing.assert_array_equal(a, b)
