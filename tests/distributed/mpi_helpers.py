"""Helpers of the distributed tests: find ``mpiexec`` and run a command under it with a time limit.

A plain module (not conftest.py), imported as ``from mpi_helpers import ...``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pymglu.distributed import mpi_available

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TRAIN_LM = ROOT / "examples" / "train_lm.py"


def mpiexec() -> str | None:
    """``mpiexec`` beside this Python (the ``mpich`` wheel installs it into the venv), else on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


#: skip marker for tests that launch ranks.
needs_mpi = pytest.mark.skipif(not mpi_available() or mpiexec() is None,
                               reason="needs mpi4py and mpiexec (pip install -e '.[distributed]')")


def run_mpi(*rank_commands: list[str], timeout: float = 60.0) -> tuple[subprocess.CompletedProcess, float]:
    """Run one command per rank (MPMD: ``mpiexec -n 1 cmd0 : -n 1 cmd1 ...``) with ``python`` prepended;
    returns the finished process (stdout and stderr merged) and its wall time in seconds. Fails the
    test if the job outlives ``timeout``."""
    argv = [mpiexec()]
    for i, cmd in enumerate(rank_commands):
        argv += ([":"] if i else []) + ["-n", "1", sys.executable, *map(str, cmd)]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="error")
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the MPI job did not end within {timeout} s (a hang): {e.output!r}")
    return proc, time.monotonic() - start
