"""attrib: attribute AI-generated images to their training data.

Public API (everything ``eval/`` and ``benchmarks/`` use is exported here or lives in a module without a
leading underscore: ``engine.rankers``, ``engine.fusion``, ``engine.results``, ``engine.report``,
``engine.images``, ``engine.scenes``, ``engine.files``, ``engine.ui``)::

    import engine
    summary = engine.build_index("photos/", "my-index", models="offline")
    index = engine.open_index("my-index")
    result = index.query(image="generated.png", prompt="a cat on a sofa", k=10)
    print(result.to_dict())
"""
from __future__ import annotations

from ._build import BuildSummary, build_index
from ._encode import ARRAY_ENCODINGS, ENCODINGS
from ._errors import (
    AttribError,
    EmptyCorpusError,
    FusionWeightsError,
    IndexBusyError,
    IndexFormatError,
    ModelMismatchError,
    QueryInputError,
    SourceError,
    UnknownNameError,
    WeightsUnavailableError,
)
from ._explain import Correspondence
from ._index import Index, open_index
from ._info import index_info
from ._maintain import CompactSummary, DeleteSummary, VerifyReport, compact, delete_records, verify
from ._manifest import FORMAT_VERSION as INDEX_FORMAT_VERSION
from ._manifest import library_versions, now_iso
from ._pool import Pool
from ._profiles import PROFILES, ModelProfile, get_profile
from ._settings import IndexSettings, QuerySettings, cache_root
from ._writer import IndexWriter
from .fusion import Fusion, FusionWeights
from .rankers import (
    RANKERS,
    Candidates,
    Feature,
    QueryInput,
    Ranker,
    Ranking,
    feature_names,
    feature_specs,
    features,
    main_rankers,
    pool_rankers,
    ranking_order,
    register_ranker,
)
from .results import Attribution, Candidate, ModelsInfo, Verdict

__version__ = "0.1.0"

__all__ = [
    "build_index", "open_index", "index_info", "delete_records", "compact", "verify", "DeleteSummary",
    "CompactSummary", "VerifyReport", "Index", "IndexWriter", "BuildSummary", "Attribution", "Candidate",
    "Verdict", "ModelsInfo", "Correspondence", "Fusion", "FusionWeights", "Pool", "IndexSettings", "QuerySettings",
    "PROFILES", "ModelProfile", "get_profile", "RANKERS", "register_ranker", "main_rankers", "pool_rankers",
    "features", "feature_names", "feature_specs", "Feature", "QueryInput", "Ranker", "Ranking", "Candidates",
    "ranking_order", "ENCODINGS", "ARRAY_ENCODINGS", "AttribError", "SourceError", "EmptyCorpusError",
    "IndexFormatError", "IndexBusyError", "ModelMismatchError", "QueryInputError", "FusionWeightsError",
    "UnknownNameError",
    "WeightsUnavailableError", "load_encoders", "cache_root", "library_versions", "now_iso", "INDEX_FORMAT_VERSION",
]


def load_encoders(models: str = "default", device: str | None = None, clip_weights: str | None = None,
                  dino_weights: str | None = None):
    """Load a model profile's encoders (imports torch)."""
    from ._encoders import Encoders

    return Encoders(models, device=device, clip_weights=clip_weights, dino_weights=dino_weights)
