"""Weighted fusion with learned weights, and the versioned weights file format.

score(d) = bias + sum_j w_j * (phi_j(d) - mean_j) / std_j, where phi_j is a feature after an optional
per-query transform, named ``FEATURE`` (raw value) or ``FEATURE:z`` / ``:mm`` / ``:rr`` / ``:nd`` / ``:ndz``
(see ``_normalize``; which transforms a feature allows comes from its kind in the ranker registry). Missing
values count as the training mean. With logistic weights the score is the log-odds that a candidate is a
source; ``threshold`` is the calibrated "no likely source" cut on the top score.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .._errors import FusionWeightsError, ModelMismatchError
from .._layout import component
from ..rankers import EVIDENCE, RANKERS, feature_names, get_feature
from ..rankers._registry import derived
from ._normalize import TRANSFORMS, normalize_columns
from .logistic import standardize

WEIGHTS_FORMAT = "attrib-fusion-weights"
WEIGHTS_VERSION = 1


@derived
def text_feature(name: str) -> bool:
    """Whether feature ``name`` is text evidence: its ranker reads no store that grows with images."""
    owner = next(c for _, c in RANKERS.items() if name in c.feature_names())
    return not any(component(x).grows_with == "image" for x in owner.components)


@derived
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
    """(n_candidates, len(specs)) matrix; raw missing values stay NaN (imputed by the model). Specs with the
    same transform are normalised together (``normalize_columns``)."""
    n = len(next(iter(feats.values()))) if feats else 0
    out = np.empty((n, len(specs)))
    by_how: dict[str, list[tuple[int, str]]] = {}
    for j, spec in enumerate(specs):
        base, how = parse_feature(spec)
        by_how.setdefault(how, []).append((j, base))
    for how, cols in by_how.items():
        X = np.stack([np.asarray(feats[b], np.float64) if b in feats else np.full(n, np.nan) for _, b in cols], axis=1)
        out[:, [j for j, _ in cols]] = normalize_columns(X, how, rrf_k)
        for j, b in cols:
            if b not in feats:  # a feature this pool does not have stays missing, whatever the transform
                out[:, j] = np.nan
    return out


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
        return self.score_matrix(self._matrix(feats))

    def _matrix(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        """The feature matrix of one pool's features, kept for the pool last asked about: a query scores its
        pool and then splits the scores of its results by evidence kind (``parts``) from the same matrix."""
        key = [id(v) for v in feats.values()]  # the same dict holding the same arrays
        last = getattr(self, "_last", None)  # (feats, key, X): not a dataclass field, so never saved
        if last is not None and last[0] is feats and last[1] == key:
            return last[2]
        X = feature_matrix(feats, self.features, self.rrf_k)
        self._last = (feats, key, X)
        return X

    @property
    def text_only(self) -> bool:
        """Whether every feature is text evidence (no ranker of its reads an image store): weights for caption-only
        indexes and prompt-only queries, as ``attrib tune`` learns on a text-only benchmark."""
        return all(text_feature(parse_feature(s)[0]) for s in self.features)

    def score_matrix(self, X: np.ndarray) -> np.ndarray:
        return self.bias + standardize(X, self.mean, self.std) @ np.asarray(self.weights)

    def parts(self, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each evidence kind's part of the score of every candidate: the sum of w_j * standardised x_j over the
        features of that kind (``engine.rankers.EVIDENCE``), so score = bias + the sum of the parts. A part is
        0 where its evidence is missing (imputed with the training mean)."""
        Z = standardize(self._matrix(feats), self.mean, self.std)
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
        """Write the weights file atomically (refused: non-finite or out-of-range numbers, an output path that
        is a link, folder or special file; see ``engine.files``)."""
        from ..files import write_text_atomic

        self.check_numbers()
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", fsync=True)

    @classmethod
    def from_dict(cls, d: dict, name: str = "") -> "FusionWeights":
        """Validate and build weights from a parsed file; every refusal names the file, the field and the problem.

        Checked: the format and version; the type of every field; finite numbers only (no NaN or infinity) in
        weights, bias, mean, std and threshold; sane ranges (``|weight|``, ``|bias|`` at most 1e6; std in
        [1e-9, 1e12]; ``rrf_k`` an integer in 1..100,000); features, weights, mean and std of one length; known
        feature names; ``models.fingerprint`` present; nesting at most 32 levels deep."""
        label = f"weights file {name}" if name else "weights"
        if not isinstance(d, dict) or d.get("format") != WEIGHTS_FORMAT:
            raise FusionWeightsError(
                f"{name or 'weights'} is not an attrib fusion weights file "
                f"(format {d.get('format') if isinstance(d, dict) else None!r})"
            )
        if d.get("version") != WEIGHTS_VERSION:
            raise FusionWeightsError(
                f"{name} has weights format version {d.get('version')!r}; this engine reads {WEIGHTS_VERSION}"
            )
        _check_depth(d, label)
        for key in ("features", "weights", "bias", "mean", "std", "models"):
            if key not in d:
                raise FusionWeightsError(f"{label} is damaged: field {key!r} is missing")
        features = _typed(d, "features", list, label)
        for i, spec in enumerate(features):
            if not isinstance(spec, str):
                raise FusionWeightsError(f"{label} is damaged: features[{i}] is {spec!r}, not a feature name")
        models = _typed(d, "models", dict, label)
        threshold = d.get("threshold")
        w = cls(
            features=list(features),
            weights=_numbers(_typed(d, "weights", list, label), "weights", label, MAX_ABS_WEIGHT),
            bias=_number(d["bias"], "bias", label, MAX_ABS_WEIGHT),
            mean=_numbers(_typed(d, "mean", list, label), "mean", label, MAX_ABS_VALUE),
            std=_numbers(_typed(d, "std", list, label), "std", label, MAX_ABS_VALUE, low=MIN_STD),
            models=dict(models),
            threshold=None if threshold is None else _number(threshold, "threshold", label, MAX_ABS_VALUE),
            threshold_rule=_typed(d, "threshold_rule", str, label, ""),
            method=_typed(d, "method", str, label, "logistic"),
            rrf_k=_integer(d.get("rrf_k", 60), "rrf_k", label, 1, MAX_RRF_K),
            provenance=dict(_typed(d, "provenance", dict, label, {})),
            evidence_levels=_levels(_typed(d, "evidence_levels", dict, label, {}), label),
            name=name,
        )
        n = len(w.features)
        if n == 0:
            raise FusionWeightsError(f"{label} is damaged: 'features' is empty")
        for key in ("weights", "mean", "std"):
            if len(getattr(w, key)) != n:
                raise FusionWeightsError(f"{label} is damaged: {key!r} has {len(getattr(w, key))} values but "
                                         f"'features' has {n} (features, weights, mean and std differ in length)")
        seen: set[str] = set()
        for spec in w.features:
            if spec in seen:
                raise FusionWeightsError(f"{label} is damaged: feature {spec!r} is listed twice")
            seen.add(spec)
            parse_feature(spec)
        for key in ("fingerprint", "profile"):
            if not isinstance(models.get(key), str) or not models.get(key):
                what = "is missing" if key not in models else f"is {_short(models.get(key))}, not a non-empty string"
                raise FusionWeightsError(f"{label} is damaged: field 'models.{key}' {what}")
        gen = w.provenance.get("benchmark_generator")
        if gen is not None:  # shown as "learned on" with every query that uses the weights
            if not isinstance(gen, dict):
                raise FusionWeightsError(f"{label} is damaged: field 'provenance.benchmark_generator' is "
                                         f"{type(gen).__name__}, not an object")
            for key in GENERATOR_KEYS:
                if key not in gen:
                    raise FusionWeightsError(f"{label} is damaged: field 'provenance.benchmark_generator.{key}' "
                                             f"is missing")
        return w

    def check_numbers(self) -> None:
        """Refuse weights that would score NaN or infinity (the same rules :meth:`from_dict` applies)."""
        label = f"weights {self.name}" if self.name else "weights"
        _numbers(self.weights, "weights", label, MAX_ABS_WEIGHT)
        _number(self.bias, "bias", label, MAX_ABS_WEIGHT)
        _numbers(self.mean, "mean", label, MAX_ABS_VALUE)
        _numbers(self.std, "std", label, MAX_ABS_VALUE, low=MIN_STD)
        if self.threshold is not None:
            _number(self.threshold, "threshold", label, MAX_ABS_VALUE)
        _integer(self.rrf_k, "rrf_k", label, 1, MAX_RRF_K)
        _levels(self.evidence_levels, label)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FusionWeights":
        """Read and validate a weights file.

        Args:
            path: a JSON file written by ``attrib tune`` (or :meth:`save`).
        Returns:
            The weights, named after the file.
        Raises:
            FusionWeightsError: the file is missing, unreadable, larger than 16 MiB (checked before reading it
                all), not UTF-8 JSON, nested too deeply, of another format or version, damaged (see
                :meth:`from_dict`), or names features no registered ranker computes.
        Example:
            >>> w = FusionWeights.load("weights.json")  # doctest: +SKIP
            >>> index.query(image="gen.png", prompt="...", weights=w)  # doctest: +SKIP
        """
        p = Path(path)
        try:
            with open(p, "rb") as f:
                raw = f.read(MAX_WEIGHTS_BYTES + 1)  # never more, whatever the file is (/dev/zero, a huge file)
        except FileNotFoundError:
            raise FusionWeightsError(f"weights file {p} does not exist") from None
        except OSError as e:
            raise FusionWeightsError(f"weights file {p} cannot be read: {e.strerror or e}") from None
        if len(raw) > MAX_WEIGHTS_BYTES:
            raise FusionWeightsError(f"weights file {p} is larger than {MAX_WEIGHTS_BYTES // 2**20} MiB; a weights "
                                     f"file from `attrib tune` is a few KB: check the path")
        try:
            d = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise FusionWeightsError(f"weights file {p} is not UTF-8 text (byte {e.start}): "
                                     f"not a weights file") from None
        except json.JSONDecodeError as e:
            raise FusionWeightsError(f"weights file {p} cannot be read: invalid JSON ({e})") from None
        except RecursionError:
            raise FusionWeightsError(f"weights file {p} is nested too deeply (more than {MAX_DEPTH} levels): "
                                     f"not a weights file") from None
        return cls.from_dict(d, str(p))


MAX_WEIGHTS_BYTES = 16 * 1024 * 1024  # a weights file is a few KB; anything larger is refused before reading it all
MAX_DEPTH = 32  # nesting levels of the JSON (the format itself uses 4)
MAX_ABS_WEIGHT = 1e6  # |weight| and |bias| (weights act on standardised features; learned ones are O(1..10))
MAX_ABS_VALUE = 1e12  # |mean|, std and |threshold|
MIN_STD = 1e-9  # smallest standardisation std (dividing by less would blow a feature up)
MAX_RRF_K = 100_000  # the :rr transform's k (60 is the usual value)
GENERATOR_KEYS = ("generator", "version", "train", "queries", "seed")  # provenance.benchmark_generator


def _typed(d: dict, key: str, kind: type, label: str, default=None):
    value = d.get(key, default)
    if not isinstance(value, kind):
        names = {list: "a list", dict: "an object", str: "a string"}
        raise FusionWeightsError(f"{label} is damaged: field {key!r} is {type(value).__name__} {_short(value)}, "
                                 f"not {names.get(kind, kind.__name__)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value, field_name: str, label: str, limit: float, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FusionWeightsError(f"{label} is damaged: {field_name} is {_short(value)}, not a number")
    x = float(value)
    if not math.isfinite(x):
        raise FusionWeightsError(f"{label} is damaged: {field_name} is {x}; it must be a finite number")
    if low is not None and x <= 0:
        raise FusionWeightsError(f"{label} is damaged: {field_name} is {x}: {field_name.split('[')[0]} is not positive "
                                 f"(it must be in [{low:g}, {limit:g}])")
    if low is not None and not low <= x <= limit:
        raise FusionWeightsError(f"{label} is damaged: {field_name} is {x}; it must be in [{low:g}, {limit:g}]")
    if abs(x) > limit:
        raise FusionWeightsError(f"{label} is damaged: {field_name} is {x:g}; its magnitude must be at most {limit:g}")
    return x


def _numbers(values: list, field_name: str, label: str, limit: float, low: float | None = None) -> list[float]:
    return [_number(v, f"{field_name}[{i}]", label, limit, low) for i, v in enumerate(values)]


def _levels(levels: dict, label: str) -> dict[str, float]:
    for k in levels:
        if k not in EVIDENCE:
            raise FusionWeightsError(f"{label} is damaged: evidence_levels has kind {_short(k)}; valid kinds: "
                                     f"{', '.join(EVIDENCE)}")
    return {str(k): _number(v, f"evidence_levels.{k}", label, MAX_ABS_VALUE) for k, v in levels.items()}


def _integer(value, field_name: str, label: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FusionWeightsError(f"{label} is damaged: {field_name} is {_short(value)}; it must be an integer in "
                                 f"{low}..{high}")
    return int(value)


def _check_depth(obj, label: str) -> None:
    """Refuse JSON nested more than MAX_DEPTH levels (iteratively: no recursion on hostile input)."""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FusionWeightsError(f"{label} is nested too deeply (more than {MAX_DEPTH} levels): not a weights file")
        if isinstance(x, dict):
            stack.extend((v, depth + 1) for v in x.values())
        elif isinstance(x, list):
            stack.extend((v, depth + 1) for v in x)
