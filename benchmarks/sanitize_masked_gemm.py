"""The masked-GEMM kernels (pymglu.cuda.masked_gemm, sm_90 only) at ragged shapes, for compute-sanitizer: the
forward's product and the backward's dx (with the bit-plane transpose) at T, H and K off the tile sizes, and
one shape each with more tiles than SMs (several tiles per block)."""
import numpy as np
import cupy as cp

from pymglu import dtypes, masks
from pymglu.cuda import masked_gemm

rng = np.random.default_rng(0)
for dtype in (dtypes.bfloat16, dtypes.float16):
    for T, H, K in [(1, 8, 8), (37, 136, 72), (300, 392, 200), (1100, 4104, 136)]:
        x = cp.asarray(rng.standard_normal((T, K)).astype(dtype))
        W = cp.asarray(rng.standard_normal((H, K)).astype(dtype))
        bits = masks.pack_masks(cp.asarray(rng.standard_normal((H, K)).astype(np.float32)))
        out = masked_gemm.masked_product(x, W, bits, cp.full((T, H), np.nan, dtype=dtype))
        cp.cuda.runtime.deviceSynchronize()
        assert bool(cp.isfinite(out.astype(cp.float32)).all())
    # dx: T, h, d, n; the last has 9 x 33 tiles on 132 SMs
    for T, h, d, n in [(1, 8, 8, 1), (37, 136, 72, 2), (300, 200, 392, 3), (2100, 136, 4104, 2)]:
        dv = cp.asarray(rng.standard_normal((T, h)).astype(dtype))
        e = cp.asarray(rng.standard_normal((n, T, h)).astype(dtype))
        W = cp.asarray(rng.standard_normal((h, d)).astype(dtype))
        bits = masks.pack_masks(cp.asarray(rng.standard_normal((n, h, d)).astype(np.float32)))
        out = masked_gemm.masked_dx(dv, e, W, bits, cp.full((T, d), np.nan, dtype=dtype))
        cp.cuda.runtime.deviceSynchronize()
        assert bool(cp.isfinite(out.astype(cp.float32)).all())
print("sanitize_masked_gemm: all launches done")
