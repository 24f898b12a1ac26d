"""A tiny named registry: components are registered by name and created by name (timm / open_clip style)."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from ._errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (configs, classes or factories). Unknown names fail with the valid choices."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self.version = 0  # bumped by every change, so that what is derived from the items can be cached

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """Register ``item`` under ``name``; without ``item`` this is a decorator."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            self.version += 1
            return obj

        return add(item) if item is not None else add

    def unregister(self, name: str) -> T:
        """Remove and return ``name`` (plug-ins and tests that register something temporarily)."""
        item = self.get(name)
        del self._items[name]
        self.version += 1
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
