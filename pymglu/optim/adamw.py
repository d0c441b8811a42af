"""AdamW."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pymglu import _checks
from pymglu.backend import get_array_module
from pymglu.cuda import optimizers as _fused
from pymglu.optim.optimizer import Optimizer, ParamsLike, _check_unit_interval, _state_dtype, _weight_decay


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov and Hutter).

    Per parameter, with step count ``t`` (from 1): ``p *= 1 - lr * weight_decay``;
    ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
    ``p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``, all in float32 (float64 for float64
    parameters); for a float16/bfloat16 parameter ``p`` is its fp32 master copy, rounded into the
    parameter after the update (module docstring).
    Parameters created with ``decay=False`` (mask logits, norm weights) are never decayed; use
    :func:`param_groups_no_decay` to keep further parameters (e.g. biases) out of the decay by name.
    State: ``exp_avg``, ``exp_avg_sq`` (and ``master`` for 16-bit parameters), shaped like the parameter.
    """

    hyperparameters = ("lr", "betas", "eps", "weight_decay")
    state_arrays = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: ParamsLike, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, master_weights: bool = True) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay},
                         master_weights=master_weights)

    def _validate_hparams(self, hp: dict[str, Any], where: str) -> dict[str, Any]:
        out = super()._validate_hparams(hp, where)
        if "betas" in hp:
            betas = hp["betas"]
            if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
                raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
            out["betas"] = (_check_unit_interval("betas[0]", betas[0]), _check_unit_interval("betas[1]", betas[1]))
        if "eps" in hp:
            out["eps"] = _checks.check_finite("eps", hp["eps"], minimum=0.0, strict_min=True)
        if "weight_decay" in hp:
            out["weight_decay"] = _checks.check_finite("weight_decay", hp["weight_decay"], minimum=0.0)
        return out

    hyper_width = 4
    step_scalar_width = 4

    def step_hyper(self, p: Any, group: dict[str, Any]) -> np.ndarray:
        b1, b2 = group["betas"]
        return np.array([group["lr"], b1, b2, _weight_decay(p, group)], dtype=np.float64)

    def _device_rows(self, hyper: Any, steps: Any, found: Any, rows: Any) -> None:
        _fused.adamw_device_rows(hyper, steps, found, rows)

    def step_scalars(self, p: Any, group: dict[str, Any], step: int) -> Any:
        b1, b2 = group["betas"]
        return _fused.adamw_scalars(lr=group["lr"], beta1=b1, beta2=b2, weight_decay=_weight_decay(p, group), step=step)

    def _update(self, p: Any, grad: Any, group: dict[str, Any]) -> Any:
        xp = get_array_module(p.data)
        ct = _state_dtype(p.dtype)
        st = self._state_for(p)
        st["step"] += 1
        t = st["step"]
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], _weight_decay(p, group)
        master = st.get("master")
        if _fused.supports(p.data, grad, master, st["exp_avg"], st["exp_avg_sq"]):
            bits = self._sign_bits_buffer(p)
            _fused.adamw_step(p.data, grad, master, st["exp_avg"], st["exp_avg_sq"], lr=lr, beta1=b1, beta2=b2,
                              eps=eps, weight_decay=wd, step=t, sign_bits=bits, step_scalars=self._captured_row(p))
            return bits
        self._refuse_capture(p)
        g = grad.astype(ct, copy=False)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        bc1 = 1.0 - b1 ** t
        bc2 = 1.0 - b2 ** t
        denom = xp.sqrt(v / bc2)
        denom += eps
        if master is not None:
            if wd:
                master *= 1.0 - lr * wd
            master -= (lr / bc1) * (m / denom)
            self._write(p, master)
            return None
        value = p.data.astype(ct, copy=True) if p.dtype != ct else p.data
        if wd:
            value = value * (1.0 - lr * wd)
        self._write(p, value - (lr / bc1) * (m / denom))
        return None


