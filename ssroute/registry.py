"""Name -> constructor registries (routers, experts, SSL objectives, datasets).

Configs choose components by name; a parametrized test runs over every
registered name, so a new component is tested the day it is added.

>>> ANIMALS = Registry("animal")
>>> @ANIMALS.register("cat")
... def make_cat():
...     return "meow"
>>> ANIMALS.build("cat")
'meow'
>>> ANIMALS.get("dog")
Traceback (most recent call last):
...
ssroute.errors.ConfigError: unknown animal 'dog'; choose one of: cat.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from ssroute.errors import ConfigError

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    """An ordered mapping from names to constructors with a helpful miss."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._entries)}.")
        return self._entries[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._entries)})"


def option_names(constructor: Callable[..., Any], fixed: tuple[str, ...]) -> list[str]:
    params = inspect.signature(constructor).parameters
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in params.items() if p.kind in kinds and n not in fixed and n != "self"]


def check_options(kind: str, name: str, constructor: Callable[..., Any], options: dict[str, Any], fixed: tuple[str, ...]) -> None:
    """Reject unknown keyword options with one sentence instead of a TypeError."""
    valid = option_names(constructor, fixed)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"{kind} {name!r} has no option {', '.join(map(repr, unknown))}; valid options: {', '.join(valid) or 'none'}.")
