"""Weighted fusion with learned weights, and the versioned weights file format.

score(d) = bias + sum_j w_j * (phi_j(d) - mean_j) / std_j, where phi_j is a feature after an optional
per-query transform, named ``FEATURE`` (raw value) or ``FEATURE:z`` / ``:mm`` / ``:rr`` / ``:nd`` / ``:ndz``
(see ``_normalize``; which transforms a feature allows comes from its kind in the ranker registry). Missing
values count as the training mean. With logistic weights the score is the log-odds that a candidate is a
source; ``threshold`` is the calibrated "no likely source" cut on the top score.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .._errors import FusionWeightsError, ModelMismatchError
from ..rankers import EVIDENCE, feature_names, get_feature
from ._normalize import TRANSFORMS, normalize
from .logistic import standardize

WEIGHTS_FORMAT = "attrib-fusion-weights"
WEIGHTS_VERSION = 1


def parse_feature(spec: str) -> tuple[str, str]:
    """(feature, transform) of a spec such as ``dino_patch:z``; unknown names or transforms fail."""
    base, _, how = str(spec).partition(":")
    how = how or "raw"
    known = feature_names()
    if base not in known or how not in TRANSFORMS:
        raise FusionWeightsError(
            f"unknown fusion feature {spec!r}; features are {', '.join(known)} with an optional suffix "
            f"{', '.join(':' + t for t in TRANSFORMS if t != 'raw')}"
        )
    f = get_feature(base)
    if how not in f.transforms:
        raise FusionWeightsError(f"fusion feature {spec!r}: :{how} does not apply to {f.kind} features "
                                 f"(valid: {', '.join(':' + t for t in f.transforms if t != 'raw')})")
    return base, how


def feature_matrix(feats: dict[str, np.ndarray], specs: list[str], rrf_k: int = 60) -> np.ndarray:
    """(n_candidates, len(specs)) matrix; raw missing values stay NaN (imputed by the model)."""
    n = len(next(iter(feats.values()))) if feats else 0
    cols = []
    for spec in specs:
        base, how = parse_feature(spec)
        x = feats.get(base)
        cols.append(np.full(n, np.nan) if x is None else normalize(x, how, rrf_k))
    return np.stack(cols, axis=1) if cols else np.zeros((n, 0))


@dataclass
class FusionWeights:
    features: list[str]  # feature specs, e.g. "clip", "dino_patch:z", "bm25:rr"
    weights: list[float]  # one per feature, on standardised values
    bias: float  # intercept (log-odds when method is logistic)
    mean: list[float]  # standardisation mean per feature (also the value imputed when missing)
    std: list[float]  # standardisation std per feature
    models: dict  # identity of the index models the weights were learned with (fingerprint, profile, ...)
    threshold: float | None = None  # "no likely source" cut on the top fused score; None = not calibrated
    threshold_rule: str = ""  # how the threshold was chosen
    method: str = "logistic"  # how the weights were learned
    rrf_k: int = 60  # k used by the :rr transform
    provenance: dict = field(default_factory=dict)  # benchmark, metric, scores per split, date, ...
    evidence_levels: dict = field(default_factory=dict)  # evidence kind -> score part the best unrelated record reaches
    name: str = ""  # display name (file name) - not saved

    def score(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return self.score_matrix(feature_matrix(feats, self.features, self.rrf_k))

    def score_matrix(self, X: np.ndarray) -> np.ndarray:
        return self.bias + standardize(X, self.mean, self.std) @ np.asarray(self.weights)

    def parts(self, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each evidence kind's part of the score of every candidate: the sum of w_j * standardised x_j over the
        features of that kind (``engine.rankers.EVIDENCE``), so score = bias + the sum of the parts. A part is
        0 where its evidence is missing (imputed with the training mean)."""
        Z = standardize(feature_matrix(feats, self.features, self.rrf_k), self.mean, self.std)
        contrib = Z * np.asarray(self.weights)
        kinds = [get_feature(parse_feature(s)[0]).evidence for s in self.features]
        return {k: contrib[:, [j for j, kk in enumerate(kinds) if kk == k]].sum(axis=1)
                for k in EVIDENCE if k in kinds}

    def check_models(self, fingerprint: str, where: str = "this index") -> None:
        theirs = self.models.get("fingerprint")
        if theirs != fingerprint:
            raise ModelMismatchError(
                f"fusion weights {self.name or ''} were learned for models {theirs} "
                f"(profile {self.models.get('profile')!r}) but {where} uses models {fingerprint}; learn weights "
                f"for this index with `attrib calibrate INDEX` (or `attrib tune BENCH --index INDEX --out WEIGHTS`), "
                f"or fuse with RRF (--weights rrf)"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("name", None)
        return {"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, **d}

    def save(self, path: str | os.PathLike) -> None:
        from ..files import write_text_atomic

        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", fsync=True)

    @classmethod
    def from_dict(cls, d: dict, name: str = "") -> "FusionWeights":
        """Validate and build weights from a parsed file; every refusal names the file and the problem."""
        if not isinstance(d, dict) or d.get("format") != WEIGHTS_FORMAT:
            raise FusionWeightsError(
                f"{name or 'weights'} is not an attrib fusion weights file "
                f"(format {d.get('format') if isinstance(d, dict) else None!r})"
            )
        if d.get("version") != WEIGHTS_VERSION:
            raise FusionWeightsError(
                f"{name} has weights format version {d.get('version')!r}; this engine reads {WEIGHTS_VERSION}"
            )
        try:
            w = cls(
                features=list(d["features"]), weights=[float(x) for x in d["weights"]], bias=float(d["bias"]),
                mean=[float(x) for x in d["mean"]], std=[float(x) for x in d["std"]], models=dict(d["models"]),
                threshold=None if d.get("threshold") is None else float(d["threshold"]),
                threshold_rule=str(d.get("threshold_rule", "")), method=str(d.get("method", "logistic")),
                rrf_k=int(d.get("rrf_k", 60)), provenance=dict(d.get("provenance", {})),
                evidence_levels={str(k): float(v) for k, v in dict(d.get("evidence_levels") or {}).items()},
                name=name,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FusionWeightsError(f"weights file {name} is damaged: {e.__class__.__name__}: {e}") from None
        n = len(w.features)
        if not (len(w.weights) == len(w.mean) == len(w.std) == n) or n == 0:
            raise FusionWeightsError(
                f"weights file {name} is damaged: features, weights, mean and std differ in length"
            )
        if any(s <= 0 for s in w.std):
            raise FusionWeightsError(f"weights file {name} is damaged: a standardisation std is not positive")
        for spec in w.features:
            parse_feature(spec)
        return w

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FusionWeights":
        """Read and validate a weights file.

        Args:
            path: a JSON file written by ``attrib tune`` (or :meth:`save`).
        Returns:
            The weights, named after the file.
        Raises:
            FusionWeightsError: the file is missing, unreadable, of another format or version, damaged, or
                names features no registered ranker computes.
        Example:
            >>> w = FusionWeights.load("weights.json")  # doctest: +SKIP
            >>> index.query(image="gen.png", prompt="...", weights=w)  # doctest: +SKIP
        """
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FusionWeightsError(f"weights file {p} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FusionWeightsError(f"weights file {p} cannot be read: {e}") from None
        return cls.from_dict(d, str(p))
