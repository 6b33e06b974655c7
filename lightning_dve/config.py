"""Frozen settings of a DVEmb run, their validation and their (de)serialisation for the manifest."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from typing import Any

from lightning_dve.errors import ConfigError

#: Default Kronecker-projected dimension, counted **per tracked layer** (k_out * k_in <= this).
#: 1024 is the paper's choice for Pythia-410M; for small layers the exact size is used when it is smaller.
DEFAULT_PROJECTION_DIM = 1024


def _choices(enum_type: type[enum.Enum]) -> str:
    return ", ".join(repr(member.value) for member in enum_type)


class _Option(str, enum.Enum):
    """A string enum whose constructor error lists every allowed value."""

    @classmethod
    def parse(cls, value: Any) -> _Option:
        """Return the member for ``value`` (a member or its string value).

        Raises:
            ConfigError: if ``value`` is not one of the allowed values.
        """
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"{cls.__name__} got {value!r}; allowed values are {_choices(cls)}."
            ) from None


class LossReduction(_Option):
    """How ``training_step``'s loss reduces the per-sample losses of a batch (method.md §2).

    The weight ``w`` of a sample is what the optimizer applied to its gradient: ``1/B`` for ``MEAN``, ``1`` for
    ``SUM``, and the user's per-sample weights for ``WEIGHTS`` (a callable ``batch -> Tensor[B]``).
    """

    MEAN = "mean"
    SUM = "sum"
    WEIGHTS = "weights"


class AccumulatorLayout(_Option):
    """Shape of the accumulation matrix ``M`` of the backward recursion (method.md §2-3).

    ``PER_LAYER`` keeps one ``[k_l, k_l]`` matrix per tracked layer (block-diagonal curvature, the paper's
    cheap choice). ``FULL`` keeps one matrix over all layers concatenated (``[sum k_l, sum k_l]``), which also
    captures cross-layer curvature at quadratic memory cost.
    """

    PER_LAYER = "per_layer"
    FULL = "full"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DVEConfig:
    """Identity-defining settings of a recording; saved in the manifest and compared on reuse.

    Attributes:
        projection_dim: Kronecker-projected dimension per tracked layer, or ``None`` for exact per-sample
            gradients (the store then keeps the training dtype).
        loss_reduction: how the training loss reduces over the batch.
        layers: names of the modules to track, or ``None`` for every supported module with trainable
            parameters.
        exclude: names (``fnmatch`` patterns) of modules not to track; excluded modules are left untracked
            without error.
        layout: accumulation-matrix layout of the recursion.
        allow_duplicate_ids: accept the same sample id twice in one step (samplers drawing with replacement);
            each copy is then its own occurrence.
        seed: base seed from which every projection seed is derived with ``hashlib``.
    """

    projection_dim: int | None = DEFAULT_PROJECTION_DIM
    loss_reduction: LossReduction = LossReduction.MEAN
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    layout: AccumulatorLayout = AccumulatorLayout.PER_LAYER
    allow_duplicate_ids: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss_reduction", LossReduction.parse(self.loss_reduction))
        object.__setattr__(self, "layout", AccumulatorLayout.parse(self.layout))
        if self.projection_dim is not None and (
            isinstance(self.projection_dim, bool) or not isinstance(self.projection_dim, int) or self.projection_dim < 1
        ):
            raise ConfigError(
                f"projection_dim must be a positive int (per-layer projected size) or None (exact gradients); "
                f"got {self.projection_dim!r}."
            )
        if self.layers is not None:
            if isinstance(self.layers, str):
                raise ConfigError(f"layers must be a sequence of module names, not a string; got {self.layers!r}. "
                                  f"Use layers=({self.layers!r},).")
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.exclude, str):
            raise ConfigError(f"exclude must be a sequence of module names, not a string; got {self.exclude!r}. "
                              f"Use exclude=({self.exclude!r},).")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int; got {self.seed!r}.")

    @property
    def exact(self) -> bool:
        """Whether per-sample gradients are stored unprojected."""
        return self.projection_dim is None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of the settings."""
        out = dataclasses.asdict(self)
        out["loss_reduction"] = self.loss_reduction.value
        out["layout"] = self.layout.value
        out["layers"] = None if self.layers is None else list(self.layers)
        out["exclude"] = list(self.exclude)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DVEConfig:
        """Rebuild settings written by :meth:`to_dict`; unknown keys are rejected."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)} in manifest; known settings are {sorted(names)}.")
        data = dict(data)
        if data.get("layers") is not None:
            data["layers"] = tuple(data["layers"])
        data["exclude"] = tuple(data.get("exclude", ()))
        return cls(**data)

    def settings_hash(self) -> str:
        """Return a stable short hash of the settings (sha256 of their canonical JSON)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
