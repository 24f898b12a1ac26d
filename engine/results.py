"""The answer to a query, as typed objects. The JSON of ``attrib query --json`` (schema version
:data:`JSON_SCHEMA_VERSION`, documented in README.md) is produced only by their ``to_dict`` methods."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .rankers import QueryInput

JSON_SCHEMA_VERSION = 1
SHARE_NOTE = ("attribution shares are similarity-based estimates normalised over the results above the threshold, "
              "not causal claims")


def clean_number(x: Any) -> float | None:
    """A JSON-safe number: None for missing or non-finite values, else rounded to 6 decimals."""
    return None if x is None or not math.isfinite(float(x)) else round(float(x), 6)


@dataclass
class Candidate:
    """One returned training record with its evidence."""

    rank: int  # 1-based position in the fused ranking
    row: int  # the record's position in the index (library API)
    id: str  # the record id
    image: str | None  # image reference (path or shard.tar::member); None for caption-only records
    caption: str  # the training caption
    score: float | None  # fused score (log-odds with logistic weights; the RRF sum otherwise)
    above_threshold: bool | None  # None when the fusion has no calibrated threshold
    evidence: dict[str, float | None]  # each registered feature's raw value (None: does not apply)
    ranks: dict[str, int | None]  # rank under each main ranker within the pool (None: not ranked)
    share: float | None = None  # attribution share, only for results above the threshold
    # what the caption shares with the prompt (engine.text.shared_text: words, phrases, spans) and how many other
    # records share the caption's words (duplicates); None when the query has no prompt terms
    text: dict | None = None
    support: dict[str, float | None] | None = None  # evidence kind -> score part above the best unrelated record's
    carried_by: list[str] | None = None  # evidence kinds that carried it, strongest first (learned fusion only)
    caption_match_only: bool | None = None  # above the threshold without image support (None: no threshold)

    def to_dict(self) -> dict:
        d = {"rank": self.rank, "row": self.row, "id": self.id, "image": self.image, "caption": self.caption,
             "score": self.score, "above_threshold": self.above_threshold, "evidence": dict(self.evidence),
             "ranks": dict(self.ranks)}
        if self.share is not None:
            d["share"] = self.share
        if self.text is not None:
            d["text"] = {k: (list(v) if isinstance(v, list) else v) for k, v in self.text.items()}
        if self.support is not None:
            d["support"] = dict(self.support)
            d["carried_by"] = list(self.carried_by or [])
        if self.caption_match_only is not None:
            d["caption_match_only"] = self.caption_match_only
        return d


@dataclass
class Verdict:
    """Whether any result is a likely source (None when the fusion has no calibrated threshold)."""

    likely_source: bool | None
    threshold: float | None
    n_above: int | None
    label: str
    share_note: str | None = None
    caption_match_only: bool | None = None  # every result above the threshold is a caption match only

    def to_dict(self) -> dict:
        d = {"likely_source": self.likely_source, "threshold": self.threshold, "n_above": self.n_above,
             "label": self.label}
        if self.share_note is not None:
            d["share_note"] = self.share_note
        if self.caption_match_only is not None:
            d["caption_match_only"] = self.caption_match_only
        return d


@dataclass
class ModelsInfo:
    """The index's models, as a query reports them."""

    profile: str
    pretrained: bool
    fingerprint: str
    clip: str
    dino: str
    warning: str | None = None  # the untrained-weights banner, when it applies

    def to_dict(self) -> dict:
        d = {"profile": self.profile, "pretrained": self.pretrained, "fingerprint": self.fingerprint,
             "clip": self.clip, "dino": self.dino}
        if self.warning is not None:
            d["warning"] = self.warning
        return d


@dataclass
class Attribution:
    """The answer to one query."""

    query: dict  # {"image": reference or None, "prompt": str}
    models: ModelsInfo
    fusion: dict  # see Fusion.describe()
    verdict: Verdict
    results: list[Candidate]
    timings_ms: dict[str, float]
    warnings: list[str]
    query_input: QueryInput | None = field(default=None, repr=False)  # the encoded query (reports use it)
    pool_rows: np.ndarray | None = field(default=None, repr=False)  # the candidate pool (report baselines)

    def to_dict(self) -> dict:
        return {
            "schema_version": JSON_SCHEMA_VERSION,
            "query": dict(self.query),
            "models": self.models.to_dict(),
            "fusion": dict(self.fusion),
            "verdict": self.verdict.to_dict(),
            "results": [c.to_dict() for c in self.results],
            "timings_ms": dict(self.timings_ms),
            "warnings": list(self.warnings),
        }
