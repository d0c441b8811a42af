#!/usr/bin/env bash
# Nsight Compute on a few FlashMGLU configurations; reports under $OUT, a summary of key metrics last.
# CONFIGS: space-separated "d,h,n,T" tuples (default: the four of docs/flash_mglu_history.md, stop 14).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
metrics="sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__cycles_elapsed.avg.per_second,smsp__inst_executed.sum"
for cfg in ${CONFIGS:-4096,14336,1,1 4096,14336,8,1 8192,28672,8,1 4096,14336,8,16}; do
  IFS=, read -r d h n t <<< "$cfg"
  tag="d${d}_h${h}_n${n}_T${t}"
  ncu --clock-control none --kernel-name regex:flash_mglu_mma --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis --section LaunchStats --section InstructionStats --section SchedulerStats \
      --metrics "$metrics" \
      python3 benchmarks/profile_flash.py --d "$d" --h "$h" --n "$n" --tokens "$t" > "$OUT/ncu_$tag.txt" 2>&1
  echo "== $tag"
  grep -E "Duration|DRAM Throughput|Registers Per|Issue Slots Busy|No Eligible|Achieved Occupancy|hmma|issue_active|dram__|cycles_elapsed|inst_executed" "$OUT/ncu_$tag.txt" | head -14
done
