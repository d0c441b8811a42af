#!/usr/bin/env bash
# One visit to the GPU machine: gpu tests, compute-sanitizer, benchmarks; logs under $OUT, a short table last.
# Usage (from the repo root, on the GPU machine): bash benchmarks/gpu_visit.sh [quick|full] [pytest -k expr]
set -uo pipefail
mode=${1:-quick}
kexpr=${2:-}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
status=0
python3 -m pytest -q -m gpu -p no:cacheprovider ${kexpr:+-k "$kexpr"} tests > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -n 3 "$OUT/gpu_tests.log"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 python3 benchmarks/sanitize_flash.py > "$OUT/sanitizer_$tool.log" 2>&1 \
      && echo "compute-sanitizer $tool: clean" || { echo "compute-sanitizer $tool: FAILED"; status=1; }
    tail -n 2 "$OUT/sanitizer_$tool.log"
  done
fi
if [ "$mode" = full ]; then
  python3 benchmarks/decode.py --replays 15 ${WARPS:+--warps $WARPS} --out-dir "$OUT" > "$OUT/decode.log" 2>&1 || status=1
else
  python3 benchmarks/decode.py --quick --dtypes bfloat16 ${WARPS:+--warps $WARPS} --out-dir "$OUT" > "$OUT/decode.log" 2>&1 || status=1
fi
grep -E "^\|" "$OUT/decode.log" | cut -c1-200 | tail -n 40
tail -n 3 "$OUT/decode.log" | grep -v "^|" || true
exit $status
