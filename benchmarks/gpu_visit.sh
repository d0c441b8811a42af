#!/usr/bin/env bash
# One visit to the GPU machine: gpu tests, compute-sanitizer, benchmarks; logs under $OUT, a short table last.
# Usage (from the repo root, on the GPU machine): bash benchmarks/gpu_visit.sh [MODE] [pytest -k expr]
# MODE: quick (decode --quick), full (decode sweep), train-quick (train_layer --quick), train (train_layer
# sweep), none (tests and sanitizer only). SANITIZE=0 skips compute-sanitizer;
# SANITIZE_SCRIPTS picks its scripts (default: sanitize_flash sanitize_training).
set -uo pipefail
mode=${1:-quick}
kexpr=${2:-}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
status=0
python3 -m pytest -q -m gpu -p no:cacheprovider ${kexpr:+-k "$kexpr"} tests > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -n 3 "$OUT/gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | cut -c1-300 | head -n 30
if [ "${SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  for script in ${SANITIZE_SCRIPTS:-sanitize_flash sanitize_training}; do
    for tool in memcheck racecheck; do
      compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 python3 benchmarks/$script.py > "$OUT/${script}_$tool.log" 2>&1 \
        && echo "compute-sanitizer $tool $script: clean" || { echo "compute-sanitizer $tool $script: FAILED"; status=1; }
      tail -n 2 "$OUT/${script}_$tool.log"
    done
  done
fi
case "$mode" in
  full) python3 benchmarks/decode.py --replays 15 ${WARPS:+--warps $WARPS} --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  quick) python3 benchmarks/decode.py --quick --dtypes bfloat16 ${WARPS:+--warps $WARPS} --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  train) python3 benchmarks/train_layer.py --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  train-quick) python3 benchmarks/train_layer.py --quick --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  none) : > "$OUT/bench.log" ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
grep -E "^\|" "$OUT/bench.log" | cut -c1-200 | tail -n 40
tail -n 3 "$OUT/bench.log" | grep -v "^|" || true
exit $status
