"""How close do the training step's weight-sized passes run to the HBM limit, and do other launch shapes help?

Issue 4's step at T = 4096, d = 4096, n = 4 spends about 0.45 ms in four ``apply_mask`` calls (two masked
copies of ``W`` each) and 0.38 ms in the weight-gradient pass (``mglu_weight_grads``), both memory-bound
(stop 37: 3.2 and 3.7 TB/s by their bytes; a device-to-device copy reaches 4.1-4.25 TB/s). This probe
times, in turns, at one (d, h) in bfloat16:

* ``apply_mask``: the library's kernel (``pymglu.cuda.training``, 2 planes per call; ``apply_mask_flat``
  since stop 38);
* ``replicate``: the same loop without the mask (``W`` read, two copies written): the bound of the pattern;
* ``mask rows``: a 2-d grid (a block row per group of rows, 32-bit column indices), no 64-bit division;
* ``mask x2``: the library's loop with two chunks per thread and iteration, both loads issued first;
* ``mask stream``: the library's loop with streaming stores (``__stcs``);
* ``weight grads``: the library's pass (``G`` in bfloat16, ``dW_acc`` float32, n planes);
* ``wgrad copy``: the same loads and stores without the arithmetic: the bound of that pattern;
* ``epilogue fwd`` / ``epilogue bwd``: the library's epilogues (SiLU) over ``--tokens`` rows, and
  ``epi fwd sums`` / ``epi bwd products``: their loads and stores with plain sums and products instead of
  the activation (no exponentials): what the activation's arithmetic costs.

Usage (GPU machine): ``python benchmarks/probe_weight_passes.py [--shape 4096x14336] [--masks 4]``, or both
shapes with ``bash benchmarks/gpu_visit.sh weight-probe``.
Prints a Markdown table: ms per call (median over rounds of 20 launches rotating three sets of arrays) and
TB/s by the bytes each call must move.

Stop 37's run on the H200 (benchmarks/results_stop37_probes_h200.md): the weight-gradient pass and both
epilogues run at 3.7-3.85 TB/s, the forward epilogue's activation costing 6% against plain sums;
``apply_mask`` at 3.40 / 2.78 TB/s (d = 4096 / 2048) against 3.86 / 3.57 for ``replicate``, and
``mask stream`` 6% / 17% faster than the library's. In the step the streaming stores made MGLU 0.3-0.9%
slower (the product that reads the masked copy next loses its L2 hits), so they were not kept. That run's
``wgrad copy`` stored each value back unchanged and the compiler dropped it.

Stop 38's run (benchmarks/results_stop38_probes_h200.md), with the library's ``apply_mask`` now
``apply_mask_flat`` for these shapes (no division per chunk, both planes' words loaded before the first
store): 0.0995 / 0.0311 ms (3.69 / 3.37 TB/s) against 0.0946 / 0.0293 for ``replicate``, as fast as
``mask stream`` without its streaming stores; the weight-gradient pass at 0.371 / 0.107 ms against 0.352 /
0.103 for ``wgrad copy`` (its loads and stores, the sign flipped), i.e. at 95-96% of its pattern's bound.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy as cp  # noqa: E402

from pymglu import masks as mask_ops  # noqa: E402
from pymglu.cuda import multiprocessor_count, training  # noqa: E402
from pymglu.dtypes import bfloat16  # noqa: E402

SOURCE = r"""
#include <cuda_bf16.h>
typedef unsigned int uint32_t;
typedef __nv_bfloat16 bf16;
struct alignas(16) Pack8 { bf16 v[8]; };

extern "C" __global__ void replicate(const bf16* __restrict__ W, const uint32_t* __restrict__ bits,
                                     bf16* __restrict__ out, int count, int h, int d, int words) {
  const long long chunks = d / 8, hd = (long long)h * d;
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < h * chunks;
       idx += (long long)gridDim.x * blockDim.x) {
    const long long r = idx / chunks;
    const int c0 = (int)(idx - r * chunks) * 8;
    const Pack8 w = *reinterpret_cast<const Pack8*>(W + r * d + c0);
    for (int p = 0; p < count; ++p) *reinterpret_cast<Pack8*>(out + p * hd + r * d + c0) = w;
  }
}

__device__ __forceinline__ Pack8 masked(Pack8 w, uint32_t word) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (!((word >> j) & 1u)) w.v[j] = __float2bfloat16(0.0f);
  return w;
}

// grid (ceil(d / 8 / blockDim.x), rows): block row y handles rows y, y + gridDim.y, ...
extern "C" __global__ void mask_rows(const bf16* __restrict__ W, const uint32_t* __restrict__ bits,
                                     bf16* __restrict__ out, int count, int h, int d, int words) {
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (c0 >= d) return;
  const long long hd = (long long)h * d, hw = (long long)h * words;
  for (int r = blockIdx.y; r < h; r += gridDim.y) {
    const Pack8 w = *reinterpret_cast<const Pack8*>(W + (long long)r * d + c0);
    for (int p = 0; p < count; ++p) {
      const uint32_t word = bits[p * hw + (long long)r * words + (c0 >> 5)] >> (c0 & 31);
      *reinterpret_cast<Pack8*>(out + p * hd + (long long)r * d + c0) = masked(w, word);
    }
  }
}

extern "C" __global__ void mask_x2(const bf16* __restrict__ W, const uint32_t* __restrict__ bits,
                                   bf16* __restrict__ out, int count, int h, int d, int words) {
  const long long chunks = d / 8, hd = (long long)h * d, hw = (long long)h * words, total = h * chunks;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total; idx += 2 * stride) {
    const long long idx2 = idx + stride;
    const bool second = idx2 < total;
    const long long r = idx / chunks, r2 = idx2 / chunks;
    const int c0 = (int)(idx - r * chunks) * 8, c2 = (int)(idx2 - r2 * chunks) * 8;
    const Pack8 w = *reinterpret_cast<const Pack8*>(W + r * d + c0);
    Pack8 w2 = w;
    if (second) w2 = *reinterpret_cast<const Pack8*>(W + r2 * d + c2);
    for (int p = 0; p < count; ++p) {
      const uint32_t word = bits[p * hw + r * words + (c0 >> 5)] >> (c0 & 31);
      *reinterpret_cast<Pack8*>(out + p * hd + r * d + c0) = masked(w, word);
      if (second) {
        const uint32_t word2 = bits[p * hw + r2 * words + (c2 >> 5)] >> (c2 & 31);
        *reinterpret_cast<Pack8*>(out + p * hd + r2 * d + c2) = masked(w2, word2);
      }
    }
  }
}

extern "C" __global__ void mask_stream(const bf16* __restrict__ W, const uint32_t* __restrict__ bits,
                                       bf16* __restrict__ out, int count, int h, int d, int words) {
  const long long chunks = d / 8, hd = (long long)h * d, hw = (long long)h * words;
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < h * chunks;
       idx += (long long)gridDim.x * blockDim.x) {
    const long long r = idx / chunks;
    const int c0 = (int)(idx - r * chunks) * 8;
    const Pack8 w = *reinterpret_cast<const Pack8*>(W + r * d + c0);
    for (int p = 0; p < count; ++p) {
      const uint32_t word = bits[p * hw + r * words + (c0 >> 5)] >> (c0 & 31);
      const Pack8 m = masked(w, word);
      __stcs(reinterpret_cast<int4*>(out + p * hd + r * d + c0), *reinterpret_cast<const int4*>(&m));
    }
  }
}

__device__ __forceinline__ void unpack(const Pack8& p, float (&f)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) f[j] = __bfloat162float(p.v[j]);
}

__device__ __forceinline__ Pack8 pack(const float (&f)[8]) {
  Pack8 p;
#pragma unroll
  for (int j = 0; j < 8; ++j) p.v[j] = __float2bfloat16(f[j]);
  return p;
}

// the forward epilogue's loads and stores (t, n planes of s -> y) with sums instead of the activation
extern "C" __global__ void epi_fwd_sums(const bf16* __restrict__ t, const bf16* __restrict__ s,
                                        bf16* __restrict__ y, int n, long long nh) {
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < nh / 8;
       idx += (long long)gridDim.x * blockDim.x) {
    const long long k = idx * 8;
    float acc[8], v[8];
    unpack(*reinterpret_cast<const Pack8*>(t + k), acc);
    for (int i = 0; i < n; ++i) {
      unpack(*reinterpret_cast<const Pack8*>(s + i * nh + k), v);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += v[j];
    }
    *reinterpret_cast<Pack8*>(y + k) = pack(acc);
  }
}

// the backward epilogue's loads and stores (dy, t, n planes of s -> n planes of e over s, dv_sum over t)
// with products instead of the activation's derivative
extern "C" __global__ void epi_bwd_products(const bf16* __restrict__ dy, bf16* t, bf16* s, int n, long long nh) {
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < nh / 8;
       idx += (long long)gridDim.x * blockDim.x) {
    const long long k = idx * 8;
    float g[8], tv[8], v[8], sum[8];
    unpack(*reinterpret_cast<const Pack8*>(dy + k), g);
    unpack(*reinterpret_cast<const Pack8*>(t + k), tv);
#pragma unroll
    for (int j = 0; j < 8; ++j) sum[j] = 0.0f;
    for (int i = 0; i < n; ++i) {
      unpack(*reinterpret_cast<const Pack8*>(s + i * nh + k), v);
#pragma unroll
      for (int j = 0; j < 8; ++j) { sum[j] += g[j] * v[j]; v[j] = g[j] * (tv[j] - v[j]); }
      *reinterpret_cast<Pack8*>(s + i * nh + k) = pack(v);
    }
    *reinterpret_cast<Pack8*>(t + k) = pack(sum);
  }
}

// the weight-gradient pass's loads and stores (G n planes bf16, W bf16, dW_acc float32 -> G, dW), no math
extern "C" __global__ void wgrad_copy(bf16* __restrict__ G, const bf16* __restrict__ W,
                                      const uint32_t* __restrict__ bits, const float* dW_acc, bf16* dW_out,
                                      int n, int h, int d, int words) {
  const long long chunks = d / 8, hd = (long long)h * d;
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < h * chunks;
       idx += (long long)gridDim.x * blockDim.x) {
    const long long r = idx / chunks;
    const int c0 = (int)(idx - r * chunks) * 8;
    const long long k = r * d + c0;
    const Pack8 w = *reinterpret_cast<const Pack8*>(W + k);
    const float4 a0 = *reinterpret_cast<const float4*>(dW_acc + k);
    const float4 a1 = *reinterpret_cast<const float4*>(dW_acc + k + 4);
    for (int i = 0; i < n; ++i) {  // each value's sign flipped, so that the store cannot be dropped
      int4 g = *reinterpret_cast<const int4*>(G + i * hd + k);
      g.x ^= 0x80008000; g.y ^= 0x80008000; g.z ^= 0x80008000; g.w ^= 0x80008000;
      *reinterpret_cast<int4*>(G + i * hd + k) = g;
    }
    Pack8 o = w;
    o.v[0] = __float2bfloat16(a0.x + a0.y + a0.z + a0.w + a1.x + a1.y + a1.z + a1.w);
    *reinterpret_cast<Pack8*>(dW_out + k) = o;
  }
}
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="4096x14336", help="d x h")
    p.add_argument("--masks", type=int, default=4, help="planes of the weight-gradient pass")
    p.add_argument("--tokens", type=int, default=4096, help="rows of the epilogues' planes")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--launches", type=int, default=20)
    args = p.parse_args(argv)
    d, h = (int(v) for v in args.shape.split("x"))
    n, words = args.masks, -(-d // 32)
    rng = np.random.default_rng(0)
    module = cp.RawModule(code=SOURCE, options=("-std=c++17",))
    sms = multiprocessor_count()
    threads = 256
    flat_blocks = min(-(-h * (d // 8) // threads), sms * 16)

    sets = []
    for _ in range(3):
        W = cp.asarray((rng.standard_normal((h, d), dtype=np.float32) * d ** -0.5).astype(bfloat16))
        bits = mask_ops.pack_masks(cp.asarray(rng.standard_normal((n, h, d), dtype=np.float32)))
        out = cp.empty((2, h, d), dtype=bfloat16)
        G = cp.asarray(rng.standard_normal((n, h, d), dtype=np.float32).astype(bfloat16))
        acc = cp.asarray(rng.standard_normal((h, d), dtype=np.float32))
        t = cp.asarray(rng.standard_normal((args.tokens, h), dtype=np.float32).astype(bfloat16))
        planes = cp.asarray(rng.standard_normal((n, args.tokens, h), dtype=np.float32).astype(bfloat16))
        dy = cp.asarray(rng.standard_normal((args.tokens, h), dtype=np.float32).astype(bfloat16))
        sets.append({"W": W, "bits": bits, "out": out, "G": G, "acc": acc, "dW": cp.empty_like(W),
                     "t": t, "s": planes, "dy": dy, "y": cp.empty_like(t)})

    i32 = np.int32
    mask_args = lambda s: (s["W"], s["bits"], s["out"], i32(2), i32(h), i32(d), i32(words))  # noqa: E731
    wg_args = lambda s: (s["G"], s["W"], s["bits"], s["acc"], s["dW"], i32(n), i32(h), i32(d), i32(words))  # noqa: E731
    wg_name = training._weight_grads_name(bfloat16, bfloat16, 8)
    nh = args.tokens * h
    epi_blocks = min(-(-nh // 8 // threads), sms * 16)
    fwd_args = lambda s: (s["t"], s["s"], s["y"], i32(n), np.int64(nh))  # noqa: E731
    # the backward epilogues write over t and s: the planes' values drift from round to round, but every
    # variant moves the same bytes (dy and t read, s read and written, t written)
    bwd_lib_args = lambda s: (s["dy"], s["t"], s["s"], s["s"], s["t"], i32(n), np.int64(nh), i32(0))  # noqa: E731
    bwd_args = lambda s: (s["dy"], s["t"], s["s"], i32(n), np.int64(nh))  # noqa: E731

    def raw(name, grid, s_args):
        fn = module.get_function(name)
        return lambda s: fn(grid, (threads,), s_args(s))

    variants = {
        "apply_mask": lambda s: training._apply_mask(s["W"], s["bits"][:2], s["out"]),
        "replicate": raw("replicate", (flat_blocks,), mask_args),
        "mask rows": raw("mask_rows", (-(-d // 8 // threads), min(h, 2048)), mask_args),
        "mask x2": raw("mask_x2", (max(1, flat_blocks // 2),), mask_args),
        "mask stream": raw("mask_stream", (flat_blocks,), mask_args),
        "weight grads": lambda s: training._launch("mglu_weight_grads", bfloat16, 8, h * (d // 8), wg_args(s),
                                                   name=wg_name),
        "wgrad copy": raw("wgrad_copy", (flat_blocks,), wg_args),
        "epilogue fwd": lambda s: training._launch("mglu_epilogue_fwd", bfloat16, 8, nh // 8, fwd_args(s) + (i32(0),)),
        "epi fwd sums": raw("epi_fwd_sums", (epi_blocks,), fwd_args),
        "epilogue bwd": lambda s: training._launch("mglu_epilogue_bwd", bfloat16, 8, nh // 8, bwd_lib_args(s)),
        "epi bwd products": raw("epi_bwd_products", (epi_blocks,), bwd_args),
    }
    hd = h * d
    mask_bytes = 2 * hd + 2 * hd // 8 + 2 * 2 * hd
    wg_bytes = 2 * hd + n * hd // 8 + 4 * hd + 2 * (2 * n * hd) + 2 * hd
    fwd_bytes = 2 * nh * (n + 2)
    bwd_bytes = 2 * nh * (2 + 2 * n + 1)
    moved = {name: (wg_bytes if name.startswith("w") else fwd_bytes if "fwd" in name else
                    bwd_bytes if "bwd" in name else mask_bytes) for name in variants}
    for fn in variants.values():
        for s in sets:
            fn(s)
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start.record()
            for k in range(args.launches):
                fn(sets[k % 3])
            end.record()
            end.synchronize()
            times[name].append(cp.cuda.get_elapsed_time(start, end) / args.launches)
    print(f"| {d} x {h}, bf16 | ms per call | TB/s (bytes it must move) |")
    print("|---|---:|---:|")
    for name, t in times.items():
        ms = statistics.median(t)
        print(f"| {name} | {ms:.4f} | {moved[name] / ms / 1e9:.2f} |", flush=True)


if __name__ == "__main__":
    main()
