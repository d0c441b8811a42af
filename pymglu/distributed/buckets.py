"""Gradient buckets: several parameters' gradients flattened into one contiguous buffer, reduced with one
all-reduce.

A bucket's buffer is 1-d, of the bucket's reduce dtype (float64 for float64 parameters, float32 for every
other parameter: float16 and bfloat16 gradients are summed in float32), laid out as
``[grad of param 0 | grad of param 1 | ... | one presence flag per parameter]``. The flags (1.0 where a
rank has a gradient, 0.0 where ``p.grad`` is ``None``) are summed with the gradients, so the ranks agree
on which parameters get a gradient without a second collective: a missing gradient counts as zeros, and
a parameter that no rank gave a gradient keeps ``grad = None``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from pymglu.backend import get_array_module, unwrap
from pymglu.distributed.comm import Communicator

__all__ = ["Bucket", "PendingBucket", "plan_buckets", "reduce_dtype", "start_bucket", "finish_buckets"]


def reduce_dtype(dtype: Any) -> np.dtype:
    """The dtype gradients of a ``dtype`` parameter are summed in: float64 stays, all else float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Parameters reduced together.

    Attributes:
        params: the parameters, in model order.
        offsets: start of each parameter's gradient in the flat buffer (elements).
        numel: number of gradient elements (the buffer holds ``numel + len(params)`` elements).
        dtype: the buffer's dtype (:func:`reduce_dtype` of the parameters').
    """

    params: tuple[Any, ...]
    offsets: tuple[int, ...]
    numel: int
    dtype: np.dtype


def plan_buckets(params: Sequence[Any], bucket_bytes: int) -> list[Bucket]:
    """Split ``params`` (in order) into buckets of at most ``bucket_bytes`` bytes of gradient each, one
    reduce dtype per bucket; a parameter larger than ``bucket_bytes`` gets a bucket of its own. Every
    rank computes the same plan from the same model, so the buckets match across ranks."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes: expected >= 1, got {bucket_bytes}")
    open_buckets: dict[np.dtype, list[Any]] = {}
    done: list[list[Any]] = []
    for p in params:
        dt = reduce_dtype(p.dtype)
        current = open_buckets.setdefault(dt, [])
        size = sum(q.size for q in current) * dt.itemsize
        if current and size + p.size * dt.itemsize > bucket_bytes:
            done.append(current)
            current = open_buckets[dt] = []
        current.append(p)
    done.extend(b for b in open_buckets.values() if b)
    buckets = []
    for group in done:
        offsets = tuple(int(x) for x in np.cumsum([0] + [q.size for q in group])[:-1])
        buckets.append(Bucket(tuple(group), offsets, int(sum(q.size for q in group)), reduce_dtype(group[0].dtype)))
    return buckets


@dataclasses.dataclass
class PendingBucket:
    """A bucket whose all-reduce was started: its buffer and the communicator's handle."""

    bucket: Bucket
    buf: Any
    handle: Any


def start_bucket(comm: Communicator, bucket: Bucket) -> PendingBucket:
    """Copy ``bucket``'s gradients and presence flags into a fresh buffer and start its all-reduce.

    Only the slices of missing gradients and the flags are zeroed: the gradients overwrite the rest, so
    the buffer is not cleared first (a whole pass over it, 0.94 GB per step for the large benchmark model).
    """
    xp = get_array_module(bucket.params[0].data)
    buf = xp.empty(bucket.numel + len(bucket.params), dtype=bucket.dtype)
    buf[bucket.numel:] = 0
    for i, (p, off) in enumerate(zip(bucket.params, bucket.offsets)):
        if p.grad is not None:
            buf[off:off + p.size] = unwrap(p.grad).reshape(-1)
            buf[bucket.numel + i] = 1.0
        else:
            buf[off:off + p.size] = 0
    return PendingBucket(bucket, buf, comm.all_reduce_sum_start(buf))


def finish_buckets(comm: Communicator, pending: Sequence[PendingBucket], confirm: bool = False) -> None:
    """Wait for the started reductions (:meth:`Communicator.wait_all`: on a GPU the host does not block),
    divide by the world size and point each ``p.grad`` at its averaged slice. A parameter that no rank gave
    a gradient keeps ``grad = None``; deciding that needs the summed presence flags on the host (one copy
    for all buckets, which waits for the reductions), so they are read only when this rank lacks a
    gradient: when it has them all, every flag is at least 1. ``confirm``: also wait on the host for the
    reductions (:meth:`Communicator.check_pending`, bounded) before launching anything after them."""
    if not pending:
        return
    locally_missing = any(p.grad is None for pb in pending for p in pb.bucket.params)
    comm.wait_all([pb.handle for pb in pending])
    if confirm:
        comm.check_pending()
    if comm.size > 1:
        for pb in pending:
            pb.buf[:pb.bucket.numel] /= comm.size
    present: Any = None
    if locally_missing:
        xp = get_array_module(pending[0].buf)
        flags = xp.concatenate([pb.buf[pb.bucket.numel:] for pb in pending])
        present = flags.get() if hasattr(flags, "get") else flags
    k = 0
    for pb in pending:
        b = pb.bucket
        for p, off in zip(b.params, b.offsets):
            keep = present is None or present[k] > 0
            p.grad = pb.buf[off:off + p.size].reshape(p.shape) if keep else None
            k += 1
