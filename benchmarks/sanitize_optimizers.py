"""Every instance of the one-kernel optimizer updates (pymglu.cuda.optimizers) on ragged shapes, for
compute-sanitizer: AdamW and SGD, each parameter dtype and gradient dtype, with and without a master and
sign bit-planes."""
import numpy as np
import cupy as cp

from pymglu import dtypes, masks
from pymglu.cuda import optimizers

rng = np.random.default_rng(0)
for dtype in (dtypes.bfloat16, dtypes.float16, dtypes.float32):
    for grad_dtype in {np.dtype(dtype), np.dtype(np.float32)}:
        for shape in [(3, 5, 33), (1, 1, 1), (2, 7, 64), (4, 97)]:
            param = cp.asarray(rng.standard_normal(shape).astype(dtype))
            grad = cp.asarray(rng.standard_normal(shape).astype(grad_dtype))
            master = cp.asarray(param, dtype=np.float32) if dtype != dtypes.float32 else None
            m = cp.asarray(rng.standard_normal(shape).astype(np.float32))
            v = cp.asarray(rng.random(shape).astype(np.float32))
            buf = cp.asarray(rng.standard_normal(shape).astype(np.float32))
            for with_bits in (False, True):
                bits = optimizers.new_sign_bits(param) if with_bits else None
                optimizers.adamw_step(param, grad, master, m, v, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                                      weight_decay=0.01, step=3, sign_bits=bits)
                if with_bits:
                    assert bool(cp.all(bits == masks.pack_masks(param)))
                bits = optimizers.new_sign_bits(param) if with_bits else None
                optimizers.sgd_step(param, grad, master, buf, lr=0.1, momentum=0.9, weight_decay=0.01,
                                    nesterov=True, first_step=False, sign_bits=bits)
                if with_bits:
                    assert bool(cp.all(bits == masks.pack_masks(param)))
                optimizers.sgd_step(param, grad, None, None, lr=0.1, momentum=0.0, weight_decay=0.0,
                                    nesterov=False, first_step=True)
            cp.cuda.runtime.deviceSynchronize()
            assert bool(cp.isfinite(param.astype(cp.float32)).all())
# gradient clipping over mixed dtypes, ragged sizes
from pymglu.optim import clip_grad_norm  # noqa: E402
from pymglu.nn import Parameter  # noqa: E402

params = []
for shape, dt in [((33, 70), dtypes.bfloat16), ((3, 5, 41), dtypes.float32), ((7,), dtypes.float16), ((1,), dtypes.float32)]:
    p = Parameter(cp.zeros(shape, dtype=dt))
    p.grad = cp.asarray(rng.standard_normal(shape).astype(dt))
    params.append(p)
norm = clip_grad_norm(params, 0.5)
cp.cuda.runtime.deviceSynchronize()
assert np.isfinite(float(norm))
print("sanitize_optimizers: all launches done")
