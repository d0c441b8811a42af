#!/usr/bin/env bash
# Nsight Compute on one launch of the fused decode step of each decode_e2e model (4 layers, position 144):
# the warp-state, memory and source-counter sections, then each launch's per-instruction stall samples
# summarised by benchmarks/ncu_stalls.py (by reason, and the instructions with the most samples).
# Reports and the exported source pages (gzip CSV) under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# profile_fused_step.py runs 5 launches of the SwiGLU model, then 5 of the SwiMGLU one: skip to the third of each
for model in "swiglu 2" "swimglu 7"; do
  read -r tag skip <<< "$model"
  ncu --clock-control none --kernel-name regex:decode_fused --launch-skip "$skip" --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section SourceCounters --section MemoryWorkloadAnalysis \
      --section SchedulerStats -o "$OUT/fused_$tag" python3 benchmarks/profile_fused_step.py --quick --launches 5 \
      > "$OUT/ncu_$tag.log" 2>&1
  ncu --import "$OUT/fused_$tag.ncu-rep" --page details > "$OUT/details_$tag.txt" 2>&1
  ncu --import "$OUT/fused_$tag.ncu-rep" --page source --csv --print-source sass 2> "$OUT/src_$tag.err" | gzip > "$OUT/src_$tag.csv.gz"
  echo "== $tag"
  grep -E "Duration|DRAM Throughput|Warp Cycles Per Issued" "$OUT/details_$tag.txt" | head -4
  python3 benchmarks/ncu_stalls.py "$OUT/src_$tag.csv.gz" --top 8
done
