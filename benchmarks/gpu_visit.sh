#!/usr/bin/env bash
# One visit to the GPU machine: gpu tests, compute-sanitizer, benchmarks; logs under $OUT, a short table last.
# Usage (from the repo root, on the GPU machine): bash benchmarks/gpu_visit.sh [MODE] [pytest -k expr]
# MODE: quick (decode --quick), full (decode sweep), pdl-sweep (the stop-17 FlashMGLU sweep of
# docs/flash_mglu.md, "Launch configuration": four warps or two groups ahead under PDL at 4096 x 14336), paired-sweep
# (the stop-18 sweep: the paired-column instance on and off for T <= 4, PDL launch; SHAPES, MASKS override), flash-probe
# (the stop-19 probe_flash_stages.py comparison: the library against the stop-18 mask loads, with the loads-only and
# one-product variants, n = 8, 4, 2 at T = 1, 8, 16; SHAPES, MASKS override), fused-probe
# (probe_fused_stages.py --quick), gemm-probe (benchmarks/probe_masked_gemm.py: the issue-4 masked GEMM, one block
# per tile and persistent, against cuBLAS and apply_mask + cuBLAS; SHAPES overrides), sparse-probe
# (benchmarks/probe_sparse_wgmma.py: the 2:4-sparse wgmma fed as the sparse route would, against the dense one), graph-probe
# (benchmarks/probe_graph_products.py: the training products and steps eager against replayed, at both issue-4 shapes
# at T = 4096; SHAPES overrides, a space-separated list of TxDxH), weight-probe (benchmarks/probe_weight_passes.py: the
# step's elementwise passes against kernels with the same loads and stores; SHAPES overrides, a list of DxH), products (benchmarks/masked_products.py:
# the package's masked-GEMM kernels against apply_mask + cuBLAS and cuBLAS unmasked; SHAPES overrides), ncu-fused (benchmarks/ncu_fused.sh: Nsight Compute on one fused decode step per
# model, stall summary), train-quick (train_layer --quick), train-4096 (train_layer at T = 4096, n = 4, both shapes:
# the stop-32 comparison of the masked GEMM against apply_mask; TRAIN_ARGS adds train_layer.py options, e.g. --narrow-logits-too), fp16-graph (compute-sanitizer memcheck on the
# device-skip tests, then train_model.py --dtype float16: eager float16 steps, the loss scaler on the host,
# against the captured ones, the scaler on the device), optim (optimizer_step.py and train_model.py: the
# optimizer's kernels against its array expressions), train (train_layer
# sweep), train-ab (train_layer.py at T = 4096, n = 4, this tree against BASE in the order base, new, new, base, the
# replayed rows printed; base_ref/ as for e2e-ab), e2e (benchmarks/decode_e2e.py: the 1B-class graph-decode comparison), e2e-ab (the fused step of this tree
# against the commit BASE, default HEAD~1, from a git archive of its pymglu: decode_e2e.py --kinds fused in the
# order base, new, new, base, then profile_fused_step.py of each), sampling (benchmarks/decode_sampling.py:
# tokens sampled on the device against on the host), nccl-hang (2 GPUs; source .gpu/mpi/setup.sh first: the NCCL
# tests of a peer that leaves or stalls under CUDA_MODULE_LOADING=LAZY and EAGER, docs/distributed.md), scaling (benchmarks/scaling.py; source .gpu/mpi/setup.sh first), dp (2 GPUs, source .gpu/mpi/setup.sh
# first: scaling.py --graphs on and benchmarks/allreduce_probe.py for both models; with the data-parallel gpu
# tests: PYTEST=1 SANITIZE=0 bash benchmarks/gpu_visit.sh dp "distributed or graph_step or trainer or staging"), experiment (compare_ffn in
# bfloat16 on tinyshakespeare: every (variant, seed) of the variants in $VARIANTS (default all) and the
# seeds $SEEDS (default "0 1 2") is one call of compare_ffn.py; the calls are spread over $JOBS_PER_GPU
# (default 4) worker loops per visible GPU, which share the GPU (the default model is too small to fill an
# H200 alone), slow variants (swimglu8, gemglu4, swimglu4) first and interleaved over the GPUs, each loop
# logging to $OUT/compare_gpu<g>_<slot>.log; runs kept in $COMPARE_DIR (default $OUT/compare; a carried,
# git-ignored directory such as runs/compare_gpu lets later visits add runs), each recording how many
# processes shared its GPU, then one call that only aggregates, the directory returned as compare.tgz),
# none (tests and sanitizer only). A dry run of the experiment mode on a CPU machine:
# PYTEST=0 SANITIZE=0 DEVICE=cpu NGPU=2 JOBS_PER_GPU=2 EXTRA=--smoke SEEDS="0 1" OUT=/tmp/o bash benchmarks/gpu_visit.sh experiment
# WARPS / AHEAD (quick, full): comma lists swept by decode.py --warps / --ahead; PDL (quick, full): a comma list of off, start,
# end (decode.py --pdl). SANITIZE_TOOLS: the compute-sanitizer tools (default: memcheck racecheck). With PYTEST=0 the gpu tests are skipped. SANITIZE=0 skips compute-sanitizer;
# SANITIZE_SCRIPTS picks its scripts (default: sanitize_flash sanitize_training sanitize_decode sanitize_masked_gemm; the last needs sm_90).
set -uo pipefail
mode=${1:-quick}
kexpr=${2:-}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
status=0
if [ "${PYTEST:-1}" = 1 ]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider ${kexpr:+-k "$kexpr"} tests > "$OUT/gpu_tests.log" 2>&1 || status=1
  tail -n 3 "$OUT/gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | cut -c1-300 | head -n 30
fi
if [ "${SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  for script in ${SANITIZE_SCRIPTS:-sanitize_flash sanitize_training sanitize_decode sanitize_masked_gemm}; do
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
      compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 python3 benchmarks/$script.py > "$OUT/${script}_$tool.log" 2>&1 \
        && echo "compute-sanitizer $tool $script: clean" || { echo "compute-sanitizer $tool $script: FAILED"; status=1; }
      tail -n 2 "$OUT/${script}_$tool.log"
    done
  done
fi
case "$mode" in
  full) python3 benchmarks/decode.py --replays 15 ${WARPS:+--warps $WARPS} ${AHEAD:+--ahead $AHEAD} ${PDL:+--pdl $PDL} --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  quick) python3 benchmarks/decode.py --quick --dtypes bfloat16 ${WARPS:+--warps $WARPS} ${AHEAD:+--ahead $AHEAD} ${PDL:+--pdl $PDL} ${SHAPES:+--shapes $SHAPES} --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  train) python3 benchmarks/train_layer.py --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  train-quick) python3 benchmarks/train_layer.py --quick --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  train-4096) python3 benchmarks/train_layer.py --tokens 4096 --masks 4 --no-naive --no-torch --recompute-n "" ${TRAIN_ARGS:-} \
      --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  optim) { python3 benchmarks/optimizer_step.py --out-dir "$OUT" && python3 benchmarks/train_model.py --out-dir "$OUT"; } \
       > "$OUT/bench.log" 2>&1 || status=1 ;;
  e2e) python3 benchmarks/decode_e2e.py --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  sparse-probe)  # the issue-4 probe of the 2:4-sparse wgmma route against the dense wgmma (stop 36)
    timeout 300 python3 -u benchmarks/probe_sparse_wgmma.py --rounds 7 > "$OUT/bench.log" 2>&1 || status=1 ;;
  graph-probe)  # the issue-4 products and steps eager, replayed, and replayed with a workspace of ours (stop 37)
    : > "$OUT/bench.log"
    for shape in ${SHAPES:-4096x4096x14336 4096x2048x8192}; do
      timeout 200 python3 -u benchmarks/probe_graph_products.py --shape "$shape" >> "$OUT/bench.log" 2>&1 || status=1
    done ;;
  weight-probe)  # the issue-4 elementwise passes against the bytes they move (stop 37)
    : > "$OUT/bench.log"
    for shape in ${SHAPES:-4096x14336 2048x8192}; do
      timeout 150 python3 -u benchmarks/probe_weight_passes.py --shape "$shape" >> "$OUT/bench.log" 2>&1 || status=1
    done ;;
  gemm-probe)  # the issue-4 masked-GEMM probe, one block per tile and persistent, against cuBLAS (SHAPES overrides)
    timeout 300 python3 -u benchmarks/probe_masked_gemm.py --rounds 7 \
      --shapes "${SHAPES:-4096x14336x4096,16384x14336x4096,4096x8192x2048}" ${VARIANTS:+--variants "$VARIANTS"} > "$OUT/bench.log" 2>&1 || status=1 ;;
  train-ab)  # the layer's training step of this tree against BASE in turns (base, new, new, base), as e2e-ab
    # does for decode: train_layer.py at T = 4096, n = 4, both shapes (TRAIN_ARGS adds options); the graph rows
    base=${BASE:-HEAD~1}
    rm -rf "$OUT/base_ref" && mkdir -p "$OUT/base_ref"
    if [ -d base_ref/pymglu ]; then cp -r base_ref/pymglu "$OUT/base_ref/"; else git archive "$base" pymglu | tar -x -C "$OUT/base_ref" || status=1; fi
    : > "$OUT/bench.log"
    i=0
    for run in base new new base; do
      i=$((i + 1)); root=$PWD; [ $run = base ] && root=$OUT/base_ref
      echo "### $i: $run ($( [ $run = base ] && echo "$base" || echo tree))" >> "$OUT/bench.log"
      PYTHONPATH=/tmp/site:$root:$PWD timeout 150 python3 benchmarks/train_layer.py --tokens 4096 --masks 4 --no-naive \
        --no-torch --recompute-n "" --no-breakdown --reps 9 ${TRAIN_ARGS:-} --out-dir "/tmp/train_${i}_$run" \
        > "$OUT/train_${i}_$run.log" 2>&1 || status=1
      cp "/tmp/train_${i}_$run/train_layer.json" "$OUT/train_${i}_$run.json" 2>/dev/null || status=1
      grep "(graph)" "/tmp/train_${i}_$run/train_layer.md" >> "$OUT/bench.log" 2>/dev/null || status=1
    done
    rm -rf "$OUT/base_ref" ;;
  e2e-ab)  # the fused step of this tree against BASE (a commit; default HEAD~1) in turns: base, new, new, base
    # the base's pymglu: base_ref/ when the copied tree has it (made beside the checkout, as the GPU machine's
    # copy may lack .git: git archive BASE pymglu | tar -x -C base_ref), else a git archive of BASE
    base=${BASE:-HEAD~1}
    rm -rf "$OUT/base_ref" && mkdir -p "$OUT/base_ref"
    if [ -d base_ref/pymglu ]; then cp -r base_ref/pymglu "$OUT/base_ref/"; else git archive "$base" pymglu | tar -x -C "$OUT/base_ref" || status=1; fi
    : > "$OUT/bench.log"
    for run in base new new base; do
      root=$PWD; [ $run = base ] && root=$OUT/base_ref
      echo "### $run ($( [ $run = base ] && echo "$base" || echo tree))" >> "$OUT/bench.log"
      PYTHONPATH=/tmp/site:$root:$PWD python3 benchmarks/decode_e2e.py --kinds fused --repeats 3 --eager-steps 2 \
        --out-dir "$OUT/e2e_$run" >> "$OUT/bench.log" 2>&1 || status=1
    done
    for run in base new; do
      root=$PWD; [ $run = base ] && root=$OUT/base_ref
      echo "### profile, $run" >> "$OUT/bench.log"
      PYTHONPATH=/tmp/site:$root:$PWD python3 benchmarks/profile_fused_step.py >> "$OUT/bench.log" 2>&1 || status=1
    done
    rm -rf "$OUT/base_ref" ;;
  fp16-graph) { compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 \
         python3 -m pytest -q -m gpu -p no:cacheprovider tests/cuda/test_device_skips_gpu.py > "$OUT/sanitize_device_skips.log" 2>&1 \
         && echo "compute-sanitizer memcheck test_device_skips_gpu.py: clean" || { echo "compute-sanitizer memcheck test_device_skips_gpu.py: FAILED"; status=1; }
       python3 benchmarks/train_model.py --dtype float16 --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1; } ;;
  sampling) python3 benchmarks/decode_sampling.py --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  pdl-sweep) python3 benchmarks/decode.py --dtypes bfloat16,float16 --shapes 4096x14336 --tokens 1,2,4,8 --masks 1,2,8 \
       --warps lib,4 --ahead lib,2 --pdl end --rounds 3 --replays 10 --no-naive --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  paired-sweep) python3 benchmarks/decode.py --dtypes bfloat16,float16 --shapes ${SHAPES:-4096x14336,8192x28672} --tokens 1,2,4 \
       --masks ${MASKS:-1,2,4,8} --paired on,off --pdl end --rounds 3 --replays 10 --no-naive --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  flash-probe)
    : > "$OUT/bench.log"
    for shape in ${SHAPES:-4096x14336 8192x28672}; do
      python3 benchmarks/probe_flash_stages.py --shapes "$shape" --masks ${MASKS:-8,4,2} --tokens 1,8,16 --rounds 4 \
        --variants "library,warp-major masks,loads only,t + 1 mask" >> "$OUT/bench.log" 2>&1 || status=1
    done ;;
  fused-probe) python3 benchmarks/probe_fused_stages.py --quick --rounds 3 > "$OUT/bench.log" 2>&1 || status=1 ;;
  ncu-fused) OUT="$OUT" bash benchmarks/ncu_fused.sh > "$OUT/bench.log" 2>&1 || status=1 ;;
  scaling) python3 benchmarks/scaling.py --out-dir "$OUT" > "$OUT/bench.log" 2>&1 || status=1 ;;
  dp)  # 2 GPUs, source .gpu/mpi/setup.sh first: graph-step scaling and each model's step all-reduces alone
    { python3 benchmarks/scaling.py --graphs on --steps 40 --out-dir "$OUT" \
        && echo "| model | ranks | buckets | MB per step | ms per step (median) | GB/s (algorithm) |" \
        && for m in large compare_ffn; do mpiexec -n 2 python3 benchmarks/allreduce_probe.py --model $m | tail -n 1; done
    } > "$OUT/bench.log" 2>&1 || status=1 ;;
  experiment)
    compare=${COMPARE_DIR:-$OUT/compare}
    variants=${VARIANTS:-swiglu,swiglu-pm,swimglu1,swimglu2,swimglu4,swimglu8,gemglu4,remglu4}
    variants=${variants// /}
    seeds=${SEEDS:-0 1 2}
    jobs=${JOBS_PER_GPU:-4}
    [ "$jobs" -ge 1 ] 2>/dev/null || { echo "JOBS_PER_GPU: expected an integer >= 1, got $jobs"; exit 2; }
    common=(examples/compare_ffn.py --device "${DEVICE:-gpu}" --dtype bfloat16 --data .gpu/data/tinyshakespeare.txt
            --out "$compare" ${EXTRA:-})
    ngpu=${NGPU:-$(python3 -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())")}
    IFS=, read -ra vs <<< "$variants"
    # units "variant:seed", longest first: the slow variants, then the others in $VARIANTS order
    ordered=()
    for v in swimglu8 gemglu4 swimglu4; do [[ ",$variants," == *",$v,"* ]] && ordered+=("$v"); done
    for v in "${vs[@]}"; do case $v in swimglu8|gemglu4|swimglu4) ;; *) ordered+=("$v") ;; esac; done
    units=()
    for v in "${ordered[@]}"; do for s in $seeds; do units+=("$v:$s"); done; done
    # unit i goes to slot k (round r = i / nslots runs forward, the next one backward, so a slot with a
    # slow unit gets a fast one next); slot k runs on GPU k % ngpu, as its slot k / ngpu there
    nslots=$((ngpu * jobs))
    slot_units=(); busy=()
    for i in "${!units[@]}"; do
      k=$((i % nslots)); [ $((i / nslots % 2)) -eq 1 ] && k=$((nslots - 1 - k))
      slot_units[k]="${slot_units[k]:-}${units[$i]} "
    done
    for k in "${!slot_units[@]}"; do busy[k % ngpu]=$(( ${busy[k % ngpu]:-0} + 1 )); done
    pids=()
    for k in "${!slot_units[@]}"; do
      g=$((k % ngpu))
      ( rc=0
        for u in ${slot_units[k]}; do
          CUDA_VISIBLE_DEVICES=$g python3 "${common[@]}" --variants "${u%%:*}" --seeds "${u#*:}" \
            --concurrent-jobs "${busy[g]}" || rc=1
        done
        exit $rc ) > "$OUT/compare_gpu${g}_$((k / ngpu)).log" 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || status=1; done
    # every requested run exists now (or failed): this call only aggregates them into results.md (a failed
    # run is tried again here, alone on the device)
    python3 "${common[@]}" --seeds $seeds --variants "$variants" --concurrent-jobs 1 > "$OUT/bench.log" 2>&1 || status=1
    tar czf "$OUT/compare.tgz" -C "$(dirname "$compare")" "$(basename "$compare")" ;;
  nccl-hang)  # the NCCL tests of a peer that leaves or stalls, with CUDA's lazy and eager module loading
    : > "$OUT/bench.log"
    for loading in LAZY EAGER; do
      CUDA_MODULE_LOADING=$loading timeout 250 python3 -m pytest -q -m gpu -p no:cacheprovider tests/distributed/test_nccl_gpu.py \
        -k "leaves or stalled" > "$OUT/nccl_hang_$loading.log" 2>&1 || status=1
      echo "| CUDA_MODULE_LOADING=$loading | $(tail -n 1 "$OUT/nccl_hang_$loading.log") |" >> "$OUT/bench.log"
    done ;;
  products) python3 benchmarks/masked_products.py ${SHAPES:+--shapes $SHAPES} --out "$OUT/masked_products.json" > "$OUT/bench.log" 2>&1 || status=1 ;;
  none) : > "$OUT/bench.log" ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
grep -E "^\|" "$OUT/bench.log" | cut -c1-200 | tail -n 40
tail -n 3 "$OUT/bench.log" | grep -v "^|" || true
exit $status
