"""benchmarks/probe_masked_gemm.cu (the issue-4 masked-GEMM probe) still compiles for sm_90a, with no
register spills and no wgmma serialisation (ptxas's C7514 remark), so that the probe keeps measuring the
kernel it describes. CPU-only: NVRTC through cuda.core; skipped where cuda.core is missing."""
import re
from pathlib import Path

from nvrtc_helpers import ptxas_log

SOURCE = Path(__file__).resolve().parents[2] / "benchmarks" / "probe_masked_gemm.cu"
ENTRIES = {"rs_dense", "rs_masked", "rs_alu_only", "rs_loads_only", "rs_dense_tma_store", "rs_masked_tma_store",
           "rs_dense_no_store", "rs_dense_pair", "rs_masked_pair", "rs_dense_pair_no_store",
           "rs_dense_direct_store", "rs_masked_direct_store", "rs_dense_chunk_store", "rs_masked_chunk_store"}


def test_probe_compiles_for_sm90a_without_spills_or_serialised_wgmma():
    log = ptxas_log(SOURCE.read_text(), "sm_90a")
    entries = set(re.findall(r"Compiling entry function '(\w+)'", log))
    assert entries == ENTRIES, log[:2000]
    assert not re.search(r"[1-9]\d* bytes spill (stores|loads)", log), log
    assert "C7514" not in log, log
