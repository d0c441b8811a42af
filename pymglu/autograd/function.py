"""``Function``: one differentiable op, recorded on the tape when any input requires a gradient.

Subclasses implement ``forward(self, *arrays, **kwargs) -> array`` on raw NumPy/CuPy arrays and
``backward(self, grad_output) -> tuple`` returning one gradient (or ``None``) per array input, in the
input's shape. The instance is the op's context: ``forward`` stores what ``backward`` needs on ``self``.
``Function.apply(*inputs, **kwargs)`` accepts Tensors, arrays and Python scalars; only Tensors take part
in differentiation.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from pymglu.backend import get_array_module, unwrap

if TYPE_CHECKING:
    from pymglu.autograd.tensor import Tensor

_state = threading.local()


def grad_enabled() -> bool:
    """False inside :func:`no_grad`: ops then record nothing."""
    return getattr(_state, "enabled", True)


@contextmanager
def no_grad() -> Iterator[None]:
    """Context in which no op is recorded on the tape (inference, optimizer updates)."""
    previous = grad_enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = previous


class Function:
    """Base class of differentiable ops (see the module docstring)."""

    #: set on the instance by :meth:`apply`: the Tensor inputs, in order (``None`` for non-Tensors).
    inputs: tuple[Any, ...]
    #: per input, whether a gradient is wanted.
    needs_input_grad: tuple[bool, ...]
    #: set by ``Tensor.backward`` before it calls :meth:`backward`: False when the graph is released
    #: afterwards, so that ``backward`` may overwrite what ``forward`` saved instead of allocating.
    graph_retained: bool = True

    def forward(self, *arrays: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, grad_output: Any) -> tuple[Any, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Any, **kwargs: Any) -> "Tensor":
        from pymglu.autograd.tensor import Tensor

        arrays = [unwrap(x) for x in inputs]  # Tensors' data; other libraries' arrays through DLPack
        get_array_module(*arrays)  # raises on mixed devices before any work
        fn = cls()
        needs = tuple(isinstance(x, Tensor) and x.requires_grad for x in inputs)
        record = grad_enabled() and any(needs)
        fn.needs_input_grad = needs
        out = fn.forward(*arrays, **kwargs)
        result = Tensor(out, requires_grad=record)
        if record:
            fn.inputs = tuple(x if isinstance(x, Tensor) else None for x in inputs)
            result._creator = fn
        return result

    def release(self) -> None:
        """Drop everything saved for backward (called once the tape has used this node)."""
        self.__dict__.clear()
        self._released = True

    @property
    def released(self) -> bool:
        return getattr(self, "_released", False)

