"""What the gpu tests of pymglu.cuda.masked_gemm share (test_masked_gemm_gpu.py, test_masked_dx_gpu.py): the
two 16-bit dtypes and their tolerances, the sm_90 skip, and the relative error that also refuses non-finite
outputs (the tests poison their outputs with NaN)."""
import numpy as np
import pytest

from pymglu.backend import gpu_available
from pymglu.dtypes import bfloat16, float16

PYTESTMARK = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA device")]
DTYPES = [pytest.param(bfloat16, id="bfloat16"), pytest.param(float16, id="float16")]
#: relative error of a 16-bit output rounded once from float32 sums
TOL = {np.dtype(bfloat16): 6e-3, np.dtype(float16): 1e-3}


@pytest.fixture(autouse=True)
def needs_sm90():
    """Skips the test on a device other than compute capability 9.0 (the kernels are sm_90a only)."""
    import cupy as cp

    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("the masked GEMM kernels are sm_90a only")


def rel_err(got, want) -> float:
    """``|got - want| / |want|`` in float64, after asserting that every element of ``got`` is finite."""
    got = np.asarray(got, dtype=np.float64)
    assert np.all(np.isfinite(got))
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
