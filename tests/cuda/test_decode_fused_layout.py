"""The fused decode step's weight layouts and launch choices, checked on the CPU (NumPy).

The tile format is read back element by element from its documented formula (flash_mglu.py): lane
``L = 4 g + c`` of tile ``q`` of group ``G`` of strip ``s`` holds ``W[16 s + g, 64 G + 16 q + 2 c + e]``,
``W[16 s + g + 8, ...]``, then the same rows at columns ``+ 8``.
"""
import numpy as np
import pytest

from pymglu.cuda import decode_fused
from pymglu.cuda.flash_mglu import tile_matrix
from pymglu.dtypes import bfloat16


def untile(tiles, rows, cols):
    """The matrix the tiles hold, from the documented lane formula (independent of tile_matrix)."""
    S, G = tiles.shape[:2]
    out = np.full((S * 16, G * 64), np.nan, dtype=np.float64)
    t = tiles.astype(np.float64)
    for s in range(S):
        for grp in range(G):
            for q in range(4):
                for lane in range(32):
                    g, c = divmod(lane, 4)
                    r0, k0 = 16 * s, 64 * grp + 16 * q + 2 * c
                    v = t[s, grp, q, lane]
                    out[r0 + g, k0:k0 + 2] = v[0:2]
                    out[r0 + g + 8, k0:k0 + 2] = v[2:4]
                    out[r0 + g, k0 + 8:k0 + 10] = v[4:6]
                    out[r0 + g + 8, k0 + 8:k0 + 10] = v[6:8]
    assert not np.isnan(out).any()
    assert not out[rows:].any() and not out[:, cols:].any()  # zero padding
    return out[:rows, :cols]


@pytest.mark.parametrize("rows, cols", [(16, 64), (37, 100), (5, 130)])
def test_tile_matrix_holds_the_matrix(rows, cols):
    W = np.random.default_rng(rows).standard_normal((rows, cols)).astype(bfloat16)
    tiles = tile_matrix(np, W)
    assert tiles.dtype == W.dtype and tiles.shape == (-(-rows // 16), -(-cols // 64), 4, 32, 8)
    np.testing.assert_array_equal(untile(tiles, rows, cols), W.astype(np.float64))


@pytest.mark.parametrize("d, head_dim", [(96, 32), (256, 128), (160, 16)])
def test_qkv_rows_pair_rotary_halves_within_a_strip(d, head_dim):
    order = decode_fused.qkv_row_order(d, head_dim)
    assert sorted(order.tolist()) == list(range(3 * d))
    strips = order.reshape(-1, 16)
    half = head_dim // 2
    for s, strip in enumerate(strips[: 2 * d // 16]):  # q then k
        section, local = divmod(s, d // 16)
        head, j0 = divmod(local, head_dim // 16)
        first = section * d + head * head_dim + 8 * j0
        np.testing.assert_array_equal(strip[:8], first + np.arange(8))
        np.testing.assert_array_equal(strip[8:], strip[:8] + half)
    np.testing.assert_array_equal(order[2 * d:], 2 * d + np.arange(d))  # v in natural order
    with pytest.raises(ValueError, match="multiple of 16"):
        decode_fused.qkv_row_order(96, 24)


@pytest.mark.parametrize("h", [8, 136, 203])
def test_glu_rows_pair_gate_and_value_units(h):
    order = decode_fused.glu_row_order(h).reshape(-1, 2, 8)
    assert order.shape[0] == -(-h // 8)
    units = np.arange(order.shape[0] * 8).reshape(-1, 8)
    np.testing.assert_array_equal(order[:, 0], np.where(units < h, units, -1))
    np.testing.assert_array_equal(order[:, 1], np.where(units < h, units + h, -1))


def test_packed_layer_reconstructs_the_permuted_weights():
    from pymglu.nn import SwiGLU

    rng = np.random.default_rng(0)
    d, h, Dh = 64, 40, 32
    wq, wk, wv, wo = (rng.standard_normal((d, d)).astype(bfloat16) for _ in range(4))
    up = SwiGLU(d, h, dtype="bfloat16", rng=1)
    w_down = rng.standard_normal((d, h)).astype(bfloat16)
    p = decode_fused.pack_layer(np, wq, wk, wv, wo, up, w_down, Dh)
    stacked = np.concatenate([wq, wk, wv]).astype(np.float64)
    np.testing.assert_array_equal(untile(p["wqkv"], 3 * d, d), stacked[decode_fused.qkv_row_order(d, Dh)])
    np.testing.assert_array_equal(untile(p["wo"], d, d), wo.astype(np.float64))
    np.testing.assert_array_equal(untile(p["wdown"], d, h), w_down.astype(np.float64))
    gv = np.concatenate([up.W_gate.data, up.W_value.data]).astype(np.float64)
    order = decode_fused.glu_row_order(h)
    want = np.where((order >= 0)[:, None], gv[np.maximum(order, 0)], 0.0)
    np.testing.assert_array_equal(untile(p["wup"], order.size, d), want)
    assert p["mup"] is None


def test_teams_fill_the_rounds():
    # H200: 132 SMs, 16 warps per block
    assert decode_fused.choose_teams(384, 132, 16) == 1    # 3 rounds of 132 strips: 97% busy; 4 teams: 73%
    assert decode_fused.choose_teams(512, 132, 16) == 4    # 97% whatever the count: more groups per warp
    assert decode_fused.choose_teams(128, 132, 16) == 1
    assert decode_fused.choose_teams(1024, 132, 8) == 2    # 8 warps: teams of at least 4 warps
    assert decode_fused.choose_teams(7, 132, 16) == 1


def test_mask_capacities_and_instances():
    assert [decode_fused.mask_capacity(n) for n in (0, 1, 4, 5, 8, 9, 16)] == [0, 4, 4, 8, 8, 16, 16]
    with pytest.raises(ValueError, match="at most 16"):
        decode_fused.mask_capacity(17)
    names = decode_fused.kernel_names("sm_90")
    assert len(names) == len(set(names)) == 8
    assert "pymglu::decode_fused<__nv_bfloat16, 4, 16>" in names
    assert "pymglu::decode_fused<__half, 16, 8>" in names
    assert "pymglu::decode_fused<__nv_bfloat16, 4, 8>" in decode_fused.kernel_names("sm_120")
    assert "pymglu::decode_fused<__nv_bfloat16, 4, 8>" in decode_fused.kernel_names("sm_86")
    sm80 = decode_fused.kernel_names("sm_80")  # 16 warps for GLU only (the 4-mask instance spilled at 16)
    assert "pymglu::decode_fused<__nv_bfloat16, 0, 16>" in sm80 and "pymglu::decode_fused<__nv_bfloat16, 4, 8>" in sm80


@pytest.mark.parametrize("warps,capacity", [(16, 4), (8, 8), (8, 16)])
def test_shared_memory_holds_every_products_tile_per_warp_for_mglu(warps, capacity):
    """The MGLU reduction stores t and each of the instance's mask slots at once: (capacity + 1) tiles of
    128 floats per warp, where the GLU instances keep one."""
    glu, stride, union = decode_fused._smem_layout(1, 2048, 8192, 128, 160, warps)
    mglu, stride_m, union_m = decode_fused._smem_layout(1, 2048, 8192, 128, 160, warps, capacity)
    assert (stride_m, union_m) == (stride, union)
    assert mglu - glu == warps * capacity * 128 * 4


@pytest.mark.parametrize("n, packets", [(160, 80), (200, 100), (201, 102), (202, 102), (2048, 1024), (8192, 4096)])
def test_packet_rows_hold_two_values_per_packet_and_an_even_count(n, packets):
    assert decode_fused.packet_row(n) == packets
