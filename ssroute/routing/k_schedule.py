"""Schedules of k (experts per token) over training, as pure functions of the step.

A training callback evaluates ``schedule(step)`` and calls ``layer.set_k(k)``
(``MoELayer.set_k`` forwards to the router: top-k for token choice and random
routing, the ``max_k`` cap for dynamic-k routers). Different layers may use
different schedules — that is "k per layer".

- ``constant``: always ``k``;
- ``linear``: from ``start`` to ``end`` over ``steps`` (rounded, then held), as
  when a run starts with many experts per token and anneals to few;
- ``random``: a k drawn uniformly from ``[low, high]`` per step, reproducible
  from ``(seed, step)`` alone (stochastic-k training).

>>> LinearK(start=4, end=1, steps=30)(0), LinearK(start=4, end=1, steps=30)(15), LinearK(4, 1, 30)(99)
(4, 2, 1)
>>> RandomK(1, 3, seed=0)(7) == RandomK(1, 3, seed=0)(7)
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

from ssroute.errors import ConfigError
from ssroute.registry import Registry


class KSchedule(Protocol):
    def __call__(self, step: int) -> int: ...


K_SCHEDULES: Registry[Any] = Registry("k schedule")


def _check(name: str, key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"k schedule {name}: {key}={value} must be at least 1; use a positive number of experts.")


@K_SCHEDULES.register("constant")
@dataclass(frozen=True)
class ConstantK:
    """The same k at every step."""

    k: int

    def __post_init__(self) -> None:
        _check("constant", "k", self.k)

    def __call__(self, step: int) -> int:
        return self.k


@K_SCHEDULES.register("linear")
@dataclass(frozen=True)
class LinearK:
    """Linear interpolation from ``start`` (step 0) to ``end`` (step ``steps`` and later)."""

    start: int
    end: int
    steps: int

    def __post_init__(self) -> None:
        _check("linear", "start", self.start)
        _check("linear", "end", self.end)
        _check("linear", "steps", self.steps)

    def __call__(self, step: int) -> int:
        fraction = min(max(step, 0), self.steps) / self.steps
        return int(round(self.start + (self.end - self.start) * fraction))


@K_SCHEDULES.register("random")
@dataclass(frozen=True)
class RandomK:
    """A uniform k in ``[low, high]`` per step, a pure function of ``(seed, step)``."""

    low: int
    high: int
    seed: int = 0

    def __post_init__(self) -> None:
        _check("random", "low", self.low)
        if self.high < self.low:
            raise ConfigError(f"k schedule random: high={self.high} is below low={self.low}; set high >= low.")

    def __call__(self, step: int) -> int:
        return random.Random(f"{self.seed}:{step}").randint(self.low, self.high)


def build_k_schedule(name: str, **options: Any) -> KSchedule:
    """``build_k_schedule("linear", start=4, end=1, steps=1000)``."""
    cls = K_SCHEDULES.get(name)
    try:
        return cls(**options)
    except TypeError as error:  # wrong or missing option names
        fields = ", ".join(cls.__dataclass_fields__)
        raise ConfigError(f"k schedule {name!r} takes options {fields}; got {', '.join(options) or 'none'} ({error}).") from None
