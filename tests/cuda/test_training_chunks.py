"""The recompute path's default chunk of tokens (pure arithmetic; runs without a GPU)."""
import math

import pytest

from pymglu.cuda.training import _token_chunks, default_chunk_tokens


@pytest.mark.parametrize("n_rows", [1, 7, 4096, 16383, 16384])
@pytest.mark.parametrize("n_masks", [1, 2, 3, 4, 8, 16])
def test_default_chunk_keeps_activations_within_swiglus_cache(n_rows, n_masks):
    chunk = default_chunk_tokens(n_rows, n_masks)
    chunks = _token_chunks(n_rows, n_masks, None)
    assert sum(c.stop - c.start for c in chunks) == n_rows and chunks[0].start == 0
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    # (n + 1) values per row of a chunk against SwiGLU's 2 per row of all rows (one row of rounding)
    assert (n_masks + 1) * chunk <= 2 * n_rows + n_masks + 1
    assert len(chunks) <= math.ceil((n_masks + 1) / 2)  # and no more chunks than that needs
    if n_masks == 1:
        assert chunk == n_rows


def test_explicit_chunks_and_bad_sizes():
    assert [(c.start, c.stop) for c in _token_chunks(10, 4, 4)] == [(0, 4), (4, 8), (8, 10)]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_tokens: expected an integer >= 1"):
            _token_chunks(10, 4, bad)
