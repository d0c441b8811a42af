"""Reads back on the GPU how sparse ``mma.m16n8k32`` (bf16) lays out its B operand and its metadata.

The instruction is ``mma.sp::ordered_metadata``, as in tensor_core.cuh.

The PTX ISA gives these layouts as figures; FlashMGLU's mask format (flash_mglu.py) depends on them, so
this script measures them directly with one-hot inputs and prints the maps:

* B: for each (lane, register, half) the (k, n) element of the 32x8 B matrix it holds;
* metadata: for sparsity selector 0 and 1, for each (lane, nibble) the (row, 4-wide chunk) of A whose
  two indices that nibble holds.

Usage on a GPU machine: ``python benchmarks/probe_sparse_mma.py [--json FILE]``.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

_SOURCE = r"""
template <int SEL>
__global__ void probe(const unsigned* A, const unsigned* B, const unsigned* E, float* D) {
  const int warp = blockIdx.x, lane = threadIdx.x;
  const unsigned* a = A + (warp * 32 + lane) * 4;
  const unsigned* b = B + (warp * 32 + lane) * 4;
  const unsigned e = E[warp * 32 + lane];
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
               "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
                 "r"(e), "n"(SEL));
  float* d = D + (warp * 32 + lane) * 4;
  for (int i = 0; i < 4; ++i) d[i] = c[i];
}
"""


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    return (np.asarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint32)


def _pack_halves(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (_bf16_bits(lo) | (_bf16_bits(hi) << 16)).astype(np.uint32)


def _d_matrix(d: np.ndarray) -> np.ndarray:
    """Per-warp (32, 4) accumulator fragments -> (16, 8) matrices (the documented m16n8 C layout)."""
    out = np.zeros((d.shape[0], 16, 8), np.float32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        out[:, g, 2 * t] = d[:, lane, 0]
        out[:, g, 2 * t + 1] = d[:, lane, 1]
        out[:, g + 8, 2 * t] = d[:, lane, 2]
        out[:, g + 8, 2 * t + 1] = d[:, lane, 3]
    return out


def run(cp) -> dict:
    module = cp.RawModule(code=_SOURCE, options=("-std=c++17",), name_expressions=("probe<0>", "probe<1>"))
    kernels = {s: module.get_function(f"probe<{s}>") for s in (0, 1)}

    def launch(sel, A, B, E):
        warps = A.shape[0]
        D = cp.full((warps, 32, 4), np.nan, dtype=cp.float32)
        kernels[sel]((warps,), (32,), (cp.asarray(A), cp.asarray(B), cp.asarray(E), D))
        return _d_matrix(cp.asnumpy(D))

    # B layout: A's two stored values of chunk c are 2^c (first) and 2^(c+8) (second) in every row;
    # metadata 0x4 per chunk places them at k = 4c, 4c+1, metadata 0xE at 4c+2, 4c+3. One-hot B.
    cases = [(lane, reg, half) for lane in range(32) for reg in range(4) for half in range(2)]
    a_vals = np.zeros((32, 4, 2), np.float32)
    for lane in range(32):
        t = lane & 3
        for reg in range(4):
            chunk = t + 4 * (reg >> 1)  # documented A layout: regs 0,1 chunk t, regs 2,3 chunk t + 4
            a_vals[lane, reg] = (2.0 ** chunk, 2.0 ** (chunk + 8))
    A1 = np.broadcast_to(_pack_halves(a_vals[..., 0], a_vals[..., 1]), (len(cases), 32, 4)).copy()
    B1 = np.zeros((len(cases), 32, 4), np.uint32)
    for w, (lane, reg, half) in enumerate(cases):
        B1[w, lane, reg] = _bf16_bits(np.float32(1.0)) << (16 * half)
    b_map = {}
    for meta, positions in ((0x44444444, (0, 1)), (0xEEEEEEEE, (2, 3))):
        E1 = np.full((len(cases), 32), meta, np.uint32)
        for sel in (0, 1):
            D = launch(sel, A1, B1, E1)
            for w, case in enumerate(cases):
                nz = np.argwhere(D[w] != 0)
                if len(nz) == 0:
                    continue
                cols = sorted(set(int(c) for c in nz[:, 1]))
                value = float(D[w][nz[0][0], nz[0][1]])
                exponent = int(round(np.log2(value)))
                chunk, which = (exponent, 0) if exponent < 8 else (exponent - 8, 1)
                key = f"{case[0]},{case[1]},{case[2]}"
                b_map.setdefault(key, set()).add((4 * chunk + positions[which], tuple(cols)))
    b_table = {}
    for key, found in b_map.items():
        assert len(found) == 1, (key, found)
        (k, cols), = found
        assert len(cols) == 1, (key, cols)
        b_table[key] = (k, cols[0])

    # Metadata: baseline 0x4 everywhere (k = 4c, 4c+1); one (lane, nibble) switched to 0xE (4c+2, 4c+3).
    # B column 0 holds 2^c at k = 4c+2 and 4c+3 of chunk c, so the change shows as D[row, 0] = 2^(c+1).
    Bk = np.zeros((32, 8), np.float32)
    for c in range(8):
        Bk[4 * c + 2, 0] = Bk[4 * c + 3, 0] = 2.0 ** c
    B2 = np.zeros((32, 4), np.uint32)
    for lane in range(32):
        for reg in range(4):
            halves = [Bk[b_table[f"{lane},{reg},{h}"]] if f"{lane},{reg},{h}" in b_table else 0.0 for h in (0, 1)]
            B2[lane, reg] = _pack_halves(np.float32(halves[0]), np.float32(halves[1]))
    A2 = np.full((1, 32, 4), _pack_halves(np.float32(1.0), np.float32(1.0)), np.uint32)
    meta_cases = [(lane, nib) for lane in range(32) for nib in range(8)]
    E2 = np.full((len(meta_cases), 32), 0x44444444, np.uint32)
    for w, (lane, nib) in enumerate(meta_cases):
        E2[w, lane] = (0x44444444 & ~(0xF << (4 * nib))) | (0xE << (4 * nib))
    meta = {}
    for sel in (0, 1):
        D = launch(sel, np.broadcast_to(A2, (len(meta_cases), 32, 4)).copy(),
                   np.broadcast_to(B2, (len(meta_cases), 32, 4)).copy(), E2)
        table = {}
        for w, (lane, nib) in enumerate(meta_cases):
            nz = np.argwhere(D[w] != 0)
            if len(nz) == 0:
                continue
            assert len(nz) == 1 and nz[0][1] == 0, (sel, lane, nib, nz)
            row = int(nz[0][0])
            chunk = int(round(np.log2(D[w][row, 0]))) - 1
            table[f"{lane},{nib}"] = (row, chunk)
        meta[str(sel)] = table
    return {"b": b_table, "meta": meta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import cupy as cp

    result = run(cp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print("B: lane,reg,half -> (k, n)")
    for lane in range(8):
        print(" ", lane, [result["b"].get(f"{lane},{r},{h}") for r in range(4) for h in range(2)])
    guess = all(result["b"][f"{l},{r},{h}"] == (2 * (l & 3) + 8 * r + h, l >> 2)
                for l in range(32) for r in range(4) for h in range(2))
    print("B matches k = 2 tg + 8 reg + half, n = lane >> 2:", guess)
    for sel, table in result["meta"].items():
        print(f"metadata, selector {sel}: lane -> [(row, chunk) per nibble]")
        for lane in range(32):
            entries = [table.get(f"{lane},{n}") for n in range(8)]
            if any(e is not None for e in entries):
                print(" ", lane, entries)


if __name__ == "__main__":
    main()
