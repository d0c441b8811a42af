"""The Numba CUDA packer under Numba's CUDA simulator, in a process of its own.

``NUMBA_ENABLE_CUDASIM=1`` only takes effect when set before numba is first imported, so the checks run in
``_bitpack_sim_child.py`` as a subprocess; this test fails if the child fails, or does not report its cases.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pymglu

CHILD = Path(__file__).with_name("_bitpack_sim_child.py")
EXPECTED_CASES = 6 * 4 * 2 + 2 + 1 + 3


def test_packer_under_cuda_simulator_matches_numpy():
    env = dict(os.environ)
    env["NUMBA_ENABLE_CUDASIM"] = "1"
    root = str(Path(pymglu.__file__).resolve().parents[1])  # the pymglu under test, installed or not
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, str(CHILD)], env=env, capture_output=True, text=True, timeout=300)
    report = f"child exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, report
    lines = proc.stdout.strip().splitlines()
    assert lines, "the simulator child printed nothing\n" + report
    assert lines[-1] == f"SIMULATOR-OK {EXPECTED_CASES}", report
