"""``GraphTrainStep``: a :class:`~pymglu.models.training.Trainer`'s step on the GPU, replayed as a CUDA graph.

A training step of a small model launches about a thousand kernels from Python (the tape's forward and
backward, the clipping, one optimizer kernel per parameter). For the ``compare_ffn.py`` model the host
needs several times longer to launch them than the GPU needs to run them. This class records the whole
step once (CUDA stream capture) and replays it: per step one upload of the batch, one of the optimizer's
step scalars, one ``cudaGraphLaunch``, and host bookkeeping, with no host synchronisation.

How a step is served:

1. The first step after construction (or after anything the graph depends on changed) runs eagerly, on
   the class's stream and from its private memory pool: it compiles the kernels, creates the optimizer
   state, gives cuBLAS its workspace on that stream, leaves a gradient on every parameter that gets one,
   and leaves in the pool the freed buffers that the capture then reuses (so the device holds one step's
   buffers, not an eager step's in the default pool plus the graph's).
2. The next step is captured, with every allocation from a private memory pool (so that no one else is
   handed the graph's buffers) and with the optimizer kernels reading their step-dependent scalars
   (learning rate, bias corrections) from a device table (:meth:`pymglu.optim.Optimizer.step_scalars`);
   it is then launched.
3. Every later step copies the batch into the graph's input buffers and the optimizer's next scalars into
   the table, launches the graph on the current stream, and does on the host what the optimizer's
   :meth:`~pymglu.optim.Optimizer.step` does after its kernels (:meth:`~pymglu.optim.Optimizer.replayed_step`:
   step counts, parameter versions, the MGLU layers' bit-planes, master keys).

The arithmetic is the eager step's: the same kernels with the same arguments, so a replayed step gives
the eager step's values up to the order of atomic additions (the embedding gradient).

The graph reads and writes the arrays it was recorded with. Before each replay the class checks that
every parameter still has the same data array at the version the last step left, that the optimizer's
state arrays and hyper-parameters (other than the learning rate) are the same, that the clipping norm,
the MGLU layers' ``recompute`` flags and the kernel switches (:data:`pymglu.cuda.training.ENABLED`,
:data:`pymglu.cuda.optimizers.ENABLED`) are the same, and that the batch has the recorded shape and
dtype. If anything differs (a loaded checkpoint, an edited weight, a new weight decay) the graph is
dropped and the step runs eagerly; the step after that records a new graph.

Served (:func:`unsupported_reason` names what rules a trainer out, and the trainer then steps eagerly):
a model on CuPy in float32, bfloat16 or float16, one process or data parallelism over a communicator that can record its reductions
(``comm.capturable``: NCCL, or the one-process world), the fused training and optimizer kernels enabled
(:mod:`pymglu.cuda.training`, :mod:`pymglu.cuda.optimizers`; with them off, products run through CuPy's
cuBLAS wrappers, which refuse a capture), and an optimizer with
:meth:`~pymglu.optim.Optimizer.step_scalars` (AdamW, SGD).

Float16: the trainer's loss scaler is held on the device from the first step on
(:meth:`pymglu.amp.DynamicLossScaler.hold_on_device`), so the recorded step scales the loss by the device's
scale, decides on the device whether a gradient overflowed, and passes that flag to the optimizer's
kernels, which then leave everything unchanged. Since a skipped step must not count, the optimizer keeps
its step counts on the device too, and computes the rows of step scalars there from a table of
hyper-parameters that the host uploads before each replay (:meth:`pymglu.optim.Optimizer.next_hyper_rows`;
``Optimizer.step(skip=...)``). The host reads the scale, the skipped steps and the step counts back only
when asked (the scaler's and the optimizer's ``state_dict``, a checkpoint).

Data parallelism: the step's gradient reductions (started by the gradient hooks during the backward,
finished by :meth:`pymglu.distributed.DataParallel.reduce_gradients`) are recorded with the rest, the NCCL
kernels on the communicator's stream forked from and joined back into the capturing stream. Every rank
records and replays the same graph at the same step, so the reductions keep their order across ranks.
After each replay the communicator watches an event recorded behind it, so a later step's bounded host
poll (:meth:`~pymglu.distributed.DataParallel.synchronize`) still turns a rank that stopped into an
error instead of a hang. A replay's inputs (the batch, the optimizer's scalars) go to the device through
two alternating pinned host buffers, so nothing on the host waits for the device before a launch; the
trainer therefore lets one replay run while it prepares the next step (:attr:`GraphTrainStep.in_flight`),
and a replay that never ends is caught by the poll of the step after next. Any step that is not a
replay polls every pending reduction first (the eager step's uploads come from pageable memory).

Memory: the private pool keeps the buffers of one step (the eager step's peak) for the life of the graph.
Arrays the eager steps create and keep (optimizer state, the first gradients) live in it too; the pools
are kept for the life of the process (:data:`_POOLS`), each holding only what is in use after
:meth:`GraphTrainStep.release`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu.backend import is_cupy_array
from pymglu.cuda.staging import AlternatingUploads

__all__ = ["GraphTrainStep", "unsupported_reason"]

#: every private pool made here, kept for the life of the process: arrays from a pool (a parameter's
#: gradient, say) may outlive the object that made it, and with older CuPy a pool that is collected
#: takes its memory along. Each holds only what is still in use once its graph is released.
_POOLS: list[Any] = []


def unsupported_reason(trainer: Any) -> str | None:
    """Why ``trainer``'s steps cannot be captured, or ``None`` when they can."""
    from pymglu.cuda import optimizers, training

    params = list(trainer.model.parameters())
    if not params or not all(is_cupy_array(p.data) for p in params):
        return "the model is not on a GPU (CuPy arrays)"
    if trainer.parallel is not None:
        reason = _parallel_reason(trainer.parallel)
        if reason is not None:
            return reason
    if trainer.model.config.dtype not in ("float32", "bfloat16", "float16"):
        return f"the model is {trainer.model.config.dtype}, not float32, bfloat16 or float16"
    if not (optimizers.ENABLED and training.ENABLED):
        return "the fused optimizer or training kernels are disabled (pymglu.cuda.optimizers / training)"
    from pymglu.optim.optimizer import Optimizer

    if trainer.scaler is not None and type(trainer.optimizer).step_hyper is Optimizer.step_hyper:
        return (f"{type(trainer.optimizer).__name__} does not provide step_hyper(), which a loss-scaled step "
                "needs to skip its updates on the device")
    if trainer.scaler is None and type(trainer.optimizer).step_scalars is Optimizer.step_scalars:
        return f"{type(trainer.optimizer).__name__} does not provide step_scalars()"
    return None


def _parallel_reason(parallel: Any) -> str | None:
    """Why the data-parallel object's reductions cannot be recorded with the step, or ``None``."""
    comm = getattr(parallel, "comm", None)
    methods = ("watch_replay", "reset_pending", "register_graph_release")
    if comm is None or not all(hasattr(parallel, m) for m in methods):
        return (f"the data-parallel object ({type(parallel).__name__}) is not a pymglu.distributed.DataParallel "
                f"(no comm, {', '.join(methods)})")
    if not getattr(comm, "capturable", False):
        return f"the data-parallel communicator ({type(comm).__name__}) cannot record its reductions in a CUDA graph"
    return None


class GraphTrainStep:
    """Runs ``trainer``'s steps as replays of one captured CUDA graph (module docstring).

    Args:
        trainer: a :class:`~pymglu.models.training.Trainer` that :func:`unsupported_reason` accepts.
        body: ``body(x, y) -> loss Tensor``, one training step on device batches ``x, y`` ``(B, T)``
            (forward, backward, clipping, optimizer step; the trainer's own step without the host-side
            bookkeeping).
    Raises:
        ValueError: the trainer cannot be captured (the reason is in the message).
    """

    def __init__(self, trainer: Any, body: Any) -> None:
        reason = unsupported_reason(trainer)
        if reason is not None:
            raise ValueError(f"graph: this trainer's steps cannot be captured in a CUDA graph: {reason}")
        import cupy as cp

        self.trainer, self.body = trainer, body
        #: the capturing stream (non-blocking: the default stream may be used while it captures); the
        #: eager steps on it are ordered with the caller's stream by events, the replays run on the caller's.
        self.stream = cp.cuda.Stream(non_blocking=True)
        #: private pool of the captured step's buffers.
        self.pool = cp.cuda.MemoryPool()
        _POOLS.append(self.pool)
        self.graph: Any = None
        self.captures = 0  #: how many graphs were recorded (tests and benchmarks read it)
        self._warm = False
        self._x = self._y = self._loss = self._table = None
        self._params: list[Any] = []
        self._kept: list = []
        self._key: tuple = ()
        self._uploads = AlternatingUploads()  # a replay's batch and scalars, never waiting on the device
        if trainer.parallel is not None:
            trainer.parallel.register_graph_release(self._drop_graph)

    # ----------------------------------------------------------------- public
    @property
    def in_flight(self) -> int:
        """How many earlier replays may still run while the next step is prepared on the host: 1 while a
        graph is held (a replay's host work never waits on the device), else 0."""
        return 1 if self.graph is not None else 0

    def step(self, x: np.ndarray, y: np.ndarray) -> Any:
        """One training step on host batches ``x, y`` ``(B, T)``; returns its loss as a 0-d device array."""
        replay = self.graph is not None and self._still_valid(x, y)
        if not replay and self.trainer.parallel is not None:
            # the replay left in flight must be done before anything here waits on the device: release()
            # frees memory (cudaFree waits for it) and the eager step uploads from pageable memory
            self.trainer.parallel.synchronize()
        if self.graph is not None and not replay:
            self.release()
        if self.graph is None and not self._warm:
            return self._eager(x, y)
        if self.graph is None:
            return self._capture_and_launch(x, y)
        return self._replay(x, y)

    def release(self) -> None:
        """Drop the graph and its buffers; the next step runs eagerly, the one after records a new graph."""
        self.graph = None
        self._warm = False
        self._x = self._y = self._loss = self._table = None
        self._params, self._kept, self._key = [], [], ()
        self.pool.free_all_blocks()

    def _drop_graph(self) -> None:
        """Drop the graph but not its buffers (the communicator is about to abort: a replay may still be
        running, and freeing device memory would wait for it)."""
        self.graph = None
        self._warm = False

    def __del__(self) -> None:
        try:
            self.graph = None
            self.pool.free_all_blocks()
        except Exception:  # interpreter shutdown: CuPy may be gone already
            pass

    # ----------------------------------------------------------------- the three kinds of step
    def _eager(self, x: np.ndarray, y: np.ndarray) -> Any:
        import cupy as cp
        from cupy_backends.cuda.libs import cublas

        caller = cp.cuda.get_current_stream()
        if self.trainer.scaler is not None:  # float16: overflowing steps are then skipped on the device
            self.trainer.scaler.hold_on_device(next(iter(self.trainer.model.parameters())).data)
        self.stream.wait_event(caller.record())
        with self.stream, cp.cuda.using_allocator(self.pool.malloc):  # the capture reuses these buffers
            cublas.setStream(cp.cuda.device.get_cublas_handle(), self.stream.ptr)
            loss = self.body(cp.asarray(x), cp.asarray(y))
        caller.wait_event(self.stream.record())
        self._warm = True
        return loss.data

    def _capture_and_launch(self, x: np.ndarray, y: np.ndarray) -> Any:
        import cupy as cp

        from pymglu.cuda.capture import keeping_uploads, record_graph

        optimizer = self.trainer.optimizer
        rows = self._next_rows()
        self._params = [p for p, _ in rows]
        self._table = cp.asarray(np.stack([r for _, r in rows]))
        self._x, self._y = cp.asarray(x), cp.asarray(y)
        saved_steps = {k: st["step"] for k, st in optimizer.state.items()}
        params = list(self.trainer.model.parameters())
        if self._skips_on_device:  # the optimizer computes its rows on the device from this table
            optimizer._hyper_table = self._table
        else:
            optimizer._step_scalar_rows = {id(p): self._table[i] for i, p in enumerate(self._params)}
        try:
            with keeping_uploads() as kept:
                graph, loss = record_graph(self.stream, lambda: self.body(self._x, self._y), self.pool)
        except BaseException as exc:
            self._undo_recorded_step(saved_steps, params)
            if isinstance(exc, Exception):
                raise RuntimeError(f"graph: capturing the training step failed ({type(exc).__name__}: {exc}); "
                                   "train with graph=False") from exc
            raise
        finally:
            optimizer._step_scalar_rows = None
            optimizer._hyper_table = None
        stale = self._layers_packing_their_own_masks()
        if stale:
            self._undo_recorded_step(saved_steps, params)
            raise RuntimeError(f"graph: the MGLU layers {stale} did not read the bit-planes the optimizer writes; a "
                               "replay would keep their masks fixed; train with graph=False")
        self.graph, self._kept, self._loss = graph, kept, loss.data
        self.captures += 1
        self._launch()
        self._key = self._make_key()
        return self._loss.copy()

    def _launch(self) -> None:
        """Replay the graph on the current stream; with data parallelism, the communicator then watches it
        (the next step's host poll is bounded by its timeout, as after an eager step)."""
        import cupy as cp

        stream = cp.cuda.get_current_stream()
        self.graph.launch(stream=stream)
        if self.trainer.parallel is not None:
            self.trainer.parallel.watch_replay(stream)

    def _replay(self, x: np.ndarray, y: np.ndarray) -> Any:
        import cupy as cp

        optimizer = self.trainer.optimizer
        rows = np.stack([r for _, r in self._next_rows()])
        self._uploads.upload(((self._x, x), (self._y, y), (self._table, rows)), cp.cuda.get_current_stream())
        self._launch()
        optimizer.replayed_step(count_steps=not self._skips_on_device)
        self._key = self._make_key()
        return self._loss.copy()

    @property
    def _skips_on_device(self) -> bool:
        """Whether the step is loss-scaled (float16): its skip, and so the optimizer's step counts and
        bias corrections, are decided on the device, and the uploaded table holds hyper-parameters."""
        return self.trainer.scaler is not None

    def _next_rows(self) -> list[tuple[Any, np.ndarray]]:
        """The rows of the table uploaded before a replay: each parameter's step scalars for its next
        update, or, for a loss-scaled step, the hyper-parameters the device computes them from."""
        optimizer = self.trainer.optimizer
        return optimizer.next_hyper_rows() if self._skips_on_device else optimizer.next_step_scalars()

    def _undo_recorded_step(self, saved_steps: dict, params: list) -> None:
        """After a capture that will not be launched: the step counts its host side advanced go back, the
        gradients it left (buffers of a graph that never ran) are dropped, and the graph is released."""
        for k, step in saved_steps.items():
            self.trainer.optimizer.state[k]["step"] = step
        for p in params:
            p.grad = None
        if self.trainer.scaler is not None:
            self.trainer.scaler._per_optimizer.clear()  # the recorded step may have stopped between its calls
        if self.trainer.parallel is not None:
            self.trainer.parallel.reset_pending()
        self.release()

    def _layers_packing_their_own_masks(self) -> list[str]:
        """Names of the MGLU layers whose recorded forward did not read the optimizer's bit-planes."""
        from pymglu.nn.mglu import MGLU

        written = self.trainer.optimizer._sign_bits
        return [name for name, m in self.trainer.model.named_modules()
                if isinstance(m, MGLU) and getattr(m, "mask_logits", None) is not None
                and m.packed_masks is not written.get(id(m.mask_logits))]

    # ----------------------------------------------------------------- what the graph depends on
    def _make_key(self) -> tuple:
        """What the recorded step depends on besides the values in its arrays: the arrays themselves,
        the parameter versions, every setting frozen into a kernel argument or a branch of the step."""
        from pymglu.cuda import optimizers, training
        from pymglu.nn.mglu import MGLU

        trainer = self.trainer
        optimizer = trainer.optimizer
        params = tuple((p, p.data, p.version) for p in trainer.model.parameters())
        state = tuple((k, tuple(v for v in st.values() if hasattr(v, "shape"))) for k, st in optimizer.state.items())
        hyper = tuple(tuple((k, g[k]) for k in optimizer.hyperparameters if k != "lr") for g in optimizer.param_groups)
        grads = tuple(p.grad is not None for p in trainer.model.parameters())
        settings = (trainer.settings.grad_clip, optimizers.ENABLED, training.ENABLED,
                    tuple(m.recompute for m in trainer.model.modules() if isinstance(m, MGLU)))
        scaler = trainer.scaler
        if scaler is not None:  # its factors are kernel arguments; its device arrays are read in place
            settings += (scaler, scaler.growth_factor, scaler.backoff_factor, scaler.growth_interval,
                         scaler.on_device)
        return params, state, hyper, grads, tuple(optimizer._sign_bits.values()), settings

    def _still_valid(self, x: np.ndarray, y: np.ndarray) -> bool:
        if x.shape != self._x.shape or x.dtype != self._x.dtype or y.shape != self._y.shape or y.dtype != self._y.dtype:
            return False
        return _same(self._make_key(), self._key)


def _same(a: Any, b: Any) -> bool:
    """Structural equality of nested tuples, comparing arrays and parameters by identity."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if hasattr(a, "shape") or hasattr(b, "shape"):
        return a is b
    return a == b
