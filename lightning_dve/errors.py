"""The error hierarchy of lightning_dve.

Every error subclasses a built-in error (so ``except ValueError`` still works) and ``DVEError`` (so
``except DVEError`` catches everything this package raises on purpose). Messages state the value, the rule
it broke and how to fix it.
"""

from __future__ import annotations


class DVEError(Exception):
    """Base class of every error raised on purpose by lightning_dve."""


class ConfigError(DVEError, ValueError):
    """A setting is invalid, or incompatible with the trainer or the model."""


class UnsupportedError(DVEError, NotImplementedError):
    """The training setup (layer, optimizer, strategy, precision) is not supported yet."""


class SampleIdError(DVEError, ValueError):
    """Sample ids are missing, malformed, or duplicated within one step."""


class GradientError(DVEError, FloatingPointError):
    """A captured per-sample gradient is NaN or infinite."""


class StoreError(DVEError, OSError):
    """The on-disk store is missing, corrupt, truncated, or was written with other settings."""


class LayerMismatchError(DVEError, ValueError):
    """A query module does not hold the recorded layers with their recorded shapes."""


class LossReductionError(ConfigError):
    """The training loss is not the sum of per-sample losses weighted as ``loss_reduction`` declares."""


class RemoteRankError(DVEError, RuntimeError):
    """Under DDP, another rank raised; this rank stops too (that rank's traceback names the cause)."""
