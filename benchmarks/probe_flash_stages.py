"""Where FlashMGLU's time goes: the tensor-core kernel timed with one stage left out at a time.

Usage (GPU machine): python benchmarks/probe_flash_stages.py [--shapes 4096x14336,8192x28672] [--masks 1,4,8]

Each variant is ``flash_mglu.cu`` with a few lines replaced before compiling (the library's source is not
changed; a replacement that no longer matches fails loudly). The variants compute wrong results on
purpose and are only timed, T = 1, bf16, same launch configuration as the library, on the one-column
instance (``TOKENS = 8``; the library serves T = 1 with the paired one since stop 18):

- ``library``: the kernel as it is;
- ``no x loads``: the B fragments come from the address arithmetic instead of loads of ``x``;
- ``t + 1 mask``: every mask word still loaded, but xor-ed into one word: two ``mma.sp`` per tile
  instead of ``n + 1``;
- ``loads only``: W and mask words loaded, folded with integer ops into one accumulator, no ``mma``.

The time of a variant against ``library`` bounds what the left-out stage costs on the critical path.
Timing as in decode.py: weight sets rotated (three times the L2), a CUDA graph of back-to-back calls,
median of the replays. The variants are timed in ``--rounds`` rounds (each round all variants in order,
one row per round), so that a slow first timing after the weights are packed shows as such.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cupy as cp  # noqa: E402

from decode import L2_BYTES, time_graph  # noqa: E402
from pymglu import cuda as pymglu_cuda  # noqa: E402
from pymglu import dtypes, masks  # noqa: E402
from pymglu.cuda import flash_mglu as fm  # noqa: E402

MMA_LOOP = "        for (int i = 0; i < N_MASKS; ++i) masked_mma<T>(acc_s[i][nt], w[q], bq, m[i], q);"
T_MMA = "        if (!PAIRED) masked_mma_metadata<T>(acc_t[nt], w[q], bq, ALL_ON_METADATA, q);"
FOLDED_WORD = "uint32_t mm = 0u; for (int i = 0; i < N_MASKS; ++i) mm ^= m[i];"

VARIANTS = {
    "library": [],
    "no x loads": [("__ldg(p + q * 4)", "make_uint2((uint32_t)(size_t)(p + q * 4), 0x3f803f80u)")],
    "t + 1 mask": [(MMA_LOOP, "        { " + FOLDED_WORD + " masked_mma<T>(acc_s[0][nt], w[q], bq, mm, q); }")],
    "loads only": [
        (T_MMA, "        acc_t[nt][0] += __uint_as_float((w[q].x ^ w[q].y ^ w[q].z ^ w[q].w ^ bq.x) & 0x3effffffu);"),
        (MMA_LOOP, "        { " + FOLDED_WORD + " acc_s[0][nt][0] += __uint_as_float(mm & 0x3effffffu); }"),
    ],
}


def variant_source(replacements: list[tuple[str, str]]) -> str:
    code = pymglu_cuda.module_code(pymglu_cuda.source_path("flash_mglu.cu"))
    for old, new in replacements:
        if code.count(old) != 1:
            raise RuntimeError(f"probe replacement no longer matches flash_mglu.cu exactly once: {old!r}")
        code = code.replace(old, new)
    return code


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x14336,8192x28672")
    p.add_argument("--masks", default="1,4,8")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--replays", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    stream = cp.cuda.Stream(non_blocking=True)
    dtype = dtypes.bfloat16
    print("| d × h | n | round | " + " | ".join(f"{v} µs" for v in VARIANTS) + " |")
    print("|---|---|---|" + "---|" * len(VARIANTS))
    for shape in args.shapes.split(","):
        d, h = (int(v) for v in shape.split("x"))
        for n in (int(v) for v in args.masks.split(",")):
            sets = max(2, math.ceil(3 * L2_BYTES / (h * d * (2 + n / 8))))
            packed = []
            for _ in range(sets):
                W = (cp.random.standard_normal((h, d), dtype=cp.float32) / math.sqrt(d)).astype(dtype)
                packed.append(fm.pack_weights(W, masks.pack_masks(cp.random.random((n, h, d), dtype=cp.float32) < 0.5)))
            x = cp.asarray(np.random.default_rng(0).standard_normal((1, d), dtype=np.float32).astype(dtype))
            out = cp.empty((1, h), dtype=dtype)
            warps, ahead = fm.mma_config(n, d)
            name = fm._mma_name(dtype, n, 8, warps, ahead)  # the one-column instance the probe was written for
            strips, groups = packed[0].w_tiles.shape[:2]
            kernels = [cp.RawModule(code=variant_source(replacements),
                                    options=(*pymglu_cuda.BASE_OPTIONS, f"-I{pymglu_cuda.source_dir()}"),
                                    name_expressions=(name,)).get_function(name) for replacements in VARIANTS.values()]

            def call(kernel, k):
                wts = packed[k % sets]
                kernel((strips,), (warps * 32,), (wts.w_tiles, wts.mask_words, x, out, np.int32(1), np.int32(d),
                                                  np.int32(h), np.int32(groups), np.int32(0)))

            for r in range(args.rounds):
                times = [time_graph([lambda k=k, kern=kern: call(kern, k) for k in range(args.calls)], args.replays, stream)
                         for kern in kernels]
                print(f"| {d} × {h} | {n} | {r + 1} | " + " | ".join(f"{t * 1e6:.1f}" for t in times) + " |", flush=True)
            del packed


if __name__ == "__main__":
    main()
