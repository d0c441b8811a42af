"""The fused decode step's MGLU up phase with parts of its work left out, timed per phase (timing only).

Usage (H200): python benchmarks/probe_fused_stages.py [--quick] [--masks 4] [--rounds 3]

Builds the SwiMGLU model of decode_e2e.py (d 2048, h 8192, 16 layers, bf16, batch 1) and, for each
variant, swaps the fused step's kernel for one compiled from a copy of ``pymglu/cuda`` with a few lines
of ``fused_products.cuh`` replaced (the outputs are wrong; only the times mean something):

- ``library``: the kernel as shipped (since stop 16 the cross-warp reduction of a strip stores ``t`` and
  every ``s_i`` at once, behind one pair of team barriers);
- ``t only``: the mask words are still loaded but only the full product ``t`` is multiplied (one
  ``mma.sp`` per tile instead of n + 1);
- ``no masks``: the mask words are neither loaded nor multiplied (``t`` only).

(Stop 16 also ran ``n + 1 passes``, the reduction of stop 15 and before; its markers left the source
since, and the variant was dropped at stop 38. Its numbers are in docs/decode_e2e_history.md.)

The variants take turns for ``--rounds`` rounds; each profile is the median over the layers of the per-
phase critical path (``profile_fused_step.profile``), and the table keeps the fastest round of each.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cupy as cp  # noqa: E402

from decode_e2e import build  # noqa: E402
from profile_fused_step import PHASES, profile  # noqa: E402
from pymglu import cuda as pc  # noqa: E402
from pymglu.cuda import decode_fused  # noqa: E402
from pymglu.models import GraphDecoder, TransformerConfig  # noqa: E402

MGLU_MMA = "        if (NM <= 4 || i < n) masked_mma<T>(acc_s[i], w[q], bq, m[i], q);"
# the mask-word loads of load_next_group (FlashMGLU's lane-major words: one 16-byte load per chunk of four
# masks, one 4-byte load per leftover mask)
MASK_LOAD_CHUNK = "        const uint4 v = load_stream(reinterpret_cast<const uint4*>(mp + 128 * j) + lane);"
MASK_LOAD = "          m[i] = i < n ? load_stream(mp + 32 * i + lane) : 0u;  // 0: every element off"

VARIANTS = {
    "library": [],
    # the mask words stay live (a test on their value) so that the compiler keeps their loads
    "t only": [(MGLU_MMA, "        acc_t[0] += __uint_as_float(m[i] & 1u);")],
    "no masks": [(MGLU_MMA, "        (void)m[i];"), (MASK_LOAD_CHUNK, "        const uint4 v = make_uint4(0u, 0u, 0u, 0u);"),
                 (MASK_LOAD, "          m[i] = 0u;")],
}


def variant_source_dir(root: Path, name: str) -> Path:
    """A copy of pymglu/cuda with ``name``'s replacements applied to fused_products.cuh."""
    target = root / name.replace(" ", "_")
    shutil.copytree(pc.source_dir(), target, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    header = target / "fused_products.cuh"
    text = header.read_text()
    for old, new in VARIANTS[name]:
        if text.count(old) != 1:
            raise SystemExit(f"variant {name!r}: the line to replace is not in fused_products.cuh once: {old.strip()!r}")
        text = text.replace(old, new)
    header.write_text(text)
    return target


def swap_kernel(step, source_dir: Path) -> None:
    """Load the fused step's kernel from ``source_dir`` into ``step``."""
    original = pc._SOURCE_DIR
    pc._SOURCE_DIR = source_dir
    try:
        pc.clear_module_cache()
        cap = decode_fused.mask_capacity(step.n_masks)
        name = decode_fused._kernel_name(step.decoder.config.np_dtype, cap, step.warps)
        kernel = pc.load_module(decode_fused._SOURCE, (name,)).get_function(name)
        if step.smem > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = step.smem
        step.kernel = kernel
    finally:
        pc._SOURCE_DIR = original
        pc.clear_module_cache()


def fastest_profiles(decoder: GraphDecoder, dirs: dict[str, Path], rounds: int, launches: int) -> dict[str, dict]:
    """Each variant's per-phase profile (``profile_fused_step.profile``) with its kernel built from
    ``dirs[name]``, the variants taking turns for ``rounds`` rounds; the fastest round of each."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, source in dirs.items():
            swap_kernel(decoder.fused_step, source)
            rows = profile(decoder, launches)
            if name not in best or rows["total (us)"][0] < best[name]["total (us)"][0]:
                best[name] = rows
    return best


def print_profiles(best: dict[str, dict]) -> None:
    """A Markdown table of the profiles: per phase, slowest block / mean block in each variant's column."""
    print("| phase | " + " | ".join(best) + " |\n|---|" + "---|" * len(best))
    for phase in PHASES + ("logits", "total (us)"):
        print(f"| {phase} | " + " | ".join(f"{best[n][phase][0]:.2f} / {best[n][phase][1]:.2f}" for n in best) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--masks", type=int, default=4)
    ap.add_argument("--position", type=int, default=144)
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 layers")
    args = ap.parse_args(argv)
    cfg = TransformerConfig(vocab_size=256, d_model=2048, n_layers=4 if args.quick else 16, n_heads=16, d_ff=8192,
                            max_seq_len=args.position + 8, tie_embeddings=True, dtype="bfloat16",
                            ffn_kind="swimglu", n_masks=args.masks)
    decoder = GraphDecoder(build(cfg, 1), 1, fused=True)
    decoder.prefill(np.random.default_rng(0).integers(0, 256, size=(1, args.position)))
    step = decoder.fused_step
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {name: variant_source_dir(Path(tmp), name) for name in VARIANTS}
        best = fastest_profiles(decoder, dirs, args.rounds, args.launches)
    print(f"SwiMGLU n={args.masks}, fused step ({step.warps} warps, teams {step.teams}), position {args.position}; "
          f"us, median over layers of the slowest block / mean block; fastest of {args.rounds} rounds\n")
    print_profiles(best)
    del decoder
    cp.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
