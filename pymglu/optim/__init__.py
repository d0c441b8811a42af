"""Optimizers (SGD, AdamW), gradient clipping and a warmup + cosine learning-rate schedule.

Every update runs on the array module of its parameter (NumPy or CuPy) with no host round-trip:
hyper-parameters and step counts are Python numbers, moments live beside the parameter. Optimizer
state is float32 for float32, float16 and bfloat16 parameters (float64 for float64 ones).

**fp32 master weights** (automatic; ``master_weights=False`` opts out). For every float16 or bfloat16
parameter the optimizer keeps a float32 copy, ``state["master"]`` (same shape), created from the
parameter on its first update. Each step updates the master in float32 and writes the master rounded to
the parameter's dtype back into the parameter, so updates smaller than half a unit in the last place of
the 16-bit value accumulate in the master instead of being rounded away. The master is saved and
restored by :meth:`Optimizer.state_dict` / :meth:`Optimizer.load_state_dict` (and so by checkpoints).
It costs 4 bytes per 16-bit parameter. float32 and float64 parameters have no master and their update is
unchanged. Gradients of a 16-bit parameter may come in its own dtype or in float32 (what
:meth:`pymglu.amp.DynamicLossScaler.unscale_` produces).

The master follows changes made to the parameter outside the optimizer: the optimizer remembers the
parameter's data array and :attr:`pymglu.nn.Parameter.version` after each of its own writes, and when
either differs on the next update (an assignment to ``.data``, ``Module.load_state_dict``,
``Module.to``, or an in-place edit followed by ``mark_modified()``), every element whose master no longer
rounds to the parameter's value is reset to that value, elementwise on the device (no host read). After
:meth:`Optimizer.load_state_dict` the same elementwise rule runs once, so a loaded master survives a
model load in either order as long as the model holds the rounded master. An in-place edit of ``.data``
*without* ``mark_modified()`` is not seen and is overwritten by the next update.

``step()`` first checks every gradient (shape, dtype, device) and the existing state, and only then
updates, so a bad gradient raises before any parameter or moment changes. ``load_state_dict`` likewise
validates everything before it touches the optimizer.
"""
from pymglu.optim.adamw import AdamW
from pymglu.optim.clipping import clip_grad_norm
from pymglu.optim.groups import param_groups_no_decay
from pymglu.optim.optimizer import LOW_PRECISION_DTYPES, Optimizer
from pymglu.optim.schedule import WarmupCosine
from pymglu.optim.sgd import SGD

__all__ = [
    "Optimizer",
    "SGD",
    "AdamW",
    "param_groups_no_decay",
    "clip_grad_norm",
    "WarmupCosine",
    "LOW_PRECISION_DTYPES",
]
