"""FlashMGLU's packed MGLU format, checked on the CPU (NumPy) by emulating what the kernel computes.

The emulation follows the hardware, not the packer: the A fragment layout of ``mma.m16n8k16`` (PTX ISA),
the B and metadata layouts of ``mma.sp::ordered_metadata.m16n8k32`` as ``benchmarks/probe_sparse_mma.py``
measured them on the H200 (B register ``j`` of lane ``4 g + tg``, half ``e``, holds ``B[2 tg + 8 j + e,
g]``; under selector ``s`` lane ``4 g + 2 s + r`` gives nibble ``j`` for row ``g + 8 (j >> 2)`` and chunk
``4 r + (j & 3)``; a nibble's bits 1..0 index the first stored value, bits 3..2 the second), and the
kernel's own steps (``mask_metadata`` and ``sparse_b_fragment`` of tensor_core.cuh). If the products it
emulates equal ``x W^T`` and ``x (M_i * W)^T``, the format and the kernel's use of it agree.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymglu.cuda import flash_mglu as fm
from pymglu.dtypes import bfloat16


def _metadata(word: int, q: int) -> int:
    return (((word >> 1) if q & 1 else word) & 0x55555555) | 0x88888888  # tensor_core.cuh: mask_metadata


def _tile_product(tile, x_cols, meta_of_lane, q, even_cols=None):
    """(16, T) product of one tile (lane registers, (32, 8)) with x columns (16, T), by the mma.sp rules.

    ``even_cols``: further x columns (16, T') placed in the low halves of B's registers (even chunk
    positions), as the complement columns of the paired instance (flash_mglu.cu, TOKENS = 4) do; their
    products follow the first T columns."""
    compressed = np.zeros((16, 16))
    for lane in range(32):
        g, tg = divmod(lane, 4)
        v = tile[lane]
        compressed[g, 2 * tg:2 * tg + 2] = v[0:2]
        compressed[g + 8, 2 * tg:2 * tg + 2] = v[2:4]
        compressed[g, 2 * tg + 8:2 * tg + 10] = v[4:6]
        compressed[g + 8, 2 * tg + 8:2 * tg + 10] = v[6:8]
    T = x_cols.shape[1]
    even = np.zeros((16, 0)) if even_cols is None else even_cols
    B = np.zeros((32, T + even.shape[1]))
    for tg in range(4):
        for j in range(4):  # sparse_b_fragment: x[4 tg + j] in the high half (e = 1) of register j
            B[2 * tg + 8 * j + 1, :T] = x_cols[4 * tg + j]
            B[2 * tg + 8 * j, T:] = even[4 * tg + j]  # complement columns: the low half (e = 0)
    A = np.zeros((16, 32))
    sel = q >> 1
    for lane in range(32):
        g, tg = divmod(lane, 4)
        if tg >> 1 != sel:
            continue
        meta = meta_of_lane(lane)
        for j in range(8):
            row, chunk = g + 8 * (j >> 2), 4 * (tg & 1) + (j & 3)
            nibble = (meta >> (4 * j)) & 0xF
            first, second = nibble & 3, nibble >> 2
            assert first < second, "ordered metadata"
            A[row, 4 * chunk + first] += compressed[row, 2 * chunk]
            A[row, 4 * chunk + second] += compressed[row, 2 * chunk + 1]
    return A @ B


def _each_tile(tiles, x):
    """(row slice of the output, strip, group, q, tile as float64 lane registers, x columns (16, T)) for
    every tile of the packed format, x zero-padded to whole groups."""
    S, G = tiles.shape[:2]
    T, d = x.shape
    xp = np.zeros((T, G * 64))
    xp[:, :d] = x
    tiles = tiles.astype(np.float64)
    for strip in range(S):
        for grp in range(G):
            for q in range(4):
                cols = xp[:, 64 * grp + 16 * q:64 * grp + 16 * q + 16].T
                yield slice(16 * strip, 16 * strip + 16), strip, grp, q, tiles[strip, grp, q], cols


def _mask_metadata(words, strip, grp, i, q):
    return lambda lane: _metadata(int(words[strip, grp, i, lane]), q)


def emulate(tiles, words, x):
    """t (T, S*16) and s (n, T, S*16) from the packed format, as the kernel's mma.sp calls compute them."""
    n, (T, _) = words.shape[2], x.shape
    t = np.zeros((T, tiles.shape[0] * 16))
    s = np.zeros((n, T, tiles.shape[0] * 16))
    for rows, strip, grp, q, tile, cols in _each_tile(tiles, x):
        t[:, rows] += _tile_product(tile, cols, lambda lane: 0xDDDDDDDD, q).T
        for i in range(n):
            s[i, :, rows] += _tile_product(tile, cols, _mask_metadata(words, strip, grp, i, q), q).T
    return t, s


def emulate_paired(tiles, words, x):
    """(s, off) (n, T, S*16) each, T <= 4, as the paired instance computes them: one mma.sp per mask and
    tile, x in the high halves of B for columns 0..T-1 and in the low halves for columns 4..4+T-1."""
    n, (T, _) = words.shape[2], x.shape
    assert T <= 4
    s = np.zeros((n, T, tiles.shape[0] * 16))
    off = np.zeros((n, T, tiles.shape[0] * 16))
    for rows, strip, grp, q, tile, cols in _each_tile(tiles, x):
        for i in range(n):
            both = _tile_product(tile, cols, _mask_metadata(words, strip, grp, i, q), q, even_cols=cols)
            s[i, :, rows] += both[:, :T].T
            off[i, :, rows] += both[:, T:].T
    return s, off


def _words_as_the_kernel_loads_them(packed, n):
    """Word ``(s, G, i, L)`` of the packed ``(S, G, 32 n)`` mask words, read at the offsets
    ``load_weights`` in flash_mglu.cu reads them: lane ``L`` loads masks ``4j .. 4j + 3`` as one uint4 at
    word ``128 j + 4 L``, and each of the last ``n % 4`` masks ``i`` with a 4-byte load at ``32 i + L``."""
    fours = n // 4
    words = np.zeros(packed.shape[:2] + (n, 32), dtype=packed.dtype)
    for lane in range(32):
        for i in range(n):
            offset = 128 * (i // 4) + 4 * lane + i % 4 if i < 4 * fours else 32 * i + lane
            words[:, :, i, lane] = packed[:, :, offset]
    return words


@pytest.mark.parametrize("n", range(1, 17))
def test_mask_words_in_lane_major_chunks(n):
    chunks = fm.mask_chunks(n)
    assert chunks == (4,) * (n // 4) + (1,) * (n % 4)
    rng = np.random.default_rng(n)
    words = rng.integers(0, 2**32, size=(3, 2, n, 32), dtype=np.uint64).astype(np.uint32)
    packed = fm.lane_major_words(np, words)
    assert packed.shape == (3, 2, 32 * n) and packed.flags.c_contiguous
    np.testing.assert_array_equal(_words_as_the_kernel_loads_them(packed, n), words)
    np.testing.assert_array_equal(fm.warp_major_words(np, packed, n), words)


def test_mask_word_layout_errors():
    with pytest.raises(ValueError, match="n: expected a mask count"):
        fm.mask_chunks(0)
    with pytest.raises(ValueError, match=r"words: expected shape \(S, G, n, 32\)"):
        fm.lane_major_words(np, np.zeros((1, 1, 2, 16), np.uint32))
    with pytest.raises(ValueError, match=r"words: expected shape \(S, G, 96\) for n = 3"):
        fm.warp_major_words(np, np.zeros((1, 1, 64), np.uint32), 3)


def _check_packed_format(h, d, n, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((h, d)).astype(bfloat16)
    masks = rng.random((n, h, d)) < 0.5
    x = rng.standard_normal((3, d)).astype(bfloat16).astype(np.float64)
    tiles = fm.sparse_tiles(np, W)
    packed = fm.lane_major_words(np, np.stack([fm.mask_words(np, m) for m in masks], axis=2))
    assert tiles.shape == (-(-h // 16), -(-d // 64), 4, 32, 8) and tiles.dtype == W.dtype
    assert packed.shape == (-(-h // 16), -(-d // 64), 32 * n) and packed.dtype == np.uint32
    words = _words_as_the_kernel_loads_them(packed, n)
    t, s = emulate(tiles, words, x)
    W64 = W.astype(np.float64)
    np.testing.assert_allclose(t[:, :h], x @ W64.T, rtol=1e-12, atol=1e-12)
    assert not t[:, h:].any()  # padding rows are zero
    for i in range(n):
        np.testing.assert_allclose(s[i, :, :h], x @ (masks[i] * W64).T, rtol=1e-12, atol=1e-12)
    s_paired, off = emulate_paired(tiles, words, x)
    for i in range(n):
        np.testing.assert_allclose(s_paired[i, :, :h], x @ (masks[i] * W64).T, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(off[i, :, :h], x @ (~masks[i] * W64).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h, d, n", [(16, 64, 1), (37, 100, 3), (5, 130, 2), (20, 70, 7), (9, 64, 8)])
def test_packed_format_gives_the_masked_products(h, d, n):
    _check_packed_format(h, d, n, seed=h * d + n)


@settings(max_examples=12, deadline=None)
@given(h=st.integers(1, 40), d=st.integers(1, 140), n=st.integers(1, 7), seed=st.integers(0, 2**31))
def test_packed_format_on_ragged_shapes(h, d, n, seed):
    _check_packed_format(h, d, n, seed)


def test_tile_column_order_is_a_permutation_matching_the_b_fragment():
    order = fm.TILE_COLUMN_ORDER
    assert sorted(order.tolist()) == list(range(16))
    # stored column 2c + e sits at B position 4c + 1 + 2e, held by lane tg = 2 (c & 1) + e, register c >> 1,
    # which sparse_b_fragment fills with x[4 tg + j]
    for c in range(8):
        for e in range(2):
            assert order[2 * c + e] == 4 * (2 * (c & 1) + e) + (c >> 1)


def test_compile_options_follow_the_pdl_trigger_and_the_register_bound(monkeypatch):
    from pymglu.cuda import flash_mglu as fm_

    assert fm_.PDL_TRIGGER == "end" and fm_.compile_options() == ("-DPYMGLU_PDL_TRIGGER_AT_END",)
    monkeypatch.setattr(fm_, "PDL_TRIGGER", "start")
    assert fm_.compile_options() == ()
    monkeypatch.setattr(fm_, "MIN_BLOCKS_BOUND", False)
    assert fm_.compile_options() == ("-DPYMGLU_MMA_NO_MIN_BLOCKS",)
    monkeypatch.setattr(fm_, "PDL_TRIGGER", "middle")
    with pytest.raises(ValueError, match="PDL_TRIGGER: expected 'start' or 'end'"):
        fm_.compile_options()


def test_pdl_must_be_a_bool_and_is_checked_first():
    import numpy as np_

    from pymglu.cuda import flash_mglu as fm_

    with pytest.raises(TypeError, match="pdl: expected a bool, got str"):
        fm_.flash_mglu(np_.ones((1, 64), np_.float32), np_.ones((32, 64), np_.float32), None, pdl="yes")


def test_every_instance_the_launcher_picks_is_compile_checked(monkeypatch):
    """The CI compile test builds kernel_names(); every (dtype, n, T, d) the launcher can meet must map
    to one of them through mma_config, and the configurations must be ones the kernel template takes."""
    from pymglu.cuda import flash_mglu as fm
    from pymglu.dtypes import bfloat16, float16

    listed = set(fm.kernel_names())
    for dtype in (bfloat16, float16):
        for n in range(1, fm.MAX_MASKS + 1):
            for tokens in range(1, fm.MAX_TOKENS + 1):
                for d in (1, 64, 4095, 4096, 4097, 8192, 1 << 16):
                    warps, ahead = fm.mma_config(n, d, tokens)
                    assert warps in (1, 2, 4, 8) and 1 <= ahead <= 3
                    for paired in (True, False):
                        monkeypatch.setattr(fm, "PAIRED_COLUMNS", paired)
                        block = fm.token_block(tokens)
                        assert block == (4 if paired and tokens <= 4 else 8 if tokens <= 8 else 16)
                        assert fm._mma_name(dtype, n, block, warps, ahead) in listed, (dtype, n, tokens, d)
