"""``Index``: the query-side facade over one index folder. Each step lives in its own module: query encoding
(``_encode``), the candidate pool (``_pool``), fusion resolution (``fusion``), the verdict and shares
(``_verdict``), patch correspondences (``_explain``), reports (``report``)."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from ._calibration import IndexCalibration
from ._encode import QueryEncoder
from ._errors import IndexFormatError, ModelMismatchError, QueryInputError
from ._explain import Correspondence, correspondences
from ._limits import MAX_DEPTH, MAX_K, int_between
from ._manifest import UNTRAINED_BANNER
from ._pool import CandidatePool, Pool
from ._reader import IndexReader
from ._settings import QuerySettings
from ._threads import one_openmp_thread, single_threaded_blas
from ._verdict import evidence_support, verdict
from .files import require_utf8_path
from .fusion import Fusion, ordinal_ranks, resolve_fusion
from .rankers import RANKERS, QueryInput, Ranking, RowFilter, create_ranker, main_rankers, ranker_names, ranking_order
from .results import Attribution, Candidate, ModelsInfo, clean_number
from .text import shared_text


class Index:
    """An opened index. Models load once, on the first query that needs them; then query many times.

    Args:
        path: the index folder (see ``attrib index``).
        models: the profile the caller expects; refused if the index was built with another one.
        device: ``cpu``, ``cuda`` or ``cuda:N`` for the encoders (default: CUDA when available).
        clip_weights, dino_weights: local weights files or folders for pretrained profiles.
        settings: query settings (pool depth, dino rerank depth, RRF k, IVF nprobe).
        previous: an opened older generation of the same index, whose packed search lists of unchanged segments
            are taken over instead of packed again (``reopen_if_changed``).
    Raises:
        IndexFormatError: the folder is missing, not an index, damaged or of an unsupported version.
        ModelMismatchError: ``models`` differs from the profile the index was built with.
    Example:
        >>> with Index("my-index") as index:  # doctest: +SKIP
        ...     result = index.query(image="gen.png", prompt="a red fox in the snow", k=10)
    """

    def __init__(self, path: str | os.PathLike, *, models: str | None = None, device: str | None = None,
                 clip_weights: str | None = None, dino_weights: str | None = None,
                 settings: QuerySettings | None = None, previous: "Index | None" = None) -> None:
        self.settings = settings or QuerySettings()
        require_utf8_path(Path(path).expanduser().absolute(), "the index folder", IndexFormatError)
        self.reader = IndexReader(path, nprobe=self.settings.nprobe,
                                  previous=previous.reader if previous is not None else None)
        self.path = self.reader.path
        self.manifest = self.reader.manifest
        built_with = self.manifest["models"]["profile"]
        if models is not None and models != built_with:
            raise ModelMismatchError(
                f"index {self.path} was built with models {built_with!r}; the query asked for {models!r}. Query with "
                f"--models {built_with} (or leave --models out), or rebuild the index with --models {models}"
            )
        self._device, self._clip_w, self._dino_w = device, clip_weights, dino_weights
        self._encoders = None
        self.rankers = {name: create_ranker(name, self.reader, self.settings) for name in ranker_names()}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attrib-query",
                                          initializer=one_openmp_thread)
        self._pool = CandidatePool(self.reader, self.rankers, self._worker)
        self._manifest_stamp: tuple | None = None  # set by the first reopen_if_changed that finds no change
        self._encoder = QueryEncoder(self.reader, self._loaded_encoders)
        self._calibration = IndexCalibration(self.path)

    def reopen_if_changed(self) -> "Index":
        """This index when its folder still holds the generation it opened; otherwise a freshly opened
        :class:`Index` of the newest committed generation (an append, a deletion, a compaction or a rebuild
        happened), sharing the already-loaded models. A long-running service calls this between requests."""
        from ._manifest import manifest_stamp, read_manifest

        self.reader.reload_search()  # measured after the commit that made this generation: picked up in place
        stamp = manifest_stamp(self.path)
        if stamp is not None and stamp == self._manifest_stamp:  # a commit replaces the file: a new inode
            return self
        current = read_manifest(self.path)
        if current.get("manifest_sha256") == self.manifest.get("manifest_sha256"):
            self._manifest_stamp = stamp
            return self
        fresh = Index(self.path, device=self._device, clip_weights=self._clip_w, dino_weights=self._dino_w,
                      settings=self.settings, previous=self)
        if self._encoders is not None and fresh.fingerprint == self.fingerprint:
            fresh.use_encoders(self._encoders)
        return fresh

    def close(self) -> None:
        """Stop the helper thread and close open files (also done at exit)."""
        self._worker.shutdown(wait=True, cancel_futures=True)
        self.reader.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ models
    @property
    def fingerprint(self) -> str:
        return self.reader.fingerprint

    @property
    def untrained(self) -> bool:
        return self.reader.untrained

    @property
    def models_info(self) -> ModelsInfo:
        m = self.manifest["models"]
        return ModelsInfo(
            profile=m["profile"], pretrained=bool(m.get("pretrained")), fingerprint=m["fingerprint"],
            clip=f"{m['clip']['arch']} ({m['clip'].get('weights_tag') or 'random init'})",
            dino=f"{m['dino']['arch']} ({m['dino'].get('weights_tag') or 'random init'})",
            warning=UNTRAINED_BANNER.format(profile=m["profile"]) if self.untrained else None,
        )

    def use_encoders(self, encoders) -> None:
        """Use already-loaded encoders (checked against the index), e.g. to share them between indexes."""
        ident = encoders.identity
        if ident["fingerprint"] != self.fingerprint:
            theirs = self.manifest["models"]
            raise ModelMismatchError(
                f"the query models ({ident['profile']}, fingerprint {ident['fingerprint']}) differ from the models "
                f"index {self.path} was built with ({theirs['profile']}, fingerprint {theirs['fingerprint']}): "
                f"{_identity_diff(ident, theirs)}. Query with the same weights, or rebuild the index."
            )
        self._encoders = encoders

    @property
    def encoders(self):
        """The loaded encoders (loaded on first use and checked against the index)."""
        return self._loaded_encoders()[0]

    def _loaded_encoders(self):
        """(encoders, whether they were loaded by this call)."""
        if self._encoders is not None:
            return self._encoders, False
        from ._encoders import Encoders

        self.use_encoders(Encoders(self.manifest["models"]["profile"], device=self._device,
                                   clip_weights=self._clip_w, dino_weights=self._dino_w))
        return self._encoders, True

    # ------------------------------------------------------------------------------------------ encoding
    def encode_queries(self, images: Sequence[Any | None], prompts: Sequence[str | None],
                       query_ids: Sequence[str] | None = None, timings: dict | None = None) -> list[QueryInput]:
        """Encode several queries in batches (images and prompts may be None)."""
        return self._encoder.encode(images, prompts, query_ids, timings)

    def encode_query(self, image=None, prompt: str | None = None, query_id: str = "q",
                     timings: dict | None = None) -> QueryInput:
        """Encode one query (an image path or PIL image, and/or a prompt) for :meth:`search` and :meth:`rank`."""
        return self.encode_queries([image], [prompt], [query_id], timings)[0]

    def with_terms(self, q: QueryInput) -> QueryInput:
        """Recompute a (cached) query's analysed prompt terms for this index."""
        return self._encoder.add_terms(q)

    # ------------------------------------------------------------------------------------------ ranking
    def rank(self, ranker: str, q: QueryInput, k: int, exclude=None) -> Ranking:
        """One ranker on its own: its first stage reranked by its own score.

        Args:
            ranker: a registered ranker name (``engine.RANKERS``).
            q: an encoded query (:meth:`encode_query`).
            k: how many results to keep.
            exclude: record rows that must not come back (e.g. held out for calibration).
        Returns:
            A :class:`Ranking` of record rows, best first (empty when the ranker cannot take part).
        Raises:
            UnknownNameError: ``ranker`` is not registered (the message lists the valid names).
        Example:
            >>> index.rank("dino", index.encode_query("gen.png"), 10).rows  # doctest: +SKIP
        """
        RANKERS.get(ranker)  # raises with the valid names
        k = _bounded("k", k, MAX_K, low=0)  # k=0: an empty ranking (the ranker contract)
        with single_threaded_blas():
            return self.rankers[ranker].search(q, k, RowFilter.of(self.reader, exclude))

    def pool(self, q: QueryInput, depth: int | None = None, exclude=None) -> Pool:
        """Union of every available first-stage ranker's top ``depth`` candidates, every feature for each;
        rows of ``exclude`` never enter."""
        depth = self.settings.depth if depth is None else _bounded("depth", depth, MAX_DEPTH)
        return self._pool.build(q, depth, RowFilter.of(self.reader, exclude))

    def resolve_fusion(self, weights: Any = "auto", text_only: bool | None = None) -> Fusion:
        """``"auto"``: the index's own calibration (``attrib calibrate``), else the shipped weights learned for
        this index's models, else RRF; ``"rrf"``/None: RRF; a path or :class:`FusionWeights`: those weights
        (refused if learned for other models). ``text_only`` (default: whether the index has no image) prefers
        shipped weights over text features only."""
        text_only = self.reader.n_images == 0 if text_only is None else text_only
        cal, notes = (self._calibration.load(self.manifest) if isinstance(weights, str) and weights == "auto"
                      else (None, []))
        return resolve_fusion(weights, self.fingerprint, f"index {self.path}", self.settings.rrf_k, text_only,
                              calibration=cal, warnings=notes)

    # ------------------------------------------------------------------------------------------ answers
    def search(self, q: QueryInput, k: int = 10, weights: Any = "auto", fusion: Fusion | None = None,
               timings: dict | None = None, exclude=None) -> Attribution:
        """Rank the index for an encoded query (the search-only path of :meth:`query`).

        Args:
            q: an encoded query (:meth:`encode_query`).
            k: how many results to return.
            weights: ``"auto"``, ``"rrf"``, a weights file or :class:`FusionWeights` (see :meth:`resolve_fusion`).
            fusion: an already-resolved fusion (overrides ``weights``).
            timings: timings (ms) measured so far, carried into the result.
            exclude: record rows that must not come back (e.g. held out for calibration).
        Returns:
            An :class:`Attribution` (``to_dict()`` gives the documented JSON).
        Raises:
            FusionWeightsError, ModelMismatchError: the weights cannot be used with this index.
        Example:
            >>> q = index.encode_query("gen.png", "a red fox")  # doctest: +SKIP
            >>> index.search(q, k=5, weights="rrf").results[0].id  # doctest: +SKIP
        """
        k = _bounded("k", k, MAX_K)
        if fusion is None:
            fusion = self.resolve_fusion(weights, text_only=q.get("clip_image") is None or self.reader.n_images == 0)
        with single_threaded_blas():
            return self._search(q, k, fusion, dict(timings or {}), exclude)

    def _search(self, q: QueryInput, k: int, fusion: Fusion, timings: dict, exclude) -> Attribution:
        t0 = time.perf_counter()
        pool = self.pool(q, max(self.settings.depth, k), exclude)
        timings.update(pool.timings)
        t = time.perf_counter()
        fused = fusion.scores(pool)
        order = ranking_order(pool.rows, fused, k)
        ranks = {n: ordinal_ranks(s) for n, s in pool.ranker_scores.items()}
        timings["fusion"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        meta = self.reader.records(pool.rows[order]) if len(order) else None
        texts = (shared_text(q.prompt, meta["caption"].to_list(), self.reader.text.analysis)
                 if meta is not None and q.get("terms") else None)
        timings["metadata"] = (time.perf_counter() - t) * 1e3
        thr = fusion.threshold
        support = evidence_support(fusion, pool.feats, order) or [{}] * len(order)
        results = [
            Candidate(
                rank=pos + 1, row=int(pool.rows[i]), id=meta["id"][pos], image=meta["image"][pos],
                caption=meta["caption"][pos], score=clean_number(fused[i]),
                above_threshold=None if thr is None else bool(fused[i] >= thr),
                evidence={f: clean_number(v[i]) for f, v in pool.feats.items()},
                ranks={n: (int(ranks[n][i]) or None) if n in ranks else None for n in main_rankers()},
                text=None if texts is None else dict(texts[pos], duplicates=_count(pool.feats.get("caption_dups"), i)),
                support=support[pos].get("support"), carried_by=support[pos].get("carried_by"),
            )
            for pos, i in enumerate(order)
        ]
        v = verdict(results, fusion)
        timings["search_total"] = (time.perf_counter() - t0) * 1e3
        warnings = []
        if self.untrained:
            warnings.append(UNTRAINED_BANNER.format(profile=self.manifest["models"]["profile"]))
        warnings += fusion.warnings
        if thr is None:
            warnings.append("no calibrated threshold for this fusion: results are ranked but no verdict is given")
        return Attribution(
            query={"image": q.image, "prompt": q.prompt}, models=self.models_info, fusion=fusion.describe(),
            verdict=v, results=results, timings_ms={k2: round(x, 3) for k2, x in timings.items()},
            warnings=warnings, query_input=q, pool_rows=pool.rows,
        )

    def query(self, image=None, prompt: str | None = None, k: int = 10, weights: Any = "auto") -> Attribution:
        """Attribute one generated image and/or prompt. Either side may be missing (its rankers take no part).

        Args:
            image: the generated image (a path or a PIL image), or None.
            prompt: the prompt that generated it (plain text; never parsed as query syntax), or None.
            k: how many results to return (at least 1).
            weights: ``"auto"``, ``"rrf"``, a weights file or :class:`FusionWeights` (see :meth:`resolve_fusion`).
        Returns:
            An :class:`Attribution`: ranked :class:`Candidate` results with their evidence, the
            :class:`Verdict`, the fusion used, timings and warnings (e.g. untrained weights).
        Raises:
            QueryInputError: neither image nor prompt, ``k`` outside 1..10,000, or an unusable image or prompt.
            FusionWeightsError, ModelMismatchError: the weights or models do not fit this index.
            WeightsUnavailableError: pretrained model weights cannot be found.
        Example:
            >>> res = open_index("my-index").query(image="gen.png", prompt="a red fox", k=5)  # doctest: +SKIP
            >>> res.verdict.label, [c.id for c in res.results]  # doctest: +SKIP
        """
        if image is None and not (prompt or "").strip():
            raise QueryInputError("a query needs an image, a prompt, or both")
        k = _bounded("k", k, MAX_K)
        # refuse a bad weights file before the slow part; a prompt-only query prefers text-only weights
        fusion = self.resolve_fusion(weights, text_only=image is None or self.reader.n_images == 0)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        q = self.encode_query(image, prompt, timings=timings)
        res = self.search(q, k, fusion=fusion, timings=timings)
        res.timings_ms["total"] = round((time.perf_counter() - t0) * 1e3, 3)
        return res

    # ------------------------------------------------------------------------------------------ explanations
    def correspondences(self, q: QueryInput, rows: Sequence[int], baseline_rows: Sequence[int] | None = None,
                        n_matches: int = 12) -> list[Correspondence | None]:
        """Patch correspondences between the query and each record of ``rows`` (None for records without an
        image, or when the query has no image). ``baseline_rows`` (default: the query's candidate pool) say
        what "ordinary" similarity is, so that only evidence specific to a record lights up."""
        if q.get("dino_cells") is None:
            return [None] * len(rows)
        if baseline_rows is None:
            baseline_rows = self.pool(q).rows
        return correspondences(self.reader, q, rows, baseline_rows, n_matches)

    def write_report(self, result: Attribution, out_path: str | os.PathLike, query_image: Any = None) -> Path:
        """Write the self-contained HTML report of a query result (see ``attrib query --html``)."""
        from .report.html import write_query_report

        return write_query_report(self, result, out_path, query_image=query_image)


def _bounded(what: str, value: Any, high: int, low: int = 1) -> int:
    """A count argument (``k``, ``depth``) as an int in low..high, checked before anything is sized by it."""
    try:
        return int_between(what, value, low, high)
    except ValueError as e:
        raise QueryInputError(str(e)) from None


def _count(values, i: int) -> int | None:
    """An integer feature value of candidate ``i`` (None when missing)."""
    v = None if values is None else clean_number(values[i])
    return None if v is None else int(v)


def _identity_diff(a: dict, b: dict) -> str:
    diffs = []
    for side in ("clip", "dino"):
        for key in ("arch", "weights_tag", "weights_sha256", "dim"):
            if a.get(side, {}).get(key) != b.get(side, {}).get(key):
                diffs.append(f"{side} {key} {a.get(side, {}).get(key)!r} vs {b.get(side, {}).get(key)!r}")
    return "; ".join(diffs) or "input handling differs"


def open_index(path: str | os.PathLike, **kwargs) -> Index:
    """Open an index folder for querying.

    Args:
        path: the index folder.
        **kwargs: see :class:`Index` (``models``, ``device``, ``clip_weights``, ``dino_weights``, ``settings``).
    Returns:
        An :class:`Index`; models load on the first query that needs them.
    Raises:
        IndexFormatError: the folder is missing, not an index, damaged or of an unsupported version.
    Example:
        >>> index = open_index("my-index")  # doctest: +SKIP
    """
    return Index(path, **kwargs)
