"""FlashMGLU's packed MGLU format, checked on the CPU (NumPy) by emulating what the kernel computes.

The emulation follows the hardware, not the packer: the A fragment layout of ``mma.m16n8k16`` (PTX ISA),
the B and metadata layouts of ``mma.sp::ordered_metadata.m16n8k32`` as ``benchmarks/probe_sparse_mma.py``
measured them on the H200 (B register ``j`` of lane ``4 g + tg``, half ``e``, holds ``B[2 tg + 8 j + e,
g]``; under selector ``s`` lane ``4 g + 2 s + r`` gives nibble ``j`` for row ``g + 8 (j >> 2)`` and chunk
``4 r + (j & 3)``; a nibble's bits 1..0 index the first stored value, bits 3..2 the second), and the
kernel's own steps (``mask_metadata`` and ``sparse_b_fragment`` of tensor_core.cuh). If the products it
emulates equal ``x W^T`` and ``x (M_i * W)^T``, the format and the kernel's use of it agree.
"""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymglu import cuda as pymglu_cuda
from pymglu.cuda import flash_mglu as fm
from pymglu.dtypes import bfloat16


def _selectors(name: str) -> tuple[int, int]:
    """The byte-permute selectors of a BSelect constant, read from tensor_core.cuh."""
    text = pymglu_cuda.source_path("tensor_core.cuh").read_text()
    m = re.search(rf"{name}\s*=\s*\{{0x([0-9A-Fa-f]+)u,\s*0x([0-9A-Fa-f]+)u\}}", text)
    assert m, f"{name} not found in tensor_core.cuh"
    return int(m.group(1), 16), int(m.group(2), 16)


ON, OFF = _selectors("B_AT_ON_POSITIONS"), _selectors("B_AT_OFF_POSITIONS")


def _byte_perm(a: int, b: int, s: int) -> int:
    """CUDA's __byte_perm(a, b, s): byte k of the result is byte (s >> 4k) & 7 of b:a."""
    source = a.to_bytes(4, "little") + b.to_bytes(4, "little")
    return int.from_bytes(bytes(source[(s >> (4 * k)) & 7] for k in range(4)), "little")


def _b_halves(selectors: tuple[int, int]) -> dict[tuple[int, int], int]:
    """Where sparse_b_fragment(v, sel) puts a lane's four x values: (register, half) -> value index j."""
    codes = [0x0101 * (j + 1) for j in range(4)]  # distinct non-zero 16-bit stand-ins for x[4 tg + j]
    v = (codes[0] | codes[1] << 16, codes[2] | codes[3] << 16)
    placed = {}
    for r in range(4):
        reg = _byte_perm(v[r >> 1], 0, selectors[r & 1])
        for e in range(2):
            half = (reg >> (16 * e)) & 0xFFFF
            if half:
                placed[r, e] = codes.index(half)
    return placed


def _metadata(word: int, q: int) -> int:
    return (((word >> 1) if q & 1 else word) & 0x55555555) | 0x88888888  # tensor_core.cuh: mask_metadata


def _tile_product(tile, x_cols, meta_of_lane, q, column_selectors=None):
    """(16, C) product of one tile (lane registers, (32, 8)) with x columns (16, C), by the mma.sp rules;
    column_selectors[c]: the BSelect of the lanes holding column c (default: all B_AT_ON_POSITIONS)."""
    compressed = np.zeros((16, 16))
    for lane in range(32):
        g, tg = divmod(lane, 4)
        v = tile[lane]
        compressed[g, 2 * tg:2 * tg + 2] = v[0:2]
        compressed[g + 8, 2 * tg:2 * tg + 2] = v[2:4]
        compressed[g, 2 * tg + 8:2 * tg + 10] = v[4:6]
        compressed[g + 8, 2 * tg + 8:2 * tg + 10] = v[6:8]
    B = np.zeros((32, x_cols.shape[1]))
    for col in range(x_cols.shape[1]):
        placed = _b_halves(column_selectors[col] if column_selectors else ON)
        for tg in range(4):
            for (r, e), j in placed.items():  # register r, half e of lane (col, tg) is B[2 tg + 8 r + e, col]
                B[2 * tg + 8 * r + e, col] = x_cols[4 * tg + j, col]
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


def emulate(tiles, words, x):
    """t (T, S*16) and s (n, T, S*16) from the packed format, as the kernel's mma.sp calls compute them."""
    S, G = tiles.shape[:2]
    n = words.shape[2]
    T, d = x.shape
    xp = np.zeros((T, G * 64))
    xp[:, :d] = x
    t = np.zeros((T, S * 16))
    s = np.zeros((n, T, S * 16))
    tiles = tiles.astype(np.float64)
    for strip in range(S):
        for grp in range(G):
            for q in range(4):
                cols = xp[:, 64 * grp + 16 * q:64 * grp + 16 * q + 16].T
                rows = slice(16 * strip, 16 * strip + 16)
                t[:, rows] += _tile_product(tiles[strip, grp, q], cols, lambda lane: 0xDDDDDDDD, q).T
                for i in range(n):
                    meta = lambda lane: _metadata(int(words[strip, grp, i, lane]), q)
                    s[i, :, rows] += _tile_product(tiles[strip, grp, q], cols, meta, q).T
    return t, s


def _check_packed_format(h, d, n, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((h, d)).astype(bfloat16)
    masks = rng.random((n, h, d)) < 0.5
    x = rng.standard_normal((3, d)).astype(bfloat16).astype(np.float64)
    tiles = fm.sparse_tiles(np, W)
    words = np.stack([fm.mask_words(np, m) for m in masks], axis=2)
    assert tiles.shape == (-(-h // 16), -(-d // 64), 4, 32, 8) and tiles.dtype == W.dtype
    assert words.shape == (-(-h // 16), -(-d // 64), n, 32) and words.dtype == np.uint32
    t, s = emulate(tiles, words, x)
    W64 = W.astype(np.float64)
    np.testing.assert_allclose(t[:, :h], x @ W64.T, rtol=1e-12, atol=1e-12)
    assert not t[:, h:].any()  # padding rows are zero
    for i in range(n):
        np.testing.assert_allclose(s[i, :, :h], x @ (masks[i] * W64).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h, d, n", [(16, 64, 1), (37, 100, 3), (5, 130, 2)])
def test_packed_format_gives_the_masked_products(h, d, n):
    _check_packed_format(h, d, n, seed=h * d + n)


@settings(max_examples=12, deadline=None)
@given(h=st.integers(1, 40), d=st.integers(1, 140), n=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_packed_format_on_ragged_shapes(h, d, n, seed):
    _check_packed_format(h, d, n, seed)


def emulate_complement(tiles, words, x):
    """s (n, T, S*16) and t - s (n, T, S*16) for T <= 4 as the COMPLEMENT kernel computes them: B columns
    0..3 hold tokens 0..3 at the positions of set mask bits, columns 4..7 the same tokens at the others."""
    S, G = tiles.shape[:2]
    n = words.shape[2]
    T, d = x.shape
    xp = np.zeros((4, G * 64))
    xp[:T, :d] = x
    s = np.zeros((n, T, S * 16))
    rest = np.zeros((n, T, S * 16))
    tiles = tiles.astype(np.float64)
    selectors = [ON] * 4 + [OFF] * 4
    for strip in range(S):
        for grp in range(G):
            for q in range(4):
                cols = np.concatenate([xp, xp])[:, 64 * grp + 16 * q:64 * grp + 16 * q + 16].T
                rows = slice(16 * strip, 16 * strip + 16)
                for i in range(n):
                    meta = lambda lane: _metadata(int(words[strip, grp, i, lane]), q)
                    prod = _tile_product(tiles[strip, grp, q], cols, meta, q, selectors).T
                    s[i, :, rows] += prod[:T]
                    rest[i, :, rows] += prod[4:4 + T]
    return s, rest


@settings(max_examples=8, deadline=None)
@given(h=st.integers(1, 33), d=st.integers(1, 130), n=st.integers(1, 3), tokens=st.integers(1, 4),
       seed=st.integers(0, 2**31))
def test_complement_columns_give_the_masked_and_unmasked_parts(h, d, n, tokens, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((h, d)).astype(bfloat16)
    masks = rng.random((n, h, d)) < 0.5
    x = rng.standard_normal((tokens, d)).astype(bfloat16).astype(np.float64)
    words = np.stack([fm.mask_words(np, m) for m in masks], axis=2)
    s, rest = emulate_complement(fm.sparse_tiles(np, W), words, x)
    W64 = W.astype(np.float64)
    for i in range(n):
        np.testing.assert_allclose(s[i, :, :h], x @ (masks[i] * W64).T, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(rest[i, :, :h], x @ (~masks[i] * W64).T, rtol=1e-12, atol=1e-12)


def test_b_selectors_place_x_where_the_metadata_indices_point():
    # set bit -> indices 1 and 3 (high halves), clear bit -> 0 and 2 (low halves), value j in register j
    assert _b_halves(ON) == {(j, 1): j for j in range(4)}
    assert _b_halves(OFF) == {(j, 0): j for j in range(4)}


def test_tile_column_order_is_a_permutation_matching_the_b_fragment():
    order = fm.TILE_COLUMN_ORDER
    assert sorted(order.tolist()) == list(range(16))
    # stored column 2c + e sits at B position 4c + 1 + 2e, held by lane tg = 2 (c & 1) + e, register c >> 1,
    # which sparse_b_fragment fills with x[4 tg + j]
    for c in range(8):
        for e in range(2):
            assert order[2 * c + e] == 4 * (2 * (c & 1) + e) + (c >> 1)
