"""Two MPI ranks launched by mpiexec from pytest: averaged gradients, training curve, rank-0 checkpoint and
resume at world size 1, and bounded failures (mismatched configuration or world size, a rank that leaves
or crashes). Skipped without mpi4py and mpiexec."""
from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import pytest

from mpi_helpers import HERE, TRAIN_LM, needs_mpi, run_mpi
from pymglu import io

sys.path.insert(0, str(HERE))
import grad_worker  # noqa: E402

pytestmark = needs_mpi

TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "48", "--seq-len", "16", "--batch-size", "4",
        "--eval-batches", "1", "--sample-tokens", "0", "--no-progress", "--seed", "3", "--warmup", "2"]


def test_averaged_gradients_equal_the_single_process_gradients(tmp_path):
    out = tmp_path / "grads.npz"
    proc, _ = run_mpi(*[[HERE / "grad_worker.py", out]] * 2, timeout=60)
    assert proc.returncode == 0, proc.stdout
    saved = np.load(out)
    net = grad_worker.model()
    x, y = grad_worker.batch()
    net.loss(x, y).backward()
    names = [n for n, _ in net.named_parameters()]
    assert any("mask_logits" in n for n in names)
    dtypes = {str(p.dtype) for _, p in net.named_parameters()}
    assert dtypes == {"float64", "float32"}  # float64 weights; mask logits stay float32 (DESIGN.md)
    for n, p in net.named_parameters():
        assert saved[f"full/{n}"].dtype == p.dtype
        tight = p.dtype == np.float64
        np.testing.assert_allclose(saved[f"full/{n}"], p.grad, rtol=1e-11 if tight else 2e-5,
                                   atol=1e-14 if tight else 1e-8, err_msg=n)
    # a gradient that rank 1 lacks counts as zeros there: the mean is rank 0's half
    dropped = str(saved["dropped"])
    np.testing.assert_allclose(saved[f"partial/{dropped}"], saved[f"local/{dropped}"] / 2, rtol=1e-12)
    other = names[0]
    np.testing.assert_allclose(saved[f"partial/{other}"], saved[f"full/{other}"], rtol=1e-12, atol=1e-15)


def _run_in_process(args: list[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_lm_for_mpi_test", TRAIN_LM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(args) == 0


def test_two_rank_training_matches_one_process_and_resumes_at_world_size_one(tmp_path, capsys):
    dist, single = tmp_path / "dist", tmp_path / "single"
    proc, _ = run_mpi(*[[TRAIN_LM, "--distributed", "--world-size", "2", "--out", dist, "--steps", "4",
                         "--eval-every", "2", *TINY]] * 2, timeout=60)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("data parallel: 2 ranks") == 1 and proc.stdout.count("step     4 |") == 1, proc.stdout
    _run_in_process(["--out", str(single), "--steps", "4", "--eval-every", "2", *TINY])
    d_metrics = json.loads((dist / "metrics.json").read_text())
    s_metrics = json.loads((single / "metrics.json").read_text())
    assert d_metrics["world_size"] == 2 and s_metrics["world_size"] == 1
    np.testing.assert_allclose(d_metrics["train_loss"], s_metrics["train_loss"], rtol=2e-5)
    np.testing.assert_allclose(d_metrics["val_loss"], s_metrics["val_loss"], rtol=2e-5)
    assert d_metrics["tokens"] == s_metrics["tokens"] == 4 * 4 * 16
    d_state, d_meta = io.read_checkpoint(dist / "checkpoint.safetensors")
    s_state, _ = io.read_checkpoint(single / "checkpoint.safetensors")
    assert d_meta["train.world_size"] == "2" and set(d_state) == set(s_state)
    for k in s_state:
        np.testing.assert_allclose(d_state[k], s_state[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert not [p.name for p in dist.iterdir() if p.name.endswith(".tmp")]  # no half-written file left

    # the 2-rank checkpoint resumes in one process exactly as the 1-process checkpoint does
    _run_in_process(["--out", str(dist), "--steps", "7", "--eval-every", "2", "--resume", *TINY])
    _run_in_process(["--out", str(single), "--steps", "7", "--eval-every", "2", "--resume", *TINY])
    d_metrics = json.loads((dist / "metrics.json").read_text())
    s_metrics = json.loads((single / "metrics.json").read_text())
    assert len(d_metrics["train_loss"]) == 7 and d_metrics["world_size"] == 1
    np.testing.assert_allclose(d_metrics["train_loss"], s_metrics["train_loss"], rtol=1e-4)
    capsys.readouterr()


@pytest.mark.parametrize("rank1_args, message", [
    (["--d-model", "48"], "configurations differ between ranks"),
    (["--world-size", "3"], "world size 2 but ranks expected [3]"),
])
def test_mismatched_ranks_fail_fast_with_a_clear_message(tmp_path, rank1_args, message):
    common = [TRAIN_LM, "--distributed", "--out", tmp_path / "run", "--steps", "2", *TINY, "--dist-timeout", "60"]
    proc, seconds = run_mpi(common, common + rank1_args, timeout=150)
    assert proc.returncode != 0
    assert "startup handshake failed" in proc.stdout and message in proc.stdout, proc.stdout
    # failed at the handshake, not by the 60 s timeout (which would end the job after start-up + 60 s)
    assert seconds < 60, proc.stdout
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_a_rank_that_leaves_early_stops_the_others_within_the_timeout():
    proc, seconds = run_mpi(*[[HERE / "exit_worker.py", "clean", "2"]] * 2, timeout=90)  # a hang fails there
    assert proc.returncode == 5, proc.stdout
    assert "rank 0 stopped" in proc.stdout and "no answer from the other ranks after 2 s" in proc.stdout, proc.stdout
    assert "finished without an error" not in proc.stdout
    assert seconds >= 2


def test_a_crashing_rank_ends_the_job():
    proc, _ = run_mpi(*[[HERE / "exit_worker.py", "crash", "30"]] * 2, timeout=90)
    ended = time.time()
    assert proc.returncode != 0, proc.stdout
    assert "finished without an error" not in proc.stdout
    crashed = re.search(r"rank 1 crashes at ([0-9.]+)", proc.stdout)
    assert crashed, proc.stdout
    # ended by the launcher, well before rank 0's 30 s collective timeout; timed from the crash, since starting
    # two Python ranks alone can take tens of seconds on a loaded 2-core CI machine
    assert ended - float(crashed.group(1)) < 20, proc.stdout
