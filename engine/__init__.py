"""attrib: attribute AI-generated images to their training data.

Public API::

    import engine
    summary = engine.build_index("photos/", "my-index", models="offline")
    index = engine.open_index("my-index")
    result = index.query(image="generated.png", prompt="a cat on a sofa", k=10)
    print(result.to_dict())
"""
from __future__ import annotations

from ._build import BuildSummary, IndexWriter, build_index
from ._errors import (AttribError, EmptyCorpusError, FusionWeightsError, IndexFormatError, ModelMismatchError,
                      QueryInputError, SourceError, UnknownNameError, WeightsUnavailableError)
from ._index import Attribution, Fusion, Index, Pool, open_index
from ._info import index_info
from ._profiles import PROFILES, ModelProfile, get_profile
from ._settings import IndexSettings, QuerySettings
from .fusion import FusionWeights
from .rankers import FEATURES, MAIN_RANKERS, RANKERS, QueryInput, Ranker, Ranking

__version__ = "0.1.0"

__all__ = [
    "build_index", "open_index", "index_info", "Index", "IndexWriter", "BuildSummary", "Attribution", "Fusion", "Pool",
    "IndexSettings", "QuerySettings", "FusionWeights", "PROFILES", "ModelProfile", "get_profile", "RANKERS",
    "MAIN_RANKERS", "FEATURES", "QueryInput", "Ranker", "Ranking", "AttribError", "SourceError", "EmptyCorpusError",
    "IndexFormatError", "ModelMismatchError", "QueryInputError", "FusionWeightsError", "UnknownNameError",
    "WeightsUnavailableError", "load_encoders",
]


def load_encoders(models: str = "default", device: str | None = None, clip_weights: str | None = None,
                  dino_weights: str | None = None):
    """Load a model profile's encoders (imports torch)."""
    from ._encoders import Encoders

    return Encoders(models, device=device, clip_weights=clip_weights, dino_weights=dino_weights)
