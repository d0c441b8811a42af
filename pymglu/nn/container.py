"""``ModuleList``: an ordered list of sub-modules registered under the names ``"0"``, ``"1"``, ..."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

from pymglu.nn.module import Module

__all__ = ["ModuleList"]


class ModuleList(Module):
    """Holds sub-modules in order, so that their parameters appear as ``"<list>.<index>.<name>"``.

    Args:
        modules: an iterable of :class:`Module` objects (may be empty).

    Supports ``len``, iteration, integer indexing (negative indices too) and :meth:`append`. It has no
    ``forward`` of its own: the owner decides how to call its entries.
    """

    def __init__(self, modules: Iterable[Module] = ()) -> None:
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> "ModuleList":
        """Add ``module`` at the end (under the name ``str(len(self))``); returns ``self``."""
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList.append: expected a pymglu.nn.Module, got {type(module).__name__}")
        setattr(self, str(len(self)), module)
        return self

    def __len__(self) -> int:
        return len(self._registries()[1])

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._registries()[1].values()))

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"ModuleList index: expected an int, got {index!r}")
        if not -n <= index < n:
            raise IndexError(f"ModuleList index {index} out of range for {n} modules")
        return self._registries()[1][str(index % n)]

    def extra_repr(self) -> str:
        return f"{len(self)} modules"
