"""Summarise Nsight Compute's per-instruction warp stall samples (``ncu --page source --csv --print-source
sass``, plain or gzip CSV): the share of all samples by stall reason, and the instructions with the most
samples, each with its index in the listing, its executions and its leading reasons.

Usage: python benchmarks/ncu_stalls.py src.csv.gz [--top 25]
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def read_rows(path: str) -> list[dict[str, str]]:
    """The instruction rows of the export (the first line names the kernel, the second the columns)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    header = next(i for i, r in enumerate(rows) if SAMPLES in r)
    names = rows[header]
    return [dict(zip(names, r)) for r in rows[header + 1:] if len(r) == len(names)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    rows = read_rows(args.csv)
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    total = sum(int(r[SAMPLES] or 0) for r in rows)
    if total == 0:
        print("no stall samples in the export")
        return 1
    by_reason = collections.Counter({k[len("stall_"):]: sum(int(r[k] or 0) for r in rows) for k in reasons})
    print(f"{len(rows)} instructions, {total} samples; by reason: "
          + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in by_reason.most_common(8)))
    ranked = sorted(enumerate(rows), key=lambda ir: -int(ir[1][SAMPLES] or 0))[:args.top]
    for i, r in ranked:
        lead = sorted(((int(r[k] or 0), k[len("stall_"):]) for k in reasons), reverse=True)[:2]
        print(f"{i:6d} {100 * int(r[SAMPLES]) / total:5.1f}%  exec {r.get('Instructions Executed', '?'):>7}  "
              f"{r['Source'].strip()[:48]:48s} " + ", ".join(f"{k} {v}" for v, k in lead if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
