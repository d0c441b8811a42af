"""Corpus loading, the train/validation split, training and validation windows."""
import numpy as np
import pytest

from pymglu.models.data import DataError, default_corpus, eval_windows, load_corpus, sample_windows, split_corpus


def test_default_corpus_is_the_stdlib_help_text():
    data, name = default_corpus()
    assert data.dtype == np.uint8 and data.size > 100_000 and "pydoc_data" in name
    assert b"for" in data[:200_000].tobytes()


def test_load_file_and_errors(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("héllo".encode("utf-8"))
    data, name = load_corpus(path)
    assert data.tolist() == list("héllo".encode("utf-8")) and "a.txt" in name
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="not a regular file"):
        load_corpus(tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        load_corpus(tmp_path / "empty.txt")


def test_split_is_contiguous_and_checks_lengths():
    data = np.arange(200, dtype=np.uint8)
    train, val = split_corpus(data, seq_len=8, val_fraction=0.1)
    assert train.size == 180 and val.size == 20
    np.testing.assert_array_equal(np.concatenate([train, val]), data)
    with pytest.raises(DataError, match="seq_len \\+ 1 = 21 bytes.*at least 210 bytes"):
        split_corpus(data, seq_len=20)
    with pytest.raises(DataError, match="smaller --seq-len"):
        split_corpus(np.zeros(10, dtype=np.uint8), seq_len=64)


def test_windows_are_shifted_by_one():
    data = np.arange(50, dtype=np.uint8)
    x, y = sample_windows(data, 64, 10, np.random.default_rng(0))
    assert x.shape == y.shape == (64, 10) and x.dtype == y.dtype == np.uint8
    np.testing.assert_array_equal(y, x + 1)            # consecutive bytes
    assert x.min() == 0 and y.max() == 49               # both ends of the data are reachable
    batches = eval_windows(data, batch=2, seq_len=10, max_batches=5)
    assert [(bx.shape, by.shape) for bx, by in batches] == [((2, 10), (2, 10))] * 2
    starts = np.concatenate([b[0][:, 0] for b in batches])
    np.testing.assert_array_equal(starts, [0, 10, 20, 30])   # (50 - 1) // 10 = 4 windows, no overlap
    assert len(eval_windows(data, batch=3, seq_len=10, max_batches=1)) == 1
