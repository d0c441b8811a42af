"""benchmarks/probe_sparse_wgmma.cu (the issue-4 probe of the 2:4-sparse wgmma route) compiles for sm_90a
with every variant that probe_sparse_wgmma.py launches, no register spills and no wgmma serialisation
(ptxas's C7513 and C7514 remarks: a serialised sparse wgmma would make the probe measure the wrong thing).
CPU-only: NVRTC through cuda.core; skipped where cuda.core is missing."""
import importlib.util
import re
from pathlib import Path

from nvrtc_helpers import ptxas_log

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _driver():
    spec = importlib.util.spec_from_file_location("probe_sparse_wgmma", BENCHMARKS / "probe_sparse_wgmma.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_compiles_for_sm90a_without_spills_or_serialised_wgmma():
    driver = _driver()
    log = ptxas_log((BENCHMARKS / "probe_sparse_wgmma.cu").read_text(), "sm_90a", cudart_headers=False)
    entries = set(re.findall(r"Compiling entry function '(\w+)'", log))
    assert entries == set(driver.VARIANTS), log[:2000]
    assert not re.search(r"[1-9]\d* bytes spill (stores|loads)", log), log
    assert "C7513" not in log and "C7514" not in log, log


def test_probe_stages_fit_in_shared_memory():
    driver = _driver()
    for name, (sparse, n, ring) in driver.VARIANTS.items():
        assert driver.smem_bytes(sparse, n, ring) <= 227 * 1024, name
        a, b, e = driver.stage_bytes(sparse, n)
        assert b == n * 64 * 2 * (2 if sparse else 1) and a == 128 * 64 * 2 and e == (2048 if sparse else 0)
