"""The benchmark folder format (see DESIGN.md): loading and validation with clear errors.

``corpus.parquet``: id (str, unique), image (str path relative to the folder, or null), caption (str).
``queries.parquet``: query_id (str, unique), image (str or null), prompt (str), relevant (list[str] of corpus
ids; empty = no source), kind (str), split (``tune`` | ``test``). Extra columns are kept.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from engine import AttribError
from engine.files import require_utf8_path

SPLITS = ("tune", "test")
CORPUS, QUERIES = "corpus.parquet", "queries.parquet"


class BenchmarkError(AttribError):
    """A benchmark folder that does not follow the format."""


@dataclass
class Benchmark:
    path: Path
    corpus: pl.DataFrame
    queries: pl.DataFrame
    content_hash: str  # sha256 of both tables and of every image's path, size and mtime
    corpus_hash: str  # the same for the corpus table and its images only (keys the cached corpus index)

    @property
    def name(self) -> str:
        return self.path.name

    def split(self, which: str) -> pl.DataFrame:
        """Queries of one split; ``all`` gives every query."""
        if which == "all":
            return self.queries
        if which not in SPLITS:
            raise BenchmarkError(f"unknown split {which!r}; valid choices: tune, test, all")
        return self.queries.filter(pl.col("split") == which)

    def image_path(self, rel: str | None) -> str | None:
        return None if rel is None else str(self.path / rel)


def _fingerprint(folder: Path, table: str, images: list[str]) -> "hashlib._Hash":
    """sha256 of a table's bytes and of its images' paths, sizes and modification times: regenerated images
    (same table, new pixels) change it, so caches keyed by it are not reused by mistake."""
    h = hashlib.sha256((folder / table).read_bytes())
    for rel in images:
        try:
            st = (folder / rel).stat()
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}|missing\n".encode())
    return h


def _require(df: pl.DataFrame, file: str, cols: dict[str, tuple]) -> None:
    for c, types in cols.items():
        if c not in df.columns:
            raise BenchmarkError(f"{file} has no column {c!r}; its columns are {', '.join(df.columns)}")
        if df.schema[c] not in types:
            raise BenchmarkError(
                f"{file} column {c!r} has type {df.schema[c]}, expected {' or '.join(map(str, types))}"
            )


def _duplicates(s: pl.Series) -> list[str]:
    return s.filter(s.is_duplicated()).unique().sort().head(5).to_list()


def load_benchmark(path: str | os.PathLike, check_images: bool = True) -> Benchmark:
    """Load and validate a benchmark folder. Every problem is reported with the offending values."""
    p = Path(path).expanduser().absolute()
    require_utf8_path(p, "the benchmark folder", BenchmarkError)
    if not p.is_dir():
        raise BenchmarkError(f"benchmark folder {p} does not exist (it must hold {CORPUS} and {QUERIES})")
    for f in (CORPUS, QUERIES):
        if not (p / f).is_file():
            raise BenchmarkError(f"{p} is not a benchmark folder: {f} is missing")
    try:
        corpus = pl.read_parquet(p / CORPUS)
        queries = pl.read_parquet(p / QUERIES)
    except Exception as e:  # noqa: BLE001
        raise BenchmarkError(f"cannot read the benchmark tables in {p}: {e}") from None
    s, n = (pl.String,), (pl.String, pl.Null)
    _require(corpus, CORPUS, {"id": s, "image": n, "caption": n})
    _require(queries, QUERIES, {"query_id": s, "image": n, "prompt": n,
                                "relevant": (pl.List(pl.String), pl.List(pl.Null)), "kind": s, "split": s})
    corpus = corpus.with_columns(pl.col("caption").fill_null(""), pl.col("image").cast(pl.String))
    queries = queries.with_columns(pl.col("prompt").fill_null(""), pl.col("image").cast(pl.String),
                                   pl.col("relevant").cast(pl.List(pl.String)).fill_null([]))
    if corpus.height == 0:
        raise BenchmarkError(f"{CORPUS} in {p} is empty")
    if corpus["id"].null_count() or queries["query_id"].null_count():
        raise BenchmarkError(f"{p}: ids must not be null")
    if (d := _duplicates(corpus["id"])):
        raise BenchmarkError(f"{CORPUS} has duplicate ids: {', '.join(d)}")
    if (d := _duplicates(queries["query_id"])):
        raise BenchmarkError(f"{QUERIES} has duplicate query ids: {', '.join(d)}")
    # null is not in SPLITS either: a null split is reported, never silently left out of both splits
    bad_split = queries.filter(pl.col("split").is_null() | ~pl.col("split").is_in(list(SPLITS)))
    if bad_split.height:
        vals = sorted(set(bad_split["split"].cast(pl.String).fill_null("null").to_list()))[:5]
        ex = ", ".join(bad_split["query_id"].cast(pl.String).fill_null("null").head(5).to_list())
        raise BenchmarkError(f"{QUERIES} has split values {vals} in {bad_split.height} rows (e.g. {ex}); "
                             f"valid values: tune, test")
    known = set(corpus["id"].to_list())
    unknown = []
    for qid, rel in zip(queries["query_id"].to_list(), queries["relevant"].to_list()):
        for r in rel or []:
            if r not in known:
                unknown.append(f"{qid} -> {r}")
    if unknown:
        raise BenchmarkError(f"{len(unknown)} relevant ids are not in {CORPUS}, e.g. {', '.join(unknown[:5])}")
    no_input = queries.filter(pl.col("image").is_null() & (pl.col("prompt").str.strip_chars() == ""))
    if no_input.height:
        raise BenchmarkError(f"{no_input.height} queries have neither an image nor a prompt, e.g. "
                             f"{', '.join(no_input['query_id'].head(5).to_list())}")
    if check_images:
        missing = [f"{CORPUS}: {x}" for x in corpus["image"].drop_nulls().to_list() if not (p / x).is_file()]
        missing += [f"{QUERIES}: {x}" for x in queries["image"].drop_nulls().to_list() if not (p / x).is_file()]
        if missing:
            raise BenchmarkError(f"{len(missing)} images of {p} are missing, e.g. {'; '.join(missing[:5])}")
    ch = _fingerprint(p, CORPUS, corpus["image"].drop_nulls().to_list())
    qh = _fingerprint(p, QUERIES, queries["image"].drop_nulls().to_list())
    both = hashlib.sha256((ch.hexdigest() + qh.hexdigest()).encode()).hexdigest()
    return Benchmark(p, corpus, queries, both, ch.hexdigest())
