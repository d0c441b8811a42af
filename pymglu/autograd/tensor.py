"""``Tensor``: an array (NumPy or CuPy) with a gradient and the op that created it.

``backward()`` walks the recorded graph in reverse topological order with an explicit stack (no
recursion, so graphs of any depth work), accumulates gradients of tensors used more than once, adds
the result to ``.grad`` of every leaf that requires a gradient (gradient accumulation across calls),
and frees the graph unless ``retain_graph=True``. ``.grad`` holds a raw array of the tensor's shape,
usually in its dtype; a float32 tensor may get float16/bfloat16 gradients (the mask logits of a 16-bit
MGLU layer on the GPU), and a sum of two such gradients is taken in the tensor's dtype.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pymglu import _checks
from pymglu.backend import device_of, get_array_module, is_cupy_array, unwrap
from pymglu.dtypes import FLOAT_DTYPES


class GraphFreedError(RuntimeError):
    """backward() reached a node whose saved arrays were freed by an earlier backward()."""


class Tensor:
    """A NumPy or CuPy array that can record the ops applied to it.

    Args:
        data: a NumPy or CuPy array (lists and scalars become NumPy arrays). Not copied.
        requires_grad: whether gradients flow to this tensor; needs a float dtype.
    """

    _is_pymglu_tensor = True
    __array_priority__ = 1000  # so that ``ndarray + Tensor`` dispatches to Tensor.__radd__

    def __init__(self, data: Any, requires_grad: bool = False) -> None:
        data = unwrap(data)
        if not (isinstance(data, np.ndarray) or is_cupy_array(data)):
            data = np.asarray(data)
        if requires_grad and np.dtype(data.dtype) not in FLOAT_DTYPES:
            raise TypeError(f"requires_grad needs a float dtype, got {_checks.describe(data)}")
        self.data = data
        self.requires_grad = bool(requires_grad)
        self.grad: Any = None
        self._creator: Any = None

    # ----------------------------------------------------------------- array-like properties
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def xp(self) -> Any:
        """The array module of the data: ``numpy`` or ``cupy``."""
        return get_array_module(self.data)

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:<id>"``."""
        return device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._creator is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({_checks.describe(self.data)}{grad})"

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (a device-to-host copy for CuPy data)."""
        return self.data.get() if is_cupy_array(self.data) else self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        """A Tensor sharing this data, cut from the graph and not requiring a gradient."""
        return Tensor(self.data)

    def zero_grad(self) -> None:
        self.grad = None

    def register_grad_hook(self, hook: Callable[["Tensor"], None]) -> Callable[[], None]:
        """Call ``hook(self)`` each time a backward pass has stored this leaf's gradient for that pass
        (all of the pass's contributions are summed by then). Returns a function that removes the hook.
        Used by :class:`pymglu.distributed.DataParallel` to start reducing gradients during backward."""
        hooks = self.__dict__.setdefault("_grad_hooks", [])
        hooks.append(hook)

        def remove() -> None:
            if hook in hooks:
                hooks.remove(hook)

        return remove

    # ----------------------------------------------------------------- autograd
    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Back-propagate from this tensor.

        Args:
            grad: gradient of the final objective w.r.t. this tensor (same shape); defaults to ones for
                a single-element tensor.
            retain_graph: keep the saved arrays so that backward can run through this graph again.
        """
        if not self.requires_grad:
            raise RuntimeError("backward: this tensor does not require a gradient (nothing was recorded)")
        if grad is None:
            if self.size != 1:
                raise ValueError(f"backward: grad must be given for a non-scalar output, got {self!r}")
            grad = self.xp.ones_like(self.data)
        grad = unwrap(grad)
        get_array_module(self.data, grad)
        _checks.check_shape("grad", grad, self.shape)

        grads: dict[int, Any] = {id(self): grad}
        for node in _reverse_topological(self):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            fn = node._creator
            if fn is None:
                # copy on first store: g may be the caller's array or shared with another leaf
                node.grad = g.copy() if node.grad is None else _accumulate(node.grad, g, node.dtype)
                for hook in getattr(node, "_grad_hooks", ()):
                    hook(node)
                continue
            if fn.released:
                raise GraphFreedError(
                    "backward: the graph was freed by an earlier backward(); "
                    "pass retain_graph=True to the first call to run backward twice"
                )
            fn.graph_retained = retain_graph
            input_grads = fn.backward(g)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for inp, ig, need in zip(fn.inputs, input_grads, fn.needs_input_grad):
                if inp is None or not need or ig is None:
                    continue
                if tuple(ig.shape) != inp.shape:
                    raise RuntimeError(
                        f"{type(fn).__name__}.backward returned a gradient of shape {tuple(ig.shape)} "
                        f"for an input of shape {inp.shape}"
                    )
                key = id(inp)
                grads[key] = ig if key not in grads else _accumulate(grads[key], ig, inp.dtype)
            if not retain_graph:
                fn.release()

    # ----------------------------------------------------------------- DLPack
    def __dlpack__(self, **kwargs: Any) -> Any:
        """Export the data (never the graph) through DLPack, zero-copy, bfloat16 included; negative strides
        are refused with a ``BufferError`` (see :func:`pymglu.interop.export`)."""
        from pymglu.interop import export

        return export(self.data, name="Tensor").__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.data.__dlpack_device__()

    # ----------------------------------------------------------------- operators
    def __add__(self, other: Any) -> "Tensor":
        return _ops().add(self, other)

    def __radd__(self, other: Any) -> "Tensor":
        return _ops().add(other, self)

    def __sub__(self, other: Any) -> "Tensor":
        return _ops().sub(self, other)

    def __rsub__(self, other: Any) -> "Tensor":
        return _ops().sub(other, self)

    def __mul__(self, other: Any) -> "Tensor":
        return _ops().mul(self, other)

    def __rmul__(self, other: Any) -> "Tensor":
        return _ops().mul(other, self)

    def __truediv__(self, other: Any) -> "Tensor":
        return _ops().div(self, other)

    def __rtruediv__(self, other: Any) -> "Tensor":
        return _ops().div(other, self)

    def __neg__(self) -> "Tensor":
        return _ops().neg(self)

    def __matmul__(self, other: Any) -> "Tensor":
        return _ops().matmul(self, other)

    def __rmatmul__(self, other: Any) -> "Tensor":
        return _ops().matmul(other, self)

    def __getitem__(self, index: Any) -> "Tensor":
        return _ops().getitem(self, index)

    def reshape(self, *shape: Any) -> "Tensor":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _ops().reshape(self, shape)

    def transpose(self, *axes: Any) -> "Tensor":
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return _ops().transpose(self, axes or None)

    @property
    def T(self) -> "Tensor":
        return _ops().transpose(self, None)

    def sum(self, axis: Any = None, keepdims: bool = False) -> "Tensor":
        return _ops().sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis: Any = None, keepdims: bool = False) -> "Tensor":
        return _ops().mean(self, axis=axis, keepdims=keepdims)

    def exp(self) -> "Tensor":
        return _ops().exp(self)

    def log(self) -> "Tensor":
        return _ops().log(self)


def _ops() -> Any:
    from pymglu.autograd import ops

    return ops


def _accumulate(total: Any, g: Any, dtype: Any) -> Any:
    """``total + g``, in ``dtype`` when both are narrower than it (16-bit gradients of a float32 tensor), so
    that sums of gradients keep the tensor's precision."""
    dtype = np.dtype(dtype)
    if np.dtype(total.dtype).itemsize < dtype.itemsize and np.dtype(g.dtype).itemsize < dtype.itemsize:
        return total.astype(dtype) + g.astype(dtype)
    return total + g


def _reverse_topological(root: Tensor) -> list[Tensor]:
    """Tensors reachable from ``root`` through recorded ops, each after every tensor computed from it.

    Among the valid orders this is one that stores a leaf's gradient (a parameter's; and runs its gradient
    hooks) as soon as its last consumer has been back-propagated: the depth-first search expands an op's
    computed inputs (the deep activation chain) before its leaf inputs, whatever their position, so it
    finishes the leaves last and the reversed post-order puts them right after the op. Expanded in input
    order, ``matmul(x, W)`` would leave every parameter until the whole backward pass had run, and data
    parallelism could not start a gradient reduction before the backward ends.
    """
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        fn = node._creator
        if fn is not None and not fn.released:
            pending = [inp for inp in fn.inputs if inp is not None and inp.requires_grad and id(inp) not in visited]
            # the stack pops last-pushed first: leaves go in first so that they are expanded last
            stack.extend((inp, False) for inp in pending if inp._creator is None)
            stack.extend((inp, False) for inp in reversed(pending) if inp._creator is not None)
    order.reverse()
    return order
