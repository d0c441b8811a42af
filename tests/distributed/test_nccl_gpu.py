"""Two ranks on two GPUs through NCCL (gpu-marked; skipped without 2 GPUs, CuPy's NCCL or mpiexec):
averaged gradients equal the single-process gradients of the whole batch, and a 2-GPU training run
follows the 1-GPU curve of the same global batch; a rank that leaves makes the other stop within its
timeout."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from mpi_helpers import HERE, TRAIN_LM, needs_mpi, run_mpi
from pymglu.backend import gpu_available

sys.path.insert(0, str(HERE))
import grad_worker  # noqa: E402


def _gpus() -> int:
    if not gpu_available():
        return 0
    import cupy as cp

    try:
        from cupy.cuda import nccl  # noqa: F401
    except ImportError:
        return 0
    return cp.cuda.runtime.getDeviceCount()


pytestmark = [pytest.mark.gpu, needs_mpi,
              pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs and CuPy's NCCL")]

TINY = ["--d-model", "64", "--n-layers", "2", "--n-heads", "4", "--d-ff", "128", "--seq-len", "32", "--batch-size",
        "8", "--eval-batches", "2", "--sample-tokens", "0", "--no-progress", "--seed", "5", "--warmup", "2",
        "--device", "gpu"]


def test_nccl_gradients_equal_the_single_process_gradients(tmp_path):
    out = tmp_path / "grads.npz"
    proc, _ = run_mpi(*[[HERE / "grad_worker.py", out, "nccl"]] * 2, timeout=120)
    assert proc.returncode == 0, proc.stdout
    saved = np.load(out)
    net = grad_worker.model()
    x, y = grad_worker.batch()
    net.loss(x, y).backward()
    for n, p in net.named_parameters():
        tight = p.dtype == np.float64
        np.testing.assert_allclose(saved[f"full/{n}"], p.grad, rtol=1e-10 if tight else 2e-5,
                                   atol=1e-13 if tight else 1e-8, err_msg=n)
    dropped = str(saved["dropped"])
    np.testing.assert_allclose(saved[f"partial/{dropped}"], saved[f"local/{dropped}"] / 2, rtol=1e-12)


def test_two_gpu_training_follows_the_one_gpu_curve(tmp_path):
    dist, single = tmp_path / "dist", tmp_path / "single"
    proc, _ = run_mpi(*[[TRAIN_LM, "--distributed", "--world-size", "2", "--out", dist, "--steps", "20",
                         "--eval-every", "10", *TINY]] * 2, timeout=180)
    assert proc.returncode == 0, proc.stdout
    proc, _ = run_mpi([TRAIN_LM, "--out", single, "--steps", "20", "--eval-every", "10", *TINY], timeout=180)
    assert proc.returncode == 0, proc.stdout
    d = json.loads((dist / "metrics.json").read_text())
    s = json.loads((single / "metrics.json").read_text())
    assert d["world_size"] == 2 and s["world_size"] == 1
    np.testing.assert_allclose(d["train_loss"], s["train_loss"], rtol=1e-3)
    np.testing.assert_allclose(d["val_loss"], s["val_loss"], rtol=1e-3)
    assert not [p.name for p in dist.iterdir() if p.name.endswith(".tmp")]


def test_a_rank_that_leaves_early_stops_the_other_within_the_timeout():
    proc, seconds = run_mpi(*[[HERE / "exit_worker.py", "clean", "3", "nccl"]] * 2, timeout=120)
    assert proc.returncode == 5, proc.stdout
    assert "rank 0 stopped" in proc.stdout, proc.stdout
    assert ("no answer from the other ranks after 3 s" in proc.stdout or "a rank died" in proc.stdout), proc.stdout
    assert "finished without an error" not in proc.stdout
    assert seconds < 90


def test_a_stalled_rank_stops_the_other_within_the_timeout():
    proc, seconds = run_mpi(*[[HERE / "exit_worker.py", "stall", "3", "nccl"]] * 2, timeout=120)
    assert proc.returncode == 5, proc.stdout
    assert "rank 0 stopped" in proc.stdout and "after 3 s" in proc.stdout, proc.stdout
    assert "finished without an error" not in proc.stdout
    assert seconds < 60


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_graph_steps_over_two_gpus_follow_the_eager_steps(tmp_path, dtype):
    """The same 2-GPU run with every step after the second replayed from a CUDA graph that holds the NCCL
    reductions (--graph on fails if the trainer cannot record them), and with eager steps; in float16 the
    graph's ranks keep their loss scalers on the device, the eager ones on the host."""
    runs = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        proc, _ = run_mpi(*[[TRAIN_LM, "--distributed", "--world-size", "2", "--out", out, "--steps", "20",
                             "--eval-every", "10", "--dtype", dtype, "--graph", mode, *TINY]] * 2, timeout=180)
        assert proc.returncode == 0, proc.stdout
        runs[mode] = json.loads((out / "metrics.json").read_text())
    np.testing.assert_allclose(runs["on"]["train_loss"], runs["off"]["train_loss"], rtol=2e-2)
    np.testing.assert_allclose(runs["on"]["val_loss"], runs["off"]["val_loss"], rtol=2e-2)


def test_a_stalled_rank_stops_the_other_during_graph_replays():
    proc, seconds = run_mpi(*[[HERE / "graph_stall_worker.py", "3"]] * 2, timeout=120)
    assert proc.returncode == 5, proc.stdout
    assert "rank 1: 4 steps, the last two replayed" in proc.stdout, proc.stdout
    assert "rank 0 stopped" in proc.stdout and ("after 3 s" in proc.stdout or "a rank died" in proc.stdout), proc.stdout
    assert "finished without an error" not in proc.stdout
    assert seconds < 60
