"""Run one FlashMGLU configuration a few times, for Nsight Compute.

    ncu --clock-control none --kernel-name regex:flash_mglu_mma --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
        python benchmarks/profile_flash.py --d 4096 --h 14336 --n 8 --tokens 1
"""
import argparse

import cupy as cp

from pymglu import dtypes, masks
from pymglu.cuda import flash_mglu as fm

p = argparse.ArgumentParser()
p.add_argument("--d", type=int, default=4096)
p.add_argument("--h", type=int, default=14336)
p.add_argument("--n", type=int, default=8)
p.add_argument("--tokens", type=int, default=1)
p.add_argument("--launches", type=int, default=5)
a = p.parse_args()
W = (cp.random.standard_normal((a.h, a.d), dtype=cp.float32) * 0.02).astype(dtypes.bfloat16)
weights = fm.pack_weights(W, masks.pack_masks(cp.random.random((a.n, a.h, a.d), dtype=cp.float32) < 0.5))
x = cp.random.standard_normal((a.tokens, a.d), dtype=cp.float32).astype(dtypes.bfloat16)
out = cp.empty((a.tokens, a.h), dtype=dtypes.bfloat16)
for _ in range(a.launches):
    fm.flash_mglu(x, weights, out=out)
cp.cuda.runtime.deviceSynchronize()
print("profile_flash: done", a)
