"""Frozen settings of a DVEmb run, their validation and their (de)serialisation for the manifest."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from typing import Any

from .config_checks import check_count, check_fraction, module_names, plain_ints
from .errors import ConfigError

#: Default Kronecker-projected dimension, counted **per tracked layer** (k_out * k_in <= this).
#: 1024 is the paper's choice for Pythia-410M; for small layers the exact size is used when it is smaller.
DEFAULT_PROJECTION_DIM = 1024
#: ``layout="auto"`` keeps one accumulation matrix over all tracked layers up to this many projected dimensions
#: in all (``M`` is then at most 64 MB in float32 and costs at most ``4 K^2`` flops per occurrence), one per
#: layer above it.
AUTO_FULL_MAX_DIM = 4096
#: How an option's error lists its values where not as its members (``'weights'`` is what a callable records).
_ALLOWED = {"LossReduction": "'mean', 'sum', or a callable batch -> Tensor[B] of per-sample weights (recorded as "
                             "'weights')"}


class _Option(str, enum.Enum):
    """A string enum whose constructor error lists every allowed value."""

    @classmethod
    def parse(cls, value: Any, field: str | None = None) -> _Option:
        """Return the member for ``value`` (a member or its string value).

        Args:
            value: the member or its value.
            field: the argument's name, for the message.

        Raises:
            ConfigError: if ``value`` is not one of the allowed values.
        """
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            case = (f" (lower case: {value.lower()!r})" if isinstance(value, str)
                    and value.lower() in {m.value for m in cls} else "")
            named = f"{field}: " if field else ""
            raise ConfigError(f"{named}{cls.__name__} got {value!r}; allowed values are {cls._allowed()}{case}."
                              ) from None

    @classmethod
    def _allowed(cls) -> str:
        """The allowed values as the error message lists them."""
        return _ALLOWED.get(cls.__name__) or ", ".join(repr(member.value) for member in cls)


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
    captures cross-layer curvature at quadratic memory cost. ``AUTO`` is ``FULL`` up to
    :data:`AUTO_FULL_MAX_DIM` projected dimensions in all and ``PER_LAYER`` above (chosen by measurement:
    ``benchmarks/fidelity.py``, where the cross-layer terms lift the CNNs from 0.80 to 0.95 at lr 0.05).
    """

    AUTO = "auto"
    PER_LAYER = "per_layer"
    FULL = "full"

    def resolve(self, total_dim: int) -> AccumulatorLayout:
        """The concrete layout for tracked layers of ``total_dim`` projected dimensions in all."""
        if self is not AccumulatorLayout.AUTO:
            return self
        return AccumulatorLayout.FULL if total_dim <= AUTO_FULL_MAX_DIM else AccumulatorLayout.PER_LAYER


class Curvature(_Option):
    """The step Hessian ``H_t`` of the recursion's factors ``I - lr_t H_t`` (method.md §2).

    ``EMPIRICAL_FISHER`` is the paper's ``sum_z w g g^T`` from the recorded gradients (no extra cost).
    ``GGN`` is the Gauss-Newton matrix of a softmax cross-entropy loss, ``sum_z w J^T (diag p - p p^T) J``,
    estimated without bias from one pseudo-gradient per sample, ``J^T (p - onehot(y~))`` with ``y~`` drawn from
    the model's own prediction ``p``; it costs one extra backward pass (of activations only) per step and twice
    the stored rows. ``NONE`` drops the curvature (``e = lr w g``): the no-curvature baseline.
    """

    EMPIRICAL_FISHER = "empirical_fisher"
    GGN = "ggn"
    NONE = "none"


class EmbeddingMethod(_Option):
    """How the train-end embeddings are formed (the recorded rows are the same either way).

    ``RECURSION`` is the backward recursion with the chosen :class:`Curvature` (method.md §2): cheap, for any
    model. ``REPLAY`` then replaces them by replayed ones, each projection row carried back through the actual
    updates (``DataValueEmbeddings.replay_embeddings``): every step's true curvature and optimizer, at
    ``sum_l k_l`` vector-Jacobian products per step, for small models; where the run cannot be replayed the
    recursion's are kept with a warning.
    """

    RECURSION = "recursion"
    REPLAY = "replay"


class StorageDtype(_Option):
    """Dtype of the per-sample gradients on disk (the accumulation matrices are always float32 or wider).

    ``AUTO`` keeps the training dtype in exact mode and uses ``FLOAT16`` in projected mode (chosen by
    measurement: ``benchmarks/fidelity.py``, scores within 3.4e-5 of float32 storage at half the bytes).
    ``FLOAT16`` stores each row scaled by its largest magnitude
    (a float32 scale per row), so small late-training gradients do not become subnormals.
    """

    AUTO = "auto"
    FLOAT64 = "float64"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    def resolve(self, training_dtype: str, exact: bool) -> StorageDtype:
        """The concrete dtype for a run trained in ``training_dtype`` (``"float32"``, ``"float64"``)."""
        if self is not StorageDtype.AUTO:
            return self
        return StorageDtype(training_dtype) if exact else StorageDtype.FLOAT16


#: Settings added after schema 1; hashed only when they differ from their default (:meth:`DVEConfig.settings_hash`).
ADDED_FIELDS = ("curvature", "checkpoint_interval", "adam_second_moment")


def _plain(value: Any) -> Any:
    """The JSON form of a setting's value (an option's string)."""
    return value.value if isinstance(value, enum.Enum) else value


@dataclasses.dataclass(frozen=True, kw_only=True)
class DVEConfig:
    """Identity-defining settings of a recording; saved in the manifest and compared on reuse.

    Attributes:
        projection_dim: Kronecker-projected dimension per tracked layer, or ``None`` for exact per-sample
            gradients (the store then keeps the training dtype).
        loss_reduction: how the training loss reduces over the batch (a callable of per-sample weights is
            recorded as ``WEIGHTS``).
        layers: names of the modules to track, or ``None`` for every supported module with trainable
            parameters.
        exclude: names (``fnmatch`` patterns) of modules not to track; excluded modules are left untracked
            without error.
        layout: accumulation-matrix layout of the recursion (``AUTO`` until a fit resolves it from the tracked
            layers' sizes; stores and manifests hold the resolved layout).
        allow_duplicate_ids: accept the same sample id twice in one step (samplers drawing with replacement);
            each copy is then its own occurrence.
        seed: base seed from which every projection seed is derived with ``hashlib``.
        storage_dtype: dtype of the stored per-sample gradients.
        segments: influence checkpointing (method.md §3): the recursion runs in this many contiguous segments
            of the trajectory, in parallel threads, and queries chain the segments' factors ``I - M_seg``. The
            same factors give the influence on each segment boundary (data value dynamics).
        curvature: the step Hessian of the recursion (:class:`Curvature`).
        checkpoint_interval: steps between the parameter and optimizer-state checkpoints that exact replay
            (``DataValueEmbeddings.exact_influence``) starts from: an int, ``"auto"`` (their disk use stays under
            10% of the gradient store's), or ``None`` (off: exact replay is then refused).
        adam_second_moment: with Adam/AdamW, also model the removed sample's effect on the second moment ``v``
            in the train-end recursion (the "v pass"; exact per-sample gradients only, ``projection_dim=None``).
    """

    projection_dim: int | None = DEFAULT_PROJECTION_DIM
    loss_reduction: LossReduction = LossReduction.MEAN
    layers: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    layout: AccumulatorLayout = AccumulatorLayout.AUTO
    allow_duplicate_ids: bool = False
    seed: int = 0
    storage_dtype: StorageDtype = StorageDtype.AUTO
    segments: int = 1
    curvature: Curvature = Curvature.EMPIRICAL_FISHER
    checkpoint_interval: int | str | None = "auto"
    adam_second_moment: bool = False

    def __post_init__(self) -> None:
        plain_ints(self, "projection_dim", "segments", "seed", "checkpoint_interval")
        reduction = LossReduction.WEIGHTS if callable(self.loss_reduction) else self.loss_reduction
        object.__setattr__(self, "loss_reduction", LossReduction.parse(reduction, "loss_reduction"))
        object.__setattr__(self, "layout", AccumulatorLayout.parse(self.layout, "layout"))
        object.__setattr__(self, "storage_dtype", StorageDtype.parse(self.storage_dtype, "storage_dtype"))
        object.__setattr__(self, "curvature", Curvature.parse(self.curvature, "curvature"))
        interval = self.checkpoint_interval
        if interval not in ("auto", None) and (
            isinstance(interval, bool) or not isinstance(interval, int) or interval < 1
        ):
            raise ConfigError(f"checkpoint_interval must be a positive int (steps between replay checkpoints), 'auto' "
                              f"or None (off); got {interval!r}.")
        if isinstance(self.segments, bool) or not isinstance(self.segments, int) or self.segments < 1:
            raise ConfigError(f"segments must be a positive int (1 = one sequential recursion); got {self.segments!r}.")
        if self.projection_dim is not None and (
            isinstance(self.projection_dim, bool) or not isinstance(self.projection_dim, int) or self.projection_dim < 1
        ):
            raise ConfigError(
                f"projection_dim must be a positive int (per-layer projected size) or None (exact gradients); "
                f"got {self.projection_dim!r}."
            )
        if self.layers is not None:  # (repeats dropped: the settings hash is the same for the same layers)
            object.__setattr__(self, "layers", module_names("layers", self.layers, "Pass layers=None to track every "
                                                            "supported layer."))
        object.__setattr__(self, "exclude", module_names("exclude", self.exclude, ""))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int; got {self.seed!r}.")
        if not isinstance(self.allow_duplicate_ids, bool):
            raise ConfigError(f"allow_duplicate_ids must be a bool; got {self.allow_duplicate_ids!r}.")
        if not isinstance(self.adam_second_moment, bool):
            raise ConfigError(f"adam_second_moment must be a bool; got {self.adam_second_moment!r}.")
        if self.adam_second_moment and self.projection_dim is not None:
            raise ConfigError("adam_second_moment=True needs exact per-sample gradients (projection_dim=None): the "
                              "correction multiplies each sample's gradient elementwise by the batch gradient, which "
                              f"a Kronecker projection cannot carry; got projection_dim={self.projection_dim}.")

    def resolved(self, total_dim: int) -> DVEConfig:
        """These settings with ``layout`` resolved for tracked layers of ``total_dim`` projected dimensions."""
        return dataclasses.replace(self, layout=self.layout.resolve(total_dim))

    @property
    def exact(self) -> bool:
        """Whether per-sample gradients are stored unprojected."""
        return self.projection_dim is None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of the settings."""
        out = dataclasses.asdict(self)
        out["loss_reduction"] = self.loss_reduction.value
        out["layout"] = self.layout.value
        out["storage_dtype"] = self.storage_dtype.value
        out["curvature"] = self.curvature.value
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
        """Return a stable short hash of the settings (sha256 of their canonical JSON).

        Fields added after the first release (:data:`ADDED_FIELDS`) are left out while they hold their default,
        so stores written before they existed keep their hash.
        """
        data = self.to_dict()
        defaults = DVEConfig.__dataclass_fields__
        for name in ADDED_FIELDS:
            if data[name] == _plain(defaults[name].default):
                del data[name]
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class CurveScale(_Option):
    """Which per-step influence curve a summary is computed on (method.md §4, "Training dynamics").

    ``RAW`` is the average influence of a step's samples on the reference loss; ``PER_LR`` divides it by the
    step's learning rate (the paper's Fig. 1a quantity, independent of the schedule's scale).
    """

    RAW = "raw"
    PER_LR = "per_lr"


class CurveSource(_Option):
    """Where the report's per-occurrence scores come from.

    ``EMBEDDINGS``: one dot product of each embedding with the reference gradient (test-agnostic, free).
    ``EXACT_REPLAY``: :meth:`~lightning_dve.influence.DataValueEmbeddings.exact_influence` of the mean reference
    loss (the first-order limit through the actual optimizer; needs the replay checkpoints, costs a replay).
    """

    EMBEDDINGS = "embeddings"
    EXACT_REPLAY = "exact_replay"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """What the train-end report computes and where it goes (``lightning_dve.reporting``).

    Attributes:
        max_reference_samples: cap on the reference samples whose mean test-loss gradient is the query vector.
        top_k: how many most helpful and most harmful training samples to list.
        early_fraction: share of the recorded steps that forms the early stage (from the start).
        late_fraction: share of the recorded steps that forms the late stage (at the end);
            ``early_fraction + late_fraction < 1`` (the rest is the middle stage).
        smoothing_fraction: width of the centred moving average, as a share of the recorded steps
            (``0`` disables smoothing; the window is at least one step and odd).
        phase_threshold: a phase boundary is where the smoothed curve crosses
            ``basin + phase_threshold * (peak - basin)`` on the way down (warm-up end) or up (ascent start).
        min_phase_rise: a warm-up or ascent is reported only if its peak rises above the basin by at least
            this share of the smoothed curve's range.
        histogram_bins: number of bins of the per-sample total influence histogram.
        stage_scale: which curve the stage summary and phase detection use.
        figures: write PNG figures (matplotlib) and log them.
        log_to_loggers: also log to ``trainer.loggers`` (files under ``save_dir/report/`` are always written).
        render_samples: look the top-k samples up in the training dataloader to show their label and input.
        curve_source: where the per-occurrence scores of the curves and tables come from (:class:`CurveSource`).
        namespace: the first part of every logged key (``dve/total_influence``) and of the logged settings; give
            each callback of one Trainer that logs its own (two with the same one are refused at fit start).
    """

    max_reference_samples: int = 512
    top_k: int = 10
    early_fraction: float = 0.1
    late_fraction: float = 0.1
    smoothing_fraction: float = 0.05
    phase_threshold: float = 0.2
    min_phase_rise: float = 0.1
    histogram_bins: int = 30
    stage_scale: CurveScale = CurveScale.PER_LR
    figures: bool = True
    log_to_loggers: bool = True
    render_samples: bool = True
    curve_source: CurveSource = CurveSource.EMBEDDINGS
    namespace: str = "dve"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_scale", CurveScale.parse(self.stage_scale, "stage_scale"))
        object.__setattr__(self, "curve_source", CurveSource.parse(self.curve_source, "curve_source"))
        plain_ints(self, "max_reference_samples", "top_k", "histogram_bins")
        check_count("max_reference_samples", self.max_reference_samples, 1)
        check_count("top_k", self.top_k, 0)
        check_count("histogram_bins", self.histogram_bins, 1)
        if self.histogram_bins > 512:
            raise ConfigError(f"histogram_bins must be <= 512 (the most W&B histograms hold); got "
                              f"{self.histogram_bins}. Use fewer bins, e.g. 30.")
        stages = "Use early_fraction + late_fraction < 1, e.g. 0.1 and 0.1."
        early = check_fraction("early_fraction", self.early_fraction, 0.0, 1.0, stages)
        late = check_fraction("late_fraction", self.late_fraction, 0.0, 1.0, stages)
        if early + late >= 1.0:
            raise ConfigError(f"early_fraction + late_fraction must be < 1 (the middle stage is the rest); got "
                              f"{early} + {late} = {early + late}. {stages}")
        check_fraction("smoothing_fraction", self.smoothing_fraction, 0.0, 1.0, "Use e.g. 0.05, or 0 for none.")
        check_fraction("phase_threshold", self.phase_threshold, 0.0, 1.0, "Use e.g. 0.2.")
        check_fraction("min_phase_rise", self.min_phase_rise, 0.0, 1.0, "Use e.g. 0.1.")
        if not isinstance(self.namespace, str) or not self.namespace or self.namespace != self.namespace.strip(" /"):
            raise ConfigError(f"namespace must be a non-empty str, e.g. 'dve_clean'; got {self.namespace!r}.")
        for name in ("figures", "log_to_loggers", "render_samples"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool; got {getattr(self, name)!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of the settings."""
        out = dataclasses.asdict(self)
        out["stage_scale"] = self.stage_scale.value
        out["curve_source"] = self.curve_source.value
        return out
