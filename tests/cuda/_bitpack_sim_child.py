"""Child process of tests/cuda/test_bitpack_sim.py: runs the Numba packer under the CUDA simulator.

Run as a script with ``NUMBA_ENABLE_CUDASIM=1`` in the environment (it must be set before numba is
imported, hence a process of its own). Prints ``SIMULATOR-OK <cases>`` on success; any mismatch raises.
"""
from __future__ import annotations

import os
import sys
import warnings


def main() -> int:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        print("NUMBA_ENABLE_CUDASIM=1 is not set", file=sys.stderr)
        return 2
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="numba")
    import numba
    import numpy as np

    assert numba.config.ENABLE_CUDASIM, "numba did not pick up NUMBA_ENABLE_CUDASIM=1"
    from pymglu.cuda import bitpack
    from pymglu.masks import _pack_numpy

    rng = np.random.default_rng(20250623)
    cases = 0
    for d in (1, 31, 32, 33, 100, 1000):
        for lead in ((1,), (3,), (2, 5), (2, 1, 3)):
            for dtype in (np.bool_, np.float32):
                shape = lead + (d,)
                if dtype is np.bool_:
                    x = rng.random(shape) < rng.uniform(0.1, 0.9)
                else:
                    x = rng.standard_normal(shape).astype(dtype)
                    x.reshape(-1)[::5] = 0.0
                rows, words = int(np.prod(lead)), (d + 31) // 32
                out = np.full((rows, words), 0xDEADBEEF, dtype=np.uint32)  # poison: must be overwritten
                name = bitpack.pack_kernel_launch(x.reshape(rows, d), out)
                want = "pack_quads_flat" if (dtype is np.bool_ and d % 32 == 0) else "pack_nibbles"
                assert name == want, (shape, dtype, name)
                ref = _pack_numpy(x > 0).reshape(rows, words)
                assert out.tobytes() == ref.tobytes(), f"bytes differ for shape {shape} dtype {dtype.__name__}"
                cases += 1

    # float16 / float64 logits, with ties at zero and NaN (never a gate element)
    for dtype in (np.float16, np.float64):
        x = rng.standard_normal((3, 70)).astype(dtype)
        x[0, :5] = [0.0, -0.0, np.nan, np.inf, -np.inf]
        out = np.zeros((3, 3), dtype=np.uint32)
        bitpack.pack_kernel_launch(x, out)
        assert out.tobytes() == _pack_numpy(x > 0).tobytes(), dtype
        cases += 1

    # contiguous but not 4-byte aligned bool data with d % 32 == 0 -> the general kernel
    buf = np.zeros(4 * 64 + 1, dtype=np.bool_)
    buf[1:] = rng.random(4 * 64) < 0.5
    x = buf[1:].reshape(4, 64)
    assert x.ctypes.data % 4 != 0
    out = np.zeros((4, 2), dtype=np.uint32)
    assert bitpack.pack_kernel_launch(x, out) == "pack_nibbles"
    assert out.tobytes() == _pack_numpy(x).tobytes()
    cases += 1

    # the unpack kernel inverts the packer, padding ignored
    for d in (1, 33, 100):
        m = rng.random((5, d)) < 0.5
        packed = _pack_numpy(m)
        back = np.zeros((5, d), dtype=np.bool_)
        bitpack._unpack_kernel[(back.size + 127) // 128, 128](packed, back)
        assert (back == m).all(), d
        cases += 1

    print(f"SIMULATOR-OK {cases}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
