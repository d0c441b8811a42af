"""Where FlashMGLU's time goes: the tensor-core kernel timed with one stage left out or changed at a time.

Usage (GPU machine): python benchmarks/probe_flash_stages.py [--shapes 4096x14336,8192x28672] [--masks 1,4,8]
    [--tokens 1,8] [--variants library,...] [--pdl | --no-pdl]

Each variant is ``flash_mglu.cu`` with a few lines replaced before compiling (the library's source is not
changed; a replacement that no longer matches fails loudly). Most variants compute wrong results on
purpose and are only timed, bf16, on the instance and launch configuration the library picks for the
token count (the paired instance for T <= 4 since stop 18), launched with programmatic dependent launch
unless ``--no-pdl``:

- ``library``: the kernel as it is;
- ``no x loads``: the B fragments come from the address arithmetic instead of loads of ``x``;
- ``t + 1 mask``: every mask word still loaded, but xor-ed into one word: one product per tile for all
  masks (plus the one for ``t`` in the one-column instances);
- ``loads only``: W and mask words loaded, folded with integer ops into one accumulator, no ``mma``;
- ``warp-major masks``: the mask loads of stop 18, one 4-byte load per mask from mask-major words
  ``(S, G, n, 32)`` (the probe passes ``warp_major_words`` of the packed words), instead of one 16-byte
  load per chunk of 4 masks;
- ``no bound``: every instance built without the register bound of ``MmaMinBlocks`` (as with
  ``MIN_BLOCKS_BOUND = False``); ``warp-major masks&no bound`` is the stop-18 kernel for T = 16;
- ``L2 256B``: the W and mask loads ask the L2 for 256-byte fetches (``ld ... .L2::256B``);
- ``L1 no allocate``: the W and mask loads bypass L1 (``ld.global.nc.L1::no_allocate``), leaving it to ``x``;
- ``interleaved``: W tiles and mask words of a group in one contiguous block (one stream per strip
  instead of two), the mask words in the library's lane-major chunks; the probe passes a random buffer
  of the same size; ``interleaved 4-byte masks``: the same with mask-major words and 4-byte loads.

- ``ring`` (stop 38): the groups in flight in a ring of ``AHEAD + 1`` register buffers with compile-time
  indices (each group's loads go into the buffer the group before emptied, nothing is copied), instead of
  the library's shift register, whose copy of the newest buffer waits for its load (one group in flight
  per warp); the fused decode step's pipeline since stop 38 (docs/flash_mglu.md, "What limits it").
  Computes the library's results. Stop 38's run: 1.7-11% slower than the library in most cells, 10-33% at
  n = 8, T = 8 (benchmarks/results_flash_ring_h200.md).

``a&b`` applies the replacements of both (e.g. ``interleaved&loads only``).

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
from pymglu.cuda import launch as launching  # noqa: E402

MMA_LOOP = "        for (int i = 0; i < N_MASKS; ++i) masked_mma<T>(acc_s[i][nt], w[q], bq, m[i], q);"
T_MMA = "        if (!PAIRED) masked_mma_metadata<T>(acc_t[nt], w[q], bq, ALL_ON_METADATA, q);"
FOLDED_WORD = "uint32_t mm = 0u; for (int i = 0; i < N_MASKS; ++i) mm ^= m[i];"

LOAD_WEIGHTS_HEAD = "__device__ __forceinline__ void load_weights("
W_LOADS = "w[q] = load_stream(w_strip + ((size_t)grp * 4 + q) * 32);"
M_WORDS = "const uint32_t* words = m_strip + (size_t)grp * N_MASKS * 32;"
M_STRIP = "const uint32_t* m_strip = Mp + (size_t)strip * groups * N_MASKS * 32;"


def load_weights_text() -> str:
    """The text of ``load_weights`` in flash_mglu.cu, from its signature to its closing brace."""
    code = pymglu_cuda.source_path("flash_mglu.cu").read_text(encoding="utf-8")
    start = code.index(LOAD_WEIGHTS_HEAD)
    return code[start:code.index("\n}\n", start) + 2]


def in_load_weights(old: str, new: str) -> list[tuple[str, str]]:
    """A replacement of ``old`` by ``new`` inside ``load_weights`` only."""
    text = load_weights_text()
    if text.count(old) < 1:
        raise RuntimeError(f"probe replacement no longer matches load_weights: {old!r}")
    return [(text, text.replace(old, new))]


def qualified_loads(qualifiers: str) -> list[tuple[str, str]]:
    """The W and mask loads of load_weights through ``ld.global<qualifiers>`` (inline PTX)."""
    helpers = f"""__device__ __forceinline__ uint4 probe_load(const uint4* p) {{
  uint4 v;
  asm("ld.global{qualifiers}.v4.u32 {{%0, %1, %2, %3}}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}}
__device__ __forceinline__ uint2 probe_load(const uint2* p) {{
  uint2 v;
  asm("ld.global{qualifiers}.v2.u32 {{%0, %1}}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}}
__device__ __forceinline__ uint32_t probe_load(const uint32_t* p) {{
  uint32_t v;
  asm("ld.global{qualifiers}.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}}
template <int N_MASKS>
"""
    text = load_weights_text()
    return [("template <int N_MASKS>\n" + text, helpers + text.replace("load_stream(", "probe_load("))]


#: the stop-18 mask loads: one 4-byte load per mask from mask-major words, (S, G, n, 32)
WARP_MAJOR_MASKS = in_load_weights(M_WORDS, """const uint32_t* words = m_strip + (size_t)grp * N_MASKS * 32;
#pragma unroll
  for (int i = 0; i < N_MASKS; ++i) m[i] = load_stream(words + i * 32 + lane);
  if (true) return;""")


def interleaved(lane_major: bool) -> list[tuple[str, str]]:
    """W tiles and mask words of each group in one block, ``(S, G, 512 + 32 n)`` uint32 (the probe passes
    one random buffer of that size as ``Wp`` and ``Mp``): the 2 KB of W, then the mask words, in the
    library's lane-major chunks or (``lane_major=False``) mask-major as at stop 18."""
    text = load_weights_text()
    body = text.replace(W_LOADS, "w[q] = load_stream(reinterpret_cast<const uint4*>(m_strip + (size_t)grp * (512 + N_MASKS * 32)) + lane + q * 32);")
    body = body.replace(M_WORDS, "const uint32_t* words = m_strip + (size_t)grp * (512 + N_MASKS * 32) + 512;"
                        + ("" if lane_major else """
#pragma unroll
  for (int i = 0; i < N_MASKS; ++i) m[i] = load_stream(words + i * 32 + lane);
  if (true) return;"""))
    return [(text, body), (M_STRIP, "const uint32_t* m_strip = reinterpret_cast<const uint32_t*>(Wp) + "
                                    "(size_t)strip * groups * (512 + N_MASKS * 32);")]


#: variants that read one interleaved buffer instead of ``w_tiles`` and ``mask_words``
INTERLEAVED = {"interleaved", "interleaved 4-byte masks"}


def one_buffer(variant: str) -> bool:
    return any(part in INTERLEAVED for part in variant.split("&"))


def mask_major(variant: str) -> bool:
    return any(part == "warp-major masks" for part in variant.split("&"))


RING_BUFFERS = ("  uint4 w_ahead[AHEAD][4];\n  uint32_t m_ahead[AHEAD][N_MASKS];\n  uint2 b_next[4][NT];\n",
                """  constexpr int RING = AHEAD + 1;
  uint4 w_ring[RING][4];
  uint32_t m_ring[RING][N_MASKS];
  uint2 b_ring[X_AHEAD ? RING : 1][4][NT];  // X_AHEAD: the x values of the warp's j-th group in b_ring[j % RING]
""")
LOOP_START = "  int grp = warp;\n"
LOOP_END = "#ifdef PYMGLU_PDL_TRIGGER_AT_END\n  pdl_launch_dependents();\n#endif\n  // Cross-warp reduction"
RING_LOOP = r"""#pragma unroll
  for (int a = 0; a < AHEAD; ++a)
    if (warp + a * WARPS < groups)
      load_weights<N_MASKS>(w_strip, m_strip, warp + a * WARPS, lane, w_ring[a], m_ring[a]);
  pdl_wait();
  if (X_AHEAD && warp < groups) load_x<T, NT>(x, x16, x_offset, tok_ok, tok, d_quads, n_tokens, d, tg, warp, b_ring[0]);
  for (int first = warp; first < groups; first += RING * WARPS) {
#pragma unroll
    for (int r = 0; r < RING; ++r) {
      const int grp = first + r * WARPS;
      if (grp < groups) {
        if (grp + AHEAD * WARPS < groups)  // into the buffer the group before emptied
          load_weights<N_MASKS>(w_strip, m_strip, grp + AHEAD * WARPS, lane, w_ring[(r + AHEAD) % RING],
                                m_ring[(r + AHEAD) % RING]);
        uint2 (&b)[4][NT] = b_ring[X_AHEAD ? r : 0];
        if constexpr (X_AHEAD) {
          if (grp + WARPS < groups)
            load_x<T, NT>(x, x16, x_offset, tok_ok, tok, d_quads, n_tokens, d, tg, grp + WARPS, b_ring[(r + 1) % RING]);
        } else {
          load_x<T, NT>(x, x16, x_offset, tok_ok, tok, d_quads, n_tokens, d, tg, grp, b);
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint4 bq = sparse_b_fragment(b[q][nt], sel_even, sel_odd);
            if (!PAIRED) masked_mma_metadata<T>(acc_t[nt], w_ring[r][q], bq, ALL_ON_METADATA, q);
#pragma unroll
            for (int i = 0; i < N_MASKS; ++i) masked_mma<T>(acc_s[i][nt], w_ring[r][q], bq, m_ring[r][i], q);
          }
        }
      }
    }
  }

"""


def ring_pipeline() -> list[tuple[str, str]]:
    """The kernel's buffer declarations and its group loop (from its first loads to the loop's end)
    replaced by the ring; the setup between them stays the library's."""
    code = pymglu_cuda.source_path("flash_mglu.cu").read_text(encoding="utf-8")
    if code.count(LOOP_START) != 1 or code.count(LOOP_END) != 1:
        raise RuntimeError("probe replacement no longer matches flash_mglu.cu: the group loop's markers")
    loop = code[code.index(LOOP_START):code.index(LOOP_END)]
    return [RING_BUFFERS, (loop, RING_LOOP)]


VARIANTS = {
    "library": [],
    "no x loads": [("__ldg(p + q * 4)", "make_uint2((uint32_t)(size_t)(p + q * 4), 0x3f803f80u)")],
    "t + 1 mask": [(MMA_LOOP, "        { " + FOLDED_WORD + " masked_mma<T>(acc_s[0][nt], w[q], bq, mm, q); }")],
    "loads only": [
        (T_MMA, "        acc_s[0][nt][1] += __uint_as_float((w[q].x ^ w[q].y ^ w[q].z ^ w[q].w ^ bq.x) & 0x3effffffu);"),
        (MMA_LOOP, "        { " + FOLDED_WORD + " acc_s[0][nt][0] += __uint_as_float(mm & 0x3effffffu); }"),
    ],
    "warp-major masks": WARP_MAJOR_MASKS,
    "L2 256B": qualified_loads(".cs.L2::256B"),
    "L1 no allocate": qualified_loads(".nc.L1::no_allocate"),
    "no bound": [("#ifdef PYMGLU_MMA_NO_MIN_BLOCKS", "#if 1  // probe: no register bound")],
    "interleaved": interleaved(True),
    "interleaved 4-byte masks": interleaved(False),
    "ring": ring_pipeline(),
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
    p.add_argument("--tokens", default="1")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma list of: " + ", ".join(VARIANTS) + "; 'a&b' applies both a's and b's replacements")
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--replays", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",")]
    unknown = [part for v in chosen for part in v.split("&") if part not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    stream = cp.cuda.Stream(non_blocking=True)
    dtype = dtypes.bfloat16
    print("| d × h | n | T | round | " + " | ".join(f"{v} µs" for v in chosen) + " |")
    print("|---|---|---|---|" + "---|" * len(chosen))
    for shape in args.shapes.split(","):
        d, h = (int(v) for v in shape.split("x"))
        for n in (int(v) for v in args.masks.split(",")):
            sets = max(2, math.ceil(3 * L2_BYTES / (h * d * (2 + n / 8))))
            packed = []
            for _ in range(sets):
                W = (cp.random.standard_normal((h, d), dtype=cp.float32) / math.sqrt(d)).astype(dtype)
                packed.append(fm.pack_weights(W, masks.pack_masks(cp.random.random((n, h, d), dtype=cp.float32) < 0.5)))
            strips, groups = packed[0].w_tiles.shape[:2]
            mask_major_words = [fm.warp_major_words(cp, wts.mask_words, n) for wts in packed] \
                if any(mask_major(v) for v in chosen) else None
            # same bytes as w_tiles + mask_words, one block per group (random words: timing only)
            blocks = [cp.random.randint(0, 2**31, size=(strips, groups, 512 + 32 * n), dtype=cp.int64).astype(cp.uint32)
                      for _ in range(sets)] if any(one_buffer(v) for v in chosen) else None
            for tokens in (int(v) for v in args.tokens.split(",")):
                x = cp.asarray(np.random.default_rng(0).standard_normal((tokens, d), dtype=np.float32).astype(dtype))
                out = cp.empty((tokens, h), dtype=dtype)
                warps, ahead = fm.mma_config(n, d, tokens)
                name = fm._mma_name(dtype, n, fm.token_block(tokens), warps, ahead)
                options = (*pymglu_cuda.BASE_OPTIONS, f"-I{pymglu_cuda.source_dir()}", *fm.compile_options())
                kernels = [(cp.RawModule(code=variant_source([r for part in v.split("&") for r in VARIANTS[part]]),
                                         options=options, name_expressions=(name,)).get_function(name), v)
                           for v in chosen]

                def call(kernel_and_variant, k):
                    kernel, variant = kernel_and_variant
                    wts = packed[k % sets]
                    if one_buffer(variant):
                        w_arg = m_arg = blocks[k % sets]
                    else:
                        w_arg, m_arg = wts.w_tiles, (mask_major_words[k % sets] if mask_major(variant) else wts.mask_words)
                    kernel_args = (w_arg, m_arg, x, out, np.int32(tokens), np.int32(d), np.int32(h),
                                   np.int32(groups), np.int32(0))
                    if args.pdl:
                        launching.launch(kernel, (strips,), (warps * 32,), kernel_args)
                    else:
                        kernel((strips,), (warps * 32,), kernel_args)

                for r in range(args.rounds):
                    times = [time_graph([lambda k=k, kern=kern: call(kern, k) for k in range(args.calls)],
                                        args.replays, stream) for kern in kernels]
                    print(f"| {d} × {h} | {n} | {tokens} | {r + 1} | " + " | ".join(f"{t * 1e6:.1f}" for t in times)
                          + " |", flush=True)
            packed.clear()  # frees the weight sets before the next mask count


if __name__ == "__main__":
    main()
