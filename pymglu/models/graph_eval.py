"""``GraphEvaluation``: a :class:`~pymglu.models.training.Trainer`'s validation passes replayed as CUDA graphs.

:meth:`Trainer.evaluate` runs the model's loss on the same validation batches at every evaluation. Each
forward pass launches a few hundred kernels from Python; for the small models of ``compare_ffn.py`` that
is several times the GPU's work. This class records the pass once per batch shape (the last batch may be
shorter) and replays it for every batch: per batch one copy of the ids and targets into the graph's input
buffers, one ``cudaGraphLaunch`` and one device copy of the loss.

As for the training step (:mod:`pymglu.models.graph_step`): the first evaluation of a batch shape runs
eagerly (kernels compiled), the next one records it, with allocations from a private pool, on the
training step's stream. The recorded pass reads the parameters in place, so it stays valid while they
are updated in place; it is dropped, and recorded again, when a parameter's array, an MGLU layer's
bit-plane array (:meth:`pymglu.nn.MGLU._current_packed`, brought up to date before every evaluation) or
a kernel switch changes. Batches of at most :data:`pymglu.cuda.flash_mglu.MAX_TOKENS` tokens are never
recorded: the MGLU layers serve them with FlashMGLU, from a weight copy rebuilt whenever ``W`` changes.

The arithmetic is the eager pass's: the same kernels with the same arguments.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu.models.graph_step import _POOLS, _same

__all__ = ["GraphEvaluation"]


class GraphEvaluation:
    """Replays ``forward(x, y) -> loss Tensor`` (run by the caller in eval mode under ``no_grad``) per
    batch shape; see the module docstring.

    Args:
        model: the model whose parameters the passes read.
        forward: one validation pass on device batches.
        stream: the CuPy stream to record on (the training step's; non-blocking).
    """

    def __init__(self, model: Any, forward: Any, stream: Any) -> None:
        import cupy as cp

        self.model, self.forward, self.stream = model, forward, stream
        self.pool = cp.cuda.MemoryPool()
        _POOLS.append(self.pool)
        self.captures = 0  #: passes recorded so far (tests read it)
        self._graphs: dict[tuple, tuple[Any, Any, Any, Any]] = {}  # shape key -> (graph, x, y, loss)
        self._seen: set[tuple] = set()
        self._key: tuple = ()

    def losses(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> list[Any]:
        """The loss of each ``(x, y)`` host batch, as 0-d device arrays, in order (no host synchronisation)."""
        import cupy as cp

        key = self._make_key()
        if not _same(key, self._key):
            self.release()
            self._key = key
        out = []
        for x, y in batches:
            shape = (x.shape, x.dtype.str, y.shape, y.dtype.str)
            recorded = self._graphs.get(shape)
            if recorded is None and (shape not in self._seen or x.size <= _max_flash_tokens()):
                self._seen.add(shape)
                out.append(self._eager(x, y))
                continue
            if recorded is None:
                recorded = self._graphs[shape] = self._capture(x, y)
            else:
                recorded[1][...] = cp.asarray(x)
                recorded[2][...] = cp.asarray(y)
            recorded[0].launch(stream=cp.cuda.get_current_stream())
            out.append(recorded[3].copy())
        return out

    def release(self) -> None:
        """Drop every recorded pass; the next evaluation of each shape runs eagerly first."""
        self._graphs.clear()
        self._seen.clear()
        self.pool.free_all_blocks()

    def _eager(self, x: np.ndarray, y: np.ndarray) -> Any:
        import cupy as cp

        caller = cp.cuda.get_current_stream()
        self.stream.wait_event(caller.record())
        with self.stream, cp.cuda.using_allocator(self.pool.malloc):  # the capture reuses these buffers
            loss = self.forward(cp.asarray(x), cp.asarray(y)).data
        caller.wait_event(self.stream.record())
        return loss

    def _capture(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any, Any, Any]:
        import cupy as cp

        from pymglu.cuda.capture import record_graph

        xd, yd = cp.asarray(x), cp.asarray(y)
        graph, loss = record_graph(self.stream, lambda: self.forward(xd, yd).data, self.pool)
        if not _same(self._make_key(), self._key):  # a layer packed its masks inside the recorded pass
            raise RuntimeError("graph: an MGLU layer changed its bit-plane array while the validation pass was "
                               "recorded; evaluate with graph=False")
        self.captures += 1
        return graph, xd, yd, loss

    def _make_key(self) -> tuple:
        from pymglu.cuda import training
        from pymglu.nn.mglu import MGLU

        packed = tuple(m._current_packed() for m in self.model.modules() if isinstance(m, MGLU))
        return tuple(p.data for p in self.model.parameters()), packed, training.ENABLED


def _max_flash_tokens() -> int:
    from pymglu.cuda import flash_mglu

    return flash_mglu.MAX_TOKENS
