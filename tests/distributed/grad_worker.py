"""Rank worker of test_mpi.py: averaged gradients of a small float64 Transformer (SwiMGLU FFN).

    mpiexec -n 2 python grad_worker.py OUT.npz [mpi|nccl]

With ``nccl`` every rank uses its own GPU (CuPy arrays, the NCCL backend); ``mpi`` (the default) runs on
the CPU.

Every rank builds the same model and global batch (seeded), perturbs its parameters unless it is rank 0
(so that the broadcast is what makes them equal), broadcasts rank 0's, runs forward and backward on its
shard, and averages the gradients through a bucket cap small enough to make several buckets (overlapped
with the backward pass). Rank 0
writes the averaged gradients to OUT.npz; a second reduction, where rank 1 drops one gradient, is
written under ``partial/`` with rank 0's own local gradient under ``local/``.
"""
from __future__ import annotations

import sys

import numpy as np

from pymglu.distributed import DataParallel, init_communicator
from pymglu.models import Transformer, TransformerConfig

CONFIG = TransformerConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=24, ffn_kind="swimglu", n_masks=2,
                           max_seq_len=8, dtype="float64")
BATCH = 4


def batch() -> tuple[np.ndarray, np.ndarray]:
    """The global batch: ``(BATCH, 8)`` int64 inputs and targets."""
    ids = np.random.default_rng(7).integers(0, CONFIG.vocab_size, size=(BATCH, CONFIG.max_seq_len + 1))
    return ids[:, :-1], ids[:, 1:]


def model() -> Transformer:
    return Transformer(CONFIG, rng=3)


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.array(a)


def main(out: str, backend: str = "mpi") -> None:
    comm = init_communicator(backend, timeout=20.0)
    net = model()
    if backend == "nccl":
        net.to("cuda")  # the communicator made this rank's GPU the current device
    if comm.rank:
        for p in net.parameters():
            p.data = p.data + 1.0
    dp = DataParallel(net, comm, bucket_bytes=4096)
    assert len(dp.buckets) > 2, len(dp.buckets)
    dp.handshake(CONFIG.to_json(), expected_world_size=comm.size)
    dp.broadcast_parameters()
    x, y = dp.shard_batch(*batch())
    if backend == "nccl":
        import cupy as cp

        x, y = cp.asarray(x), cp.asarray(y)
    names = [n for n, _ in net.named_parameters()]

    net.loss(x, y).backward()
    dp.reduce_gradients()
    full = {n: _host(p.grad) for n, p in net.named_parameters()}

    # a gradient dropped between backward and the reduction: only seen without overlap
    dp.detach_hooks()
    dp = DataParallel(net, comm, bucket_bytes=4096, overlap=False)
    for p in net.parameters():
        p.grad = None
    net.loss(x, y).backward()
    local = {n: _host(p.grad) for n, p in net.named_parameters()}
    dropped = dict(net.named_parameters())[names[1]]
    if comm.rank == 1:
        dropped.grad = None
    dp.reduce_gradients()
    partial = {n: _host(p.grad) for n, p in net.named_parameters()}
    if comm.rank == 0:
        np.savez(out, dropped=names[1], **{f"full/{n}": v for n, v in full.items()},
                 **{f"local/{n}": v for n, v in local.items()}, **{f"partial/{n}": v for n, v in partial.items()})


if __name__ == "__main__":
    main(*sys.argv[1:])
