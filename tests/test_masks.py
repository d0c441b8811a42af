"""pymglu.masks on NumPy: the bit-plane format, pack/unpack, mask statistics, and argument errors."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymglu import masks as M


def _pack_by_bit_loop(m: np.ndarray) -> np.ndarray:
    """Independent reference: word k of a row has bit j set iff element 32 k + j is set."""
    d = m.shape[-1]
    words = (d + 31) // 32
    flat = m.reshape(-1, d)
    out = np.zeros((flat.shape[0], words), dtype=np.uint32)
    for r in range(flat.shape[0]):
        for c in range(d):
            if flat[r, c]:
                out[r, c // 32] |= np.uint32(1 << (c % 32))
    return out.reshape(m.shape[:-1] + (words,))


@st.composite
def mask_sets(draw):
    n = draw(st.integers(1, 16))
    h = draw(st.integers(1, 6))
    d = draw(st.one_of(st.integers(1, 70), st.sampled_from([95, 96, 97, 127, 128, 129, 255])))
    density = draw(st.sampled_from([0.0, 0.03, 0.5, 0.97, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).random((n, h, d)) < density


@settings(max_examples=60, deadline=None)
@given(mask_sets())
def test_pack_unpack_round_trip_and_format(m):
    n, h, d = m.shape
    packed = M.pack_masks(m)
    assert packed.dtype == np.uint32 and packed.shape == (n, h, M.words_per_row(d))
    assert packed.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(M.unpack_masks(packed, d), m)
    np.testing.assert_array_equal(packed, _pack_by_bit_loop(m))
    if d % 32:
        assert not (packed[..., -1] >> np.uint32(d % 32)).any(), "padding bits must be 0"
    M.check_packed(packed, n, h, d)
    M.check_packed(packed, None, h, d)


def test_known_words():
    row = np.zeros(40, dtype=bool)
    row[[0, 2, 31, 32, 39]] = True
    packed = M.pack_masks(row)
    assert packed.tolist() == [(1 << 0) | (1 << 2) | (1 << 31), (1 << 0) | (1 << 7)]
    assert M.pack_masks(np.ones((1, 1, 32), dtype=bool)).tolist() == [[[0xFFFFFFFF]]]
    assert M.pack_masks(np.ones(33, dtype=bool)).tolist() == [0xFFFFFFFF, 1]
    # little-endian bytes, as np.packbits(bitorder="little") on d padded to a multiple of 32
    assert M.pack_masks(row).tobytes() == np.packbits(np.pad(row, (0, 24)), bitorder="little").tobytes()


def test_any_leading_dims():
    rng = np.random.default_rng(1)
    for shape in [(7,), (3, 33), (2, 3, 4, 65)]:
        m = rng.random(shape) < 0.5
        packed = M.pack_masks(m)
        assert packed.shape == shape[:-1] + (M.words_per_row(shape[-1]),)
        np.testing.assert_array_equal(M.unpack_masks(packed, shape[-1]), m)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16])
def test_logits_are_thresholded_at_zero(dtype):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, 4, 50)).astype(dtype)
    # NaN is never a gate element (ml_dtypes' bfloat16 warns when comparing NaN, so not for that one)
    special = [0.0, -0.0, -1.0 if dtype is ml_dtypes.bfloat16 else np.nan, 1e-3]
    logits[0, 0, :4] = np.array(special, dtype=np.float32).astype(dtype)
    want = logits.astype(np.float32) > 0
    assert not want[0, 0, :3].any() and want[0, 0, 3]
    np.testing.assert_array_equal(M.pack_masks(logits), M.pack_masks(want))
    np.testing.assert_array_equal(M.masks_from_logits(logits), want)


def test_non_contiguous_input():
    rng = np.random.default_rng(3)
    m = rng.random((4, 70, 3)) < 0.5
    view = m.transpose(2, 0, 1)[:, :, ::2]
    np.testing.assert_array_equal(M.pack_masks(view), _pack_by_bit_loop(np.ascontiguousarray(view)))


def test_words_per_row():
    assert [M.words_per_row(d) for d in (1, 31, 32, 33, 64, 4095, 4096)] == [1, 1, 1, 2, 2, 128, 128]


def _hand_masks() -> np.ndarray:
    m = np.zeros((3, 2, 4), dtype=bool)
    m[0] = True  # all gate
    m[1, 0, :2] = True  # 2 of 8 gate: the first two of m[0]'s ones
    # m[2] empty
    return m


def test_gate_fraction_on_hand_built_masks():
    frac = M.gate_fraction(_hand_masks())
    assert frac.dtype == np.float64 and frac.shape == (3,)
    np.testing.assert_array_equal(frac, [1.0, 0.25, 0.0])
    logits = np.where(_hand_masks(), 0.5, -0.5)
    logits[2, 0, 0] = 0.0  # exactly zero is not a gate element
    np.testing.assert_array_equal(M.gate_fraction(logits), [1.0, 0.25, 0.0])


def test_mask_overlap_on_hand_built_masks():
    ov = M.mask_overlap(_hand_masks())
    # agreement P[M_i == M_j] over 8 elements; jaccard |and| / |or|, two empty masks -> 1
    np.testing.assert_allclose(ov["agreement"], [[1, 2 / 8, 0], [2 / 8, 1, 6 / 8], [0, 6 / 8, 1]])
    np.testing.assert_allclose(ov["jaccard"], [[1, 2 / 8, 0], [2 / 8, 1, 0], [0, 0, 1]])
    for v in ov.values():
        assert v.dtype == np.float64 and v.shape == (3, 3)
    both_empty = M.mask_overlap(np.zeros((2, 3, 5), dtype=bool))
    np.testing.assert_array_equal(both_empty["jaccard"], np.ones((2, 2)))
    np.testing.assert_array_equal(both_empty["agreement"], np.ones((2, 2)))


def test_mask_statistics():
    stats = M.mask_statistics(_hand_masks())
    assert set(stats) == {"gate_fraction", "mean_gate_fraction", "agreement", "jaccard"}
    assert stats["mean_gate_fraction"] == pytest.approx(1.25 / 3)


def test_pack_rejects_bad_inputs_naming_the_argument():
    with pytest.raises(TypeError, match=r"^masks: expected bool masks or float logits, got int32"):
        M.pack_masks(np.zeros((2, 3), dtype=np.int32))
    with pytest.raises(TypeError, match=r"^masks: "):
        M.pack_masks(np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"^masks: expected an array with at least 1 dims"):
        M.pack_masks(np.array(True))


def test_unpack_rejects_bad_inputs_naming_the_argument():
    packed = M.pack_masks(np.ones((2, 3, 40), dtype=bool))
    with pytest.raises(TypeError, match=r"^packed: expected dtype in \(uint32\)"):
        M.unpack_masks(packed.astype(np.int64), 40)
    with pytest.raises(ValueError, match=r"^packed: expected last dim ceil\(d/32\) = 1 for d = 20"):
        M.unpack_masks(packed, 20)
    with pytest.raises(ValueError, match=r"^packed: expected last dim ceil\(d/32\) = 3 for d = 65"):
        M.unpack_masks(packed, 65)
    with pytest.raises(ValueError, match=r"^d: expected an integer >= 1"):
        M.unpack_masks(packed, 0)
    with pytest.raises(ValueError, match=r"^d: "):
        M.unpack_masks(packed, 40.0)


def test_check_packed_and_statistics_errors():
    packed = M.pack_masks(np.ones((2, 3, 40), dtype=bool))
    with pytest.raises(ValueError, match=r"^packed_masks: expected shape \(2, 3, 1\)"):
        M.check_packed(packed, 2, 3, 20)
    with pytest.raises(ValueError, match=r"^bits: expected shape \(4, 3, 2\)"):
        M.check_packed(packed, 4, 3, 40, name="bits")
    with pytest.raises(TypeError, match=r"^packed_masks: expected dtype"):
        M.check_packed(packed.view(np.float32), 2, 3, 40)
    with pytest.raises(ValueError, match=r"^packed_masks: expected at least one mask plane"):
        M.check_packed(np.zeros((0, 3, 2), dtype=np.uint32), None, 3, 40)
    with pytest.raises(ValueError, match=r"^masks: expected a 3-d array"):
        M.gate_fraction(np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match=r"^masks: expected a 3-d array"):
        M.mask_overlap(np.ones((3,), dtype=bool))
    with pytest.raises(ValueError, match=r"^logits: expected an array with at least 1 dims"):
        M.masks_from_logits(np.float32(1.0))


def test_pack_unpack_on_each_array_module(xp):
    """Same bytes from NumPy and (gpu-marked) CuPy input, bool and float32 logits, ragged d."""
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((3, 5, 77)).astype(np.float32)
    want = M.pack_masks(logits > 0)
    for x in (xp.asarray(logits > 0), xp.asarray(logits)):
        packed = M.pack_masks(x)
        assert type(packed) is type(x) and packed.dtype == np.uint32
        host = packed.get() if hasattr(packed, "get") else packed
        assert host.tobytes() == want.tobytes()
        back = M.unpack_masks(packed, 77)
        assert bool((back == (xp.asarray(logits) > 0)).all())
    assert M.gate_fraction(xp.asarray(logits)).tolist() == M.gate_fraction(logits > 0).tolist()


def test_mask_overlap_is_exact_across_column_chunks(monkeypatch):
    import pymglu.masks as pm

    m = np.random.default_rng(9).random((3, 40, 77)) < 0.3
    f = m.reshape(3, -1)
    want = np.array([[(f[i] & f[j]).sum() / max((f[i] | f[j]).sum(), 1) for j in range(3)] for i in range(3)])
    monkeypatch.setattr(pm, "_OVERLAP_CHUNK", 101)  # several chunks, the last one ragged
    got = pm.mask_overlap(m)
    np.testing.assert_array_equal(got["jaccard"], want)
    np.testing.assert_array_equal(got["agreement"], np.array([[(f[i] == f[j]).mean() for j in range(3)] for i in range(3)]))
