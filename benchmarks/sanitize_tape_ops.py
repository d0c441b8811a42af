"""The fused tape-op kernels (pymglu.cuda.tape_ops) and the cuBLAS MatMul path on ragged shapes, forward
and backward, for compute-sanitizer."""
import numpy as np
import cupy as cp

from pymglu import dtypes
from pymglu.autograd import Tensor, ops

rng = np.random.default_rng(0)


def run(fn, shapes, dtype):
    ts = [Tensor(cp.asarray(rng.standard_normal(s).astype(dtype)), requires_grad=True) for s in shapes]
    out = fn(*ts)
    out.backward(cp.asarray(rng.standard_normal(out.shape).astype(dtype)))
    cp.cuda.runtime.deviceSynchronize()
    for a in [out.data] + [t.grad for t in ts]:
        assert bool(cp.isfinite(a.astype(cp.float32)).all())


for dtype in (dtypes.bfloat16, dtypes.float16, dtypes.float32):
    for shape in [(3, 5, 33), (2, 1025), (1, 1)]:
        run(lambda x, w: ops.rms_norm(x, w), [shape, shape[-1:]], dtype)
    for shape in [(2, 3, 7, 8), (5, 130)]:
        run(lambda x: ops.rope(x, cp.arange(3, 3 + x.shape[-2])), [shape], dtype)
for dtype in (dtypes.bfloat16, dtypes.float16):
    for B, H, Tq, Tk, Dh in [(2, 3, 37, 37, 16), (1, 2, 5, 40, 32), (1, 1, 1, 1, 8)]:
        run(lambda q, k, v: ops.causal_self_attention(q, k, v), [(B, H, Tq, Dh), (B, H, Tk, Dh), (B, H, Tk, Dh)], dtype)
    run(lambda a, b: ops.matmul(a, ops.transpose(b)), [(3, 7, 40), (24, 40)], dtype)
print("sanitize_tape_ops: all launches done")
