"""A representative set of the training-path launches (pymglu.cuda.training) for compute-sanitizer."""
import numpy as np
import cupy as cp

from pymglu import dtypes, functional, masks
from pymglu.cuda import training

rng = np.random.default_rng(0)
for dtype in (dtypes.bfloat16, dtypes.float16, dtypes.float32):
    # ragged shapes take the one-element kernels, aligned ones the 16-byte ones
    for tokens, n, d, h, act in [(3, 1, 33, 17, "silu"), (5, 3, 1000, 77, "gelu"), (8, 2, 256, 64, "relu"),
                                 (7, 4, 130, 40, "gelu_tanh"), (2, 2, 4095, 33, "sigmoid")]:
        x = cp.asarray(rng.standard_normal((tokens, d)).astype(dtype))
        W = cp.asarray(rng.standard_normal((h, d)).astype(dtype))
        dy = cp.asarray(rng.standard_normal((tokens, h)).astype(dtype))
        bits = masks.pack_masks(cp.asarray(rng.standard_normal((n, h, d)).astype(np.float32)))
        y, cache = functional.mglu_forward(x, W, bits, act)
        with training.narrow_logit_grads(False):  # the logit gradients in float32 (4-wide or 1-wide pass)
            wide = functional.mglu_backward(dy, x, W, bits, act, cache)
        grads = functional.mglu_backward(dy, x, W, bits, act, cache, consume_cache=True)
        gy, gcache = functional.glu_forward(x, W, W, act)
        ggrads = functional.glu_backward(dy, x, W, W, act, gcache)
        cp.cuda.runtime.deviceSynchronize()
        for a in (y, *wide, *grads, gy, *ggrads):
            assert bool(cp.isfinite(a.astype(cp.float32)).all())
print("sanitize_training: all launches done")
