"""Validation helpers of the frozen settings (:mod:`lightning_dve.config`): numbers, fractions and counts."""

from __future__ import annotations

import numbers
from typing import Any

from .errors import ConfigError


def check_fraction(name: str, value: Any, low: float, high: float, fix: str) -> float:
    """Return ``value`` as a float if ``low <= value < high``; raise naming the value, the rule and ``fix``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ConfigError(f"{name} must be a number in [{low}, {high}); got {value!r}. {fix}")
    return float(value)


def plain_ints(config: Any, *names: str) -> None:
    """Set the fields ``names`` of the frozen ``config`` that hold other integers (``numpy.int64``) to ``int``."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
            object.__setattr__(config, name, int(value))


def check_count(name: str, value: Any, minimum: int) -> None:
    """Raise unless ``value`` is an int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}; got {value!r}.")
