"""Parameter groups by name."""
from __future__ import annotations

from typing import Any, Sequence

from pymglu import _checks


def param_groups_no_decay(
    module: Any,
    weight_decay: float,
    no_decay: Sequence[str] = ("mask_logits", "norm", "bias"),
) -> list[dict[str, Any]]:
    """Split a module's parameters into a decayed group and a group with ``weight_decay = 0``.

    A parameter goes to the no-decay group when one of the ``no_decay`` patterns is a substring of its
    dotted name (``"layers.0.ffn.up.mask_logits"``) or of the lower-cased class name of the module
    that owns it (so an ``RMSNorm``'s ``weight`` matches ``"norm"`` whatever the attribute is called).

    Returns:
        a list of one or two group dicts ``{"params", "names", "weight_decay"}`` (empty groups dropped),
        to pass to :class:`AdamW` or :class:`SGD`.
    """
    weight_decay = _checks.check_finite("weight_decay", weight_decay, minimum=0.0)
    if isinstance(no_decay, str):
        no_decay = (no_decay,)
    patterns = tuple(no_decay)
    if not all(isinstance(s, str) and s for s in patterns):
        raise ValueError(f"no_decay: expected non-empty strings, got {no_decay!r}")
    if not hasattr(module, "named_modules"):
        raise TypeError(f"module: expected a pymglu.nn.Module, got {type(module).__name__}")
    decay: dict[str, list] = {"params": [], "names": []}
    keep: dict[str, list] = {"params": [], "names": []}
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        owner = type(mod).__name__.lower()
        for name, p in mod._parameters.items():
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{name}" if mod_name else name
            target = keep if any(s in full or s in owner for s in patterns) else decay
            target["params"].append(p)
            target["names"].append(full)
    groups = []
    if decay["params"]:
        groups.append({**decay, "weight_decay": weight_decay})
    if keep["params"]:
        groups.append({**keep, "weight_decay": 0.0})
    if not groups:
        raise ValueError(f"module: {type(module).__name__} has no parameters")
    return groups


