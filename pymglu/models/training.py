"""The language-model training loop shared by ``examples/train_lm.py`` and ``examples/compare_ffn.py``.

:class:`Trainer` owns the optimizer (AdamW; mask logits and norm weights are left undecayed by their
Parameter ``decay`` flag), the warmup + cosine schedule, gradient clipping, the batch sampler and the
record of losses. Mixed precision follows the model's dtype: float16 and bfloat16 models train with the
optimizer's fp32 master weights, and float16 ones with a :class:`pymglu.amp.DynamicLossScaler` as well.

Its whole state besides the model and optimizer arrays (step, sampler state, schedule, loss scaler,
history) round-trips through :meth:`Trainer.state_metadata` / :meth:`Trainer.load_state_metadata`, so a
resumed run continues exactly where the saved one stopped.

Data parallelism: given ``parallel`` (a :class:`pymglu.distributed.DataParallel`), every rank draws the
same global batch of ``batch_size`` windows from the same sampler state, keeps its own rows
(``parallel.shard_batch``), and averages the gradients after ``backward`` (``parallel.reduce_gradients``)
before clipping and the optimizer step; the recorded loss is the mean over ranks. The sampler state is
thus global, and a checkpoint resumes at any world size that divides ``batch_size``.

On a GPU, the steps are replays of a captured CUDA graph (:class:`pymglu.models.GraphTrainStep`;
``Trainer(graph=False)`` steps eagerly); a float16 model's loss scaler is then held on the device, so
that overflowing steps are skipped there. No step waits for the device: losses are read back every
:attr:`Trainer.sync_every` steps.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import numpy as np

from pymglu import amp, optim
from pymglu.autograd.function import no_grad
from pymglu.backend import get_array_module
from pymglu.models.data import eval_windows, sample_windows
from pymglu.models.graph_eval import GraphEvaluation
from pymglu.models.graph_step import GraphTrainStep, unsupported_reason
from pymglu.models.transformer import Transformer

__all__ = ["TrainSettings", "History", "Trainer"]


@dataclasses.dataclass
class TrainSettings:
    """Optimisation settings (the model's shape lives in :class:`TransformerConfig`).

    Attributes:
        steps: optimizer steps in total (the cosine schedule ends there).
        batch_size: windows per step (each ``config.max_seq_len`` tokens).
        lr, min_lr_ratio, warmup_steps: peak rate, final rate as a fraction of it, linear warmup steps
            (capped at ``steps``).
        weight_decay, beta1, beta2: AdamW.
        grad_clip: global L2 norm the gradients are clipped to (0: no clipping).
        eval_every: validation every this many steps (and at the last step); 0: only at the end.
        eval_batches: validation batches (of ``batch_size`` consecutive windows).
        seed: seed of the batch sampler.
    """

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.warmup_steps > self.steps:
            self.warmup_steps = self.steps


@dataclasses.dataclass
class History:
    """What a run measured.

    Attributes:
        train_loss: training loss of every step (index = step - 1).
        val_steps, val_loss: step and validation loss of each evaluation.
        tokens: training tokens processed; train_seconds: wall time of the training steps (evaluation,
            checkpoints and logging excluded).
    """

    train_loss: list[float] = dataclasses.field(default_factory=list)
    val_steps: list[int] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Training throughput (0 before the first step)."""
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Trainer:
    """Trains a :class:`Transformer` on byte windows.

    Args:
        model: the model, already on its device (NumPy or CuPy parameters).
        settings: a :class:`TrainSettings`.
        train_data, val_data: 1-d uint8 host arrays, each at least ``max_seq_len + 1`` bytes
            (:func:`pymglu.models.data.split_corpus` checks that).
        parallel: ``None``, or a :class:`pymglu.distributed.DataParallel` over ``model`` (any object with
            its ``size``, ``shard_batch(x, y)``, ``reduce_gradients()`` and ``mean(value)``);
            ``settings.batch_size`` is then the global batch and must be a multiple of ``parallel.size``.
        graph: run the steps as replays of a captured CUDA graph (:class:`pymglu.models.GraphTrainStep`):
            ``None`` (default) where :func:`pymglu.models.graph_step.unsupported_reason` allows it (a
            float32, bfloat16 or float16 model on GPUs, data parallelism over NCCL included), else
            eagerly; ``True`` requires it (``ValueError`` naming the reason otherwise); ``False`` never.
    """

    def __init__(self, model: Transformer, settings: TrainSettings, train_data: np.ndarray,
                 val_data: np.ndarray, parallel: Any = None, graph: bool | None = None) -> None:
        if parallel is not None and settings.batch_size % parallel.size:
            raise ValueError(f"batch_size {settings.batch_size} is not a multiple of the world size {parallel.size}")
        if graph is not None and not isinstance(graph, (bool, np.bool_)):
            raise TypeError(f"graph: expected None, True or False, got {graph!r}")
        self.parallel = parallel
        self.model, self.settings = model, settings
        self.seq_len = model.config.max_seq_len
        self.train_data, self.val_data = train_data, val_data
        self.xp = get_array_module(model.embed.weight.data)
        s = settings
        self.optimizer = optim.AdamW(model, lr=s.lr, betas=(s.beta1, s.beta2), weight_decay=s.weight_decay)
        self.schedule = optim.WarmupCosine(self.optimizer, warmup_steps=s.warmup_steps, total_steps=s.steps,
                                           min_lr_ratio=s.min_lr_ratio)
        self.rng = np.random.default_rng(s.seed)
        #: loss scaler of a float16 model (``None`` otherwise).
        self.scaler = amp.DynamicLossScaler() if model.config.dtype == "float16" else None
        #: :meth:`run` reads the losses back (one host synchronisation) every this many steps, and at
        #: evaluations and the end; on a GPU the steps in between are queued without waiting.
        self.sync_every = 1 if self.xp is np else 10
        self._pending: list[Any] = []
        self._pending_since = 0.0
        self.step = 0
        self.history = History()
        self._eval_set = eval_windows(val_data, s.batch_size, self.seq_len, s.eval_batches)
        #: the :class:`GraphTrainStep` that runs the steps, or ``None`` (eager steps).
        self.graph_step: GraphTrainStep | None = None
        if graph or (graph is None and unsupported_reason(self) is None):
            self.graph_step = GraphTrainStep(self, self._step_body)
        self._graph_eval: GraphEvaluation | None = None

    # ----------------------------------------------------------------- one step
    def train_step(self, sync: bool = True) -> float | None:
        """One optimizer step on a fresh random batch.

        Returns its loss; with ``sync=False`` the loss stays on the device (no host synchronisation)
        until the next synchronised step or :meth:`flush`, and ``None`` is returned. (A float16 model
        stepped eagerly still reads its loss scaler's flag every step; under the graph step the scaler
        is held on the device and reads nothing.)
        """
        if not self._pending:
            self._pending_since = time.perf_counter()
        x, y = sample_windows(self.train_data, self.settings.batch_size, self.seq_len, self.rng)
        tokens = x.size  # of the global batch
        if self.parallel is not None and self.graph_step is not None:
            x, y = self.parallel.shard_batch(x, y, in_flight=self.graph_step.in_flight)
        elif self.parallel is not None:
            x, y = self.parallel.shard_batch(x, y)
        if self.graph_step is not None:
            loss_value = self.graph_step.step(x, y)
        else:
            loss_value = self._step_body(self.xp.asarray(x), self.xp.asarray(y)).data
        self.schedule.step()
        self.step += 1
        self.history.tokens += tokens
        self._pending.append(loss_value)
        return self.flush() if sync else None

    def _step_body(self, x: Any, y: Any) -> Any:
        """Forward, backward, gradient reduction and clipping, optimizer update on device batches; the
        loss Tensor. (What :class:`GraphTrainStep` records.) A float16 model's step goes through its loss
        scaler: the step is skipped when a gradient overflowed."""
        self.model.train()
        loss = self.model.loss(x, y)
        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
            self._reduce_gradients()
            if self.settings.grad_clip > 0:
                optim.clip_grad_norm(self.model.parameters(), self.settings.grad_clip)
            self.optimizer.step()
            return loss
        # overflows are expected under a too large scale (the step is then skipped)
        with np.errstate(over="ignore", invalid="ignore"):
            self.scaler.scale(loss).backward()
            self._reduce_gradients()  # every rank has the same scale; an inf anywhere reaches all
            self.scaler.unscale_(self.optimizer)
            if self.settings.grad_clip > 0:
                optim.clip_grad_norm(self.model.parameters(), self.settings.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss

    def flush(self) -> float | None:
        """Read the losses of the steps not yet synchronised into ``history`` (one device-to-host copy,
        which waits for those steps); returns the last one (``None`` if there were none)."""
        if not self._pending:
            return None
        if self.parallel is not None and hasattr(self.parallel, "synchronize"):
            self.parallel.synchronize()  # bounded wait for the gradient reductions before a device read
        values = [float(v) for v in np.asarray(_to_host(self.xp.stack(self._pending)), dtype=np.float64)]
        self._pending = []
        if self.parallel is not None:
            values = [self.parallel.mean(v) for v in values]
        self.history.train_loss.extend(values)
        self.history.train_seconds += time.perf_counter() - self._pending_since
        return values[-1]

    def _reduce_gradients(self) -> None:
        """Average the gradients over the data-parallel ranks (nothing without ``parallel``)."""
        if self.parallel is not None:
            self.parallel.reduce_gradients()

    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows (eval mode, no gradients); the training flag is
        restored afterwards. The batches' losses are read back together (one host synchronisation). With
        :attr:`graph_step`, the passes are replays of captured graphs (:class:`GraphEvaluation`)."""
        if self.parallel is not None and hasattr(self.parallel, "synchronize"):
            self.parallel.synchronize()  # the passes may load kernels, which must not queue behind a stuck reduction
        was_training = self.model.training
        self.model.eval()
        try:
            with no_grad():
                if self.graph_step is not None:
                    if self._graph_eval is None:
                        self._graph_eval = GraphEvaluation(self.model, self.model.loss, self.graph_step.stream)
                    losses = self._graph_eval.losses(self._eval_set)
                else:
                    losses = [self.model.loss(self.xp.asarray(x), self.xp.asarray(y)).data for x, y in self._eval_set]
        finally:
            self.model.train(was_training)
        values = np.asarray(_to_host(self.xp.stack(losses)), dtype=np.float64)
        total = count = 0.0
        for value, (x, _) in zip(values, self._eval_set):
            total += float(value) * x.size
            count += x.size
        return total / count

    # ----------------------------------------------------------------- the loop
    def run(self, progress: bool = True, log: Callable[[str], None] | None = print,
            on_eval: Callable[["Trainer"], None] | None = None) -> History:
        """Train from the current step to ``settings.steps``, validating every ``eval_every`` steps and
        after the last one.

        Args:
            progress: show a tqdm bar with the loss and tokens/s.
            log: receives one line per evaluation (``None``: silent).
            on_eval: called after each evaluation (``train_lm`` writes its checkpoint there).
        """
        s = self.settings
        bar = None
        if progress and self.step < s.steps:
            from tqdm import tqdm

            bar = tqdm(total=s.steps, initial=self.step, unit="step", dynamic_ncols=True)
        write = (bar.write if bar is not None else log) if log is not None else None
        try:
            while self.step < s.steps:
                after = self.step + 1
                evaluate = bool(s.eval_every and after % s.eval_every == 0) or after == s.steps
                loss = self.train_step(sync=evaluate or after % self.sync_every == 0)
                if bar is not None:
                    bar.update(1)
                    if loss is not None:
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.history.tokens_per_second:,.0f}",
                                        refresh=False)
                if evaluate:
                    val = self.evaluate()
                    self.history.val_steps.append(self.step)
                    self.history.val_loss.append(val)
                    if write is not None:
                        write(f"step {self.step:5d} | train loss {loss:.4f} | val loss {val:.4f} | "
                              f"lr {self.schedule.get_last_lr()[0]:.2e} | "
                              f"{self.history.tokens_per_second:,.0f} tok/s")
                    if on_eval is not None:
                        on_eval(self)
        finally:
            self.flush()
            if bar is not None:
                bar.close()
        return self.history

    # ----------------------------------------------------------------- state for checkpoints
    def state_metadata(self) -> dict[str, str]:
        """``str -> str`` entries for a checkpoint header: step, sampler state, schedule, settings, history
        and, for a float16 model, the loss scaler."""
        self.flush()
        return {
            "train.step": str(self.step),
            "train.rng": json.dumps(self.rng.bit_generator.state),
            "train.schedule": json.dumps(self.schedule.state_dict()),
            "train.settings": json.dumps(dataclasses.asdict(self.settings)),
            "train.history": json.dumps(self.history.to_dict()),
            **({"train.scaler": json.dumps(self.scaler.state_dict())} if self.scaler is not None else {}),
        }

    def parse_state_metadata(self, meta: dict[str, str]) -> dict[str, Any]:
        """Read what :meth:`state_metadata` saved without changing anything; ``ValueError`` when an entry
        is missing or unreadable."""
        try:
            step = int(meta["train.step"])
            rng = np.random.default_rng()
            rng.bit_generator.state = json.loads(meta["train.rng"])
            last_step = int(json.loads(meta["train.schedule"])["last_step"])
            history = History(**json.loads(meta["train.history"]))
            scaler = None
            if self.scaler is not None:
                scaler = amp.DynamicLossScaler()
                scaler.load_state_dict(json.loads(meta["train.scaler"]))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"training state missing or unreadable in the checkpoint metadata ({e!r})") from None
        if step < 0 or last_step != step:
            raise ValueError(f"training state: step {step} and schedule step {last_step} disagree")
        return {"step": step, "rng": rng, "history": history, "scaler": scaler}

    def load_state_metadata(self, meta: dict[str, str]) -> None:
        """Restore what :meth:`state_metadata` saved (after the model and optimizer arrays are loaded).

        The learning-rate schedule continues from the saved step with this trainer's settings (so a
        resumed run may raise ``steps``). Raises ``ValueError`` (changing nothing) when an entry is
        missing or unreadable.
        """
        state = self.parse_state_metadata(meta)
        self.schedule.load_state_dict({"last_step": state["step"], "base_lrs": self.schedule.base_lrs})
        self.rng, self.step, self.history = state["rng"], state["step"], state["history"]
        if state["scaler"] is not None:
            self.scaler = state["scaler"]


def _to_host(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)
