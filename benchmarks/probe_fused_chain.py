"""Where the fused decode step's short phases spend their time: parts of their chains left out (timing only).

Usage (H200): python benchmarks/probe_fused_chain.py [--quick] [--rounds 3] [--kinds swiglu,swimglu]

Builds the decode_e2e.py models (d 2048, h 8192, 16 layers, bf16, batch 1) and, for each variant, swaps
the fused step's kernel for one compiled from a copy of ``pymglu/cuda`` with a few lines replaced (the
outputs are wrong; only the times mean something):

- ``library``: the kernel as shipped;
- ``no residual read``: the o and down epilogues store their sums without reading the residual packets first;
- ``no staged merge``: the o product stages ``attn`` as it is instead of merging the attention chunks;
- ``qkv no norm``: the q k v staging takes x's packets without its RMSNorm (no block reduction);
- ``o weights hot``: every layer's o product reads layer 0's W_o (8.4 MB, likely in L2);
- ``qkv loads after staging``: the q k v product's first loads issued after its packet staging, as before
  stop 30 (the library issues them before, for the layers after the first).

The variants take turns for ``--rounds`` rounds; each profile is the median over the layers of the per-
phase critical path (``profile_fused_step.profile``), and the table keeps the fastest round of each.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
import shutil

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cupy as cp  # noqa: E402

from decode_e2e import build  # noqa: E402
from probe_fused_stages import fastest_profiles, print_profiles  # noqa: E402
from pymglu import cuda as pc  # noqa: E402
from pymglu.models import GraphDecoder, TransformerConfig  # noqa: E402

QKV_STAGING = ("stage_packets<T>(cx, x_set(2 * l), packet_row(d), static_cast<const T*>(L.attn_norm), d, "
               "KD, 5 * l - 1);")
VARIANTS: dict[str, list[tuple[str, str, str]]] = {
    "library": [],
    "no residual read": [("fused_products.cuh", """  res0 = packet_value<T>(__ldcg(xr + 2 * (row >> 1)), row & 1);
  res1 = packet_value<T>(__ldcg(xr + 2 * ((row + 8) >> 1)), (row + 8) & 1);""", "  (void)xr;")],
    "no staged merge": [("decode_fused.cu", "stage_attention<T>(cx, staged, KD);",
                         "stage_input<T>(cx, attn, nullptr, nullptr, d, KD);")],
    "qkv no norm": [("decode_fused.cu", QKV_STAGING, QKV_STAGING.replace("static_cast<const T*>(L.attn_norm)", "nullptr"))],
    "o weights hot": [("decode_fused.cu", "prefetch_phase(pd, L.wo, nullptr, 0, d / 16, gd, t_o);\n    grid_wait",
                       "prefetch_phase(pd, layers[0].wo, nullptr, 0, d / 16, gd, t_o);\n    grid_wait"),
                      ("decode_fused.cu", "      prefetch_phase(pd, L.wo, nullptr, 0, d / 16, gd, t_o);\n    } else",
                       "      prefetch_phase(pd, layers[0].wo, nullptr, 0, d / 16, gd, t_o);\n    } else"),
                      ("decode_fused.cu", "product_phase<T, 0, EPI_RESIDUAL, AD>(cx, L, L.wo,",
                       "product_phase<T, 0, EPI_RESIDUAL, AD>(cx, L, layers[0].wo,")],
    "qkv loads after staging": [("decode_fused.cu", f"""    }} else {{
      prefetch_phase(pd, L.wqkv, nullptr, 0, 3 * d / 16, gd, t_qkv);
      {QKV_STAGING}
    }}
    if (l == 0) prefetch_phase(pd, L.wqkv, nullptr, 0, 3 * d / 16, gd, t_qkv);""", f"""    }} else {{
      {QKV_STAGING}
    }}
    prefetch_phase(pd, L.wqkv, nullptr, 0, 3 * d / 16, gd, t_qkv);""")],
}


def variant_source_dir(root: Path, name: str) -> Path:
    """A copy of pymglu/cuda with ``name``'s replacements applied."""
    target = root / name.replace(" ", "_")
    shutil.copytree(pc.source_dir(), target, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    for file, old, new in VARIANTS[name]:
        path = target / file
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"variant {name!r}: the text to replace is not in {file} once: {old.strip()!r}")
        path.write_text(text.replace(old, new))
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--masks", type=int, default=4)
    ap.add_argument("--position", type=int, default=144)
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default="swiglu,swimglu")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="4 layers")
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    for kind in args.kinds.split(","):
        cfg = TransformerConfig(vocab_size=256, d_model=2048, n_layers=4 if args.quick else 16, n_heads=16,
                                d_ff=8192, max_seq_len=args.position + 8, tie_embeddings=True, dtype="bfloat16",
                                ffn_kind=kind, n_masks=args.masks if kind != "swiglu" else None)
        decoder = GraphDecoder(build(cfg, 1), 1, fused=True)
        decoder.prefill(np.random.default_rng(0).integers(0, 256, size=(1, args.position)))
        step = decoder.fused_step
        with tempfile.TemporaryDirectory() as tmp:
            dirs = {name: variant_source_dir(Path(tmp), name) for name in names}
            best = fastest_profiles(decoder, dirs, args.rounds, args.launches)
        print(f"\n{kind}, fused step ({step.warps} warps, teams {step.teams}), position {args.position}; "
              f"us, median over layers of the slowest block / mean block; fastest of {args.rounds} rounds\n")
        print_profiles(best)
        del decoder, step
        cp.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
