"""lightning_dve: data value embeddings (DVEmb) for PyTorch Lightning.

Record per-sample gradients during ``fit`` with :class:`DataValueEmbedding`, then ask which training samples,
used at which step, shaped the final model with :meth:`DataValueEmbeddings.influence`. The callback, and with it
Lightning, is imported at its first use: a process that only loads a store and queries it does not import Lightning.
"""

from typing import TYPE_CHECKING, Any

from .config import (
    DEFAULT_PROJECTION_DIM,
    AccumulatorLayout,
    Curvature,
    CurveScale,
    CurveSource,
    DVEConfig,
    EmbeddingMethod,
    LossReduction,
    ReportConfig,
    StorageDtype,
)
from .errors import (
    ConfigError,
    DVEError,
    GradientError,
    LayerMismatchError,
    LossReductionError,
    RemoteRankError,
    SampleIdError,
    StoreError,
    UnsupportedError,
)
from .influence import DataValueEmbeddings, InfluenceResult, Ranking
from .results import EmbeddingMatrix

if TYPE_CHECKING:
    from .callback import DataValueEmbedding


def __getattr__(name: str) -> Any:
    """``DataValueEmbedding``, imported at first use (PEP 562)."""
    if name == "DataValueEmbedding":
        from .callback import DataValueEmbedding

        return DataValueEmbedding
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DEFAULT_PROJECTION_DIM",
    "AccumulatorLayout",
    "ConfigError",
    "Curvature",
    "CurveScale",
    "CurveSource",
    "DVEConfig",
    "DVEError",
    "DataValueEmbedding",
    "DataValueEmbeddings",
    "EmbeddingMatrix",
    "EmbeddingMethod",
    "GradientError",
    "InfluenceResult",
    "LayerMismatchError",
    "LossReduction",
    "LossReductionError",
    "Ranking",
    "RemoteRankError",
    "ReportConfig",
    "SampleIdError",
    "StorageDtype",
    "StoreError",
    "UnsupportedError",
]
