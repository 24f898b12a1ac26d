"""engine._ingest through builds: every input kind (folders with sidecars, tar shards, tables), stable ids, and bad
records rejected by name while the rest is indexed."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import world
from world import build, records, rejects

import engine
from engine._manifest import read_manifest
from engine.cli import main


def test_folder_with_txt_sidecars(tmp_path, tiny):
    caps = world.image_folder(tmp_path / "src", 6, sidecar="txt")
    s = build(tmp_path / "src", tmp_path / "idx", tiny)
    assert (s.records, s.images, s.rejected) == (6, 6, 0)
    df = records(tmp_path / "idx")
    assert sorted(df["caption"].to_list()) == sorted(caps)
    assert set(df["id"]) == {f"part{i % 2}/img{i:04d}.{'jpg' if i % 2 else 'png'}" for i in range(6)}
    assert all(Path(p).is_file() for p in df["image"])


def test_folder_with_json_sidecars_keeps_extra_fields(tmp_path, tiny):
    caps = world.image_folder(tmp_path / "src", 4, sidecar="json", nested=False)
    (tmp_path / "src" / "notes.pdf").write_bytes(b"%PDF-1.4")
    s = build(tmp_path / "src", tmp_path / "idx", tiny)
    df = records(tmp_path / "idx")
    assert sorted(df["caption"].to_list()) == sorted(caps)
    meta = json.loads(df["meta"][0])
    assert meta["url"].startswith("http://x/") and meta["width"] == 96
    assert s.ignored_files == ["notes.pdf"]


@pytest.mark.parametrize("fmt,caption_col,image_col", [("parquet", "caption", "image"), ("csv", "text", "path"),
                                                        ("jsonl", "TEXT", "image")])
def test_tables(tmp_path, tiny, fmt, caption_col, image_col):
    path = world.table(tmp_path / "src", 5, fmt, caption_col=caption_col, image_col=image_col, caption_only=2)
    s = build(path, tmp_path / "idx", tiny)
    assert (s.records, s.images) == (7, 5)
    df = records(tmp_path / "idx")
    assert df["id"].to_list()[:5] == [f"rec-{i}" for i in range(5)]
    assert df.filter(pl.col("image").is_null())["id"].to_list() == ["txt-0", "txt-1"]
    assert df["score"].dtype == pl.Float64  # extra columns keep their type
    m = read_manifest(tmp_path / "idx")
    assert m["counts"]["caption_only"] == 2


def test_tar_shards_in_a_folder(tmp_path, tiny):
    (tmp_path / "src").mkdir()
    caps = (world.tar_shard(tmp_path / "src" / "00000.tar", 4)
            + world.tar_shard(tmp_path / "src" / "00001.tar", 3, start=4))
    s = build(tmp_path / "src", tmp_path / "idx", tiny)
    assert (s.records, s.images) == (7, 7)
    df = records(tmp_path / "idx")
    assert df["caption"].to_list() == caps
    assert df["id"][0] == "00000.tar::000000000.jpg"
    # the stored reference reopens the member for reports
    from engine.images import load_image

    assert load_image(df["image"][0]).size == (96, 96)


def test_benchmark_corpus_table_with_relative_paths(tmp_path, tiny):
    bench = tmp_path / "bench"
    (bench / "images").mkdir(parents=True)
    rows = []
    for i in range(4):
        im, cap = world.scene(i)
        im.save(bench / "images" / f"{i}.png")
        rows.append({"id": f"c{i}", "image": f"images/{i}.png", "caption": cap})
    rows.append({"id": "c-text", "image": None, "caption": "text only"})
    pl.DataFrame(rows).write_parquet(bench / "corpus.parquet")
    s = build(bench / "corpus.parquet", tmp_path / "idx", tiny)
    assert (s.records, s.images) == (5, 4)


def test_ids_are_stable_across_runs(tmp_path, tiny):
    path = world.table(tmp_path / "src", 4, "csv", with_id=False, caption_only=2)
    world.image_folder(tmp_path / "folder", 3)
    for src in (path, tmp_path / "folder"):
        build(src, tmp_path / "a", tiny, overwrite=True)
        build(src, tmp_path / "b", tiny, overwrite=True)
        a, b = records(tmp_path / "a")["id"].to_list(), records(tmp_path / "b")["id"].to_list()
        assert a == b and len(set(a)) == len(a)
    assert a[0] == "part0/img0000.png"


def test_each_bad_record_is_rejected_and_the_rest_indexed(tmp_path, tiny):
    src = tmp_path / "src"
    world.image_folder(src, 5, nested=False)
    expected = world.hostile_files(src)
    s = build(src, tmp_path / "idx", tiny)
    assert s.records == 5 and s.rejected == len(expected)
    got = {Path(r["record"]).name: r["reason"] for r in rejects(tmp_path / "idx")}
    assert got == expected
    assert read_manifest(tmp_path / "idx")["counts"]["rejected"] == len(expected)


def test_missing_files_duplicates_and_size_limit_in_a_table(tmp_path, tiny):
    root = tmp_path / "src"
    root.mkdir()
    for i in range(3):
        world.scene(i)[0].save(root / f"{i}.png")
    world.scene(7, size=200)[0].save(root / "big.png")
    df = pl.DataFrame({
        "id": ["a", "b", "a", "c", "d"],
        "image": ["0.png", "1.png", "2.png", "gone.png", "big.png"],
        "caption": ["x", "y", "z", "w", "v"],
    })
    df.write_parquet(root / "t.parquet")
    s = build(root / "t.parquet", tmp_path / "idx", tiny,
              settings=engine.IndexSettings(pca_sample=8, max_pixels=150 * 150))
    assert s.records == 2
    reasons = {r["record"]: r["reason"] for r in rejects(tmp_path / "idx")}
    assert reasons == {"row 2 of t.parquet": "duplicate id", "row 3 of t.parquet": "missing file",
                       "row 4 of t.parquet": "image too large (decompression bomb)"}


def test_empty_corpus_fails_and_writes_nothing(tmp_path, tiny):
    (tmp_path / "empty").mkdir()
    with pytest.raises(engine.EmptyCorpusError, match="no records"):
        build(tmp_path / "empty", tmp_path / "idx", tiny)
    assert not (tmp_path / "idx").exists()
    assert not list(tmp_path.glob(".idx.building-*"))


def test_fully_rejected_corpus_fails_with_the_reasons(tmp_path, tiny):
    world.hostile_files(tmp_path / "bad")
    with pytest.raises(engine.EmptyCorpusError, match="rejected.*not an image"):
        build(tmp_path / "bad", tmp_path / "idx", tiny)
    assert not (tmp_path / "idx").exists()


def test_cli_reports_bad_sources_clearly(tmp_path, capsys):
    assert main(["index", str(tmp_path / "nope"), "--out", str(tmp_path / "i"), "--models", "tiny"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    assert main(["index", str(tmp_path / "x.xlsx"), "--out", str(tmp_path / "i"), "--models", "tiny"]) == 2
    assert "unknown source type" in capsys.readouterr().err
    pl.DataFrame({"foo": [1]}).write_csv(tmp_path / "t.csv")
    assert main(["index", str(tmp_path / "t.csv"), "--out", str(tmp_path / "i"), "--models", "tiny"]) == 2
    assert "neither an image column" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "t.csv"), "--out", str(tmp_path / "i"), "--models", "nope"]) == 2
    err = capsys.readouterr().err
    assert ("--models: invalid choice: 'nope'" in err and "'default', 'offline', 'tiny'" in err
            and len(err.splitlines()) == 1)


# ------------------------------------------------------------------------------------------- parts (distributed builds)
def _items(records) -> list[tuple]:
    return [(r.key, r.where, r.caption, r.image, r.reject, r.part, r.extra) for r in records]


def test_source_parts_read_exactly_what_the_whole_source_gives(tmp_path):
    """Reading the parts of a source one after the other (as the workers of a distributed build do, each part on
    its own) gives the same records, rejects and order as reading the source; each part's record bound holds."""
    from engine._ingest import open_source, part_records

    src = tmp_path / "src"
    world.image_folder(src, 7)
    (src / "part0" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # a record that is rejected later
    (src / "shards").mkdir()
    world.tar_shard(src / "shards" / "a.tar", 3)
    world.tar_shard(src / "shards" / "b.tar", 4, start=50)
    good = (src / "shards" / "b.tar").read_bytes()
    (src / "shards" / "c.tar").write_bytes(good[: len(good) // 2])  # truncated: its first records, then a reject
    table = world.table(tmp_path / "t", 5, "parquet", caption_only=2)
    for path, size in ((src, 3), (src / "shards" / "a.tar", 2), (table, 3)):
        s = open_source(path)
        parts = s.parts(size)
        assert _items(r for p in parts for r in part_records(p)) == _items(s.records())
        for p in parts:
            got = list(part_records(p))
            assert sum(r.reject is None for r in got) <= p.max_records, p.name
            assert p.items is None or p.items == len(got), p.name
    folder_parts = open_source(src).parts(3)
    assert [p.kind for p in folder_parts] == ["images"] * 3 + ["tar"] * 3
    assert [p.name for p in folder_parts[3:]] == ["shards/a.tar", "shards/b.tar", "shards/c.tar"]
    assert [p.max_records for p in folder_parts[:3]] == [3, 3, 2] and folder_parts[3].max_records == 3


# ------------------------------------------------------------------------------------------- found by a hostile pass
def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_an_empty_caption_member_in_a_shard_is_an_empty_caption_not_a_huge_one(tmp_path):
    """img2dataset writes an empty KEY.txt for an empty caption: the record is read with caption "" (it was
    rejected as a sidecar over 1 MiB); a zero-byte image member is left to the image decoder, not called huge."""
    from engine._ingest import open_source

    jpg = world.jpeg_bytes(world.scene(1)[0])
    _tar(tmp_path / "s.tar", [("000.jpg", jpg), ("000.txt", b"a caption"), ("001.jpg", jpg), ("001.txt", b""),
                              ("002.jpg", b""), ("002.txt", b"x")])
    got = {r.where.split("::")[-1]: r for r in open_source(tmp_path / "s.tar").records()}
    assert got["000.jpg"].reject is None and got["000.jpg"].caption == "a caption"
    assert got["001.jpg"].reject is None and got["001.jpg"].caption == ""
    assert got["002.jpg"].reject is None or "too large" not in got["002.jpg"].reject[0]


def test_csv_ids_keys_and_paths_are_read_as_written(tmp_path):
    """Type inference would turn the id 007 into 7.0 (and make 10 a duplicate of 0010) and the LAION key
    000000001 into 1; other columns keep their inferred types."""
    from engine._ingest import open_source

    (tmp_path / "t.csv").write_text("image,caption,id,key,width\n,fox,007,000000001,12\n,car,0010,000000002,13\n"
                                    ",owl,10,000000003,14\n")
    recs = list(open_source(tmp_path / "t.csv").records())
    assert [r.id for r in recs] == ["007", "0010", "10"]
    assert [r.extra["key"] for r in recs] == ["000000001", "000000002", "000000003"]
    assert [r.extra["width"] for r in recs] == [12, 13, 14]


def test_a_csv_row_with_more_fields_than_its_header_is_an_error_naming_the_line(tmp_path):
    from engine._ingest import open_source

    (tmp_path / "t.csv").write_text("image,caption,id\n,a car,id1\n,a fox, in snow,id2\n")
    with pytest.raises(engine.SourceError, match=r"line 3 has 4 fields, the header 3; quote fields"):
        open_source(tmp_path / "t.csv")


@pytest.mark.parametrize("content,why", [(b"{not json", "is not valid JSON"), (b"[1, 2, 3]", "holds a JSON list"),
                                         (b'{"caption": ["a", "b"]}', "is a JSON list, not text"),
                                         (b'{"caption": {"en": "x"}}', "is a JSON dict, not text")])
def test_a_json_sidecar_that_cannot_be_read_rejects_its_record_by_name(tmp_path, content, why):
    """In a folder and in a shard: the record is listed with the reason, not indexed without its caption."""
    from engine._ingest import open_source

    (tmp_path / "f").mkdir()
    world.scene(1)[0].save(tmp_path / "f" / "bad.png")
    (tmp_path / "f" / "bad.json").write_bytes(content)
    [r] = list(open_source(tmp_path / "f").records())
    assert r.reject[0] == "unreadable sidecar" and "bad.json" in r.reject[1] and why in r.reject[1]
    _tar(tmp_path / "s.tar", [("000.jpg", world.jpeg_bytes(world.scene(2)[0])), ("000.json", content)])
    [r] = list(open_source(tmp_path / "s.tar").records())
    assert r.reject[0] == "unreadable sidecar" and "000.json" in r.reject[1] and why in r.reject[1]


def test_jsonl_rows_of_mixed_schemas_keep_their_captions(tmp_path):
    """A row with only "text" keeps it as its caption although other rows have "caption"."""
    from engine._ingest import open_source

    rows = [{"text": "fox in snow", "id": "a"}, {"caption": "both", "text": "other", "id": "b"},
            {"caption": "", "text": "owl", "id": "c"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.caption for r in open_source(tmp_path / "t.jsonl").records()] == ["fox in snow", "both", "owl"]


def test_a_failed_append_names_its_own_rejects_and_keeps_the_rejects_file(tmp_path, tiny):
    world.image_folder(tmp_path / "c1", 4, nested=False)
    (tmp_path / "c1" / "zero.jpg").write_bytes(b"")
    build(tmp_path / "c1", tmp_path / "idx", tiny)
    before = (tmp_path / "idx" / "rejects.jsonl").read_bytes()
    (tmp_path / "c2").mkdir()
    (tmp_path / "c2" / "only_broken.jpg").write_bytes(b"x")
    with pytest.raises(engine.EmptyCorpusError) as e:
        build(tmp_path / "c2", tmp_path / "idx", tiny, append=True)
    assert "only_broken.jpg" in str(e.value) and "zero.jpg" not in str(e.value)
    assert (tmp_path / "idx" / "rejects.jsonl").read_bytes() == before


def test_json_sidecars_with_a_byte_order_mark_or_a_number_caption_are_read(tmp_path):
    from engine._ingest import open_source

    for name, raw in (("bom", b'\xef\xbb\xbf{"caption": "with a BOM"}'), ("num", b'{"caption": 1984}')):
        world.scene(1)[0].save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.json").write_bytes(raw)
    got = {r.where: r.caption for r in open_source(tmp_path).records()}
    assert got == {"bom.png": "with a BOM", "num.png": "1984"}


def test_odd_fields_beside_a_good_caption_do_not_reject_a_record(tmp_path):
    """Only the caption that is used must be text: an OCR list under "text" beside a "caption", or a JSON sidecar
    with odd fields beside a .txt caption, keeps the record (in a folder and in a shard)."""
    from engine._ingest import open_source

    jpg = world.jpeg_bytes(world.scene(1)[0])
    _tar(tmp_path / "s.tar", [("0.jpg", jpg), ("0.json", b'{"caption": "a cat", "text": ["ocr1", "ocr2"]}'),
                              ("1.jpg", jpg), ("1.json", b'{"key": "3", "text": ["x"]}'), ("1.txt", b"a dog"),
                              ("2.jpg", jpg), ("2.json", b'{"caption": false}'), ("2.txt", b"a bird")])
    got = {r.where.split("::")[-1]: (r.reject, r.caption) for r in open_source(tmp_path / "s.tar").records()}
    assert got == {"0.jpg": (None, "a cat"), "1.jpg": (None, "a dog"), "2.jpg": (None, "a bird")}


def test_a_csv_whose_rows_end_with_a_comma_loads(tmp_path):
    from engine._ingest import open_source

    (tmp_path / "t.csv").write_text("image,caption\n,a fox,\n,a car,\n")
    assert [r.caption for r in open_source(tmp_path / "t.csv").records()] == ["a fox", "a car"]
