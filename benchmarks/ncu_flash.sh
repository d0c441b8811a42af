#!/usr/bin/env bash
# Nsight Compute on a few FlashMGLU configurations; reports under $OUT, a summary of key metrics last.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
for cfg in "4096 14336 1 1" "4096 14336 8 1" "8192 28672 8 1" "4096 14336 8 16"; do
  set -- $cfg
  tag="d$1_h$2_n$3_T$4"
  ncu --clock-control none --kernel-name regex:flash_mglu_mma --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis --section LaunchStats --section InstructionStats --section SchedulerStats \
      python3 benchmarks/profile_flash.py --d $1 --h $2 --n $3 --tokens $4 > "$OUT/ncu_$tag.txt" 2>&1
  echo "== $tag"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|Executed Ipc Active|No Eligible|Stall|One or More Eligible" "$OUT/ncu_$tag.txt" | head -14
done
