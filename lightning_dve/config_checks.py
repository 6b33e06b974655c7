"""Validation helpers of the frozen settings (:mod:`lightning_dve.config`): numbers, fractions, counts, names."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Set
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


def module_names(name: str, value: Any, fix: str) -> tuple[str, ...]:
    """``value``, a sequence of module names (``fnmatch`` patterns for ``exclude``), as a tuple without repeats.

    Raises:
        ConfigError: naming ``name`` and the value, for a string (a tuple of its characters), a mapping or set (its
            keys, in no set order), anything not iterable, an item that is not a str, or no name at all (``fix``
            says what to pass instead; ``""``: none is allowed).
    """
    if isinstance(value, str):
        raise ConfigError(f"{name} must be a sequence of module names, not a string; got {value!r}. Use "
                          f"{name}=({value!r},).")
    if isinstance(value, (Mapping, Set)) or not isinstance(value, Iterable):
        raise ConfigError(f"{name} must be a sequence of module names (a list or tuple of str); got {value!r}. "
                          f"{fix or f'Use {name}=() for none.'}")
    names = tuple(value)
    bad = [x for x in names if not isinstance(x, str)]
    if bad:
        raise ConfigError(f"{name} must hold module names (str); got {bad!r} in {name}={value!r}.")
    if not names and fix:
        raise ConfigError(f"{name}={value!r} names no module. {fix}")
    return tuple(dict.fromkeys(names))
