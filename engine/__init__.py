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

try:
    from . import _startup

    if _startup.is_console_script():  # `attrib ...`: Ctrl-C during start-up exits quietly (see engine._startup)
        _startup.install()
except KeyboardInterrupt:  # a Ctrl-C before that handler was in place (while _startup loaded): the same quiet exit
    from . import _startup

    if not _startup.is_console_script():
        raise
    _startup.interrupted_at_start_up(None, None)

import importlib  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

# Public names -> the module that defines them. They are imported on first use (module ``__getattr__``), so
# ``import engine`` (and the ``attrib`` console script, which imports ``engine.cli``) starts in milliseconds and
# reaches the CLI's interrupt handling before numpy, polars, faiss or torch are loaded.
_LAZY = {
    "._build": ("BuildSummary", "build_index"),
    "._cluster": ("ClusterSettings",),
    "._ray": ("build_index_ray",),
    "._encode": ("ARRAY_ENCODINGS", "ENCODINGS"),
    "._errors": ("AttribError", "EmptyCorpusError", "FusionWeightsError", "IndexBusyError", "IndexFormatError",
                 "ModelMismatchError", "OutputError", "QueryInputError", "SourceError", "UnknownNameError",
                 "WeightsUnavailableError"),
    "._explain": ("Correspondence",),
    "._index": ("Index", "open_index"),
    "._info": ("index_info",),
    "._maintain": ("CompactSummary", "DeleteSummary", "MergeSummary", "VerifyReport", "compact", "delete_records",
                   "merge_appended", "verify"),
    "._manifest": ("library_versions", "now_iso", "model_fingerprint"),
    "._stores": ("patch_scores",),
    "._search_tune": ("tune_search",),
    "._pool": ("Pool",),
    "._profiles": ("PROFILES", "ModelProfile", "get_profile"),
    "._settings": ("IndexSettings", "QuerySettings", "cache_root"),
    "._writer": ("IndexWriter",),
    ".fusion": ("Fusion", "FusionWeights"),
    ".rankers": ("RANKERS", "Candidates", "Feature", "QueryInput", "Ranker", "Ranking", "feature_names",
                 "feature_specs", "features", "main_rankers", "pool_rankers", "ranking_order", "register_ranker"),
    ".results": ("Attribution", "Candidate", "ModelsInfo", "Verdict"),
}
_RENAMED = {"INDEX_FORMAT_VERSION": ("._manifest", "FORMAT_VERSION")}
_WHERE = {name: (mod, name) for mod, names in _LAZY.items() for name in names} | _RENAMED


def __getattr__(name: str):
    """Import a public name's module on first use (PEP 562)."""
    try:
        mod, attr = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'engine' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(mod, __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from ._build import BuildSummary, build_index  # noqa: F401
    from ._cluster import ClusterSettings  # noqa: F401
    from ._encode import ARRAY_ENCODINGS, ENCODINGS  # noqa: F401
    from ._errors import (  # noqa: F401
        AttribError,
        EmptyCorpusError,
        FusionWeightsError,
        IndexBusyError,
        IndexFormatError,
        ModelMismatchError,
        OutputError,
        QueryInputError,
        SourceError,
        UnknownNameError,
        WeightsUnavailableError,
    )
    from ._explain import Correspondence  # noqa: F401
    from ._index import Index, open_index  # noqa: F401
    from ._info import index_info  # noqa: F401
    from ._maintain import (  # noqa: F401
        CompactSummary,
        DeleteSummary,
        MergeSummary,
        VerifyReport,
        compact,
        delete_records,
        merge_appended,
        verify,
    )
    from ._manifest import FORMAT_VERSION as INDEX_FORMAT_VERSION  # noqa: F401
    from ._manifest import library_versions, model_fingerprint, now_iso  # noqa: F401
    from ._pool import Pool  # noqa: F401
    from ._profiles import PROFILES, ModelProfile, get_profile  # noqa: F401
    from ._ray import build_index_ray  # noqa: F401
    from ._search_tune import tune_search  # noqa: F401
    from ._settings import IndexSettings, QuerySettings, cache_root  # noqa: F401
    from ._stores import patch_scores  # noqa: F401
    from ._writer import IndexWriter  # noqa: F401
    from .fusion import Fusion, FusionWeights  # noqa: F401
    from .rankers import (  # noqa: F401
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
    from .results import Attribution, Candidate, ModelsInfo, Verdict  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "build_index", "open_index", "index_info", "delete_records", "compact", "merge_appended", "verify", "tune_search",
    "DeleteSummary", "CompactSummary", "MergeSummary", "VerifyReport", "Index", "IndexWriter", "BuildSummary",
    "Attribution", "Candidate",
    "Verdict", "ModelsInfo", "Correspondence", "Fusion", "FusionWeights", "Pool", "IndexSettings", "QuerySettings",
    "PROFILES", "ModelProfile", "get_profile", "RANKERS", "register_ranker", "main_rankers", "pool_rankers",
    "features", "feature_names", "feature_specs", "Feature", "QueryInput", "Ranker", "Ranking", "Candidates",
    "ranking_order", "ENCODINGS", "ARRAY_ENCODINGS", "AttribError", "SourceError", "EmptyCorpusError",
    "IndexFormatError", "IndexBusyError", "ModelMismatchError", "QueryInputError", "FusionWeightsError",
    "UnknownNameError", "WeightsUnavailableError", "OutputError", "load_encoders", "cache_root", "library_versions",
    "now_iso", "INDEX_FORMAT_VERSION", "model_fingerprint", "patch_scores", "build_index_ray", "ClusterSettings",
]


def load_encoders(models: str = "default", device: str | None = None, clip_weights: str | None = None,
                  dino_weights: str | None = None):
    """Load a model profile's encoders (imports torch)."""
    from ._encoders import Encoders

    return Encoders(models, device=device, clip_weights=clip_weights, dino_weights=dino_weights)
