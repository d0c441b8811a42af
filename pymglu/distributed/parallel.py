"""Data parallelism: every rank holds the whole model, trains on its share of each global batch, and
averages gradients with the others before the optimizer step.

Order of a step (what :class:`pymglu.models.training.Trainer` does when given a :class:`DataParallel`):
sample the global batch (same sampler state on every rank) -> :meth:`DataParallel.shard_batch` keeps this
rank's rows -> forward, ``loss.backward()`` -> :meth:`DataParallel.reduce_gradients` (one all-reduce per
bucket, gradients divided by the world size) -> clipping and the optimizer step, identical on every rank.

Overlap (``overlap=True``, the default): buckets are planned in reverse parameter order (the order in which
backward produces gradients), and a gradient hook on every parameter starts a bucket's all-reduce as soon
as the backward pass has stored all of its gradients, provided every earlier bucket has started (all
ranks start them in the same order). On a GPU with NCCL the reduction then runs on its own stream while
backward goes on; with MPI the non-blocking all-reduce progresses when MPI is next called.
:meth:`DataParallel.reduce_gradients` starts what is left and makes the compute stream wait for every
reduction (NCCL: without blocking the host); the presence flags are read back, in one copy, only when this
rank lacks a gradient. :meth:`DataParallel.synchronize` is the bounded host wait for reductions still
running; :meth:`DataParallel.shard_batch` calls it at the start of each step. Overlap assumes one backward
pass per :meth:`reduce_gradients`; for gradient accumulation over several passes use ``overlap=False``.
With NCCL (``comm.confirm_first_step``) the first step does not overlap and its reductions are waited for
on the host: kernels are loaded at their first launch, and a load behind a reduction that never ends
would hang beyond any poll.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from pymglu.backend import get_array_module
from pymglu.distributed.buckets import Bucket, PendingBucket, finish_buckets, plan_buckets, start_bucket
from pymglu.distributed.comm import Communicator, DistributedError, LocalCommunicator

__all__ = ["DataParallel", "config_digest"]

#: default bucket size: 25 MiB of gradient per all-reduce.
DEFAULT_BUCKET_BYTES = 25 * 2**20


def config_digest(text: str) -> np.ndarray:
    """SHA-256 of ``text`` as 4 int64 words ``(4,)``: what ranks compare in :meth:`DataParallel.handshake`."""
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.int64).copy()


class DataParallel:
    """Gradient averaging and parameter broadcast for a model replicated on every rank.

    Args:
        model: a :class:`pymglu.nn.Module`; its parameters (same order on every rank) are what is reduced.
        comm: the :class:`Communicator` (``None``: :class:`LocalCommunicator`, world size 1).
        bucket_bytes: gradient bytes per all-reduce (see :mod:`pymglu.distributed.buckets`).
    """

    def __init__(self, model: Any, comm: Communicator | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = True) -> None:
        self.model = model
        self.comm = comm if comm is not None else LocalCommunicator()
        self.params = list(model.parameters())
        self.overlap = bool(overlap)
        order = list(reversed(self.params)) if self.overlap else self.params
        self.buckets: list[Bucket] = plan_buckets(order, bucket_bytes)
        self._bucket_of = {id(p): k for k, b in enumerate(self.buckets) for p in b.params}
        self._pending: list[PendingBucket] = []
        self._ready: list[set[int]] = [set() for _ in self.buckets]
        self._removers = [p.register_grad_hook(self._on_grad) for p in self.params] if self.overlap else []
        #: whether a step's reductions were seen complete on the host (``comm.confirm_first_step``): until
        #: then no bucket starts during backward, and reduce_gradients waits for the reductions
        self.confirmed = not getattr(self.comm, "confirm_first_step", False)

    def _on_grad(self, p: Any) -> None:
        """Gradient hook: note ``p`` ready and start every bucket, in order, whose gradients are all ready."""
        k = self._bucket_of[id(p)]
        if id(p) in self._ready[k]:
            raise DistributedError(
                f"rank {self.rank}: DataParallel(overlap=True) got a second gradient for a parameter of shape "
                f"{p.shape} before reduce_gradients(); with several backward passes per step (gradient "
                "accumulation) use DataParallel(..., overlap=False)")
        self._ready[k].add(id(p))
        while (self.confirmed and len(self._pending) < len(self.buckets)
               and len(self._ready[len(self._pending)]) == len(self.buckets[len(self._pending)].params)):
            self._pending.append(start_bucket(self.comm, self.buckets[len(self._pending)]))

    def detach_hooks(self) -> None:
        """Remove the gradient hooks (the model can then be used without this DataParallel)."""
        for remove in self._removers:
            remove()
        self._removers = []

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that prints and writes checkpoints."""
        return self.comm.is_main

    # ----------------------------------------------------------------- start
    def handshake(self, config: str, expected_world_size: int | None = None) -> None:
        """Check that every rank runs the same configuration in the same world; raise
        :class:`DistributedError` on every rank, naming what differs, otherwise.

        Args:
            config: text describing everything that must agree (model config, training settings, ...);
                ranks compare its SHA-256.
            expected_world_size: the world size this rank was told to expect (``None``: any).

        Bounded by the communicator's timeout: a rank that never reaches the handshake makes the others
        raise :class:`~pymglu.distributed.comm.DistributedTimeoutError`.
        """
        mine = np.concatenate([[self.size, -1 if expected_world_size is None else expected_world_size,
                                self._n_param_elements()], config_digest(config)]).astype(np.int64)
        rows = self.comm.allgather_int64(mine)
        problems = []
        if rows.shape[0] != self.size:
            problems.append(f"{rows.shape[0]} ranks answered in a world of size {self.size}")
        expected = sorted({int(r[1]) for r in rows if r[1] >= 0})
        if any(e != self.size for e in expected):
            problems.append(f"world size {self.size} but ranks expected {expected}")
        if len({int(r[2]) for r in rows}) > 1:
            problems.append("parameter counts differ: " + ", ".join(f"rank {i}: {int(r[2])}" for i, r in enumerate(rows)))
        digests = [tuple(int(v) for v in r[3:]) for r in rows]
        if len(set(digests)) > 1:
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, d in enumerate(digests):
                groups.setdefault(d, []).append(i)
            problems.append("configurations differ between ranks (same configuration: "
                            + "; ".join(f"ranks {v}" for v in groups.values()) + ")")
        if problems:
            raise DistributedError(f"rank {self.rank}: startup handshake failed: " + "; ".join(problems)
                                   + "; launch every rank with the same arguments and the expected -n")

    def _n_param_elements(self) -> int:
        return int(sum(p.size for p in self.params))

    def broadcast_parameters(self, root: int = 0) -> None:
        """Overwrite every parameter with ``root``'s values (float16/bfloat16 travel as exact float32)."""
        for bucket in self.buckets:
            xp = get_array_module(bucket.params[0].data)
            buf = xp.empty(bucket.numel, dtype=bucket.dtype)
            for p, off in zip(bucket.params, bucket.offsets):
                buf[off:off + p.size] = p.data.reshape(-1).astype(bucket.dtype)
            self.comm.broadcast_(buf, root=root)
            for p, off in zip(bucket.params, bucket.offsets):
                p.data[...] = buf[off:off + p.size].reshape(p.shape).astype(p.dtype)
                if hasattr(p, "mark_modified"):
                    p.mark_modified()

    # ----------------------------------------------------------------- every step
    def shard_batch(self, *arrays: np.ndarray, in_flight: int = 0) -> tuple[np.ndarray, ...]:
        """This rank's rows of each ``(B, ...)`` array: rows ``[rank * B/size, (rank + 1) * B/size)``.
        ``B`` must be a multiple of the world size (equal shards make the mean of the ranks' mean losses
        the mean loss of the global batch). Calls :meth:`synchronize` first, with ``in_flight``."""
        self.synchronize(in_flight)
        out = []
        for a in arrays:
            b = a.shape[0]
            if b % self.size:
                raise ValueError(f"shard_batch: batch of {b} rows does not split into {self.size} equal shards")
            k = b // self.size
            out.append(a[self.rank * k:(self.rank + 1) * k])
        return tuple(out)

    def reduce_gradients(self) -> None:
        """Average every parameter's gradient over the ranks, one all-reduce per bucket: start the buckets
        the backward pass has not started yet (in order), wait for all, and install the averages."""
        pending, self._pending = self._pending, []
        self._ready = [set() for _ in self.buckets]
        for bucket in self.buckets[len(pending):]:
            pending.append(start_bucket(self.comm, bucket))
        finish_buckets(self.comm, pending, confirm=not self.confirmed)
        self.confirmed = True

    def synchronize(self, in_flight: int = 0) -> None:
        """Wait on the host, bounded by the communicator's timeout, for the gradient reductions still
        running (on a GPU they do not block the host). Call it before anything that reads results back
        to the host or copies data from pageable host memory, which could otherwise wait forever on a
        stream held up by a reduction that never ends; :meth:`shard_batch` and the Trainer's loss
        read-back call it. Raises the communicator's error on a timeout or a failed reduction.

        ``in_flight``: how many of the most recent watched replays (:meth:`watch_replay`) may still run.
        A CUDA-graph step whose host work before its launch never waits on the device (its inputs go
        through pinned buffers) passes 1, so that the host prepares step ``k + 1`` while replay ``k`` runs;
        a replay that never ends is then caught one step later."""
        self.comm.check_pending(in_flight)

    def watch_replay(self, stream: Any) -> None:
        """After a replayed CUDA graph that holds this step's reductions was launched on ``stream``: let
        :meth:`synchronize` wait for it (bounded by the communicator's timeout), as it waits for the
        reductions of an eager step."""
        self.comm.watch(stream.record())

    def register_graph_release(self, release: Any) -> None:
        """``release()`` drops a CUDA graph that records this step's reductions; the communicator calls it
        before it aborts (:meth:`Communicator.register_graph_release`)."""
        self.comm.register_graph_release(release)

    def reset_pending(self) -> None:
        """Forget the buckets started since the last :meth:`reduce_gradients` (after a step that will not
        run, e.g. a CUDA graph capture that failed)."""
        self._pending = []
        self._ready = [set() for _ in self.buckets]

    def mean(self, value: float) -> float:
        """The mean over ranks of a host scalar (e.g. the loss of each rank's shard)."""
        if self.size == 1:
            return float(value)
        xp = get_array_module(self.params[0].data) if self.params else np
        buf = xp.asarray([value], dtype=np.float64)
        self.comm.all_reduce_sum_(buf)
        return float(buf[0]) / self.size
