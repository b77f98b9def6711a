"""Registries that refuse duplicates (stages, benchmark backends, ...).

A registry maps a key to a value and raises on a second registration of the same key, so two
modules cannot silently fight over a name.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> value mapping that refuses duplicate names."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def add(self, key: str, value: T) -> T:
        if key in self._items:
            raise KeyError(f"{self.what} {key!r} is already registered ({self._items[key]!r})")
        self._items[key] = value
        return value

    def __getitem__(self, key: str) -> T:
        try:
            return self._items[key]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise KeyError(f"unknown {self.what} {key!r}; known: {known}") from None

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self):
        return self._items.items()

    def values(self):
        return self._items.values()

    def __len__(self) -> int:
        return len(self._items)


class StageEntry:
    """A registered stage: its config class and the function that runs it."""

    def __init__(self, config_cls: type, fn: Callable[..., Any]):
        self.config_cls = config_cls
        self.fn = fn

    def __repr__(self) -> str:
        return f"StageEntry({self.config_cls.__name__} -> {self.fn.__module__}.{self.fn.__qualname__})"


STAGES: Registry[StageEntry] = Registry("stage kind")


def register_stage(config_cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(cfg, state) -> StageResult`` as the implementation of ``config_cls``.

    The stage kind is the config's ``kind`` literal default. Duplicate kinds raise ``KeyError``.
    """
    kind = config_cls.model_fields["kind"].default

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        STAGES.add(kind, StageEntry(config_cls, fn))
        return fn

    return deco
