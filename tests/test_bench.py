"""eval.bench: the benchmark folder format is validated, and every problem is reported by value."""
from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest

from eval.bench import BenchmarkError, load_benchmark


def _copy(bench: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bench, tmp_path / "b"))


@pytest.mark.parametrize("mutate,msg", [
    (lambda c, q: (c, q.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(["nope"]))
                                     .otherwise(pl.col("relevant")).alias("relevant"))),
     r"relevant ids are not in corpus.parquet, e.g. .* -> nope"),
    (lambda c, q: (pl.concat([c, c.head(1)]), q), "duplicate ids: t000000"),
    (lambda c, q: (c, q.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("dev"))
                                     .otherwise(pl.col("split")).alias("split"))),
     r"split values \['dev'\]"),
    (lambda c, q: (c.drop("caption"), q), "no column 'caption'"),
    (lambda c, q: (c, pl.concat([q, q.head(1)])), "duplicate query ids"),
])
def test_benchmark_validation_errors(bench, tmp_path, mutate, msg):
    b = _copy(bench, tmp_path)
    c, q = pl.read_parquet(b / "corpus.parquet"), pl.read_parquet(b / "queries.parquet")
    c, q = mutate(c, q)
    c.write_parquet(b / "corpus.parquet")
    q.write_parquet(b / "queries.parquet")
    with pytest.raises(BenchmarkError, match=msg):
        load_benchmark(b)


def test_missing_images_and_folders_are_reported(bench, tmp_path):
    b = _copy(bench, tmp_path)
    first = pl.read_parquet(b / "corpus.parquet")["image"][0]
    (b / first).unlink()
    with pytest.raises(BenchmarkError, match=f"1 images of .* are missing, e.g. corpus.parquet: {first}"):
        load_benchmark(b)
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_benchmark(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "corpus.parquet").write_bytes(b"")
    with pytest.raises(BenchmarkError, match="queries.parquet is missing"):
        load_benchmark(tmp_path / "half")
