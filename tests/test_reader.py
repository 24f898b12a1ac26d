"""engine._reader / _segment: an opened index answers from one generation whatever happens to the folder;
damage is detected and named instead of changing answers; read-only indexes answer queries."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import world
from world import build

import engine
from engine._layout import MANIFEST
from engine._manifest import read_manifest, write_manifest
from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small(tmp_path, tiny):
    world.image_folder(tmp_path / "src", 12, nested=False)
    build(tmp_path / "src", tmp_path / "idx", tiny)
    return tmp_path / "idx"


def _query(path, tiny, n=3, k=5):
    idx = world.opened(path, tiny)
    q = idx.encode_query(world.source_image(path, n) if (path / MANIFEST).exists() else None, world.scene(n)[1])
    return idx, q


def test_an_open_index_answers_consistently_while_the_folder_is_rebuilt(small, tmp_path, tiny):
    idx, q = _query(small, tiny)
    before = [(c.id, c.caption, c.score, c.evidence) for c in idx.search(q, 8, weights="rrf").results]
    other = tmp_path / "other"
    other.mkdir()
    for i in range(40, 52):  # another corpus under the same file names: ids and captions would mix silently
        im, _ = world.scene(i)
        im.save(other / (f"img{i - 40:04d}.{'jpg' if (i - 40) % 2 else 'png'}"))
        (other / f"img{i - 40:04d}.txt").write_text(f"a different caption {i}")
    build(other, small, tiny, overwrite=True)
    again = [(c.id, c.caption, c.score, c.evidence) for c in idx.search(q, 8, weights="rrf").results]
    assert again == before  # the old handle keeps its generation: old vectors with old ids and captions
    fresh = engine.open_index(small)
    fresh.use_encoders(tiny)
    captions = {c.caption for c in fresh.search(q, 8, weights="rrf").results}
    assert all(c.startswith("a different caption") for c in captions)
    reopened = idx.reopen_if_changed()
    assert reopened is not idx and reopened.reader.generation == fresh.reader.generation
    assert fresh.reopen_if_changed() is fresh


def test_cli_queries_racing_a_rebuild_never_mix_two_builds(small, tmp_path, tiny):
    """Queries in other processes while the index is replaced again and again: each answer is entirely one
    build or the other (ids and captions agree), or a clean error."""
    other = tmp_path / "other"
    other.mkdir()
    for i in range(12):
        im, _ = world.scene(i + 60)
        im.save(other / (f"img{i:04d}.{'jpg' if i % 2 else 'png'}"))
        (other / f"img{i:04d}.txt").write_text(f"other build caption {i}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    img = str(tmp_path / "src" / "img0003.jpg")
    procs = [subprocess.Popen([sys.executable, "-m", "engine.cli", "query", str(small), "--image", img, "--prompt",
                               "a picture", "-k", "6", "--json", "--weights", "rrf"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(6)]
    for k in range(2):
        build(other if k % 2 == 0 else tmp_path / "src", small, tiny, overwrite=True)
    for p in procs:
        out, err = p.communicate(timeout=300)
        if p.returncode != 0:
            assert p.returncode == 2 and b"error:" in err, err.decode()[-2000:]
            continue
        res = json.loads(out)
        kinds = {"other" if c["caption"].startswith("other build") else "src" for c in res["results"]}
        assert len(kinds) == 1, res["results"]


@pytest.mark.parametrize("damage", ["patch-byte", "patch-ff-record", "clip-refine-byte", "serving-byte",
                                    "rows-negative"])
def test_damage_that_keeps_sizes_is_detected_and_named(small, tiny, tmp_path, damage):
    d = Path(shutil.copytree(small, tmp_path / "d"))
    m = read_manifest(d)
    seg = d / m["segments"][0]["path"]
    if damage == "patch-byte":
        p, off = seg / "patches.bin", 100
    elif damage == "patch-ff-record":
        p, off = seg / "patches.bin", None
    elif damage == "clip-refine-byte":
        p, off = seg / "clip.refine", 10
    elif damage == "serving-byte":
        p = seg / "records.arrow"
        off = p.read_bytes().find(b"background, picture 7")  # inside one record's caption
    else:
        p, off = seg / "rows.npy", None
    data = bytearray(p.read_bytes())
    if damage == "patch-ff-record":
        per = len(data) // m["segments"][0]["images"]
        data[3 * per:4 * per] = b"\xff" * per  # 0xFF over one record's patch cells
    elif damage == "rows-negative":
        arr = np.load(p)
        arr[0] = -5
        with open(p, "wb") as f:
            np.save(f, arr)
        data = None
    else:
        data[off] ^= 0x5A
    if data is not None:
        p.write_bytes(bytes(data))
    # small indexes are hashed when opened; a large one would be opened without hashing and caught on read
    with pytest.raises(engine.IndexFormatError, match=r"damaged|checksum|not match"):
        engine.open_index(d)
    if damage in ("patch-byte", "patch-ff-record", "clip-refine-byte", "serving-byte"):
        idx = engine.Index.__new__(engine.Index)
        from engine._reader import IndexReader

        r = IndexReader(d, hash_files=False)  # opened like a large index: sizes and headers only
        with pytest.raises(engine.IndexFormatError, match=r"seg-000001.*(checksum|CRC)"):
            rows = r.live_rows()
            if damage == "serving-byte":
                r.records(rows)
            else:
                r.patch_cells(rows)
                r.vectors("clip", rows)
        del idx
    assert main(["verify", str(d), "--no-progress"]) == 1


def test_damaged_and_foreign_folders_are_refused(small, tmp_path, capsys):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a.txt").write_text("x")
    cases = {}
    seg = read_manifest(small)["segments"][0]["path"]
    d = shutil.copytree(small, tmp_path / "trunc")
    with open(d / seg / "patches.bin", "r+b") as f:
        f.truncate(100)
    cases["trunc"] = "patches.bin has 100 bytes"
    d = shutil.copytree(small, tmp_path / "badjson")
    (d / MANIFEST).write_text("{not json")
    cases["badjson"] = "manifest .* is damaged"
    d = shutil.copytree(small, tmp_path / "nofaiss")
    (d / seg / "clip.ivf").unlink()
    cases["nofaiss"] = "clip.ivf is missing"
    d = shutil.copytree(small, tmp_path / "notext")
    for f in (d / "text").glob("*.pos"):
        f.unlink()
    cases["notext"] = "caption index"
    cases["foreign"] = "not an attrib index"
    d = shutil.copytree(small, tmp_path / "future")
    m = json.loads((d / MANIFEST).read_text())
    m["format_version"] = 99
    write_manifest(d, m)
    cases["future"] = "format version 99"
    for field, value in (("counts", {"records": "12"}), ("dims", {"clip": -1}), ("settings", None),
                         ("segments", [{"path": "../../etc"}])):
        d = shutil.copytree(small, tmp_path / f"type-{field}")
        m = json.loads((d / MANIFEST).read_text())
        if isinstance(value, dict):
            m[field].update(value)
        else:
            m[field] = value
        write_manifest(d, m)  # a consistent checksum: the types themselves are checked
        cases[f"type-{field}"] = f"damaged: {field}"
    for name, pattern in cases.items():
        with pytest.raises(engine.IndexFormatError, match=pattern):
            engine.open_index(tmp_path / name)
        assert main(["info", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err


def test_a_read_only_index_answers_queries(small, tmp_path):
    """chmod -R a-w (and a read-only tantivy lock file): queries work; writers say it is read-only."""
    # a folder of its own under /tmp: pytest resets /tmp/pytest-of-USER to 0700 whenever another session starts
    tmp_path = Path(tempfile.mkdtemp(prefix="attrib-ro-"))
    try:
        shutil.copytree(small.parent / "src", tmp_path / "src")
        _read_only_index_answers_queries(small, tmp_path)
    finally:
        for p in [tmp_path, *tmp_path.rglob("*")]:
            if not p.is_symlink():
                os.chmod(p, 0o700)
        shutil.rmtree(tmp_path)


def _read_only_index_answers_queries(small: Path, tmp_path: Path) -> None:
    ro = Path(shutil.copytree(small, tmp_path / "ro"))
    user = []
    if os.geteuid() == 0:  # root ignores permissions: run the query as an unprivileged user
        shutil.chown(tmp_path, "nobody")
        for p in [ro, *ro.rglob("*")]:
            shutil.chown(p, "nobody")
        user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        for parent in [tmp_path, *tmp_path.parents]:
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
        src = tmp_path / "src"
        for p in [src, *src.rglob("*")]:
            os.chmod(p, os.stat(p).st_mode | 0o005)
    for p in [ro, *ro.rglob("*")]:
        os.chmod(p, os.stat(p).st_mode & ~0o222)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME=str(tmp_path), ATTRIB_CACHE=str(tmp_path / "cache"))
    q = subprocess.run([*user, sys.executable, "-m", "engine.cli", "query", str(ro), "--prompt",
                        world.scene(3)[1], "-k", "3", "--json"], env=env, capture_output=True, timeout=300)
    assert q.returncode == 0, q.stderr.decode()[-2000:]
    assert len(json.loads(q.stdout)["results"]) == 3
    d = subprocess.run([*user, sys.executable, "-m", "engine.cli", "delete", str(ro), "--id", "img0001.jpg"],
                       env=env, capture_output=True, timeout=300)
    assert d.returncode == 2 and b"read-only" in d.stderr, d.stderr.decode()[-2000:]


def test_rows_are_grouped_by_segment_and_made_distinct_like_numpy():
    from engine._rows import by_segment, distinct

    rng = np.random.default_rng(0)
    for seg in (np.zeros(5, np.int64), np.array([2, -1, 0, 2, 0, -1]), np.array([-1, -1]), np.zeros(0, np.int64),
                rng.integers(-1, 4, 50)):
        got = [(s, sel.tolist()) for s, sel in by_segment(seg)]
        want = [(int(s), np.flatnonzero(seg == s).tolist()) for s in np.unique(seg[seg >= 0])]
        assert got == want
    for a in (np.zeros(0, np.int64), np.array([3, 1, 3, 2, 1]), rng.integers(0, 30, 200)):
        assert np.array_equal(distinct(a), np.unique(a))
