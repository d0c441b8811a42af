"""One launch each of the masked-GEMM kernels and of the cuBLAS products they replace, for Nsight Compute.

At T = 4096, d = 4096, h = 14336, n = 4, bfloat16 (the issue-4 step's shape): ``masked_dx`` (all five dx
products in one kernel), cuBLAS's ``e W -> float32 +=`` (one of the five it replaces), the forward's
``masked_product`` and cuBLAS's ``x W^T`` of the same shape. Each runs twice; profile the second with, e.g.,

    ncu --clock-control none --kernel-name regex:"masked|sm90|gemm" --launch-skip 4 --launch-count 4 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        python benchmarks/profile_masked_products.py
"""
import numpy as np
import cupy as cp

from pymglu import masks
from pymglu.cuda import masked_gemm, training
from pymglu.cuda.gemm import gemm
from pymglu.dtypes import bfloat16

T, d, h, n = 4096, 4096, 14336, 4
rng = np.random.default_rng(0)
x = cp.asarray(rng.standard_normal((T, d), dtype=np.float32)).astype(bfloat16)
dv = cp.asarray(rng.standard_normal((T, h), dtype=np.float32)).astype(bfloat16)
e = cp.asarray(rng.standard_normal((n, T, h), dtype=np.float32)).astype(bfloat16)
W = cp.asarray(rng.standard_normal((h, d), dtype=np.float32) * d ** -0.5).astype(bfloat16)
bits = masks.pack_masks(cp.asarray(rng.standard_normal((n, h, d), dtype=np.float32)))
bits_t = masked_gemm.transpose_bits(bits, cp.empty((n, d, h // 32), dtype=np.uint32))
built = training.apply_mask(W, bits[:1], cp.empty((1, h, d), dtype=bfloat16))[0]
dx = cp.empty((T, d), dtype=bfloat16)
dx32 = cp.zeros((T, d), dtype=np.float32)
s = cp.empty((T, h), dtype=bfloat16)
for _ in range(2):
    masked_gemm.launch_dx_unchecked(dv, e, W, bits_t, dx)
    gemm(e[0], built, dx32, accumulate=True)
    masked_gemm.launch_unchecked(x, W, bits[0], s)
    gemm(x, built, s, trans_b=True)
cp.cuda.Device().synchronize()
print("profile_masked_products: done")
