"""SwiGLU against SwiMGLU (and GeMGLU, ReMGLU) in the same small language model: loss, size, speed, masks.

    python examples/compare_ffn.py --smoke            # every variant, tiny model, 1 seed: < 1 minute on a CPU
    python examples/compare_ffn.py                    # the real experiment (sized for a GPU), 3 seeds
    python examples/compare_ffn.py --variants swiglu,swimglu4 --seeds 0 1   # a part of it

Variants: SwiGLU, SwiMGLU with n = 1, 2, 4, 8 masks, GeMGLU n = 4, ReMGLU n = 4, all at the same d_model and
feed-forward width h (as the paper does, so SwiMGLU has fewer weights), plus a parameter-matched SwiGLU of
width round(2h/3) (its feed-forward then has as many weights as SwiMGLU's). Every variant trains with the
same settings on the same batches (seed s draws the same windows for every variant) through
pymglu.models.training.Trainer, the loop train_lm.py uses.

Each finished (variant, seed) run is stored as OUT/runs/<variant>-seed<s>.json and skipped when the script
runs again, so the experiment can be split over several calls; OUT/results.md gets a Markdown table
(final validation loss mean ± std over seeds, weights, mask bits, training tokens/s, gate fraction per
layer; then each variant against SwiGLU and against the parameter-matched SwiGLU, paired by seed,
with 95% confidence intervals, and the paired gap to SwiGLU at every validation step) and OUT/loss_curves.png the validation curves (needs matplotlib: pip install -e ".[plot]").
Several processes may share one OUT at once (benchmarks/gpu_visit.sh experiment runs a few per GPU): every
file is written to a temporary file and renamed over its name, OUT/setup.json is created only where absent
(a process with other settings is refused), and --concurrent-jobs N records in each run how many processes
shared its device, which its training tokens/s depend on; results.md says so under the table.
Data: --data FILE, default ../shared/data/tinyshakespeare.txt when present, else the embedded corpus.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

# One BLAS thread unless the caller sets it: the model's matrices are small, so a second thread gains
# little (95 -> 112 ms per default train_lm step on an idle 2-core machine) and makes a step 3-7x slower
# as soon as another process competes for the cores. OPENBLAS_NUM_THREADS=2 restores it.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np

import pymglu
from pymglu.models import ByteTokenizer, Transformer, TransformerConfig
from pymglu.models.data import DataError, load_corpus, split_corpus
from pymglu.models.training import Trainer, TrainSettings

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = ("../shared/data/tinyshakespeare.txt", "shared/data/tinyshakespeare.txt")

#: variant name -> (label, ffn kind, n_masks, width rule: "h" or "pm" for the parameter-matched width)
VARIANTS: dict[str, tuple[str, str, int | None, str]] = {
    "swiglu": ("SwiGLU", "swiglu", None, "h"),
    "swiglu-pm": ("SwiGLU, param-matched", "swiglu", None, "pm"),
    "swimglu1": ("SwiMGLU", "swimglu", 1, "h"),
    "swimglu2": ("SwiMGLU", "swimglu", 2, "h"),
    "swimglu4": ("SwiMGLU", "swimglu", 4, "h"),
    "swimglu8": ("SwiMGLU", "swimglu", 8, "h"),
    "gemglu4": ("GeMGLU", "gemglu", 4, "h"),
    "remglu4": ("ReMGLU", "remglu", 4, "h"),
}

#: (model, training) settings of the real run and of --smoke.
FULL = dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, seq_len=256, batch_size=32, steps=1000, lr=2e-3,
            warmup=100, eval_every=100, eval_batches=16, seeds=[0, 1, 2])
SMOKE = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=32, batch_size=8, steps=12, lr=3e-3,
             warmup=2, eval_every=4, eval_batches=2, seeds=[0])


def matched_width(h: int) -> int:
    """SwiGLU width whose feed-forward (gate, value and down: 3 h' d weights) matches SwiMGLU's (W and
    down: 2 h d)."""
    return max(1, round(2 * h / 3))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, one seed (a check that it runs)")
    p.add_argument("--data", default=None, help="text file (default: tinyshakespeare when present, else pydoc_data)")
    p.add_argument("--out", default=None, help="output directory (default: runs/compare_ffn, or "
                   "runs/compare_ffn-smoke with --smoke)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; 0 with --smoke)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    for name in ("d_model", "n_layers", "n_heads", "d_ff", "seq_len", "batch_size", "steps", "warmup",
                 "eval_every", "eval_batches"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {FULL[name]} ({SMOKE[name]} with --smoke)")
    p.add_argument("--lr", type=float, default=None, help=f"default {FULL['lr']}")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="parameter dtype (16-bit: fp32 master weights, loss scaling for float16)")
    p.add_argument("--progress", action="store_true", help="show a progress bar per run")
    p.add_argument("--graph", choices=("auto", "on", "off"), default="auto",
                   help="replay each training step from a captured CUDA graph (auto: float32/bfloat16 on a GPU)")
    p.add_argument("--concurrent-jobs", type=int, default=None, metavar="N",
                   help="number of compare_ffn processes sharing the device, stored in each run as "
                   "concurrent_jobs (default: not recorded)")
    return p


def _temp_beside(path: Path) -> Path:
    """A fresh name in ``path``'s directory for the file that is then renamed over ``path`` (hidden, and not
    ending in .json, so no glob of runs picks it up)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: a process reading
    ``path`` while another writes it sees the old or the new file, never a part of one."""
    tmp = _temp_beside(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def claim_setup(path: Path, setup: dict[str, Any]) -> str | None:
    """Store ``setup`` as the JSON file ``path`` unless it exists; None when ``path`` now holds these
    settings, else the text of the other settings it holds.

    The complete file is hard-linked to ``path``, which fails where ``path`` exists, so of several processes
    starting at once exactly one writes it, and the others compare their settings with that one's. Where the
    file system has no hard links, it is renamed over ``path`` (then two first writers of different settings
    are not told apart)."""
    text = json.dumps(setup, indent=1)
    if not path.exists():
        tmp = _temp_beside(path)
        try:
            tmp.write_text(text)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    stored = path.read_text()
    return None if json.loads(stored) == setup else stored.strip()


def _default_data() -> str | None:
    for rel in SHAKESPEARE:
        path = (REPO / rel).resolve()
        if path.is_file():
            return str(path)
    return None


def _run_one(name: str, seed: int, base: dict[str, Any], train_data: np.ndarray, val_data: np.ndarray,
             device: str, progress: bool, graph: bool | None = None) -> dict[str, Any]:
    label, kind, n_masks, width = VARIANTS[name]
    h = base["d_ff"] if width == "h" else matched_width(base["d_ff"])
    config = TransformerConfig(vocab_size=ByteTokenizer.vocab_size, d_model=base["d_model"], n_layers=base["n_layers"],
                               n_heads=base["n_heads"], d_ff=h, ffn_kind=kind, n_masks=n_masks,
                               max_seq_len=base["seq_len"], dtype=base["dtype"])
    settings = TrainSettings(steps=base["steps"], batch_size=base["batch_size"], lr=base["lr"],
                             warmup_steps=base["warmup"], eval_every=base["eval_every"],
                             eval_batches=base["eval_batches"], seed=seed)
    model = Transformer(config, rng=seed)
    if device == "gpu":
        model.to("cuda")
    trainer = Trainer(model, settings, train_data, val_data, graph=graph)
    start = time.perf_counter()
    history = trainer.run(progress=progress, log=None)
    ffn_weights = sum(p.size for n, p in model.named_parameters() if ".ffn." in n and not n.endswith("mask_logits"))
    return {
        "variant": name, "label": label, "seed": seed, "config": config.to_dict(),
        "settings": dataclasses.asdict(settings), "final_val_loss": history.val_loss[-1],
        "weights": model.num_weights(), "ffn_weights": ffn_weights, "mask_bits": model.num_mask_bits(),
        "gate_fraction_per_layer": model.gate_fractions(), "tokens_per_second": history.tokens_per_second,
        "wall_seconds": time.perf_counter() - start, "history": history.to_dict(),
    }


def concurrency_note(results: dict[str, list[dict[str, Any]]]) -> str:
    """A line for under the table: how many compare_ffn processes shared the device while the runs trained
    (their ``concurrent_jobs``), which the tokens/s column depends on; empty when no run recorded it."""
    counts: dict[int | None, int] = {}
    for runs in results.values():
        for r in runs:
            k = r.get("concurrent_jobs")
            counts[k] = counts.get(k, 0) + 1
    if set(counts) == {None}:
        return ""
    parts = [f"{k} in {n} run{'s' if n > 1 else ''}" for k, n in sorted((k, n) for k, n in counts.items() if k)]
    if None in counts:
        parts.append(f"not recorded in {counts[None]} run{'s' if counts[None] > 1 else ''}")
    text = "compare_ffn processes sharing the device while training: " + ", ".join(parts) + "."
    if max(k for k in counts if k) > 1:
        text += (" Training tokens/s with several processes on a device are lower than one process alone "
                 "reaches; compare them only between runs of the same count.")
    return text


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def best_val_loss(run: dict[str, Any]) -> float:
    """The lowest validation loss of a run's curve (the final one when the curve has a single point)."""
    return float(min(run["history"]["val_loss"]))


def make_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table, one row per variant (in :data:`VARIANTS` order), over the seeds it ran."""
    ref = results.get("swiglu")
    ref_loss = float(np.mean([r["final_val_loss"] for r in ref])) if ref else None
    ref_best = float(np.mean([best_val_loss(r) for r in ref])) if ref else None
    lines = ["| variant | n | h | weights | FFN weights | mask bits | val loss (mean ± std) | vs SwiGLU "
             "| best val loss (mean ± std) | vs SwiGLU | seeds | train tokens/s | gate fraction per layer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        runs = results.get(name)
        if not runs:
            continue
        r0 = runs[0]
        losses = [r["final_val_loss"] for r in runs]
        rel = f"{100 * (np.mean(losses) / ref_loss - 1):+.2f}%" if ref_loss else "—"
        bests = [best_val_loss(r) for r in runs]
        rel_best = f"{100 * (np.mean(bests) / ref_best - 1):+.2f}%" if ref_best else "—"
        gates = np.mean([r["gate_fraction_per_layer"] for r in runs], axis=0) if r0["gate_fraction_per_layer"] else []
        gate_text = " / ".join(f"{g:.3f}" for g in gates) if len(gates) else "—"
        n = r0["config"]["n_masks"]
        lines.append(
            f"| {r0['label']} | {n if n else '—'} | {r0['config']['d_ff']} | {_count(r0['weights'])} "
            f"| {_count(r0['ffn_weights'])} | {_count(r0['mask_bits']) if r0['mask_bits'] else '0'} "
            f"| {_mean_std(losses)} | {rel} | {_mean_std(bests)} | {rel_best} | {len(runs)} | {np.mean([r['tokens_per_second'] for r in runs]):,.0f} "
            f"| {gate_text} |")
    return "\n".join(lines)


def paired_differences(results: dict[str, list[dict[str, Any]]], name: str, metric: Any,
                       ref: str = "swiglu") -> np.ndarray:
    """Per seed that both ran, ``100 * (metric(variant) / metric(ref) - 1)``: the variant's loss relative
    to the reference in percent (negative: lower loss), ``(seeds,)`` float64, in seed order. Seed ``s`` trains
    every variant on the same batches and evaluates it on the same windows, so these differences vary far
    less than the losses themselves do between seeds."""
    mine = {r["seed"]: metric(r) for r in results.get(name, [])}
    theirs = {r["seed"]: metric(r) for r in results.get(ref, [])}
    seeds = sorted(set(mine) & set(theirs))
    return np.array([100 * (mine[s] / theirs[s] - 1) for s in seeds], dtype=np.float64)


def mean_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of the Student-t confidence interval at ``level`` for the mean of ``values``
    (half-width ``nan`` for fewer than two values)."""
    from scipy import stats

    if values.size < 2:
        return float(np.mean(values)) if values.size else float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, values.size - 1) * np.std(values, ddof=1) / np.sqrt(values.size)
    return float(np.mean(values)), float(half)


def make_paired_table(results: dict[str, list[dict[str, Any]]], ref: str = "swiglu") -> str:
    """Markdown table, one row per variant other than ``ref`` (a key of :data:`VARIANTS`): the per-seed
    paired loss differences against ``ref`` (:func:`paired_differences`) as mean ± the 95% t-interval's
    half-width, for the final and the best validation loss, and on how many of the seeds the variant's
    loss is lower. Empty without runs of ``ref``."""
    if not results.get(ref):
        return ""
    label = VARIANTS[ref][0]
    lines = [f"| variant | n | paired seeds | final val loss vs {label} (95% CI) | lower on | best val loss vs "
             f"{label} (95% CI) | lower on |", "|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        if name == ref or not results.get(name):
            continue
        r0 = results[name][0]
        cells = []
        for metric in (lambda r: r["final_val_loss"], best_val_loss):
            diffs = paired_differences(results, name, metric, ref)
            mean, half = mean_interval(diffs)
            cells.append(f"{mean:+.2f}%" + ("" if np.isnan(half) else f" ± {half:.2f}%"))
            cells.append(f"{int(np.sum(diffs < 0))} of {diffs.size}")
        if not diffs.size:
            continue
        n = r0["config"]["n_masks"]
        lines.append(f"| {r0['label']} | {n if n else '—'} | {diffs.size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_gaps_over_training(results: dict[str, list[dict[str, Any]]], name: str,
                              ref: str = "swiglu") -> tuple[list[int], np.ndarray, np.ndarray]:
    """``(steps, mean, half)``: at every validation step, the variant's loss relative to ``ref``'s in percent,
    paired by seed (:func:`paired_differences`), mean and 95% t-interval half-width, each ``(len(steps),)``."""
    steps = list(results[ref][0]["history"]["val_steps"])
    stats = [mean_interval(paired_differences(results, name, lambda r, k=k: r["history"]["val_loss"][k], ref))
             for k in range(len(steps))]
    return steps, np.array([m for m, _ in stats]), np.array([h for _, h in stats])


def make_gap_table(results: dict[str, list[dict[str, Any]]], ref: str = "swiglu") -> str:
    """Markdown table: one row per variant, one column per validation step, each cell the paired loss gap
    to ``ref`` of :func:`paired_gaps_over_training` (mean ± half-width). Empty without runs of ``ref`` or when
    the runs validated at different steps."""
    if not results.get(ref):
        return ""
    steps = results[ref][0]["history"]["val_steps"]
    if any(r["history"]["val_steps"] != steps for runs in results.values() for r in runs):
        return ""
    lines = ["| variant | n | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for name in VARIANTS:
        if name == ref or not results.get(name):
            continue
        _, mean, half = paired_gaps_over_training(results, name, ref)
        cells = [f"{m:+.2f}%" + ("" if np.isnan(h) else f" ± {h:.2f}") for m, h in zip(mean, half)]
        n = results[name][0]["config"]["n_masks"]
        lines.append(f"| {results[name][0]['label']} | {n if n else '—'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(results: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Validation loss against step, mean over seeds, one line per variant; beside it, when SwiGLU ran and
    every run validated at the same steps, each variant's paired gap to SwiGLU with its 95% interval as a
    band (:func:`paired_gaps_over_training`). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plot was drawn (pip install -e \".[plot]\" adds it)")
        return False
    with_gaps = bool(make_gap_table(results))
    fig, axes = plt.subplots(1, 2 if with_gaps else 1, figsize=(15 if with_gaps else 8, 5), squeeze=False)
    ax, gap_ax = axes[0][0], (axes[0][1] if with_gaps else None)
    for name in VARIANTS:
        runs = results.get(name)
        if not runs:
            continue
        steps = runs[0]["history"]["val_steps"]
        curve = np.mean([r["history"]["val_loss"] for r in runs], axis=0)
        n = runs[0]["config"]["n_masks"]
        label = runs[0]["label"] + (f" n={n}" if n else "") + f" (h={runs[0]['config']['d_ff']})"
        line, = ax.plot(steps, curve, marker="o", markersize=3, label=label)
        if gap_ax is not None and name != "swiglu":
            steps, mean, half = paired_gaps_over_training(results, name)
            gap_ax.plot(steps, mean, marker="o", markersize=3, color=line.get_color(), label=label)
            if not np.isnan(half).any():
                gap_ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.12)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title("Validation loss, mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if gap_ax is not None:
        gap_ax.axhline(0.0, color="black", linewidth=0.8)
        gap_ax.set_xlabel("step")
        gap_ax.set_ylabel("validation loss vs SwiGLU, paired by seed (%)")
        gap_ax.set_title("Gap to SwiGLU (mean over seeds, 95% interval)")
        gap_ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = _temp_beside(path)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)  # another process writing the plot at the same time: one whole file wins
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    base = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in defaults.items()}
    base["dtype"] = args.dtype
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    for k in ("d_model", "n_layers", "n_heads", "d_ff", "seq_len", "batch_size", "steps", "eval_batches"):
        if base[k] < 1:
            parser.error(f"--{k.replace('_', '-')}: expected an integer >= 1, got {base[k]}")
    if args.concurrent_jobs is not None and args.concurrent_jobs < 1:
        parser.error(f"--concurrent-jobs: expected an integer >= 1, got {args.concurrent_jobs}")
    if args.device == "gpu" and not pymglu.gpu_available():
        parser.error("--device gpu: CuPy is not installed or no CUDA device is usable")
    device = "gpu" if args.device == "gpu" or (args.device == "auto" and pymglu.gpu_available()) else "cpu"
    data_path = args.data if args.data is not None else _default_data()
    try:
        corpus, source = load_corpus(data_path)
        train_data, val_data = split_corpus(corpus, base["seq_len"])
    except DataError as e:
        parser.error(f"--data: {e}")
    out = Path(args.out or ("runs/compare_ffn-smoke" if args.smoke else "runs/compare_ffn"))
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in base.items() if k != "seeds"}
    setup["data"] = source
    other = claim_setup(out / "setup.json", setup)
    if other is not None:
        parser.error(f"{str(out)!r} holds results of other settings ({other}); "
                     "use another --out so that runs of different settings never share a table")

    print(f"data: {source}; device: {'CuPy (GPU)' if device == 'gpu' else 'NumPy (CPU)'}; settings: {setup}")
    for name in variants:
        for seed in base["seeds"]:
            path = runs_dir / f"{name}-seed{seed}.json"
            if path.exists():
                print(f"{name} seed {seed}: done before ({path.name})")
                continue
            try:
                result = _run_one(name, seed, base, train_data, val_data, device, args.progress,
                                  {"auto": None, "on": True, "off": False}[args.graph])
            except (ValueError, TypeError) as e:
                parser.error(f"{name}: {e}")
            if args.concurrent_jobs is not None:
                result["concurrent_jobs"] = args.concurrent_jobs
            write_atomic(path, json.dumps(result))
            print(f"{name} seed {seed}: val loss {result['final_val_loss']:.4f}, "
                  f"{result['tokens_per_second']:,.0f} tok/s, {result['wall_seconds']:.1f} s")

    results: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(runs_dir.glob("*.json")):
        r = json.loads(path.read_text())
        results.setdefault(r["variant"], []).append(r)
    table = make_table(results)
    for ref in ("swiglu", "swiglu-pm"):
        paired = make_paired_table(results, ref)
        if paired:
            table += (f"\n\nPaired by seed (each seed trains every variant on the same batches): the variant's loss "
                      f"relative to {VARIANTS[ref][0]}'s, mean over seeds ± the half-width of the 95% t-interval."
                      "\n\n" + paired)
    gaps = make_gap_table(results)
    if gaps:
        table += ("\n\nThe same paired gap to SwiGLU's validation loss at every validation step (percent, ± the "
                  "95% t-interval's half-width).\n\n" + gaps)
    note = concurrency_note(results)
    cmd = "python examples/compare_ffn.py " + " ".join(argv if argv is not None else sys.argv[1:])
    plotted = plot_curves(results, out / "loss_curves.png")
    text = (f"# compare_ffn results\n\nCommand: `{cmd.strip()}`\n\nData: {source}. Device: {device}. "
            f"Settings: {json.dumps({k: v for k, v in setup.items() if k != 'data'})}.\n\n{table}\n")
    if note:
        text += f"\n{note}\n"
    if plotted:
        text += "\n![validation loss](loss_curves.png)\n"
    write_atomic(out / "results.md", text)
    print(table)
    if note:
        print(note)
    print(f"wrote {out / 'results.md'}" + (f" and {out / 'loss_curves.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
