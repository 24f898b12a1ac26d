"""The ranker registry. Everything the engine does per ranker or per feature is derived from it: the
candidate pool, the evidence in results, the fusion features and transforms, the report labels, the
benchmark tables and plots. See ``engine/rankers/README.md`` for how to add a ranker."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

from .._layout import COMPONENTS
from .._registry import Registry
from ._base import EVIDENCE, KINDS, Feature, Ranker

RANKERS: Registry[type[Ranker]] = Registry("ranker")

R = TypeVar("R", bound=type[Ranker])
F = TypeVar("F", bound=Callable)


def derived(fn: F) -> F:
    """Cache what ``fn`` derives from the registry until the registry changes (queries ask for features and
    their kinds hundreds of times each; a registration or ``unregister`` starts afresh)."""
    memo: dict = {}

    @functools.wraps(fn)
    def wrapper(*args):
        version = RANKERS.version
        key = (version, args)
        try:
            return memo[key]
        except KeyError:
            out = fn(*args)
            if RANKERS.version == version:  # not computed across a registration
                if next(iter(memo), (version,))[0] != version:
                    memo.clear()  # entries of an older registry are never asked for again
                memo[key] = out
            return out

    return wrapper  # type: ignore[return-value]


def register_ranker(cls: R) -> R:
    """Class decorator: check a ranker's declarations and add it to :data:`RANKERS`."""
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"ranker {cls.__name__} needs a name that is an identifier, got {cls.name!r}")
    owned = {f.name: n for n, c in RANKERS.items() for f in c.features}
    for f in cls.features:
        if not isinstance(f, Feature):
            raise TypeError(f"ranker {cls.name!r}: features must be Feature objects, got {f!r}")
        if f.kind not in KINDS:
            raise ValueError(f"ranker {cls.name!r}: feature {f.name!r} has unknown kind {f.kind!r}; "
                             f"valid kinds: {', '.join(KINDS)}")
        if f.evidence not in EVIDENCE:
            raise ValueError(f"ranker {cls.name!r}: feature {f.name!r} has unknown evidence kind {f.evidence!r}; "
                             f"valid kinds: {', '.join(EVIDENCE)}")
        if ":" in f.name or not f.name:
            raise ValueError(f"ranker {cls.name!r}: feature name {f.name!r} must be non-empty without ':'")
        if f.name in owned:
            raise ValueError(f"ranker {cls.name!r}: feature {f.name!r} is already computed by ranker {owned[f.name]!r}")
    unknown = [c for c in cls.components if c not in {x.name for x in COMPONENTS}]
    if unknown:  # the layout table (engine/_layout.py) names every index component a ranker can read
        raise ValueError(f"ranker {cls.name!r} reads unknown index components {unknown}; valid components: "
                         f"{', '.join(x.name for x in COMPONENTS)}")
    if cls.main and not cls.features:
        raise ValueError(f"ranker {cls.name!r} is a main ranker but declares no feature to score with")
    cls.label = cls.label or cls.name
    RANKERS.register(cls.name, cls)
    return cls


@derived
def ranked_classes() -> tuple[tuple[str, type[Ranker]], ...]:
    """(name, class) of every registered ranker in display order: ``Ranker.order``, then registration."""
    items = RANKERS.items()
    return tuple(sorted(items, key=lambda nc: (nc[1].order, items.index(nc))))


@derived
def ranker_names() -> tuple[str, ...]:
    return tuple(n for n, _ in ranked_classes())


@derived
def main_rankers() -> tuple[str, ...]:
    """Rankers reported on their own by benchmarks and fused by RRF, in display order."""
    return tuple(n for n, c in ranked_classes() if c.main)


@derived
def rrf_rankers() -> tuple[str, ...]:
    """Main rankers that reciprocal rank fusion fuses (the untrained baseline), in display order."""
    return tuple(n for n, c in ranked_classes() if c.main and c.rrf)


@derived
def pool_rankers() -> tuple[str, ...]:
    """Rankers whose first-stage candidates form the fused pool."""
    return tuple(n for n, c in ranked_classes() if c.first_stage)


@derived
def features() -> tuple[Feature, ...]:
    """Every evidence feature, in display order (rankers in display order, then declaration order)."""
    return tuple(f for _, c in ranked_classes() for f in c.features)


@derived
def feature_names() -> tuple[str, ...]:
    return tuple(f.name for f in features())


@derived
def _by_name() -> dict[str, Feature]:
    return {f.name: f for f in features()}


def get_feature(name: str) -> Feature:
    f = _by_name().get(name)
    if f is not None:
        return f
    from .._errors import UnknownNameError

    raise UnknownNameError(f"unknown feature {name!r}; valid choices: {', '.join(feature_names())}")


def evidence_of(name: str) -> str:
    """The evidence kind (``EVIDENCE``) of feature ``name``."""
    return get_feature(name).evidence


@derived
def feature_specs() -> tuple[str, ...]:
    """The fusion feature specs a learned model uses by default: each feature raw, z-scored and as a
    reciprocal rank within the pool; cosines also as the near-duplicate log-distance and its z-score."""
    out = []
    for f in features():
        suffixes = ("", ":z", ":rr", ":nd", ":ndz") if f.kind == "cosine" else ("", ":z", ":rr")
        out += [f"{f.name}{s}" for s in suffixes]
    return tuple(out)
