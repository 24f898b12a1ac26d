"""Issue 2: ingestion of every input kind, stable ids, bad records, empty corpora, interrupted builds,
the manifest, damaged folders and faiss against brute force."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import world

import engine
from engine._layout import MANIFEST as MANIFEST_NAME
from engine._layout import path_of
from engine._manifest import read_manifest
from engine._stores import VectorStore, build_faiss, l2n
from engine.cli import main

REJECTS = path_of("rejects")

SETTINGS = engine.IndexSettings(pca_sample=8, batch_size=8)


def build(src, out, tiny, **kw):
    return engine.build_index(src, out, encoders=tiny, progress=False, settings=kw.pop("settings", SETTINGS), **kw)


def records(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "records.parquet")


def rejects(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / REJECTS).read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------- input kinds
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


# ------------------------------------------------------------------------------------------- bad input
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


def test_overwrite_rules(tmp_path, tiny):
    world.image_folder(tmp_path / "src", 3)
    build(tmp_path / "src", tmp_path / "idx", tiny)
    with pytest.raises(engine.AttribError, match="already exists"):
        build(tmp_path / "src", tmp_path / "idx", tiny)
    build(tmp_path / "src", tmp_path / "idx", tiny, overwrite=True)
    assert read_manifest(tmp_path / "idx")["counts"]["records"] == 3
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not delete")
    with pytest.raises(engine.AttribError, match="not an attrib index"):
        build(tmp_path / "src", tmp_path / "precious", tiny, overwrite=True)
    assert (tmp_path / "precious" / "thesis.tex").exists()


# ------------------------------------------------------------------------------------------- interruption
def _spawn_build(src: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "index", str(src), "--out", str(out), "--models", "tiny",
         "--batch-size", "2", "--workers", "1", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _wait_for_partial(tmp: Path, out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        parts = list(tmp.glob(f".{out.name}.building-*"))
        if parts and (parts[0] / "patches.f16").exists() and (parts[0] / "patches.f16").stat().st_size > 0:
            return
        if proc.poll() is not None:
            raise AssertionError(f"build ended before it could be interrupted: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    raise AssertionError("build never started writing")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_build_leaves_no_valid_looking_index(tmp_path, sig):
    world.image_folder(tmp_path / "src", 300, size=64)
    out = tmp_path / "idx"
    proc = _spawn_build(tmp_path / "src", out)
    _wait_for_partial(tmp_path, out, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not out.exists()
    leftovers = list(tmp_path.glob(f".{out.name}.building-*"))
    if sig == signal.SIGINT:
        assert (proc.returncode, leftovers) == (130, []), proc.stderr.read().decode()[-2000:]
    for p in leftovers:  # a kill -9 cannot clean up, but what it leaves is hidden and has no manifest
        assert not (p / MANIFEST_NAME).exists()
        with pytest.raises(engine.IndexFormatError):
            engine.open_index(p)
    with pytest.raises(engine.IndexFormatError, match="does not exist"):
        engine.open_index(out)


def test_stale_temporary_folders_are_cleaned_by_the_next_build(tmp_path, tiny):
    world.image_folder(tmp_path / "src", 2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".idx.building-{dead.pid}-deadbeef"
    stale.mkdir()
    build(tmp_path / "src", tmp_path / "idx", tiny)
    assert not stale.exists()


# ------------------------------------------------------------------------------------------- manifest
def test_manifest_round_trip_and_info(tmp_path, tiny, capsys):
    world.image_folder(tmp_path / "src", 5)
    s = build(tmp_path / "src", tmp_path / "idx", tiny)
    m = read_manifest(tmp_path / "idx")
    assert m == json.loads(json.dumps(s.manifest))
    assert m["models"]["profile"] == "tiny" and m["untrained"] is True
    assert m["models"]["fingerprint"] == tiny.identity["fingerprint"]
    assert len(m["models"]["clip"]["weights_sha256"]) == 64
    assert m["dims"] == {"clip": 64, "dino": 64, "dino_global": 128, "patch_grid": 8, "patch_cells": 64,
                         "patch_dims": 64}
    assert m["counts"]["records"] == 5 and m["settings"]["patch_grid"] == 8
    assert {"torch", "faiss-cpu", "tantivy", "open_clip_torch", "timm"} <= set(m["versions"])
    assert main(["info", str(tmp_path / "idx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["manifest"] == m
    assert set(info["sizes"]) == set(m["components"]) and info["bytes_per_image"]["total"] > 0
    assert "UNTRAINED" in info["warning"]
    assert main(["info", str(tmp_path / "idx")]) == 0
    err = capsys.readouterr().err
    assert "UNTRAINED" in err and "size on disk" in err and "patches" in err


def test_damaged_and_foreign_folders_are_refused(tmp_path, tiny, capsys):
    world.image_folder(tmp_path / "src", 4)
    build(tmp_path / "src", tmp_path / "idx", tiny)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a.txt").write_text("x")
    cases = {}
    d = shutil.copytree(tmp_path / "idx", tmp_path / "trunc")
    with open(d / "patches.f16", "r+b") as f:
        f.truncate(100)
    cases["trunc"] = "patches.f16 has 100 bytes"
    d = shutil.copytree(tmp_path / "idx", tmp_path / "badjson")
    (d / MANIFEST_NAME).write_text("{not json")
    cases["badjson"] = "manifest .* is damaged"
    d = shutil.copytree(tmp_path / "idx", tmp_path / "nofaiss")
    (d / "clip.faiss").unlink()
    cases["nofaiss"] = "component 'clip'.*missing"
    d = shutil.copytree(tmp_path / "idx", tmp_path / "garbage")
    size = (d / "dino.faiss").stat().st_size
    (d / "dino.faiss").write_bytes(b"\0" * size)
    cases["garbage"] = "damaged"
    cases["foreign"] = "not an attrib index"
    d = shutil.copytree(tmp_path / "idx", tmp_path / "future")
    m = json.loads((d / MANIFEST_NAME).read_text())
    m["format_version"] = 99
    (d / MANIFEST_NAME).write_text(json.dumps(m))
    cases["future"] = "format version 99"
    for name, pattern in cases.items():
        with pytest.raises(engine.IndexFormatError, match=pattern):
            engine.open_index(tmp_path / name)
        assert main(["info", str(tmp_path / name)]) == 2
        assert "error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- faiss
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_faiss_search_matches_brute_force(tmp_path, kind):
    rng = np.random.default_rng(0)
    x = l2n(rng.standard_normal((2000, 32)).astype(np.float32))
    info = build_faiss(x, tmp_path / "v.faiss", kind)
    if kind == "ivf":
        info["nprobe"] = info["nlist"]  # probe every list: exhaustive, so it must equal brute force
    store = VectorStore(tmp_path / "v.faiss", info)
    q = l2n(rng.standard_normal((5, 32)).astype(np.float32))
    scores, slots = store.search(q, 10)
    x16 = x.astype(np.float16).astype(np.float32)  # the stores keep fp16 codes
    brute = q @ x16.T
    want = np.argsort(-brute, axis=1)[:, :10]
    np.testing.assert_array_equal(slots, want)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, want, 1), atol=1e-4)
    np.testing.assert_allclose(store.vectors(np.array([3, 1999])), x16[[3, 1999]], atol=1e-6)


# ------------------------------------------------------------------------------------------- models
def test_profiles_share_architectures_and_tiny_is_deterministic(tiny):
    d, o = engine.get_profile("default"), engine.get_profile("offline")
    assert ((d.clip.arch, d.dino.arch, d.dino.img_size) == (o.clip.arch, o.dino.arch, o.dino.img_size)
            == ("ViT-B-32", "vit_small_patch14_dinov2", 224))
    assert d.pretrained and not o.pretrained
    again = engine.load_encoders("tiny", device="cpu")
    assert again.identity == tiny.identity


def test_missing_pretrained_weights_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t = time.time()
    with pytest.raises(engine.WeightsUnavailableError) as e:
        engine.load_encoders("default", device="cpu")
    assert time.time() - t < 15
    msg = str(e.value)
    assert "--models offline" in msg and "--clip-weights" in msg and "HF_HOME" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(engine.WeightsUnavailableError, match="HF_HUB_OFFLINE"):
        engine.load_encoders("default", device="cpu")
    with pytest.raises(engine.WeightsUnavailableError, match="does not exist"):
        engine.load_encoders("default", device="cpu", clip_weights=str(tmp_path / "nope.bin"))


def test_local_weight_files_are_loaded_and_hashed(tmp_path, tiny):
    """The pretrained code path (explicit weight files) with the tiny architectures."""
    import dataclasses

    import torch

    from engine._encoders import Encoders

    torch.save(tiny.clip.state_dict(), tmp_path / "clip.bin")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny.dino.state_dict().items()}, str(tmp_path / "model.safetensors"))
    prof = dataclasses.replace(engine.get_profile("tiny"), name="tiny-local", pretrained=True)
    enc = Encoders(prof, device="cpu", clip_weights=str(tmp_path / "clip.bin"), dino_weights=str(tmp_path))
    assert enc.clip_sha256 == tiny.clip_sha256 and enc.dino_sha256 == tiny.dino_sha256
    assert enc.identity["fingerprint"] == tiny.identity["fingerprint"]
