"""pymglu/cuda/masked_gemm.cu compiles for sm_90a (the only target it has) with no register spills and no
wgmma serialisation (ptxas's C7514 remark), and pymglu.cuda.masked_gemm's constants match the source.
CPU-only: NVRTC through cuda.core; skipped where cuda.core is missing."""
import re

from nvrtc_helpers import ptxas_log

from pymglu import cuda as pymglu_cuda
from pymglu.cuda import masked_gemm


def test_kernels_compile_for_sm90a_without_spills_or_serialised_wgmma():
    log = ptxas_log(pymglu_cuda.read_source("masked_gemm.cu"), "sm_90a", cudart_headers=False)
    entries = set(re.findall(r"Compiling entry function '(\w+)'", log))
    assert entries == set(masked_gemm._KERNELS), log[:2000]
    assert not re.search(r"[1-9]\d* bytes spill (stores|loads)", log), log
    assert "C7514" not in log, log


def test_shared_memory_size_matches_the_source():
    source = pymglu_cuda.read_source("masked_gemm.cu")
    assert "constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4" in source
    assert "CHUNK_ROWS = 32;" in source
    # 4 stages of (128 + 256) x 64 16-bit values, two 32 x 128 output chunks, 8 mask bytes per W row and
    # stage, 1 KB of alignment
    assert masked_gemm.SMEM_BYTES == 4 * (128 + 256) * 64 * 2 + 2 * 32 * 128 * 2 + 4 * 128 * 8 + 1024
    assert masked_gemm.SMEM_BYTES <= 227 * 1024


def test_unusable_without_cupy_arrays():
    import numpy as np

    x = np.zeros((4, 8), dtype=np.float32)
    assert not masked_gemm.supports(x, x, np.zeros((4, 1), dtype=np.uint32), x)
    assert not masked_gemm.supports_dx(x, x[None], x)
    assert not masked_gemm.usable_dx(x, x[None], x)


def test_dx_kernel_is_off_by_default_and_switched_within_a_block():
    assert masked_gemm.DX_ENABLED is False
    with masked_gemm.dx_kernel():
        assert masked_gemm.DX_ENABLED is True
        with masked_gemm.dx_kernel(False):
            assert masked_gemm.DX_ENABLED is False
        assert masked_gemm.DX_ENABLED is True
    assert masked_gemm.DX_ENABLED is False
    try:
        with masked_gemm.dx_kernel():
            raise KeyError("inside")
    except KeyError:
        pass
    assert masked_gemm.DX_ENABLED is False


def test_dx_and_transpose_refuse_numpy_arrays_with_a_clear_error():
    import numpy as np
    import pytest

    bits = np.zeros((2, 64, 1), dtype=np.uint32)
    with pytest.raises(RuntimeError, match="transpose_bits: needs C-contiguous CuPy arrays"):
        masked_gemm.transpose_bits(bits)
    with pytest.raises(ValueError, match="out"):
        masked_gemm.transpose_bits(bits, np.zeros((2, 40, 2), dtype=np.uint32))
    T, h, d, n = 4, 64, 32, 2
    dv, e, W = (np.zeros(s, dtype=np.float16) for s in ((T, h), (n, T, h), (h, d)))
    out = np.full((T, d), 7, dtype=np.float16)
    with pytest.raises(RuntimeError, match="masked_dx: needs CuPy arrays"):
        masked_gemm.masked_dx(dv, e, W, bits, out)
    with pytest.raises(ValueError, match="bits"):
        masked_gemm.masked_dx(dv, e, W, bits[:1], out)
    assert (out == 7).all()
