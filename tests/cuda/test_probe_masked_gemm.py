"""benchmarks/probe_masked_gemm.cu (the issue-4 masked-GEMM probe) still compiles for sm_90a, with no
register spills and no wgmma serialisation (ptxas's C7514 remark), so that the probe keeps measuring the
kernel it describes. CPU-only: NVRTC through cuda.core; skipped where cuda.core is missing."""
import re
from pathlib import Path

import pytest

from pymglu import cuda as pymglu_cuda

SOURCE = Path(__file__).resolve().parents[2] / "benchmarks" / "probe_masked_gemm.cu"
ENTRIES = {"rs_dense", "rs_masked", "rs_alu_only", "rs_loads_only", "rs_dense_tma_store", "rs_masked_tma_store",
           "rs_dense_no_store", "rs_dense_pair", "rs_masked_pair", "rs_dense_pair_no_store",
           "rs_dense_direct_store", "rs_masked_direct_store", "rs_dense_chunk_store", "rs_masked_chunk_store"}


def test_probe_compiles_for_sm90a_without_spills_or_serialised_wgmma():
    core = pytest.importorskip("cuda.core")
    import cuda.pathfinder

    include = cuda.pathfinder.find_nvidia_header_directory("cudart")
    options = core.ProgramOptions(arch="sm_90a", std="c++17", include_path=[include, str(pymglu_cuda.source_dir())],
                                  ptxas_options=["-v"])

    class Log:
        text = ""

        def write(self, s):
            self.text += s

    log = Log()
    core.Program(SOURCE.read_text(), "c++", options=options).compile("cubin", logs=log)
    entries = set(re.findall(r"Compiling entry function '(\w+)'", log.text))
    assert entries == ENTRIES, log.text[:2000]
    assert not re.search(r"[1-9]\d* bytes spill (stores|loads)", log.text), log.text
    assert "C7514" not in log.text, log.text
