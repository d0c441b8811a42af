"""A representative set of FlashMGLU launches for compute-sanitizer (memcheck, racecheck, synccheck), each
launched normally and then twice back to back with programmatic dependent launch (pdl=True)."""
import numpy as np
import cupy as cp

from pymglu import dtypes, masks
from pymglu.cuda import flash_mglu as fm

rng = np.random.default_rng(0)
for dtype in (dtypes.bfloat16, dtypes.float16, dtypes.float32):
    for tokens, n, d, h in [(1, 1, 33, 17), (3, 5, 1000, 77), (8, 8, 256, 64), (16, 16, 130, 40), (9, 2, 4095, 33), (4, 8, 4100, 20)]:
        x = cp.asarray(rng.standard_normal((tokens, d)).astype(dtype))
        W = cp.asarray(rng.standard_normal((h, d)).astype(dtype))
        planes = masks.pack_masks(cp.asarray(rng.standard_normal((n, h, d)) > 0))
        weights = fm.pack_weights(W, planes)
        y = fm.flash_mglu(x, weights, activation="gelu")
        cp.cuda.runtime.deviceSynchronize()
        assert bool(cp.isfinite(y.astype(cp.float32)).all())
        z = fm.flash_mglu(x, weights, activation="gelu", pdl=True)
        z = fm.flash_mglu(x, weights, activation="gelu", pdl=True, out=z)
        cp.cuda.runtime.deviceSynchronize()
        assert bool((z == y).all())
print("sanitize_flash: all launches done")
