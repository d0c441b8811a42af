"""ByteTokenizer: round trips, replacement of invalid UTF-8, errors."""
import numpy as np
import pytest

from pymglu import Tensor
from pymglu.models import ByteTokenizer


@pytest.mark.parametrize("text", ["", "hello", "naïve café – ünïcödé 日本語 🙂", "tabs\tand\nnewlines\x00"])
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.ndim == 1 and ids.size == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(list(ids)) == text and tok.decode(Tensor(ids)) == text


def test_ids_are_the_bytes():
    tok = ByteTokenizer()
    np.testing.assert_array_equal(tok.encode("Aé"), [65, 0xC3, 0xA9])
    assert tok.vocab_size == 256 and tok.decode_bytes([255, 0]) == b"\xff\x00"


def test_invalid_utf8_is_replaced():
    tok = ByteTokenizer()
    ids = tok.encode("é")[:1]                 # half of a two-byte character
    assert tok.decode(ids) == "\ufffd"
    assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"


def test_errors():
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tok.decode([1, 256])
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tok.decode(np.array([-1, 3]))
    with pytest.raises(TypeError, match="integers"):
        tok.decode(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="ids"):
        tok.decode(np.zeros((2, 2), dtype=np.int64))
