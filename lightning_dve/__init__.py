"""lightning_dve: data value embeddings (DVEmb) for PyTorch Lightning.

Record per-sample gradients during ``fit`` with :class:`DataValueEmbedding`, then ask which training samples,
used at which step, shaped the final model with :meth:`DataValueEmbeddings.influence`.
"""

from .callback import DataValueEmbedding
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
