"""engine._maintain: deleted records never come back from anywhere; compaction keeps answers the same and drops
them physically; `attrib verify` names damaged components."""
from __future__ import annotations

import gc
import json
import re
import shutil
from concurrent.futures import Future
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pytest
import world
from world import build

import engine
from engine._layout import path_of
from engine._manifest import read_manifest
from engine._reader import IndexReader
from engine.cli import main

CHUNKS_OF_8 = engine.IndexSettings(pca_sample=8, batch_size=8, chunk=8)


def _index_and_more(tmp_path, tiny, extra: range):
    """An index of 24 images built in chunks of 8 at tmp_path/idx, and a folder tmp_path/more of the scenes
    ``extra`` (images with caption sidecars) to append to it (in chunks of 8 too: ``CHUNKS_OF_8``); returns that
    folder."""
    src = tmp_path / "src"
    world.image_folder(src, 24, sidecar="json", nested=False)
    build(src, tmp_path / "idx", tiny, settings=CHUNKS_OF_8)
    more = tmp_path / "more"
    more.mkdir()
    for i in extra:
        im, cap = world.scene(i)
        im.save(more / f"extra{i}.png")
        (more / f"extra{i}.txt").write_text(cap)
    return more


@pytest.fixture
def idx_dir(tmp_path, tiny):
    build(_index_and_more(tmp_path, tiny, range(30, 36)), tmp_path / "idx", tiny, append=True)  # a second segment
    return tmp_path / "idx"


def _everything(idx, q, k=30) -> set[str]:
    """Every id any path of a query can return: each ranker alone, the pool and the fused results."""
    ids = set()
    for name in engine.rankers.ranker_names():
        ids.update(idx.reader.ids_of(idx.rank(name, q, k).rows).tolist())
    ids.update(idx.reader.ids_of(idx.pool(q, k).rows).tolist())
    ids.update(c.id for c in idx.search(q, k, weights="rrf").results)
    return ids


def test_ids_are_found_by_hash_and_confirmed_against_the_stored_ids(idx_dir, monkeypatch):
    """``rows_of`` keeps a sorted 64-bit hash per live record (a dictionary of id strings took gigabytes at 10M
    records) and confirms every match against the stored id: ids that share a hash still find their own rows."""
    from engine import _reader

    r = IndexReader(idx_dir)
    rows, ids = r.all_ids()
    assert len(r.segments) == 2 and len(ids) == 30
    assert r.rows_of(list(ids[::-1])).tolist() == rows[::-1].tolist()
    assert r.rows_of(["nope", ids[0] + "x", "", ids[0][:-1]]).tolist() == [-1] * 4
    assert r.ids_of(rows[::-1]).tolist() == ids[::-1].tolist() and r.rows_of([]).tolist() == []
    with pytest.raises(engine.IndexFormatError, match="not live records"):
        r.ids_of([10_000])
    monkeypatch.setattr(_reader, "id_hashes", lambda values: np.zeros(len(values), np.uint64))  # all collide
    r = IndexReader(idx_dir)
    assert r.rows_of(list(ids[::-1]) + ["nope"]).tolist() == rows[::-1].tolist() + [-1]
    monkeypatch.undo()
    assert IndexReader(idx_dir).rows_of(["img\udcff.png", ids[1]]).tolist() == [-1, rows[1]]  # not UTF-8
    engine.delete_records(idx_dir, ids=[ids[3]])
    assert IndexReader(idx_dir).rows_of([ids[3], ids[4]]).tolist() == [-1, rows[4]]
    engine.delete_records(idx_dir, ids=list(ids))
    engine.compact(idx_dir, progress=False)  # one segment without records
    assert IndexReader(idx_dir).rows_of([ids[4]]).tolist() == [-1]


def test_deleted_records_never_come_back(idx_dir, tiny, tmp_path, capsys):
    idx = world.opened(idx_dir, tiny)
    victim = "img0004.png"
    q = idx.encode_query(world.source_image(idx_dir, 4), world.scene(4)[1])
    assert victim in _everything(idx, q)
    top_before = [c.id for c in idx.search(q, 10, weights="rrf").results if c.id != victim]
    assert main(["delete", str(idx_dir), "--id", victim, "--id", "no-such-id", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deleted"] == 1 and out["not_found"] == 1 and out["live"] == 29
    # the handle opened before keeps its snapshot; a new one never sees the record again
    assert victim in _everything(idx, q)
    fresh = world.opened(idx_dir, tiny)
    assert victim not in _everything(fresh, q)
    assert [c.id for c in fresh.search(q, 9, weights="rrf").results] == top_before[:9]
    with pytest.raises(engine.IndexFormatError, match="not live records"):
        fresh.reader.records(np.array([int(idx.reader.rows_of([victim])[0])]))
    assert fresh.reader.rows_of([victim]).tolist() == [-1]
    assert main(["info", str(idx_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["live"], info["deleted"]) == (29, 1)
    # by a LAION-style removal list: a parquet with a url column (the sidecars' url field)
    pl.DataFrame({"url": ["http://x/7", "http://x/404"]}).write_parquet(tmp_path / "optout.parquet")
    (tmp_path / "ids.txt").write_text("# one id per line\nimg0009.jpg\n\nextra31.png\n")
    assert main(["delete", str(idx_dir), "--ids", str(tmp_path / "optout.parquet"),
                 "--ids", str(tmp_path / "ids.txt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deleted"] == 3 and out["not_found"] == 1 and out["live"] == 26
    gone = {"img0004.png", "img0007.jpg", "img0009.jpg", "extra31.png"}
    fresh = world.opened(idx_dir, tiny)
    for n in (4, 7, 9):
        q = fresh.encode_query(world.source_image(idx_dir, n) if n != 4 else
                               str(idx_dir.parent / "src" / "img0004.png"), world.scene(n)[1])
        assert not gone & _everything(fresh, q)
    assert not gone & set(fresh.reader.all_ids()[1].tolist())
    assert main(["delete", str(idx_dir)]) == 2
    assert "--id ID" in capsys.readouterr().err


def test_removal_list_urls_are_matched_in_url_columns_and_sidecar_metadata(tmp_path, monkeypatch):
    """URLs are matched a row group at a time in Arrow (a LAION-size record table is never read whole): in a
    URL column of any of its spellings and type, and in the metadata's JSON (invalid JSON matches nothing)."""
    from types import SimpleNamespace

    from engine import _maintain

    monkeypatch.setattr(_maintain, "LIVE_PART_RECORDS", 2)  # row groups of two records
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    pl.DataFrame({"row": [0, 1, 2, 3, 4], "caption": ["x"] * 5, "URL": ["http://u/0", None, "http://u/2", "", "u3"],
                  "meta": ['{"url": "http://m/0"}', "not json", None, '{"Url": "http://u/2"}', '{"URL": 5}']}
                 ).write_parquet(a / "records.parquet", row_group_size=2)
    pl.DataFrame({"row": [7, 8], "caption": ["y", "z"]}).write_parquet(b / "records.parquet")  # no URL at all
    reader = SimpleNamespace(segments=[SimpleNamespace(path=a), SimpleNamespace(path=b)])
    monkeypatch.setattr(_maintain.pq, "read_table", None)  # never the whole table
    found = _maintain._rows_of_urls(reader, ["http://u/0", "http://m/0", "http://u/2", "not json", "5", "nope",
                                             "http://u/\udcff"])  # a removal list's line that is not UTF-8
    assert found == {"http://u/0": [0], "http://m/0": [0], "http://u/2": [2, 3], "5": [4]}


def test_deleted_records_leave_benchmarks_too(tmp_path, tiny, cache):
    from eval.bench import load_benchmark
    from eval.run import ensure_index, run_queries
    from eval.synth import generate

    generate(tmp_path / "b", train=30, queries=12, seed=5, image_size=64, progress=False)
    b = load_benchmark(tmp_path / "b")
    idx = ensure_index(b, None, "tiny", progress=False)
    corpus_ids = pl.read_parquet(tmp_path / "b" / "corpus.parquet")["id"].to_list()
    unreferenced = sorted(set(corpus_ids) - {r for rel in b.queries["relevant"].to_list() for r in rel})[:3]
    engine.delete_records(idx.path, ids=unreferenced)
    idx = ensure_index(b, idx.path, None, progress=False)
    idx.use_encoders(tiny)
    for run in run_queries(b, idx, b.split("all"), progress=False):
        assert not set(unreferenced) & set(run.pool_ids.tolist())
        assert all(not set(unreferenced) & set(v) for v in run.rankings.values())


def test_compaction_keeps_answers_and_drops_deleted_records(idx_dir, tiny, capsys):
    engine.delete_records(idx_dir, ids=["img0002.png", "extra33.png"])
    idx = world.opened(idx_dir, tiny)
    queries = [idx.encode_query(world.source_image(idx_dir, n), world.scene(n)[1]) for n in (1, 5, 12)]
    before = [[(c.id, c.score) for c in idx.search(q, 10, weights="rrf").results] for q in queries]
    evidence = [idx.search(q, 5, weights="rrf").results[0].evidence for q in queries]
    m = read_manifest(idx_dir)
    assert len(m["segments"]) == 2 and m["counts"]["deleted"] == 2
    assert main(["compact", str(idx_dir), "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["segments_before"] == 2 and out["segments_after"] == 1 and out["purged"] == 2 and out["records"] == 28
    m = read_manifest(idx_dir)
    assert len(m["segments"]) == 1 and m["counts"]["deleted"] == 0 and m["counts"]["purged"] == 2
    assert sorted(p.name for p in (idx_dir / "segments").iterdir()) == [m["segments"][0]["path"].split("/")[-1]]
    assert not (idx_dir / "deletes").exists() or not any((idx_dir / "deletes").iterdir())
    # the handle opened before still answers from its (now deleted) files: a consistent snapshot
    assert [[(c.id, c.score) for c in idx.search(q, 10, weights="rrf").results] for q in queries] == before
    fresh = world.opened(idx_dir, tiny)
    after = [[(c.id, c.score) for c in fresh.search(q, 10, weights="rrf").results] for q in queries]
    assert after == before
    assert [fresh.search(q, 5, weights="rrf").results[0].evidence for q in queries] == evidence
    assert "img0002.png" not in fresh.reader.all_ids()[1].tolist()
    assert engine.verify(idx_dir, progress=False).ok


def test_the_next_writer_removes_deletes_files_that_no_generation_lists(tmp_path, tiny):
    """A deletion killed between writing its tombstones and committing them (or between the commit and removing
    the previous file) leaves a deletes file nothing lists; the next writer, a deletion too, removes it."""
    world.image_folder(tmp_path / "src", 6, size=64)
    idx_dir = tmp_path / "idx"
    build(tmp_path / "src", idx_dir, tiny)
    ids = sorted(IndexReader(idx_dir).all_ids()[1].tolist())
    engine.delete_records(idx_dir, ids=[ids[0]])
    shutil.copy(idx_dir / read_manifest(idx_dir)["deletes"]["path"], idx_dir / "deletes" / "del-000099.npy")
    engine.delete_records(idx_dir, ids=[ids[1]])
    m = read_manifest(idx_dir)
    assert sorted(p.name for p in (idx_dir / "deletes").iterdir()) == [Path(m["deletes"]["path"]).name]
    assert m["counts"]["deleted"] == 2 and engine.verify(idx_dir, progress=False).ok


def test_indexes_opened_while_another_process_deletes_and_compacts_are_never_called_damaged(tmp_path, tiny):
    """A writer's commit removes files of the generation before it (merged segments, caption index files its
    merges replaced); an open that read the previous manifest met them missing and called a sound index damaged
    ("rebuild it": 18 of about 400 opens, before). Opens now retry while a writer works: none fails, each one a
    whole generation."""
    import subprocess
    import sys

    world.image_folder(tmp_path / "src", 40, size=64)
    idx_dir = tmp_path / "idx"
    build(tmp_path / "src", idx_dir, tiny)
    ids = sorted(IndexReader(idx_dir).all_ids()[1].tolist())[:12]
    root = Path(__file__).resolve().parents[1]
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); import engine\n"
            f"for i, rid in enumerate({ids!r}):\n"
            f"    engine.delete_records({str(idx_dir)!r}, ids=[rid])\n"
            f"    if i % 3 == 2:\n"
            f"        engine.compact({str(idx_dir)!r}, progress=False, measure_search=False)\n")
    writer = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    opened, live = 0, set()
    while writer.poll() is None:
        r = IndexReader(idx_dir)
        assert len(r.all_ids()[0]) == r.n_records == int(r.manifest["counts"]["records"])  # one whole generation
        live.add(r.n_records)
        r.close()
        opened += 1
    assert writer.returncode == 0, writer.stderr.read().decode()[-2000:]
    assert opened > 10 and len(live) > 2 and IndexReader(idx_dir).n_records == 40 - 12


def _pq_index(folder, tiny, n: int = 1200, seed: int = 1, copies: int = 0) -> np.ndarray:
    """An IVF-PQ index of n random records written in 400-image segments, the first ``copies`` of them the same
    image (all their vectors equal); returns the CLIP vectors."""
    rng = np.random.default_rng(seed)
    w = engine.IndexWriter(folder, tiny.identity, engine.IndexSettings(codec="pq", ann="ivf", chunk=400,
                                                                       pca_sample=64))
    d = tiny.dino_dim
    clip = rng.standard_normal((n, 64)).astype(np.float32)
    clip /= np.linalg.norm(clip, axis=1, keepdims=True)
    dino, glob = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)
    cells = rng.standard_normal((n, 64, d)).astype(np.float32)
    for x in (clip, dino, glob, cells):
        x[:copies] = x[0]
    for s in range(0, n, 400):  # the writer commits a segment every 400 images
        b = slice(s, s + 400)
        w.add_images([f"v{i}" for i in range(s, s + 400)], [None] * 400, [f"caption {i}" for i in range(s, s + 400)],
                     [{}] * 400, clip[b], dino[b], glob[b], cells[b])
    w.finalize({"path": "synthetic", "kind": "test"})
    return clip


def test_compaction_with_retrained_codebooks(tmp_path, tiny):
    clip = _pq_index(tmp_path / "idx", tiny)
    assert len(read_manifest(tmp_path / "idx")["segments"]) == 3
    r0 = IndexReader(tmp_path / "idx")
    top0 = r0.search("clip", clip[:5], 5)
    s = engine.compact(tmp_path / "idx", retrain=True, progress=False)
    assert s.retrained and s.codebooks["generation"] == 2 and s.segments_after == 1
    r1 = IndexReader(tmp_path / "idx")
    top1 = r1.search("clip", clip[:5], 5)
    assert [a[0][0] for a in top0] == [b[0][0] for b in top1] == [0, 1, 2, 3, 4]
    for reader in (r0, r1):  # memory-mapped lists start no prefetch threads per search (several segments or one)
        for seg in reader.segments:
            for store in seg.stores.values():
                lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(store).invlists)
                assert type(lists).__name__ == "OnDiskInvertedLists" and lists.prefetch_nthread == 0
    assert sorted(p.name for p in (tmp_path / "idx" / "codebooks").iterdir()) == ["cb-0002"]


def _stored(reader: IndexReader) -> dict[str, np.ndarray]:
    """Every live record's stored content, in row order: ids, captions, record CRCs, caption keys, and every
    live image's refine codes, patch codes and checksums."""
    out: dict[str, list] = {k: [] for k in ("rows", "ids", "captions", "crc", "keys", "image_rows", "clip", "dino",
                                            "patches", "sums")}
    for seg in reader.segments:
        keep = reader.live.keep(np.asarray(seg.rows))
        t = pl.read_parquet(seg.path / "records.parquet").filter(pl.Series(keep))
        out["rows"].append(np.asarray(seg.rows)[keep])
        out["ids"] += t["id"].to_list()
        out["captions"] += t["caption"].to_list()
        out["crc"].append(np.asarray(seg.record_crc)[keep])
        out["keys"].append(np.asarray(seg.caption_keys)[keep])
        li = reader.live.keep(np.asarray(seg.image_rows))
        out["image_rows"].append(np.asarray(seg.image_rows)[li])
        for n in ("clip", "dino"):
            out[n].append(np.asarray(seg.refine[n])[li])
        out["patches"].append(np.asarray(seg.patches)[li])
        out["sums"].append(np.asarray(seg.image_sums)[li])
    return {k: (v if k in ("ids", "captions") else np.concatenate(v)) for k, v in out.items()}


@pytest.mark.parametrize("block,parts", [(None, [398, 400, 398]),
                                          (150, [148, 150, 100, 150, 150, 100, 150, 150, 98])])
def test_compaction_streams_a_segment_at_a_time_and_keeps_every_stored_byte(tmp_path, tiny, monkeypatch, block,
                                                                             parts):
    """Without --retrain, compaction writes the merged segment part by part (a block of an old segment's live
    records at a time: memory grows neither with the index nor with one big segment; here 400-record segments in
    blocks of 150) and stores exactly the live records' codes of before."""
    from engine import _maintain, _segment

    if block:
        monkeypatch.setattr(_maintain, "LIVE_PART_RECORDS", block)
    expected = parts

    folder = tmp_path / "idx"
    clip = _pq_index(folder, tiny)
    engine.delete_records(folder, ids=["v3", "v17", "v1100", "v1199"])
    r0 = IndexReader(folder)
    before, top0 = _stored(r0), r0.search("clip", clip[[0, 500, 900]], 5)
    parts, append = [], _segment.SegmentFiles.append
    monkeypatch.setattr(_segment.SegmentFiles, "append",
                        lambda self, enc: (parts.append(len(enc.table)), append(self, enc))[1])
    s = engine.compact(folder, progress=False, measure_search=False)
    assert parts == expected and s.purged == 4 and s.segments_after == 1
    r1 = IndexReader(folder)
    after = _stored(r1)
    for k, v in before.items():
        assert (v == after[k]) if isinstance(v, list) else np.array_equal(v, after[k]), k
    assert [a[0].tolist() for a in r1.search("clip", clip[[0, 500, 900]], 5)] == [a[0].tolist() for a in top0]
    assert engine.verify(folder, progress=False).ok
    assert not [p for p in (folder / "segments").iterdir() if p.name.startswith(".")]


def test_a_compaction_that_finds_damage_leaves_the_index_as_it_was(tmp_path, tiny):
    """A refine code damaged in the second of three segments (sizes intact): compaction names the segment, writes
    no manifest generation and leaves no half-written segment folder behind."""
    folder = tmp_path / "idx"
    _pq_index(folder, tiny)
    m = read_manifest(folder)
    victim = folder / m["segments"][1]["path"] / "clip.refine"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(engine.IndexFormatError, match=m["segments"][1]["path"].split("/")[-1]):
        engine.compact(folder, progress=False, measure_search=False)
    assert read_manifest(folder) == m
    assert sorted(p.name for p in (folder / "segments").iterdir()) == sorted(
        s["path"].split("/")[-1] for s in m["segments"])


def test_a_killed_compaction_leaves_nothing_that_stays(tmp_path, tiny):
    """A compaction killed midway leaves its half-written segment folder (named after the process); the next
    compaction (or build) removes it."""
    folder = tmp_path / "idx"
    _pq_index(folder, tiny)
    left = folder / "segments" / ".seg-000099.tmp-12345"
    left.mkdir()
    (left / "clip.refine").write_bytes(b"x" * 100)
    engine.compact(folder, progress=False, measure_search=False)
    m = read_manifest(folder)
    assert sorted(p.name for p in (folder / "segments").iterdir()) == [m["segments"][0]["path"].split("/")[-1]]


def test_a_segment_writer_that_fails_leaves_no_folder_and_no_open_file(tmp_path, monkeypatch):
    """A failure while opening the files (the third memory map) or while syncing them (a full disk): the
    temporary folder is removed and every file closed, each on its own."""
    import os

    import pyarrow as pa

    from engine import _segment

    schema = pa.schema([("row", pa.int64()), ("id", pa.string()), ("image", pa.string()), ("caption", pa.string())])
    real = np.lib.format.open_memmap
    calls = []

    def third_fails(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(np.lib.format, "open_memmap", third_fails)
    with pytest.raises(KeyboardInterrupt):
        _segment.SegmentFiles(tmp_path, "segments/seg-000001", 0, 0, schema, False)
    assert not list((tmp_path / "segments").iterdir())
    monkeypatch.setattr(np.lib.format, "open_memmap", real)

    out = _segment.SegmentFiles(tmp_path, "segments/seg-000001", 0, 0, schema, False)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        out.commit(1, {"clip": faiss.IndexFlatIP(4), "dino": faiss.IndexFlatIP(4)})
    out.abort()
    assert not list((tmp_path / "segments").iterdir())
    assert not out._records.is_open and all(f.closed for f in out._bins.values()) and out._serving_sink.closed


def test_search_settings_are_measured_for_a_recall_target(tmp_path, tiny, capsys):
    """Compaction measures, per IVF store, the cheapest (nprobe, refine) whose recall@100 against an exhaustive
    scan reaches 0.95 on the index's own records; readers use it, --nprobe overrides it, other codebooks and a
    damaged file are ignored, and `attrib info` shows it."""
    from engine._reader import SEARCH_FORMAT, search_path

    folder = tmp_path / "idx"
    _pq_index(folder, tiny)
    s = engine.compact(folder, progress=False)
    saved = json.loads(search_path(folder).read_text())
    assert saved["format"] == SEARCH_FORMAT and saved["codebooks"] == 1 and set(saved["stores"]) == {"clip", "dino"}
    r = IndexReader(folder)
    rng = np.random.default_rng(9)
    for name, st in saved["stores"].items():
        assert s.search["stores"][name]["nprobe"] == st["nprobe"] == r.nprobe[name] and r.refine[name] == st["refine"]
        # the least work of the settings tried that reach the target
        good = [t for t in st["tried"] if t["recall_at_100"] >= 0.95]
        assert st["reached_target"] and st["recall_at_100"] >= 0.95
        assert st["work"] == min(t["work"] for t in good)
        # the claim holds on queries it was not measured on: other stored vectors, exact top-100 by brute force
        rows = np.concatenate([np.asarray(seg.image_rows) for seg in r.segments])
        _, allv = r.vectors(name, rows)
        got = []
        for i in rng.choice(len(rows), 40, replace=False):
            exact = rows[np.argsort(-(allv @ allv[i]), kind="stable")[1:101]]
            found = [x for x in r.search(name, allv[i], 101)[0][0].tolist() if x != rows[i]][:100]
            got.append(len(set(found) & set(exact.tolist())) / 100)
        assert np.mean(got) >= 0.93, (name, np.mean(got))
    r.close()
    assert IndexReader(folder, nprobe=3).nprobe == {"clip": 3, "dino": 3}  # --nprobe overrides the measurement
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["search"]
    assert info["clip"]["measured"] and info["clip"]["nprobe"] == saved["stores"]["clip"]["nprobe"]
    assert info["clip"]["recall_at_100"] >= 0.95
    defaults = {n: st.nprobe for n, st in IndexReader(folder).codebooks.stores.items()}
    for bad in ({**saved, "codebooks": 2}, "not json {"):  # measured on other codebooks; damaged
        search_path(folder).write_text(bad if isinstance(bad, str) else json.dumps(bad))
        r = IndexReader(folder)
        assert r.nprobe == defaults and r.search_settings == {}
        r.close()
    s = engine.compact(folder, retrain=True, progress=False)  # new codebooks: measured again
    assert json.loads(search_path(folder).read_text())["codebooks"] == 2 and s.search["stores"]
    capsys.readouterr()
    assert main(["compact", str(folder), "--no-progress"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "search settings measured for recall@100 >= 0.95" in err and "clip: " in err and "dino: " in err


def test_search_measurement_counts_duplicates_as_found_and_services_pick_it_up(tmp_path, tiny):
    """300 copies of one image tie with each other: any 100 of them are a right top 100, so they must not count
    as misses (which would push the measurement to the slowest setting). A damaged or out-of-range search.json
    falls back to the defaults, and an open index picks up a new measurement between requests."""
    from engine._reader import default_refine, search_path
    from engine._search_tune import tune_search

    folder = tmp_path / "idx"
    _pq_index(folder, tiny, copies=300)
    engine.compact(folder, progress=False, measure_search=False)
    out = tune_search(folder, n_queries=80, seed=3)
    assert all(st["reached_target"] and st["recall_at_100"] >= 0.95 for st in out["stores"].values()), out["stores"]
    idx = world.opened(folder, tiny)
    saved = json.loads(search_path(folder).read_text())
    defaults = {n: st.nprobe for n, st in idx.reader.codebooks.stores.items()}
    for bad in ('{"format": "attrib-search", "codebooks": 1, "stores": {"clip": {"nprobe": Infinity, "refine": 4}}}',
                json.dumps({**saved, "stores": {"clip": {"nprobe": 1e30, "refine": 4}, "dino": {"nprobe": 3,
                                                                                                "refine": 10**9}}})):
        search_path(folder).write_text(bad)
        r = IndexReader(folder)
        assert r.nprobe == defaults and r.refine == {n: default_refine(st) for n, st in r.codebooks.stores.items()}
        assert r.refine == {"clip": 8, "dino": 8}  # 4-bit (fast-scan) codes: twice the 8-bit PQ default
        r.close()
    search_path(folder).write_text(json.dumps({**saved, "stores": {**saved["stores"], "clip": {
        **saved["stores"]["clip"], "nprobe": 5, "refine": 8}}}))
    assert idx.reopen_if_changed() is idx and idx.reader.nprobe["clip"] == 5 and idx.reader.refine["clip"] == 8
    assert len(idx.search(idx.encode_queries([None], ["caption 7"])[0], 5, weights="rrf").results) == 5


def test_flat_indexes_need_no_search_settings(idx_dir):
    from engine._reader import search_path
    from engine._search_tune import tune_search

    assert tune_search(idx_dir) is None and not search_path(idx_dir).exists()


def test_verify_names_damaged_components(idx_dir, tmp_path, capsys):
    assert main(["verify", str(idx_dir), "--no-progress"]) == 0
    assert "ok" in capsys.readouterr().err
    m = read_manifest(idx_dir)
    seg = idx_dir / m["segments"][0]["path"]
    cases = {"patches.bin": "patches", "clip.refine": "clip_refine", "records.arrow": "serving",
             "image_rows.npy": "image_rows"}
    for name, component in cases.items():
        d = shutil.copytree(idx_dir, tmp_path / f"bad-{component}")
        p = d / m["segments"][0]["path"] / name
        data = bytearray(p.read_bytes())
        data[-9] ^= 0xFF  # one byte, same size
        p.write_bytes(bytes(data))
        r = engine.verify(d, progress=False)
        assert not r.ok and r.problems[0]["component"] == component, r.problems
        assert m["segments"][0]["path"] in r.problems[0]["where"]
        assert main(["verify", str(d), "--no-progress", "--json"]) == 1
        assert json.loads(capsys.readouterr().out)["ok"] is False
    assert seg.exists()


def test_scores_from_codes_equal_products_of_decoded_vectors(tmp_path, tiny):
    """The re-scoring step computes inner products straight from the 8-bit codes (several segments here, and
    rows given out of order, deleted ones among them); they equal the decoded vectors' products."""
    _pq_index(tmp_path / "idx", tiny)
    engine.delete_records(tmp_path / "idx", ids=["v5", "v401"])
    r = IndexReader(tmp_path / "idx")
    assert len(r.segments) == 3
    rng = np.random.default_rng(3)
    rows = rng.permutation(1200)[:300]
    for store in ("clip", "dino"):
        q = rng.standard_normal(r.codebooks.stores[store].dim).astype(np.float32)
        has_v, v = r.vectors(store, rows)
        has_s, s = r.scores(store, rows, q)
        assert has_s.tolist() == has_v.tolist() and not has_s[rows == 5].any() and not has_s[rows == 401].any()
        assert s.dtype == np.float32 and np.allclose(s, v @ q, rtol=0, atol=1e-5 * np.abs(v @ q).max())
    # duplicates of one image (the same codes) score exactly alike wherever they sit, so row order breaks the tie
    for store in ("clip", "dino"):
        seg = r.segments[0]
        codes = np.asarray(seg.refine[store][:7]).copy()
        codes[[2, 6]] = codes[0]
        q = rng.standard_normal(r.codebooks.stores[store].dim).astype(np.float32)
        for n in (7, 5, 3):
            s = r.codebooks.refine_scores(store, codes[:n], q)
            assert len(set(s[[i for i in (0, 2, 6) if i < n]].tolist())) == 1


def test_pool_searches_compressed_stores_side_by_side_with_the_serial_answer(tmp_path, tiny):
    """On an IVF-PQ index of three segments with deletions, the pool's dense first stages searched side by side
    (one store on the helper thread) return the rows of the stores searched one after the other."""
    from engine.rankers import QueryInput, RowFilter

    clip = _pq_index(tmp_path / "idx", tiny)
    engine.delete_records(tmp_path / "idx", ids=["v8", "v650"])
    idx = world.opened(tmp_path / "idx", tiny)
    assert len(idx.reader.segments) == 3
    _, dino = idx.reader.vectors("dino", np.array([7, 900]))
    submitted = []

    def later(fn, *args):
        submitted.append(args[0])
        return idx._worker.submit(fn, *args)

    for i, row in enumerate((7, 900)):
        q = QueryInput(f"q{row}", None, None, {"clip_image": clip[row], "dino_global": dino[i]})
        firsts = [r for r in idx.rankers.values() if r.first_stage and r.available(q) and r.dense_query(q) is not None]
        wanted = {r.name: r.first_stage_depth(20) for r in firsts}
        for exclude in (None, RowFilter(np.array([row, 3], np.int64))):
            submitted.clear()
            serial = idx._pool._dense_first_stages(q, firsts, wanted, exclude, None)
            side = idx._pool._dense_first_stages(q, firsts, wanted, exclude, later)
            assert submitted == ["clip"]  # the cheaper store went to the helper thread, dino stayed here
            assert {n: v.tolist() for n, v in serial.items()} == {n: v.tolist() for n, v in side.items()}
            never_run = Future()  # a helper thread still busy elsewhere: the calling thread takes the search back
            taken = idx._pool._dense_first_stages(q, firsts, wanted, exclude, lambda fn, *a, f=never_run: f)
            assert never_run.cancelled()
            assert {n: v.tolist() for n, v in taken.items()} == {n: v.tolist() for n, v in serial.items()}
            found = set().union(*(set(v.tolist()) for v in side.values()))
            assert not found & {8, 650} and (exclude is None or not found & {row, 3})
            if exclude is None:
                assert side["clip"][0] == row


def test_compact_and_delete_outside_an_index_give_one_line_and_leave_nothing(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    for argv in (["compact", str(tmp_path / "nope")], ["delete", str(tmp_path / "afile"), "--id", "x"],
                 ["compact", str(tmp_path / "empty")], ["delete", str(tmp_path / "empty"), "--id", "x"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and ("does not exist" in err or "not an" in err), err
    assert not list((tmp_path / "empty").iterdir()) and not (tmp_path / "nope").exists()


def test_verify_finds_a_damaged_caption_index_and_queries_name_it(idx_dir, tiny):
    """Damage to the term dictionary changes BM25 document counts: verify names the caption index. Damage
    that makes tantivy panic is an IndexFormatError naming the caption index, not a Rust traceback."""
    import shutil

    term = next((idx_dir / "text").glob("*.term"))
    data = bytearray(term.read_bytes())
    copy = idx_dir.parent / "copy"
    shutil.copytree(idx_dir, copy)
    a, b = len(data) // 2, len(data) * 9 // 10  # term infos: document counts and posting offsets
    data[a:b] = bytes(x ^ 0x55 for x in data[a:b])
    term.write_bytes(bytes(data))
    rep = engine.verify(idx_dir, progress=False)
    assert not rep.ok and ("caption index" in json.dumps(rep.problems)), rep.problems
    fast = next((copy / "text").glob("*.fast"))
    data = bytearray(fast.read_bytes())
    data[int(len(data) * 0.3)] ^= 0x55
    fast.write_bytes(bytes(data))
    rep = engine.verify(copy, progress=False)
    assert not rep.ok and "caption index" in json.dumps(rep.problems)
    with pytest.raises(engine.IndexFormatError, match="caption index"):
        IndexReader(copy)


def test_verify_compares_caption_term_counts_with_the_live_captions(tiny_index, monkeypatch):
    """A term found in fewer caption documents than live captions hold it (what a damaged term dictionary
    gives, silently changing BM25 scores) is reported by verify."""
    from engine._stores import TextStore

    assert engine.verify(tiny_index, progress=False).ok
    real = TextStore.doc_freq
    monkeypatch.setattr(TextStore, "doc_freq", lambda self, t: real(self, t) - (t == "red"))
    rep = engine.verify(tiny_index, progress=False)
    assert not rep.ok and [p["component"] for p in rep.problems] == ["text"]
    assert "'red' in" in rep.problems[0]["problem"] and "fewer documents" in rep.problems[0]["problem"]


def test_verify_searches_caption_terms_and_finds_lost_postings(tiny_index, monkeypatch):
    """A posting list that lost documents (a search for a term finds fewer captions than hold it) is reported."""
    from engine._stores import TextStore

    real = TextStore._collect
    monkeypatch.setattr(TextStore, "_collect", lambda self, res: tuple(x[:-1] for x in real(self, res)))
    rep = engine.verify(tiny_index, progress=False)
    assert not rep.ok and "a search for the caption term" in json.dumps(rep.problems)


def test_record_tables_of_irreconcilable_types_merge_as_text():
    """An index whose older segments hold a CSV column as int64 (an older version inferred CSV types) and newer
    ones as text still compacts: the column becomes text."""
    import pyarrow as pa

    from engine._segment import cast_table, unified_schema

    old = pa.table({"row": [1], "id": ["a"], "key": pa.array([1], pa.int64())})
    new = pa.table({"row": [2], "id": ["b"], "key": ["0001"], "score": [0.5]})
    schema = unified_schema([old.schema, new.schema])
    assert schema.field("key").type == pa.large_string() and schema.field("score").type == pa.float64()
    assert [cast_table(t, schema).to_pylist()[0]["key"] for t in (old, new)] == ["1", "0001"]


def _exhaustive(r: IndexReader, store: str, q: np.ndarray, k: int) -> list[set]:
    """Each query's top k live rows by the stored (refine) vectors, scanned in full."""
    rows = np.concatenate([np.asarray(s.image_rows, np.int64) for s in r.segments])
    rows = rows[r.live.keep(rows)]
    _, v = r.vectors(store, rows)
    return [set(rows[np.argsort(-(v @ qi), kind="stable")[:k]].tolist()) for qi in q]


def _dense_answers(folder, q: np.ndarray, k: int, exclude=None, nprobe: int = 10_000, refine: int = 32) -> list:
    """(rows, scores) of both dense stores for queries ``q`` (CLIP vectors; DINO: the same values, padded)."""
    r = IndexReader(folder, nprobe=nprobe, refine=refine)
    qd = np.resize(q, (len(q), r.codebooks.stores["dino"].dim)).astype(np.float32)
    out = [(rows.tolist(), s.tolist()) for store, x in (("clip", q), ("dino", qd))
           for rows, s in r.search(store, x, k, exclude)]
    r.close()
    return out


@pytest.mark.parametrize("segments, parts", [(3, 1), (3, 3), (1, 1)])
def test_fast_scan_lists_answer_like_lists_without_the_deleted_rows(tmp_path, tiny, monkeypatch, segments, parts):
    """4-bit lists are packed on the first search into fast-scan parts searched as one: three small segments
    packed together, or each on its own (as large segments are), or one segment. Deleted rows stay in the packed
    lists and never come back: every answer, rows and scores, is the one of the index compacted into one segment
    without them. Excluded rows never come back, and probing every list finds the exhaustive top 10."""
    import faiss

    import engine._reader as rd

    if parts > 1:
        monkeypatch.setattr(rd, "SMALL_SEGMENT_IMAGES", 0)  # every segment is large: a part of its own
    folder = tmp_path / "idx"
    clip = _pq_index(folder, tiny)
    if segments == 1:
        engine.compact(folder, progress=False)
    engine.delete_records(folder, ids=[f"v{i}" for i in range(0, 1200, 3)])
    r = IndexReader(folder, nprobe=10_000, refine=32)
    spec = r.codebooks.stores["clip"]
    assert spec.fast_scan and spec.nbits == 4 and spec.code_bytes == spec.m // 2
    assert r._shells == {}  # packed on the first search, not when an index opens (info, delete, compact)
    shell = r._shell("clip")
    assert len(r.segments) == segments and len(shell.parts) == parts
    assert all(isinstance(p, faiss.IndexIVFPQFastScan) for _, p in shell.parts)
    assert shell.ntotal == 1200 and r.n_images == 800  # the deleted rows are still in the lists
    # the packed copy is what searches read: the segments' memory-mapped lists of that store are closed
    assert all("clip" not in seg.stores and "dino" in seg.stores for seg in r.segments)
    gc.collect()  # nothing of the closed lists is still needed
    q = clip[1:40:3] + 0.05
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    want = _exhaustive(r, "clip", q, 10)
    found = r.search("clip", q, 10)
    assert all(int(x) % 3 for rows, _ in found for x in rows)  # deleted rows never come back
    assert np.mean([len(set(rows.tolist()) & w) / 10 for (rows, _), w in zip(found, want)]) >= 0.95
    top = np.array([rows[0] for rows, _ in found])
    again = r.search("clip", q, 10, exclude=top)
    assert all(t not in rows.tolist() for t, (rows, _) in zip(top, again))
    r.close()
    # fast-scan distances are coarse: with few lists probed and little re-scoring, candidates often tie at the
    # k-th first-stage distance, and the lower rows are kept whatever the segments
    qs = np.concatenate([q, np.random.default_rng(3).standard_normal((200, 64)).astype(np.float32)])
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    settings = [dict(nprobe=10_000, refine=32), dict(nprobe=2, refine=2), dict(nprobe=1, refine=1)]
    before = [_dense_answers(folder, qs, k, **st) for k in (1, 10, 200) for st in settings] + \
        [_dense_answers(folder, q, 10, top)]
    engine.compact(folder, progress=False)  # the same codes, without the deleted rows
    r = IndexReader(folder)
    assert r._shell("clip").ntotal == 800
    r.close()
    assert [_dense_answers(folder, qs, k, **st) for k in (1, 10, 200) for st in settings] + \
        [_dense_answers(folder, q, 10, top)] == before


def _append(folder, tiny, n: int, seed: int) -> np.ndarray:
    """Appends n random records (ids n<seed>-<i>) as one segment; returns their CLIP vectors."""
    w = engine.IndexWriter(folder, tiny.identity, engine.IndexSettings(codec="pq", ann="ivf", chunk=400,
                                                                       pca_sample=64))
    rng = np.random.default_rng(seed)
    clip = rng.standard_normal((n, 64)).astype(np.float32)
    clip /= np.linalg.norm(clip, axis=1, keepdims=True)
    d = tiny.dino_dim
    w.add_images([f"n{seed}-{i}" for i in range(n)], [None] * n, [""] * n, [{}] * n, clip,
                 rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32),
                 rng.standard_normal((n, 64, d)).astype(np.float32))
    w.finalize({"path": "more", "kind": "test"})
    return clip


def _parts(index, store: str) -> list:
    return [p for _, p in index.reader._shell(store).parts]


def test_a_new_generation_takes_over_the_packed_lists_of_unchanged_segments(tmp_path, tiny):
    """Reopening an index after an append packs only the appended segment, and after a deletion nothing: the
    segments it shares with the generation already open are taken over, for a store that generation never searched
    too, and the codebooks with them (one copy, however many generations). After a compaction nothing is taken
    over and nothing of the older generation is kept. Answers, of both stores, are those of the index opened
    afresh, also once the older generations are closed, and deleted rows never come back from lists taken over."""
    folder = tmp_path / "idx"
    clip = _pq_index(folder, tiny, n=800)
    index = engine.open_index(folder)
    first = index.reader.search("clip", clip[:30], 10)
    old = {"clip": _parts(index, "clip"), "dino": _parts(index, "dino")}
    assert len(old["clip"]) == len(old["dino"]) == 1  # two small segments, packed together
    more = _append(folder, tiny, 50, 11)
    appended = index.reopen_if_changed()
    assert appended is not index and appended.reader.codebooks is index.reader.codebooks
    appended.reader._shell("clip")  # this generation searches one store only
    parts = _parts(appended, "clip")
    assert len(parts) == 2 and parts[:1] == old["clip"]  # the same object: not packed again
    _append(folder, tiny, 20, 12)
    again = appended.reopen_if_changed()
    assert again.reader.codebooks is index.reader.codebooks
    assert _parts(again, "dino")[:1] == old["dino"] and _parts(again, "clip")[:2] == parts  # dino: from `index`
    assert len(_parts(again, "clip")) == 3
    for i in (index, appended):
        i.close()
    gc.collect()
    q = np.concatenate([clip[:30], more[:5]])
    qd = np.resize(q, (len(q), again.reader.codebooks.stores["dino"].dim)).astype(np.float32)

    def answers(i) -> list:
        return [(r.tolist(), s.tolist()) for store, x in (("clip", q), ("dino", qd))
                for r, s in i.reader.search(store, x, 10)]

    fresh = engine.open_index(folder)
    assert answers(again) == answers(fresh)
    assert [r[0] for r, _ in again.reader.search("clip", more[:5], 1)] == list(range(800, 805))
    fresh.close()
    engine.delete_records(folder, ids=[f"v{i}" for i in range(0, 800, 2)] + ["n11-1"])
    deleted = again.reopen_if_changed()
    assert _parts(deleted, "clip") == _parts(again, "clip") and _parts(deleted, "dino") == _parts(again, "dino")
    found = answers(deleted)
    assert not (set(range(0, 800, 2)) | {801}) & {x for rows, _ in found for x in rows}
    fresh = engine.open_index(folder)
    assert found == answers(fresh)
    assert [r.tolist() for r, _ in first] != [r for r, _ in found[:30]]
    fresh.close()
    engine.compact(folder, progress=False, measure_search=False)  # searched with the same settings
    compacted = deleted.reopen_if_changed()
    assert not compacted.reader.packed_segments()  # nothing offered by `deleted` is for this generation's segments
    assert answers(compacted) == found  # compaction changes no answer
    assert len(compacted.reader.packed_segments()) == 2  # its own two stores, one segment
    for i in (compacted, deleted, again):
        i.close()


def test_parts_of_small_segments_taken_over_are_packed_again_as_one_beyond_a_few(tmp_path, tiny, monkeypatch):
    """Each append a service moves on after adds a part to search; beyond MAX_SMALL_PARTS parts of small
    segments, those segments are packed again as one part. At every generation the parts hold every stored image,
    appended records are found, parts taken over are the same objects, and answers are those of a fresh reader.
    Parts of 20 images or fewer (where faiss 1.15's fast-scan search reads its output buffers) answer every time."""
    import engine._reader as rd

    monkeypatch.setattr(rd, "MAX_SMALL_PARTS", 2)
    folder = tmp_path / "idx"
    clip = _pq_index(folder, tiny, n=400)
    index = engine.open_index(folder)
    counts = []
    for seed, n in ((21, 30), (22, 30), (23, 12), (24, 5)):
        before = _parts(index, "clip")
        more = _append(folder, tiny, n, seed)
        index = index.reopen_if_changed()
        shell = index.reader._shell("clip")
        counts.append(len(shell.parts))
        assert shell.ntotal == sum(s.n_images for s in index.reader.segments) == index.reader.n_images
        if len(shell.parts) > 1:
            assert [p for _, p in shell.parts[:-1]] == before  # taken over
        first = index.reader.n_images - n
        for _ in range(20):  # two threads answer the batch: every search finds every appended record first
            assert [int(r[0]) for r, _ in index.reader.search("clip", more, 1)] == list(range(first, first + n))
        fresh = IndexReader(folder)
        q = np.concatenate([clip[:20], more])
        assert [(r.tolist(), s.tolist()) for r, s in index.reader.search("clip", q, 10)] == \
            [(r.tolist(), s.tolist()) for r, s in fresh.search("clip", q, 10)]
        fresh.close()
    assert counts == [2, 1, 2, 1]  # 1 + 1; 3 > 2: one part of the three segments; 1 + 1; again one
    index.close()


def test_fast_scan_searches_never_ask_faiss_for_2_to_20_results_nor_hand_it_unset_buffers(tmp_path, tiny,
                                                                                          monkeypatch):
    """faiss 1.15's fast-scan search for 2 to 20 results starts from what its output buffers hold: with recycled
    memory holding the best possible distance, whole queries came back empty (a part of a few appended images,
    searched for k=1 x refine 8, is such a search). Every fast-scan search asks for at least 21 results, into
    buffers holding the worst distance and no row, and finds what it should."""
    import faiss

    import engine._reader as rd

    monkeypatch.setattr(rd, "SMALL_SEGMENT_IMAGES", 0)  # a part per segment, the last one of 12 images
    folder = tmp_path / "idx"
    _pq_index(folder, tiny, n=400)
    more = _append(folder, tiny, 12, 31)
    seen = []
    cls = faiss.IndexIVFPQFastScan
    for name, kpos, dpos, ipos in (("search_c", 2, 3, 4), ("search_preassigned_c", 2, 5, 6)):
        real = getattr(cls, name)

        def spy(self, *a, real=real, kpos=kpos, dpos=dpos, ipos=ipos):
            n, k = a[0], a[kpos]
            d = faiss.rev_swig_ptr(a[dpos], n * k)
            i = faiss.rev_swig_ptr(a[ipos], n * k)
            seen.append((k, bool(np.all(d == -np.finfo(np.float32).max)), bool(np.all(i == -1))))
            return real(self, *a)

        monkeypatch.setattr(cls, name, spy)
    r = IndexReader(folder, refine=8)
    assert len(r._shell("clip").parts) == 2
    assert [int(x[0]) for x, _ in r.search("clip", more, 1)] == list(range(400, 412))
    r.close()
    monkeypatch.undo()
    assert seen and all(k >= 21 and filled and unset for k, filled, unset in seen)


def test_candidates_tied_with_the_kth_are_the_lowest_rows_whatever_the_parts(tmp_path, tiny, monkeypatch):
    """Near 700 copies of one image spread over two segments, far more candidates tie at the k-th distance than
    a part is first asked for: the parts holding more of them are asked again, and the candidates kept are the
    best by distance, then by row, over everything the probed lists hold."""
    import faiss

    import engine._reader as rd

    monkeypatch.setattr(rd, "SMALL_SEGMENT_IMAGES", 0)  # a part per segment
    folder = tmp_path / "idx"
    clip = _pq_index(folder, tiny, copies=700)
    r = IndexReader(folder)
    shell = r._shell("clip")
    assert len(shell.parts) == 3
    q = np.concatenate([clip[:1], clip[690:720]])
    for nprobe in (1, 4, 10_000):
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, r.codebooks.stores["clip"].nlist))
        everything = [p.search(q, p.ntotal, params=params) for _, p in shell.parts]
        for k in (1, 10, 50, 300):
            d, i = shell.search(q, k, params)
            for j in range(len(q)):
                dd = np.concatenate([e[0][j] for e in everything])
                ii = np.concatenate([e[1][j] for e in everything])
                dd, ii = dd[ii >= 0], ii[ii >= 0]
                want = set(ii[np.lexsort((ii, -dd))[:k]].tolist())
                assert set(i[j][i[j] >= 0].tolist()) == want
    r.close()


def test_indexes_with_8_bit_product_codes_are_searched_as_before(tmp_path, tiny, monkeypatch):
    """An index written before 4-bit codes (8-bit PQ lists, no ``nbits`` in its manifest) keeps its format: it
    is searched through its memory-mapped lists, appended to and compacted with its own codebooks."""
    import engine._codebooks as cbm
    from engine._manifest import write_manifest

    monkeypatch.setattr(cbm, "PQ_NBITS", 8)
    monkeypatch.setattr(cbm, "SUBVECTOR_DIMS", 8)
    folder = tmp_path / "idx"
    clip = _pq_index(folder, tiny)
    m = read_manifest(folder)
    assert m["format_version"] == 3
    for st in m["codebooks"]["stores"].values():
        assert st.pop("nbits") == 8
    write_manifest(folder, {**m, "format_version": 2})
    assert read_manifest(folder)["format_version"] == 2  # as older versions wrote it
    monkeypatch.undo()  # the current code reads and writes it
    r = IndexReader(folder, nprobe=10_000)
    spec = r.codebooks.stores["clip"]
    assert spec.nbits == 8 and not spec.fast_scan and r.refine["clip"] == 4
    assert not isinstance(r._shell("clip"), faiss.IndexIVFPQFastScan)
    q = clip[:20]
    want = _exhaustive(r, "clip", q, 10)
    assert np.mean([len(set(rows.tolist()) & w) / 10 for (rows, _), w in zip(r.search("clip", q, 10), want)]) >= 0.9
    r.close()
    engine.compact(folder, progress=False)
    assert read_manifest(folder)["format_version"] == 2  # still readable by the versions that made it
    r = IndexReader(folder, nprobe=10_000)
    assert r.codebooks.stores["clip"].nbits == 8 and len(r.segments) == 1
    assert [rows[0] for rows, _ in r.search("clip", clip[:20], 1)] == list(range(20))
    r.close()
    engine.compact(folder, retrain=True, progress=False)  # new codebooks: 4-bit codes, format version 3
    m = read_manifest(folder)
    assert m["format_version"] == 3 and all(st["nbits"] == 4 for st in m["codebooks"]["stores"].values())
    r = IndexReader(folder, nprobe=10_000, refine=32)
    assert [rows[0] for rows, _ in r.search("clip", clip[:20], 1)] == list(range(20))
    r.close()


def test_fast_scan_packs_segments_whose_lists_fill_whole_blocks(tmp_path, tiny):
    """Three 512-image segments of a one-list (flat) pq store: each list reaches a multiple of faiss's block size
    in bytes at a segment boundary, where appending packed lists in faiss 1.15 writes past the end of the list
    (the process aborted). Each segment is packed on its own, so the search answers like an exhaustive scan."""
    rng = np.random.default_rng(5)
    n, d = 1536, tiny.dino_dim
    w = engine.IndexWriter(tmp_path / "idx", tiny.identity, engine.IndexSettings(codec="pq", ann="flat", chunk=512,
                                                                                  pca_sample=64))
    clip = rng.standard_normal((n, 64)).astype(np.float32)
    clip /= np.linalg.norm(clip, axis=1, keepdims=True)
    for s in range(0, n, 512):
        w.add_images([f"v{i}" for i in range(s, s + 512)], [None] * 512, [""] * 512, [{}] * 512, clip[s:s + 512],
                     rng.standard_normal((512, d)).astype(np.float32), rng.standard_normal((512, d)).astype(np.float32),
                     rng.standard_normal((512, 64, d)).astype(np.float32))
    w.finalize({"path": "synthetic", "kind": "test"})
    r = IndexReader(tmp_path / "idx", refine=32)
    shell = r._shell("clip")
    assert len(r.segments) == 3 and r.codebooks.stores["clip"].nlist == 1 and shell.ntotal == n
    block = faiss.downcast_InvertedLists(shell.parts[0][1].invlists).block_size
    assert 512 % block == 0  # the list held a multiple of the block size after each segment
    want = _exhaustive(r, "clip", clip[:30], 10)
    found = r.search("clip", clip[:30], 10)
    assert np.mean([len(set(rows.tolist()) & w_) / 10 for (rows, _), w_ in zip(found, want)]) >= 0.95
    r.close()


def test_a_pq_index_takes_a_segment_of_caption_only_records(tmp_path, tiny):
    """Records without an image appended to a pq index make a segment without codes (its commit failed on
    reshaping zero refine codes); searches, the text rankers and compaction go on."""
    folder = tmp_path / "idx"
    clip = _pq_index(folder, tiny)
    w = engine.IndexWriter(folder, tiny.identity, engine.IndexSettings(codec="pq", ann="ivf", chunk=400,
                                                                       pca_sample=64))  # an existing index: appends
    for j in range(5):
        w.add_caption_only(f"t{j}", f"only text {j}")
    w.finalize({"path": "captions", "kind": "test"})
    r = IndexReader(folder)
    assert len(r.segments) == 4 and r.segments[-1].n_images == 0 and r.n_records == 1205
    assert r.search("clip", clip[:3], 1)[0][0].tolist() == [0]
    assert r.rows_of(["t3"]).tolist() == [1203] and r.text.search(["text"], 10)[0].tolist()[:1] != []
    r.close()
    engine.compact(folder, progress=False)
    r = IndexReader(folder)
    assert len(r.segments) == 1 and r.n_records == 1205 and r.search("clip", clip[:3], 1)[0][0].tolist() == [0]
    r.close()


def _mapped_rss(path) -> int:
    """Bytes of ``path`` this process has mapped and resident (/proc/self/smaps)."""
    total, mine = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's first line: address range, ..., its file
            mine = len(head) >= 6 and head[5] == str(path)
        elif mine and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def test_code_files_stay_mapped_within_a_budget(tmp_path, monkeypatch):
    """Scattered reads of code files larger than the budget together: the rows read are the files', and the pages
    the process keeps mapped stay near the budget, where the same reads without one leave most of them mapped.
    Eight files of 2 MiB are bounded as one of 16 MiB is."""
    from engine import _segment

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (65536, 256), dtype=np.uint8)  # 16 MiB, just written: in the page cache
    layouts = {"one file": [data], "eight files": np.split(data, 8)}
    for name, parts in layouts.items():
        paths = []
        for i, part in enumerate(parts):
            paths.append(tmp_path / f"{name.replace(' ', '-')}-{i}.bin")
            paths[-1].write_bytes(part.tobytes())
        mapped = {}
        for budget in (1 << 20, 1 << 40):
            monkeypatch.setattr(_segment, "MAPPED_BUDGET_BYTES", budget)
            maps = [_segment.MappedCodes(np.memmap(p, dtype=np.uint8, mode="r", shape=part.shape))
                    for p, part in zip(paths, parts)]
            for _ in range(300):
                f = int(rng.integers(0, len(parts)))
                rows = rng.integers(0, len(parts[f]), 16)
                assert np.array_equal(maps[f].take(rows), parts[f][rows])
            mapped[budget] = sum(_mapped_rss(p) for p in paths)
            del maps
            gc.collect()
        assert mapped[1 << 40] > 8 << 20, name  # without a budget, most of the 16 MiB stays mapped
        assert mapped[1 << 20] <= 2 << 20, name  # with one: the budget, plus the rows of the last read


def test_answers_are_the_same_when_every_read_drops_the_mapped_pages(tmp_path, tiny, monkeypatch):
    """Re-scoring, patch cells and caption embeddings read through maps whose pages are dropped after every
    read (a budget of 0 bytes) give the same answers as maps that keep them."""
    from engine import _segment
    from engine.rankers import QueryInput

    clip = _pq_index(tmp_path / "idx", tiny)
    answers = []
    for budget in (1 << 40, 0):
        monkeypatch.setattr(_segment, "MAPPED_BUDGET_BYTES", budget)
        idx = world.opened(tmp_path / "idx", tiny)
        maps = [m for s in idx.reader.segments for m in (*s._refine_maps.values(), s._patch_map, s._caption_map)
                if m is not None]
        assert len(maps) >= 9 and all(m in _segment.MAPPED.maps for m in maps)
        drops = _segment.MAPPED.drops
        got = []
        for row in (3, 450, 1100):
            _, dino = idx.reader.vectors("dino", np.array([row]))
            q = idx.with_terms(QueryInput(f"q{row}", None, f"caption {row}",
                                          {"clip_image": clip[row], "clip_text": clip[row], "dino_global": dino[0],
                                           "dino_cells": np.ones((64, tiny.dino_dim), np.float32)}))
            res = idx.search(q, k=10)
            d = res.to_dict()
            assert len(d["results"]) == 10
            got.append({k: v for k, v in d.items() if k != "timings_ms"})  # every score and feature of each result
            _, cells = idx.reader.patch_cells(np.array([row, 7]))
            got.append(np.round(cells, 6).tolist())
        answers.append(got)
        assert (_segment.MAPPED.drops > drops) == (budget == 0)  # every read dropped the pages of every map
        idx.close()
    assert answers[0] == answers[1]


def _captioned_pq_index(folder, tiny, n: int, chunk: int, empty_every: int = 10, caption_codec: str = "auto"):
    """An IVF-PQ index of n random images whose captions have clustered CLIP text embeddings (every
    ``empty_every``-th caption empty), written in ``chunk``-image segments; returns the embeddings by record."""
    rng = np.random.default_rng(7)
    d = tiny.clip_dim
    centres = rng.standard_normal((12, d)).astype(np.float32)
    emb = centres[rng.integers(0, 12, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    caps = ["" if i % empty_every == 0 else f"caption {i}" for i in range(n)]
    emb[[i for i, c in enumerate(caps) if not c]] = 0
    by_text = {c: emb[i] for i, c in enumerate(caps) if c}
    w = engine.IndexWriter(folder, tiny.identity, engine.IndexSettings(codec="pq", ann="ivf", chunk=chunk,
                                                                       pca_sample=64, caption_codec=caption_codec),
                           caption_encoder=lambda texts: np.stack([by_text[t] for t in texts]))
    dd = tiny.dino_dim
    clip = rng.standard_normal((n, d)).astype(np.float32)
    clip /= np.linalg.norm(clip, axis=1, keepdims=True)
    for s in range(0, n, 100):
        b = slice(s, min(s + 100, n))
        k = b.stop - b.start
        w.add_images([f"v{i}" for i in range(b.start, b.stop)], [None] * k, caps[b], [{}] * k, clip[b],
                     rng.standard_normal((k, dd)).astype(np.float32), rng.standard_normal((k, dd)).astype(np.float32),
                     rng.standard_normal((k, 64, dd)).astype(np.float32))
    w.finalize({"path": "synthetic", "kind": "test"})
    return emb


def test_caption_embeddings_are_product_coded_when_the_first_chunk_has_enough_captions(tmp_path, tiny, capsys):
    """With the pq codec and at least CAPTION_PQ_MIN_TRAIN captions in the first chunk, caption embeddings are
    8-bit product codes plus a presence byte (format version 4): cosines stay close to the exact ones, empty
    captions stay empty, and a compaction (a retraining too) copies the codes byte for byte. With fewer
    captions they are int8 with a per-record scale (format version 3), as before."""
    from engine import _codebooks

    folder = tmp_path / "idx"
    emb = _captioned_pq_index(folder, tiny, 1500, 1200)  # segments of 1,200 and 300 records
    m = read_manifest(folder)
    assert m["codebooks"]["caption_codec"] == "pq" and m["format_version"] == 4
    r = IndexReader(folder)
    d = tiny.clip_dim
    width = d // _codebooks.CAPTION_PQ_DIMS * _codebooks.CAPTION_PQ_NBITS // 8 + 1
    assert r.codebooks.caption_code_shape == (width, np.uint8) and len(r.segments) == 2
    assert all(s.caption_codes.shape == (s.n_records, width) for s in r.segments)
    assert engine.index_info(folder)["codebooks"]["caption_codec"] == "pq"

    gone = np.zeros(1500, bool)

    def fidelity(reader):
        rng = np.random.default_rng(1)
        errs, overlaps = [], []
        for i in rng.choice(np.flatnonzero(emb.any(axis=1)), 20, replace=False):
            p = emb[i]
            got = reader.captions.cosines(np.arange(1500), p)
            want = emb @ p
            assert np.array_equal(np.isnan(got), ~emb.any(axis=1) | gone)  # empty captions, deleted rows: none
            ok = ~np.isnan(got)
            errs.append(np.abs(got[ok] - want[ok]).mean())
            top = set(reader.captions.top(p, 50).tolist())
            exact = set(np.argsort(-np.where(ok, want, -np.inf))[:50].tolist())
            overlaps.append(len(top & exact) / 50)
        return float(np.mean(errs)), float(np.mean(overlaps))

    err, overlap = fidelity(r)
    assert err < 0.03 and overlap >= 0.8, (err, overlap)
    before = np.concatenate([s.caption_code_rows(np.arange(s.n_records)) for s in r.segments])
    r.close()
    engine.delete_records(folder, ids=["v3", "v1250"])
    gone[[3, 1250]] = True
    engine.compact(folder, progress=False)
    r = IndexReader(folder)
    live = np.setdiff1d(np.arange(1500), [3, 1250])
    assert len(r.segments) == 1 and r.codebooks.caption_codec == "pq"
    assert np.array_equal(r.segments[0].caption_code_rows(np.arange(len(live))), before[live])
    r.close()
    engine.compact(folder, retrain=True, progress=False)
    r = IndexReader(folder)
    assert r.codebooks.generation == 2 and r.codebooks.caption_codec == "pq"
    err2, overlap2 = fidelity(r)
    assert err2 < 0.03 and overlap2 >= 0.8, (err2, overlap2)
    coded = r.captions.cosines(np.arange(1500), emb[5])
    r.close()
    assert engine.verify(folder, progress=False).ok
    assert main(["compact", str(folder), "--caption-codec", "int8"]) == 2  # a codebook change needs --retrain
    assert "--retrain" in capsys.readouterr().err
    assert main(["compact", str(folder), "--retrain", "--caption-codec", "int8", "--no-progress"]) == 0
    m = read_manifest(folder)
    assert "caption_codec" not in m["codebooks"] and m["settings"]["caption_codec"] == "int8"
    assert m["format_version"] == 3  # engines of version 3 read it again
    r = IndexReader(folder)
    assert r.codebooks.caption_code_shape == (d + 4, np.uint8)
    # retrained from the stored product codes: int8 keeps what they held (it cannot restore what they lost)
    np.testing.assert_allclose(r.captions.cosines(np.arange(1500), emb[5]), coded, atol=5e-3)
    r.close()
    engine.compact(folder, retrain=True, progress=False)  # the choice holds for later retrainings
    assert IndexReader(folder).codebooks.caption_codec == "int8"

    chosen = tmp_path / "chosen"  # enough captions, but int8 asked for
    _captioned_pq_index(chosen, tiny, 1200, 1200, caption_codec="int8")
    assert IndexReader(chosen).codebooks.caption_codec == "int8" and read_manifest(chosen)["format_version"] == 3
    with pytest.raises(engine.AttribError, match="caption codec"):
        engine.IndexSettings(caption_codec="pq4")

    few = tmp_path / "few"  # 900 captions in the first chunk: too few to train on
    _captioned_pq_index(few, tiny, 1000, 1000)
    m = read_manifest(few)
    assert "caption_codec" not in m["codebooks"] and m["format_version"] == 3
    r = IndexReader(few)
    assert r.codebooks.caption_codec == "int8" and r.codebooks.caption_code_shape == (d + 4, np.uint8)
    r.close()
    with pytest.raises(engine.AttribError, match="at least 1000 captions in the first chunk"):  # asked for: said
        _captioned_pq_index(tmp_path / "few-pq", tiny, 1000, 1000, caption_codec="pq")
    with pytest.raises(engine.AttribError, match="holds 900 live ones"):  # a retraining says what the index holds
        engine.compact(few, retrain=True, progress=False, caption_codec="pq")


def test_a_retraining_fits_product_codes_on_a_sample_of_the_captions_not_of_the_records(tmp_path, tiny, monkeypatch):
    """The caption quantizer of a retraining is fitted on a uniform sample of the non-empty captions, however few
    records have one (a sample of records could hold too few captions to fit on)."""
    from engine import _maintain

    folder = tmp_path / "idx"
    emb2 = _captioned_pq_index(folder, tiny, 1500, 1500, empty_every=3, caption_codec="int8")  # 1,000 captions
    assert IndexReader(folder).codebooks.caption_codec == "int8" and emb2.any(axis=1).sum() == 1000
    monkeypatch.setattr(_maintain, "CAPTION_PQ_MAX_TRAIN", 1010)  # a sample of 1,010 records would hold 673
    engine.compact(folder, retrain=True, progress=False, caption_codec="pq")
    r = IndexReader(folder)
    assert r.codebooks.caption_codec == "pq"
    got = r.captions.cosines(np.arange(1500), emb2[1])
    ok = emb2.any(axis=1)
    assert np.array_equal(np.isnan(got), ~ok) and np.abs(got[ok] - emb2[ok] @ emb2[1]).mean() < 0.03


def test_a_retraining_keeps_the_finest_codes_and_refits_the_first_stage(tmp_path, tiny):
    """Refine, patch and caption codes are the finest an index holds: fitting their quantizers again on their own
    decoded values learns nothing, and coding them again only adds error (repeated retrainings compounded it).
    A retraining keeps those quantizers and copies the codes byte for byte, however often it runs; only the IVF
    lists and fast-scan codes are refitted, and every stored vector still finds itself."""
    folder = tmp_path / "idx"
    emb = _captioned_pq_index(folder, tiny, 1500, 1200)
    r = IndexReader(folder)
    before, caps = _stored(r), np.concatenate([s.caption_code_rows(np.arange(s.n_records)) for s in r.segments])
    vecs = r.vectors("clip", np.arange(1500))[1]
    files = {n: r.codebooks.sq[n] for n in ("clip", "dino")}
    r.close()
    engine.delete_records(folder, ids=["v7", "v1300"])
    live = np.setdiff1d(np.arange(1500), [7, 1300])
    m0 = read_manifest(folder)["codebooks"]
    (folder / "codebooks" / "cb-0009").mkdir()  # what a retraining killed before its commit left
    with pytest.MonkeyPatch.context() as mp:  # samples read where they lie = those of the stream of every record
        from engine import _maintain

        for name, value in (("RETRAIN_SAMPLE_MIN", 100), ("RETRAIN_PER_LIST", 1), ("PATCH_SAMPLE_IMAGES", 40),
                            ("RANGE_BLOCK", 128)):
            mp.setattr(_maintain, name, value)
        r = IndexReader(folder)
        assert len(r.segments) == 2
        a, b = (_maintain._training_sample(r, folder, True, lambda n: None, stream=s) for s in (False, True))
        assert a["captions"] is None and a["ranges"] is None and len(a["clip"]) == 100 and len(a["cells"]) == 40
        for k in ("clip", "dino", "cells"):
            assert np.array_equal(a[k], b[k]), k
        r.close()
    (folder / "codebooks" / "cb-0009" / "clip.ivf").write_bytes(b"half")
    for generation in (2, 3):
        engine.compact(folder, retrain=True, progress=False)
        r = IndexReader(folder)
        assert r.codebooks.generation == generation and r.codebooks.caption_codec == "pq"
        after = _stored(r)
        for k in ("clip", "dino", "patches", "sums"):
            assert np.array_equal(after[k], before[k][live]), k
        assert np.array_equal(r.segments[0].caption_code_rows(np.arange(len(live))), caps[live])
        for n in ("clip", "dino"):  # the same quantizer: the same range of every dimension
            assert np.array_equal(faiss.vector_to_array(r.codebooks.sq[n].trained),
                                  faiss.vector_to_array(files[n].trained))
        found = [rows[0] for rows, _ in r.search("clip", vecs[live[:40]], 1)]
        assert np.mean(np.asarray(found) == live[:40]) >= 0.95
        np.testing.assert_allclose(r.captions.cosines(live[:50], emb[5]),
                                   IndexReader(folder).captions.cosines(live[:50], emb[5]))
        r.close()
    m = read_manifest(folder)["codebooks"]
    for c in ("clip_sq", "dino_sq", "patch_pq", "caption_pq"):  # kept: the same files
        assert m["files"][path_of(c)] == m0["files"][path_of(c)], c
    assert m["files"][path_of("clip_ivf")] != m0["files"][path_of("clip_ivf")]  # the first stage: refitted
    assert [p.name for p in (folder / "codebooks").iterdir()] == ["cb-0003"]
    assert engine.verify(folder, progress=False).ok


def test_a_retraining_reads_a_block_at_a_time_and_fits_refine_ranges_on_every_vector(tmp_path, tiny, monkeypatch):
    """From float16 to product codes: the first stage is fitted on a sample of the images, read in a first
    pass, and nothing decodes every vector or patch cell of the index at once (a 1M-image index's cells alone
    are 16 GB as float32); the 8-bit refine quantizers still span every vector's values, as a fit on all of
    them would."""
    from engine import _codebooks, _maintain

    folder = tmp_path / "idx"
    rng = np.random.default_rng(3)
    n, d = 1200, tiny.dino_dim
    w = engine.IndexWriter(folder, tiny.identity, engine.IndexSettings(codec="fp16", ann="flat", chunk=400,
                                                                       pca_sample=64))
    clip = rng.standard_normal((n, 64)).astype(np.float32)
    clip /= np.linalg.norm(clip, axis=1, keepdims=True)
    for s in range(0, n, 400):
        b = slice(s, s + 400)
        w.add_images([f"v{i}" for i in range(s, s + 400)], [None] * 400, [f"caption {i}" for i in range(s, s + 400)],
                     [{}] * 400, clip[b], rng.standard_normal((400, d)).astype(np.float32),
                     rng.standard_normal((400, d)).astype(np.float32),
                     rng.standard_normal((400, 64, d)).astype(np.float32))
    w.finalize({"path": "synthetic", "kind": "test"})
    r = IndexReader(folder)
    stored = {k: r.vectors(k, np.arange(n))[1] for k in ("clip", "dino")}
    r.close()
    monkeypatch.setattr(_maintain, "LIVE_PART_RECORDS", 150)
    monkeypatch.setattr(_maintain, "RETRAIN_SAMPLE_MIN", 300)
    monkeypatch.setattr(_maintain, "RETRAIN_PER_LIST", 2)
    monkeypatch.setattr(_maintain, "PATCH_SAMPLE_IMAGES", 100)
    decoded = []
    for name in ("decode_refine", "decode_patches"):
        real = getattr(_codebooks.Codebooks, name)

        def spy(self, *args, _real=real):
            decoded.append(len(args[-1]))
            return _real(self, *args)
        monkeypatch.setattr(_codebooks.Codebooks, name, spy)
    engine.compact(folder, retrain=True, codec="pq", ann="ivf", progress=False, measure_search=False)
    assert decoded and max(decoded) <= 300  # a block of records, or the sample
    r = IndexReader(folder)
    assert r.codebooks.stores["clip"].codec == "pq" and r.codebooks.stores["clip"].nlist == 300 // 39
    for k in ("clip", "dino"):
        t = faiss.vector_to_array(r.codebooks.sq[k].trained)
        lo, hi = stored[k].min(axis=0), stored[k].max(axis=0)
        assert np.array_equal(t[:len(lo)], lo) and np.allclose(t[len(lo):], hi - lo)
    found = [rows[0] for rows, _ in r.search("clip", clip[:40], 1)]
    assert np.mean(np.asarray(found) == np.arange(40)) >= 0.95
    r.close()
    assert engine.verify(folder, progress=False).ok


def test_an_index_made_before_caption_product_codes_keeps_int8_codes_through_a_retraining(tmp_path, tiny):
    """Its settings name no caption codec: ``compact --retrain`` keeps int8 caption codes and format version 3
    (readable by the engine that made it); ``--caption-codec pq`` converts it."""
    from engine._manifest import write_manifest

    folder = tmp_path / "idx"
    _captioned_pq_index(folder, tiny, 1200, 1200, caption_codec="int8")
    m = read_manifest(folder)
    del m["settings"]["caption_codec"]  # as versions before caption product codes wrote it
    write_manifest(folder, m)
    engine.compact(folder, retrain=True, progress=False)
    m = read_manifest(folder)
    assert "caption_codec" not in m["codebooks"] and m["format_version"] == 3
    engine.compact(folder, retrain=True, progress=False, caption_codec="pq")
    m = read_manifest(folder)
    assert m["codebooks"]["caption_codec"] == "pq" and m["format_version"] == 4
    assert m["settings"]["caption_codec"] == "pq"


def test_the_mapped_budget_is_set_in_mib_by_the_environment(monkeypatch, capsys):
    from engine import _segment

    for raw, want in (("", 256 << 20), ("64", 64 << 20), ("0", 1 << 62), ("-5", 256 << 20), ("lots", 256 << 20)):
        monkeypatch.setenv(_segment.MAPPED_BUDGET_ENV, raw)
        assert _segment._budget_from_env() == want
    assert "'lots' is not a whole number of MiB" in capsys.readouterr().err


def test_a_map_collected_while_the_budget_is_checked_does_not_deadlock(tmp_path, monkeypatch):
    """An old reader's maps sit in reference cycles and are freed by a garbage collection, which can run while the
    budget's lock is held (an allocation in ``check``): the map's finaliser takes the same lock."""
    import threading

    from engine import _segment

    p = tmp_path / "a.bin"
    p.write_bytes(bytes(1 << 16))
    monkeypatch.setattr(_segment, "MAPPED_BUDGET_BYTES", 1)
    keep = _segment.MappedCodes(np.memmap(p, dtype=np.uint8, mode="r", shape=(256, 256)))
    real = _segment._file_resident_bytes

    def collecting():  # a collection at the worst moment: under the lock
        gc.collect()
        return real()

    class Reader:
        pass

    gc.disable()  # the cycle must survive until the collection inside check
    try:
        r = Reader()
        r.cycle = [r]
        r.codes = _segment.MappedCodes(np.memmap(p, dtype=np.uint8, mode="r", shape=(256, 256)))
        del r
        monkeypatch.setattr(_segment, "_file_resident_bytes", collecting)
        t = threading.Thread(target=keep.take, args=(np.arange(256),), daemon=True)
        t.start()
        t.join(timeout=30)
        assert not t.is_alive(), "deadlock: the finaliser waited for the lock its own thread held"
    finally:
        gc.enable()


# --------------------------------------------------------------------------------------------- merge after an append
def test_the_tail_run_an_append_merges():
    """Its own segments always; earlier small segments like the carries of a binary counter (each joins when it
    holds at most as many records as the run so far); never a large one."""
    from engine._maintain import tail_run
    from engine._reader import SMALL_SEGMENT_IMAGES

    def entries(*sizes):
        out, row = [], 0
        for n in sizes:
            out.append({"records": n, "first_row": row})
            row += n
        return out

    big = SMALL_SEGMENT_IMAGES
    assert tail_run(entries(1000, 50, 50, 20), 1100) == 3  # its one segment: nothing joins (50 > 20)
    assert tail_run(entries(1000, 50, 50, 20), 1050) == 1  # its own two (70), then 50 <= 70; 1000 > 120
    assert tail_run(entries(1000, 50, 40, 30), 1090) == 3  # 40 > 30
    assert tail_run(entries(1000, 40, 20, 20), 1060) == 1  # 20 <= 20, then 40 <= 40; 1000 > 80
    assert tail_run(entries(big, 10, 10), big + 10) == 1  # a large segment never joins, however large the run
    assert tail_run(entries(big - 1, 10 * big), big - 1) == 0  # a small one before a larger run does
    assert tail_run(entries(100), 100) == 1  # nothing appended: nothing to merge
    assert tail_run(entries(500, 8, 8, 8, 4), 500) == 1  # its four chunks
    grown, written = entries(10), 10  # 200 appends of 10 records: few segments, each record written a few times
    for _ in range(200):
        grown += [{"records": 10, "first_row": sum(e["records"] for e in grown)}]
        written += 10
        start = tail_run(grown, grown[-1]["first_row"])
        if len(grown) - start > 1:
            written += sum(e["records"] for e in grown[start:])
            grown = grown[:start] + [{"records": sum(e["records"] for e in grown[start:]),
                                      "first_row": grown[start]["first_row"]}]
        assert len(grown) <= 9
        assert [e["records"] for e in grown] == sorted((e["records"] for e in grown), reverse=True)
    assert sum(e["records"] for e in grown) == 2010 and written <= 2010 * 9  # at most log2(201) + 1 writes each


def _appended(folder, tiny, base: int = 1200, chunks: tuple = (100, 100, 60)) -> np.ndarray:
    """``_pq_index`` compacted into one segment, then records appended in segments of ``chunks`` images (as an
    append writes one per --chunk), without the merge at the end of an append; returns every CLIP vector."""
    clip = _pq_index(folder, tiny, n=base)
    engine.compact(folder, progress=False, measure_search=False)
    rng = np.random.default_rng(5)
    n, d = sum(chunks), tiny.dino_dim
    more = rng.standard_normal((n, 64)).astype(np.float32)
    more /= np.linalg.norm(more, axis=1, keepdims=True)
    w = engine.IndexWriter(folder, tiny.identity, engine.IndexSettings())
    a = 0
    for k in chunks:
        w.add_images([f"a{i}" for i in range(a, a + k)], [None] * k, [f"added caption {i}" for i in range(a, a + k)],
                     [{}] * k, more[a:a + k], rng.standard_normal((k, d)).astype(np.float32),
                     rng.standard_normal((k, d)).astype(np.float32), rng.standard_normal((k, 64, d)).astype(np.float32))
        w.commit()
        a += k
    w.finalize({"path": "synthetic", "kind": "test append"})
    return np.concatenate([clip, more])


def _answers(folder, tiny, clip: np.ndarray, rows) -> list:
    """Every score and feature of the fused top 10 for queries made of the given rows' stored vectors, and what
    each store and the captions give."""
    from engine.rankers import QueryInput

    idx = world.opened(folder, tiny)
    got = []
    for row in rows:
        _, dino = idx.reader.vectors("dino", np.array([row]))
        q = idx.with_terms(QueryInput(f"q{row}", None, f"added caption {row - 1200} {row}",
                                      {"clip_image": clip[row], "clip_text": clip[row], "dino_global": dino[0],
                                       "dino_cells": np.ones((64, tiny.dino_dim), np.float32)}))
        d = idx.search(q, k=10).to_dict()
        got.append({k: v for k, v in d.items() if k != "timings_ms"})
        for store in ("clip", "dino"):
            r, s = idx.reader.search(store, clip[row] if store == "clip" else dino[0], 20)[0]
            got.append((store, r.tolist(), np.round(s, 5).tolist()))
    idx.close()
    return got


def test_an_append_leaves_its_segments_merged_with_the_same_answers(tmp_path, tiny):
    """The segments an append wrote become one: every answer stays the same (fused results with every feature,
    each store's top 20), deleted records among them are removed physically and the others stay deleted, the old
    segment folders are gone, and the earlier segment is not written again."""
    from engine._maintain import merge_appended

    folder = tmp_path / "idx"
    clip = _appended(folder, tiny)
    m = read_manifest(folder)
    assert [e["records"] for e in m["segments"]] == [1200, 100, 100, 60]
    engine.delete_records(folder, ids=["v7", "a150"])  # one in the old segment, one among the appended
    rows = [3, 1210, 1300, 1455]
    before = _answers(folder, tiny, clip, rows)
    base = m["segments"][0]
    s = merge_appended(folder, 1200, progress=False)
    assert (s.merged, s.records, s.purged, s.segments_after) == (3, 259, 1, 2)
    m2 = read_manifest(folder)
    assert m2["segments"][0] == base and m2["segments"][1]["records"] == 259
    assert m2["counts"]["records"] == 1458 and m2["counts"]["deleted"] == 1 and m2["counts"]["purged"] == 1
    assert sorted(p.name for p in (folder / "segments").iterdir()) == sorted(
        e["path"].split("/")[-1] for e in m2["segments"])
    assert _answers(folder, tiny, clip, rows) == before
    r = IndexReader(folder)
    assert r.rows_of(["v7", "a150", "a149", "v8"]).tolist() == [-1, -1, 1349, 8]
    assert len(r.live.deleted) == 1  # v7 stays a tombstone; a150 is gone from the files
    assert merge_appended(folder, 1200, progress=False) is None  # one segment of its own: nothing to merge
    assert engine.verify(folder, progress=False).ok


def test_an_interrupted_merge_leaves_the_index_as_the_append_committed_it(tmp_path, tiny, monkeypatch):
    from engine import _maintain
    from engine._segment import SegmentFiles

    folder = tmp_path / "idx"
    clip = _appended(folder, tiny)
    m = read_manifest(folder)
    before = _answers(folder, tiny, clip, [5, 1250])

    def killed(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(SegmentFiles, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        _maintain.merge_appended(folder, 1200, progress=False)
    monkeypatch.undo()
    assert read_manifest(folder) == m and _answers(folder, tiny, clip, [5, 1250]) == before
    s = _maintain.merge_appended(folder, 1200, progress=False)  # the next writer clears what was left
    assert s.merged == 3
    assert len(list((folder / "segments").iterdir())) == 2
    assert _answers(folder, tiny, clip, [5, 1250]) == before


def test_attrib_index_append_merges_its_chunks(tmp_path, tiny, capsys):
    """An append of 20 images in chunks of 8 (three segments) ends as one segment beside the index's own, and
    says so; its records are found."""
    more = _index_and_more(tmp_path, tiny, range(40, 60))
    s = build(more, tmp_path / "idx", tiny, append=True, settings=CHUNKS_OF_8)
    assert s.merged["segments"] == 3 and s.merged["records"] == 20 and s.segments == 2
    m = read_manifest(tmp_path / "idx")
    assert [e["records"] for e in m["segments"]] == [24, 20]
    idx = world.opened(tmp_path / "idx", tiny)
    q = idx.encode_query(str(more / "extra45.png"), world.scene(45)[1])
    assert idx.search(q, 3, weights="rrf").results[0].id == "extra45.png"


def test_a_merged_run_whose_records_were_all_deleted_leaves_no_segment(tmp_path, tiny):
    """Every appended record deleted before the merge: the run goes away (an empty segment after others could not
    be placed by its rows), and the index opens, verifies and answers."""
    from engine._maintain import merge_appended

    folder = tmp_path / "idx"
    clip = _appended(folder, tiny)
    engine.delete_records(folder, ids=[f"a{i}" for i in range(260)] + ["v3"])
    s = merge_appended(folder, 1200, progress=False)
    assert s.records == 0 and s.purged == 260 and s.segments_after == 1
    m = read_manifest(folder)
    assert [e["records"] for e in m["segments"]] == [1200] and m["counts"]["deleted"] == 1
    assert len(list((folder / "segments").iterdir())) == 1
    r = IndexReader(folder)
    assert r.n_records == 1199 and r.search("clip", clip[5], 1)[0][0].tolist() == [5]
    assert engine.verify(folder, progress=False).ok


def test_a_merge_drops_the_caption_documents_of_the_tombstones_it_drops(tmp_path, tiny, monkeypatch):
    """A deletion interrupted after its commit, before it removed the caption documents, leaves them hidden by
    their tombstones: a merge (and a compaction) that drops the tombstones removes those documents first, so BM25
    never returns a row that is in no segment."""
    from engine import _maintain
    from engine.rankers import QueryInput

    folder = tmp_path / "idx"
    clip = _appended(folder, tiny)
    monkeypatch.setattr(_maintain, "_delete_text", lambda folder, rows: None)
    engine.delete_records(folder, ids=["a150"])
    monkeypatch.undo()
    assert 1350 not in IndexReader(folder).text.search(["150"], 50)[0].tolist()  # hidden by its tombstone
    _maintain.merge_appended(folder, 1200, progress=False)
    r = IndexReader(folder)
    assert 1350 not in r.text.search(["150"], 50)[0].tolist() and len(r.live.deleted) == 0
    idx = world.opened(folder, tiny)
    q = idx.with_terms(QueryInput("q", None, "added caption 150", {"clip_image": clip[1350], "clip_text": clip[1350]}))
    assert "a150" not in [c.id for c in idx.search(q, k=10).results]
    assert engine.verify(folder, progress=False).ok


def test_an_append_whose_merge_fails_is_committed_and_says_so(tmp_path, tiny, monkeypatch, capsys):
    """Another writer taking the lock between the append's commit and its merge (or any error of the merge) does
    not fail the append: its records are committed, the summary names what was not merged and how to merge it."""
    from engine import _maintain
    from engine.report.text import print_build_summary

    more = _index_and_more(tmp_path, tiny, range(40, 60))

    def busy(*a, **kw):
        raise engine.IndexBusyError("index is locked by another writer (delete, pid 1)")

    monkeypatch.setattr(_maintain, "merge_appended", busy)
    s = build(more, tmp_path / "idx", tiny, append=True, settings=CHUNKS_OF_8)
    assert "IndexBusyError" in s.merged["error"] and s.records == 44 and s.segments == 4
    print_build_summary(s)
    err = capsys.readouterr().err
    assert "not merged" in err and "attrib compact" in err
