"""Learning-rate schedules."""
from __future__ import annotations

import math
from typing import Any, Mapping

from pymglu import _checks
from pymglu.optim.optimizer import Optimizer, _check_lr


class WarmupCosine:
    """Linear warmup then cosine decay of every group's learning rate.

    With base rate ``lr0`` (each group's ``lr`` when the schedule is created), at step ``s`` (0-based):

    * ``s < warmup_steps``: ``lr0 * (s + 1) / warmup_steps``;
    * ``warmup_steps <= s < total_steps``: ``lr0 * (r + (1 - r) * (1 + cos(pi * q)) / 2)`` with
      ``q = (s - warmup_steps) / (total_steps - warmup_steps)`` and ``r = min_lr_ratio``;
    * ``s >= total_steps``: ``lr0 * r``.

    The constructor sets the rate of step 0; call :meth:`step` after each ``optimizer.step()``.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer: expected a pymglu.optim.Optimizer, got {type(optimizer).__name__}")
        self.warmup_steps = _checks.check_positive_int("warmup_steps", warmup_steps, minimum=0)
        self.total_steps = _checks.check_positive_int("total_steps", total_steps, minimum=1)
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps: expected at most total_steps = {self.total_steps}, got {warmup_steps!r}"
            )
        self.min_lr_ratio = _checks.check_finite("min_lr_ratio", min_lr_ratio, minimum=0.0, maximum=1.0)
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def factor(self, step: int) -> float:
        """Multiplier of the base rates at ``step`` (an integer >= 0)."""
        step = _checks.check_positive_int("step", step, minimum=0)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr_ratio
        q = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        r = self.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * q))

    def lr_at(self, step: int) -> list[float]:
        """The learning rate of each group at ``step``."""
        f = self.factor(step)
        return [lr0 * f for lr0 in self.base_lrs]

    def get_last_lr(self) -> list[float]:
        return self.lr_at(self.last_step)

    def _apply(self) -> None:
        lrs = self.lr_at(self.last_step)
        for lr in lrs:
            _check_lr(lr)
        for gi, lr in enumerate(lrs):
            self.optimizer.set_lr(lr, group=gi)

    def step(self) -> None:
        """Advance one step and set the optimizer's rates."""
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (validated first) and set the optimizer's rates."""
        if not isinstance(state, Mapping) or set(state) != {"last_step", "base_lrs"}:
            raise ValueError("schedule state: expected a mapping with the keys 'last_step' and 'base_lrs'")
        last = _checks.check_positive_int("last_step", state["last_step"], minimum=0)
        base = list(state["base_lrs"])
        if len(base) != len(self.optimizer.param_groups):
            raise ValueError(
                f"base_lrs: {len(base)} values for {len(self.optimizer.param_groups)} param groups"
            )
        base = [_check_lr(b) for b in base]
        self.last_step, self.base_lrs = last, base
        self._apply()

