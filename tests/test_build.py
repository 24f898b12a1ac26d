"""engine._build / _writer / _manifest: overwrite rules, interrupted builds, the manifest and damaged folders."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import world
from world import build

import engine
from engine._layout import MANIFEST as MANIFEST_NAME
from engine._manifest import read_manifest
from engine.cli import main


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
