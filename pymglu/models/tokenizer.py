"""``ByteTokenizer``: UTF-8 bytes as token ids 0..255 (no merges, no special tokens)."""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks
from pymglu.backend import to_numpy, unwrap

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """Byte-level tokenizer: every UTF-8 byte of a text is one token.

    ``encode`` never fails (any ``str`` has a UTF-8 encoding); ``decode`` replaces byte sequences that
    are not valid UTF-8 (a model may emit half a multi-byte character) with U+FFFD.
    """

    #: number of token ids.
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> ``(len(text.encode("utf-8")),)`` int64 ids in ``[0, 256)``."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Raw ``bytes`` -> ``(len(data),)`` int64 ids."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data: expected bytes, got {type(data).__name__}")
        return np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Any) -> str:
        """Integer ids (a 1-d NumPy/CuPy array, Tensor or list, values in ``[0, 256)``) -> ``str``;
        invalid UTF-8 becomes U+FFFD (``errors="replace"``)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Any) -> bytes:
        """Integer ids -> the raw ``bytes`` they stand for."""
        arr = unwrap(ids)
        arr = to_numpy(arr) if hasattr(arr, "dtype") else np.asarray(arr)
        if arr.size == 0:
            return b""
        if np.dtype(arr.dtype).kind not in "iu":
            raise TypeError(f"ids: expected integers, got {_checks.describe(arr)}")
        _checks.check_ndim("ids", arr, 1)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"ids: expected values in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        return arr.astype(np.uint8).tobytes()

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"
