"""Tests for eval.synth: folder format, determinism, split hygiene, duplicate groups, captions and crop pixels."""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from engine import scenes
from eval import synth

PARAMS = dict(train=60, queries=60, image_size=64)
CORPUS_SCHEMA = {"id": pl.Utf8, "image": pl.Utf8, "caption": pl.Utf8, "group": pl.Utf8}
QUERY_SCHEMA = {"query_id": pl.Utf8, "image": pl.Utf8, "prompt": pl.Utf8, "relevant": pl.List(pl.Utf8),
                "kind": pl.Utf8, "split": pl.Utf8, "prompt_kind": pl.Utf8, "seed": pl.Int64}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        summary = synth.generate(root / name, seed=seed, progress=False, **PARAMS)
        out[name] = (root / name, summary)
    return out


@pytest.fixture(scope="module")
def bench(runs):
    folder, summary = runs["a"]
    corpus = pl.read_parquet(folder / "corpus.parquet")
    queries = pl.read_parquet(folder / "queries.parquet")
    group_of = dict(zip(corpus["id"].to_list(), corpus["group"].to_list()))
    return folder, summary, corpus, queries, group_of


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float64)


# --- format -------------------------------------------------------------------------------------------------------

def test_folder_format(bench):
    folder, summary, corpus, queries, group_of = bench
    assert dict(corpus.schema) == CORPUS_SCHEMA
    assert dict(queries.schema) == QUERY_SCHEMA
    assert corpus.height == 60 and queries.height == 60
    assert corpus["id"].n_unique() == 60 and queries["query_id"].n_unique() == 60
    assert all(i.startswith("t") and len(i) == 7 for i in corpus["id"])
    assert all(g.startswith("g") and len(g) == 6 for g in corpus["group"])
    assert corpus["caption"].str.len_chars().min() > 10
    for rel in corpus["image"].to_list() + queries["image"].to_list():
        assert not Path(rel).is_absolute() and (folder / rel).is_file(), rel
    assert all(p.startswith("train/") and p.endswith(".png") for p in corpus["image"])
    assert all(p.startswith("queries/") for p in queries["image"])
    corpus_sizes = []
    for rel in corpus["image"]:
        with Image.open(folder / rel) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            corpus_sizes.append(im.size)
    assert corpus_sizes.count((64, 64)) >= 50  # sources are image_size; some near duplicates are rescaled/cropped
    ids = set(corpus["id"])
    assert all(set(rel) <= ids for rel in queries["relevant"])
    assert set(queries["kind"]) == set(synth.KINDS)
    assert set(queries["prompt_kind"]) == set(synth.PROMPT_KINDS)
    assert set(queries["split"]) == {"tune", "test"}
    assert queries["seed"].n_unique() == 60
    # verbatim copies are JPEG re-encodes, everything else PNG
    for kind, rel in zip(queries["kind"], queries["image"]):
        with Image.open(folder / rel) as im:
            assert im.format == ("JPEG" if kind == "verbatim" else "PNG"), (kind, rel)
            assert im.mode == "RGB"
    # synth.json is the returned summary and agrees with the tables
    saved = json.loads((folder / "synth.json").read_text())
    assert saved == summary
    assert (saved["train"], saved["queries"], saved["seed"], saved["image_size"]) == (60, 60, 3, 64)
    assert saved["version"] == synth.VERSION
    counts = saved["counts"]
    assert counts["kind"] == {k: queries.filter(pl.col("kind") == k).height for k in synth.KINDS}
    assert counts["prompt_kind"] == {k: queries.filter(pl.col("prompt_kind") == k).height for k in synth.PROMPT_KINDS}
    assert counts["split"] == {s: queries.filter(pl.col("split") == s).height for s in ("tune", "test")}
    assert counts["corpus"]["groups"] == corpus["group"].n_unique()
    # roughly the requested mixes
    assert counts["kind"] == {"verbatim": 12, "template": 9, "crop": 9, "composite": 9, "texture": 9, "novel": 12}
    assert counts["prompt_kind"]["empty"] == 9 and counts["prompt_kind"]["verbatim"] == 18
    # no temporary siblings left behind
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_small_counts_still_cover_every_kind(tmp_path):
    summary = synth.generate(tmp_path / "min", train=10, queries=6, image_size=32, progress=False)
    assert summary["counts"]["kind"] == dict.fromkeys(synth.KINDS, 1)
    assert all(v >= 1 for v in summary["counts"]["prompt_kind"].values())
    corpus = pl.read_parquet(tmp_path / "min" / "corpus.parquet")
    assert corpus.height == 10 and corpus["group"].n_unique() < 10


# --- determinism --------------------------------------------------------------------------------------------------

def test_same_seed_gives_identical_bytes(runs):
    (a, sa), (b, sb) = runs["a"], runs["b"]
    for table in ("corpus.parquet", "queries.parquet"):
        assert pl.read_parquet(a / table).equals(pl.read_parquet(b / table))
    ha, hb = _hashes(a), _hashes(b)
    assert len(ha) == 60 + 60 + 3
    assert ha == hb
    assert sa == sb


def test_different_seed_gives_different_data(runs):
    (a, _), (c, _) = runs["a"], runs["c"]
    ca, cc = pl.read_parquet(a / "corpus.parquet"), pl.read_parquet(c / "corpus.parquet")
    assert ca["caption"].to_list() != cc["caption"].to_list()
    assert len(set(ca["caption"]) & set(cc["caption"])) < 3
    ha, hc = _hashes(a), _hashes(c)
    same = [k for k in ha if k.startswith(("train/", "queries/")) and ha[k] == hc.get(k)]
    assert same == []
    qa, qc = pl.read_parquet(a / "queries.parquet"), pl.read_parquet(c / "queries.parquet")
    assert qa["seed"].to_list() != qc["seed"].to_list()
    assert qa["kind"].to_list() != qc["kind"].to_list()


# --- splits and relevance ---------------------------------------------------------------------------------------

def test_no_leakage_between_splits(bench):
    _, _, _, queries, group_of = bench
    reach = {"tune": set(), "test": set()}
    for row in queries.iter_rows(named=True):
        groups = {group_of[i] for i in row["relevant"]}
        reach[row["split"]] |= groups
        if row["kind"] == "novel":
            assert row["relevant"] == []
        elif row["kind"] == "composite":
            assert len(groups) == 2
        else:
            assert len(groups) == 1
    assert reach["tune"] and reach["test"]
    assert reach["tune"].isdisjoint(reach["test"])
    # queries >= 60: every kind appears in both splits
    for split in ("tune", "test"):
        assert set(queries.filter(pl.col("split") == split)["kind"]) == set(synth.KINDS)


def test_duplicate_groups_and_full_relevance(bench):
    folder, summary, corpus, queries, group_of = bench
    members = {g: set(ids) for g, ids in corpus.group_by("group").agg(pl.col("id")).iter_rows()}
    sizes = [len(m) for m in members.values()]
    assert max(sizes) <= 4 and sum(s > 1 for s in sizes) >= 3
    assert 0.78 <= len(members) / corpus.height <= 0.87
    assert summary["counts"]["corpus"]["duplicate_records"] == sum(s for s in sizes if s > 1)
    for row in queries.iter_rows(named=True):
        groups = {group_of[i] for i in row["relevant"]}
        expected = set().union(*(members[g] for g in groups)) if groups else set()
        assert set(row["relevant"]) == expected
        assert row["relevant"] == sorted(row["relevant"])
    # near duplicates look alike: far closer to each other than to other records
    path = dict(zip(corpus["id"], corpus["image"]))

    def small(i: str) -> np.ndarray:
        with Image.open(folder / path[i]) as im:
            return _pixels(im.convert("RGB").resize((16, 16), Image.Resampling.BOX))

    dup = [np.abs(small(a) - small(b)).mean()
           for m in members.values() for a, b in itertools.combinations(sorted(m), 2)]
    ids = corpus["id"].to_list()
    rng = np.random.default_rng(0)
    pairs = [rng.choice(len(ids), 2, replace=False) for _ in range(100)]
    cross = [np.abs(small(ids[i]) - small(ids[j])).mean() for i, j in pairs if group_of[ids[i]] != group_of[ids[j]]]
    assert np.mean(dup) < 0.3 * np.mean(cross)
    # and they are not byte copies
    hashes = {i: hashlib.sha256((folder / path[i]).read_bytes()).hexdigest() for i in ids}
    assert all(len({hashes[i] for i in m}) == len(m) for m in members.values())


# --- captions and prompts ---------------------------------------------------------------------------------------

def test_captions_are_not_unique_keys(bench):
    _, _, corpus, _, _ = bench
    words = [set(c.split()) for c in corpus["caption"]]
    rng = np.random.default_rng(1)
    pairs = [rng.choice(len(words), 2, replace=False) for _ in range(400)]
    mean_j = float(np.mean([_jaccard(words[i], words[j]) for i, j in pairs]))
    assert mean_j > 0.2
    best = [max(_jaccard(words[i], words[j]) for j in range(len(words)) if j != i) for i in range(len(words))]
    assert np.mean(np.array(best) >= 0.5) > 0.4
    vocabulary = set(scenes.PALETTE) | set(scenes.SHAPES) | {w for w in scenes.TEXTURE_WORDS.values() if w}
    assert all(words_i & vocabulary for words_i in words)


def test_prompts_follow_their_kind(bench):
    _, _, corpus, queries, group_of = bench
    caption_of = dict(zip(corpus["id"], corpus["caption"]))
    group_captions: dict[str, set[str]] = {}
    for i, g in group_of.items():
        group_captions.setdefault(g, set()).add(caption_of[i])
    all_captions = set(corpus["caption"])
    for row in queries.iter_rows(named=True):
        prompt, kind, groups = row["prompt"], row["prompt_kind"], {group_of[i] for i in row["relevant"]}
        if kind == "empty":
            assert prompt == ""
            continue
        assert prompt
        if kind == "verbatim" and row["kind"] != "novel":
            assert prompt in {caption_of[i] for i in row["relevant"]}
        elif kind == "verbatim":
            assert prompt not in all_captions and "background" in prompt
        elif kind == "misleading":
            owners = {g for g, caps in group_captions.items() if prompt in caps}
            assert owners and owners.isdisjoint(groups)
        elif kind == "paraphrase":
            assert prompt not in all_captions
            assert set(prompt.split()).isdisjoint(set(scenes.SHAPES) | set(scenes.PALETTE))  # reworded
        elif kind == "partial":
            assert len(prompt.split()) < 30 and prompt not in all_captions


def test_template_and_texture_specs():
    rng = np.random.default_rng(11)
    spec = scenes.random_scene(rng)
    tpl = synth.template_spec(spec, np.random.default_rng(1))
    assert [(o.shape, o.size, o.cell, o.dx, o.dy) for o in tpl.objects] == \
        [(o.shape, o.size, o.cell, o.dx, o.dy) for o in spec.objects]
    for new, old in zip([tpl.background] + [o.texture for o in tpl.objects],
                        [spec.background] + [o.texture for o in spec.objects]):
        assert new.colour1 not in (old.colour1, old.colour2) and new.period != old.period
    tex = synth.texture_spec(spec, np.random.default_rng(2))
    assert tex.background == spec.background
    assert [o.texture for o in tex.objects] == [o.texture for o in spec.objects]
    assert all(n.shape != o.shape for n, o in zip(tex.objects, spec.objects))
    assert {o.cell for o in tex.objects}.isdisjoint({o.cell for o in spec.objects})


# --- pixels really come from the source ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["crop", "composite"])
def test_pasted_regions_contain_source_pixels(bench, kind):
    folder, _, corpus, queries, group_of = bench
    path = dict(zip(corpus["id"], corpus["image"]))

    def load(i: str) -> Image.Image:
        with Image.open(folder / path[i]) as im:
            return im.convert("RGB")

    rows = queries.filter(pl.col("kind") == kind).rows(named=True)
    assert len(rows) == 9
    for row in rows:
        info = synth.explain_query(folder, row["query_id"])
        assert info["kind"] == kind and set(info["groups"]) == {group_of[i] for i in row["relevant"]}
        with Image.open(folder / row["image"]) as im:
            query = im.convert("RGB")
        assert np.array_equal(_pixels(info["image"]), _pixels(query))  # the replay is the stored image
        assert len(info["sources"]) == (2 if kind == "composite" else 1)
        others = [load(i) for i in corpus["id"] if group_of[i] not in info["groups"]][:20]
        for src in info["sources"]:
            assert src["source_id"] in row["relevant"] and group_of[src["source_id"]] == src["group"]
            x0, y0, x1, y1 = src["src_box"]
            d0, e0, d1, e1 = src["dst_box"]
            assert 0 <= d0 < d1 <= 64 and 0 <= e0 < e1 <= 64
            if kind == "crop":
                assert 0.33 <= (x1 - x0) * (y1 - y0) / 64**2 <= 0.62
                assert 0.55 <= (d1 - d0) / (x1 - x0) <= 1.05
            region = _pixels(query.crop(src["dst_box"]))

            def diff(img: Image.Image, region=region, src=src, d0=d0, d1=d1, e0=e0, e1=e1) -> float:
                # an independent resampler: close to the generator's BILINEAR, not its exact code path
                return float(np.abs(region - _pixels(img.crop(src["src_box"]).resize(
                    (d1 - d0, e1 - e0), Image.Resampling.BICUBIC))).mean())

            match = diff(load(src["source_id"]))
            control = float(np.median([diff(o) for o in others if o.size == (64, 64)]))
            assert match < 12.0 and match < 0.4 * control, (row["query_id"], match, control)


def test_crop_boxes_hold_an_object():
    for i in range(30):
        spec = scenes.random_scene(np.random.default_rng([5, i]))
        x0, y0, x1, y1 = synth.object_crop_box(spec, 128, np.random.default_rng([6, i]))
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        assert 0.33 <= (x1 - x0) * (y1 - y0) / 128**2 <= 0.62
        masks = [np.asarray(scenes.shape_mask(o, 128)) > 0 for o in spec.objects]
        inside = [m[y0:y1, x0:x1].sum() / max(1, m.sum()) for m in masks]
        assert max(inside) > 0.6, (i, inside)  # most of at least one object's silhouette is in the crop


def test_explain_query_rejects_unknown_id(bench):
    with pytest.raises(ValueError, match="q999999"):
        synth.explain_query(bench[0], "q999999")


# --- refusal, validation, atomicity --------------------------------------------------------------------------------

def test_overwrite_refusal_and_replace(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(synth.SynthOptionError, match="already exists .a non-empty folder.; pass --overwrite"):
        synth.generate(out, train=10, queries=6, image_size=32, progress=False)
    # --overwrite replaces only what the generator wrote: a foreign folder is never wiped
    with pytest.raises(synth.SynthOptionError,
                       match="not written by `attrib bench synth` .no valid synth.json.; refusing"):
        synth.generate(out, train=10, queries=6, image_size=32, progress=False, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine" and not (out / "synth.json").exists()
    (out / "keep.txt").unlink()
    first = synth.generate(out, train=10, queries=6, image_size=32, progress=False)
    with pytest.raises(synth.SynthOptionError, match="already exists .a synthetic benchmark."):
        synth.generate(out, train=10, queries=6, image_size=32, progress=False, seed=1)
    summary = synth.generate(out, train=10, queries=6, image_size=32, progress=False, overwrite=True, seed=1)
    assert summary != first and json.loads((out / "synth.json").read_text()) == summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]
    empty = tmp_path / "empty"
    empty.mkdir()
    synth.generate(empty, train=10, queries=6, image_size=32, progress=False)  # an empty folder is fine
    assert (empty / "corpus.parquet").is_file()


@pytest.mark.parametrize("kwargs, bad", [
    (dict(train=9), "9"), (dict(queries=5), "5"), (dict(seed=-1), "-1"), (dict(image_size=8), "8"),
    (dict(train="100"), "'100'"), (dict(queries=True), "True"), (dict(train=12.0), "12.0"),
])
def test_input_validation(tmp_path, kwargs, bad):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"{name}.*{bad}"):
        synth.generate(tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    import eval.synth.write as gen

    monkeypatch.setattr(gen, "_build_prompt", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        synth.generate(tmp_path / "bench", train=10, queries=6, image_size=32, progress=False)
    assert list(tmp_path.iterdir()) == []
