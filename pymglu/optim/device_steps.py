"""Step counts kept on the device, for updates whose skip is decided there.

A float16 step under a loss scaler kept on the device (:meth:`pymglu.amp.DynamicLossScaler.hold_on_device`)
may be skipped without the host knowing: the found-inf flag stays on the device, and the optimizer's
fused kernels read it. A skipped step must not count, and AdamW's bias corrections depend on the count,
so the counts of such steps live in one device array (:class:`DeviceSteps`), advanced by the kernel that
computes the step scalars (:func:`pymglu.cuda.optimizers.adamw_device_rows`), and are copied back into the
optimizer's host state only when something on the host needs them (:meth:`pymglu.optim.Optimizer.settle_steps`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["DeviceSteps"]


class DeviceSteps:
    """The step counts of an ordered list of parameters, one int64 per parameter in a CuPy array.

    Args:
        params: the parameters, in the order of the optimizer's step-scalar rows.
        counts: their step counts on the host (0 for a parameter without state yet).
        like: a CuPy array on the device to hold the counts.

    Made outside any CUDA graph capture (the upload would be replayed, resetting the counts): the
    optimizer refuses to make one while capturing.
    """

    def __init__(self, params: Sequence[Any], counts: Sequence[int], like: Any) -> None:
        import cupy as cp

        self.params = list(params)
        self.ids = tuple(id(p) for p in self.params)
        with like.device:
            #: ``(len(params),)`` int64: each parameter's step count, advanced on the device.
            self.counts = cp.asarray(np.asarray(counts, dtype=np.int64))

    def matches(self, params: Sequence[Any]) -> bool:
        """Whether these counts belong to exactly ``params``, in that order."""
        return tuple(id(p) for p in params) == self.ids

    def read(self) -> list[int]:
        """The counts as Python ints (a device-to-host copy: waits for the queued steps)."""
        return [int(c) for c in self.counts.get()]

    def write(self, counts: Sequence[int]) -> None:
        """Overwrite the counts in place (a captured graph keeps reading the same array)."""
        self.counts.set(np.asarray(counts, dtype=np.int64))
