"""Byte corpora for language-model training: loading, a contiguous train/validation split, and windows.

A corpus is a 1-d ``uint8`` NumPy array of bytes (the token ids of :class:`ByteTokenizer`). Training
draws random windows of ``seq_len + 1`` bytes (inputs and their next-byte targets); validation reads
a fixed set of consecutive windows, so that every model is scored on the same bytes.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pymglu import _checks

__all__ = ["DataError", "default_corpus", "load_corpus", "split_corpus", "sample_windows", "eval_windows"]


class DataError(ValueError):
    """The training text is missing, empty or too short; the message says what to change."""


def default_corpus() -> tuple[np.ndarray, str]:
    """The text every CPython has: the standard library's ``pydoc_data.topics.topics`` help pages
    (about 0.46 MB of English prose and Python examples), joined in sorted key order.

    Returns:
        ``(bytes as uint8 array, description)``.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        raise DataError("the embedded corpus (the standard library's pydoc_data.topics) is missing from this "
                        "Python; pass a text file with --data FILE") from None
    text = "\n\n".join(topics[k] for k in sorted(topics))
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return data, f"pydoc_data.topics ({len(topics)} help topics, {data.size:,} bytes)"


def load_corpus(path: str | os.PathLike | None) -> tuple[np.ndarray, str]:
    """The bytes of ``path`` (read as raw bytes, any encoding), or :func:`default_corpus` for ``None``.

    Raises:
        DataError: the file is missing, not a regular file, unreadable or empty.
    """
    if path is None:
        return default_corpus()
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {str(p)!r} does not exist")
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} is not a regular file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"data file {str(p)!r} cannot be read: {e.strerror or e}") from None
    if not raw:
        raise DataError(f"data file {str(p)!r} is empty")
    data = np.frombuffer(raw, dtype=np.uint8)
    return data, f"{p.name} ({data.size:,} bytes)"


def split_corpus(data: np.ndarray, seq_len: int, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Split into the first ``1 - val_fraction`` (training) and the last ``val_fraction`` (validation).

    Raises:
        DataError: either part is shorter than one window of ``seq_len + 1`` bytes.
    """
    seq_len = _checks.check_positive_int("seq_len", seq_len)
    val_fraction = _checks.check_finite("val_fraction", val_fraction, minimum=0.0, strict_min=True, maximum=0.5)
    n_val = int(round(data.size * val_fraction))
    train, val = data[:data.size - n_val], data[data.size - n_val:]
    need = seq_len + 1
    if train.size < need or val.size < need:
        raise DataError(
            f"the text has {data.size:,} bytes: {train.size:,} for training and {val.size:,} for validation "
            f"({val_fraction:g} of it), but each part needs at least one window of seq_len + 1 = {need} bytes; "
            f"use a text of at least {int(np.ceil(need / val_fraction)):,} bytes or a smaller --seq-len"
        )
    return train, val


def sample_windows(data: np.ndarray, batch: int, seq_len: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` random windows: inputs ``(batch, seq_len)`` and targets shifted by one, both in
    ``data``'s dtype (``uint8`` for a byte corpus, which lets the model skip reading the ids back to
    check their range: no host synchronisation per step on a GPU)."""
    starts = rng.integers(0, data.size - seq_len, size=batch)
    windows = data[starts[:, None] + np.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]


def eval_windows(data: np.ndarray, batch: int, seq_len: int, max_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Consecutive non-overlapping windows from the start of ``data``, in batches of up to ``batch``,
    at most ``max_batches`` batches (at least one window; ``data`` holds ``seq_len + 1`` bytes or more),
    in ``data``'s dtype."""
    n_windows = min((data.size - 1) // seq_len, batch * max_batches)
    starts = np.arange(n_windows) * seq_len
    windows = data[starts[:, None] + np.arange(seq_len + 1)]
    return [(windows[i:i + batch, :-1], windows[i:i + batch, 1:]) for i in range(0, n_windows, batch)]
