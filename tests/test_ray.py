"""engine._cluster / engine._ray: building an index on Ray gives the same index as a local build; a killed driver
resumes (committed units skipped, finished ones committed from their done markers); a unit that keeps failing
is a reject and the rest completes; a worker that dies is replaced; duplicate ids across units are rejected at
commit; a missing Ray is one line.

Ray runs in local mode with 2 CPUs and one worker actor (two actors only where a test needs one to stall).
These tests skip only when Ray is missing and ``ATTRIB_REQUIRE_RAY`` is not set (CI sets it)."""
from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import world
from test_build import assert_same_index, snapshot

import engine
from engine._cluster import ClusterSettings, plan_units, valid_marker
from engine._ingest import open_source
from engine._layout import MANIFEST
from engine._manifest import read_manifest
from engine._reader import IndexReader
from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
try:
    import ray
except ImportError:
    if os.environ.get("ATTRIB_REQUIRE_RAY", "") not in ("", "0"):
        raise
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install 'attrib-engine[ray]'); "
                                                   "CI sets ATTRIB_REQUIRE_RAY=1, which makes this a failure")

CORRUPT = "corrupt or truncated image"
SETTINGS = dict(chunk=4, batch_size=4, workers=1, pca_sample=6)
CLI_ARGS = ("--models", "tiny", "--batch-size", "4", "--workers", "1", "--chunk", "4", "--no-progress")


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray (2 CPUs) for the in-process tests of this module."""
    term = signal.getsignal(signal.SIGTERM)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, object_store_memory=256 * 1024**2)
    signal.signal(signal.SIGTERM, term)
    yield ray
    ray.shutdown()
    signal.signal(signal.SIGTERM, term)


def ray_build(src, out, **kw):
    from engine._ray import build_index_ray

    settings = engine.IndexSettings(**{**SETTINGS, **kw.pop("settings", {})})
    cluster = kw.pop("cluster", ClusterSettings(commit_seconds=0))
    return build_index_ray(src, out, models="tiny", settings=settings, cluster=cluster, progress=False, **kw)


def local_build(src, out, tiny, **kw):
    settings = engine.IndexSettings(**{**SETTINGS, **kw.pop("settings", {})})
    return engine.build_index(src, out, encoders=tiny, settings=settings, progress=False, **kw)


def mixed_source(root: Path, images: int = 10, nested: bool = True) -> Path:
    """A folder with loose images and two tar shards (img2dataset style): parts of every folder kind."""
    world.image_folder(root, images, size=64, nested=nested)
    (root / "shards").mkdir()
    world.tar_shard(root / "shards" / "00000.tar", 5)
    world.tar_shard(root / "shards" / "00001.tar", 3, start=100)
    return root


def assert_same_records(a: Path, b: Path, only: set[str] | None = None) -> None:
    """Same ids, in the same row order, with the same vectors; rows themselves may differ (records rejected while
    a distributed build reads its units leave gaps)."""
    sa, sb = snapshot(a), snapshot(b)
    ids = set(sa) if only is None else set(only)
    assert only is not None or set(sa) == set(sb)
    assert sorted(ids, key=lambda k: sa[k][0]) == sorted(ids, key=lambda k: sb[k][0])
    for rid in ids:
        for x, y in zip(sa[rid][1:], sb[rid][1:]):
            if x is None:
                assert y is None
            else:
                np.testing.assert_allclose(x, y, atol=1e-3, err_msg=rid)


def caption_snapshot(index: Path) -> dict:
    """id -> (caption text, caption CLIP embedding (None: none stored), caption key) of every live record."""
    r = IndexReader(index)
    try:
        out = {}
        for seg in r.segments:
            local = np.arange(seg.n_records)
            rows = np.asarray(seg.rows)
            live = r.live.keep(rows)
            ids, _, caps = seg.serving(local)
            emb = seg.caption_vectors(local) if seg.caption_codes is not None else [None] * seg.n_records
            keys = np.asarray(seg.caption_keys).tolist() if seg.caption_keys is not None else [None] * seg.n_records
            for k, (rid, cap) in enumerate(zip(ids, caps)):
                if live[k]:
                    out[rid] = (cap, None if emb[k] is None else np.array(emb[k]), keys[k])
        return out
    finally:
        r.close()


def assert_same_captions(a: Path, b: Path, only: set[str] | None = None) -> None:
    """The same caption embeddings (within fp16 rounding) and caption keys for the same ids; both indexes store
    them (a build always encodes the captions with the CLIP text encoder)."""
    ca, cb = caption_snapshot(a), caption_snapshot(b)
    ids = set(ca) if only is None else set(only)
    assert only is not None or set(ca) == set(cb)
    for rid in ids:
        (cap_a, emb_a, key_a), (cap_b, emb_b, key_b) = ca[rid], cb[rid]
        assert cap_a == cap_b and key_a == key_b and key_a is not None, rid
        assert emb_a is not None and emb_b is not None, rid
        np.testing.assert_allclose(emb_a, emb_b, atol=1e-3, err_msg=rid)
        assert (np.linalg.norm(emb_a) > 0.99) == bool((cap_a or "").strip()), rid  # zeros only for no caption


# ------------------------------------------------------------------------------------------- the plan
def test_the_plan_covers_the_source_once_in_order_and_is_stable(tmp_path):
    src = mixed_source(tmp_path / "src", images=10)
    plan = plan_units(open_source(src), 4, 0, 1, bootstrap=True)
    parts = [p for u in plan.units for p in u.parts]
    assert [p.name for p in parts] == [p.name for p in open_source(src).parts(4)]
    assert [u.index for u in plan.units] == list(range(len(plan.units)))
    assert [u.seg_id for u in plan.units] == list(range(1, len(plan.units) + 1))
    rows = 0
    for u in plan.units:
        assert u.first_row == rows and u.capacity == sum(p.max_records for p in u.parts)
        rows += u.capacity
        assert u.capacity <= 4 or len(u.parts) == 1 or u.bootstrap
    assert plan.units[0].bootstrap and plan.units[0].capacity >= 4 and not any(u.bootstrap for u in plan.units[1:])
    assert plan.end_row == 10 + 5 + 3
    assert plan_units(open_source(src), 4, 0, 1, True).checksum == plan.checksum
    assert plan_units(open_source(src), 5, 0, 1, True).checksum != plan.checksum
    appended = plan_units(open_source(src), 4, 100, 7, bootstrap=False)
    assert appended.units[0].first_row == 100 and appended.units[0].seg_id == 7 and not appended.units[0].bootstrap


def test_cluster_settings_are_checked():
    for bad in ({"workers": 0}, {"gpus_per_worker": -1}, {"cpus_per_worker": 0}, {"retries": True},
                {"address": "  "}):
        with pytest.raises(engine.AttribError, match="cluster setting"):
            ClusterSettings(**bad)


# ------------------------------------------------------------------------------------------- no Ray
def test_a_missing_ray_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    world.image_folder(tmp_path / "src", 2, size=64)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    out = tmp_path / "idx"
    assert main(["index", str(tmp_path / "src"), "--out", str(out), "--engine", "ray", *CLI_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'attrib-engine[ray]'" in err and "Traceback" not in err
    assert not out.exists()
    from engine._ray import build_index_ray

    with pytest.raises(engine.AttribError, match=r"pip install 'attrib-engine\[ray\]'"):
        build_index_ray(tmp_path / "src", out, models="tiny")


def test_ray_options_need_engine_ray(tmp_path, capsys):
    world.image_folder(tmp_path / "src", 2, size=64)
    assert main(["index", str(tmp_path / "src"), "--out", str(tmp_path / "idx"), "--ray-workers", "2",
                 "--address", "auto", *CLI_ARGS]) == 2
    assert "--address, --ray-workers only apply to --engine ray" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_only_the_ray_module_imports_ray():
    bad = []
    for top in ("engine", "eval", "benchmarks"):
        for p in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                if any(n == "ray" or n.startswith("ray.") for n in names) and p != ROOT / "engine" / "_ray.py":
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


# ------------------------------------------------------------------------------------------- kill and resume
def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    e = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _session_pids(sid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid and "State:\tZ" not in (d / "status").read_text():
                    out.append(int(d.name))
            except (OSError, ProcessLookupError):
                continue
    return out


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then every process of its session (its Ray: nothing else), and wait until they are
    gone, so that no worker of the killed build writes anything afterwards."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline:
        left = _session_pids(proc.pid)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"processes of the killed build survive: {_session_pids(proc.pid)}")


@needs_ray
def test_a_killed_driver_resumes_skipping_committed_and_finished_units(tmp_path, tiny):
    """kill -9 the driver while one unit stalls on a worker and later units have finished; the rerun commits the
    finished units from their done markers without encoding them again, encodes only the rest, and the index
    equals a local build. The local engine can finish the same interrupted build too."""
    src = tmp_path / "src"
    world.image_folder(src, 24, size=64)  # 6 units of 4 images; unit 2 (images 8-11) stalls
    ref = tmp_path / "ref"
    local_build(src, ref, tiny, settings={"pca_sample": 512})
    out = tmp_path / "idx"
    proc = _cli("index", str(src), "--out", str(out), *CLI_ARGS, "--engine", "ray", "--ray-workers", "2",
                "--cpus-per-worker", "1", env={"ATTRIB_RAY_FAULTS": json.dumps({"images 8-11": "sleep:600"})})
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            try:
                m = json.loads((out / MANIFEST).read_text())
                if m["build"]["ray"]["units_committed"] >= 2 and list((out / "incoming").glob("unit-00000[345].json")):
                    break
            except (OSError, ValueError, KeyError):
                pass
            if proc.poll() is not None:
                pytest.fail(f"the build ended before it could be killed: {proc.stderr.read().decode()[-3000:]}")
            time.sleep(0.1)
        else:
            pytest.fail("the build never committed its first units")
    finally:
        _kill_session(proc)
    m = read_manifest(out)
    assert not m["build"]["complete"] and m["build"]["engine"] == "ray"
    committed = m["build"]["ray"]["units_committed"]
    plan = plan_units(open_source(src), 4, 0, 1, True)
    finished = [u for u in plan.units[committed:] if valid_marker(out, u, plan.checksum, tiny.identity["fingerprint"],
                                                                  deep=True)]
    assert finished and all(u.index > 2 for u in finished)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)

    flag = tmp_path / "died-once"  # the rerun's worker dies once on the stalled unit: Ray reports it on the driver
    proc = _cli("index", str(src), "--out", str(out), *CLI_ARGS, "--engine", "ray", "--json",
                env={"ATTRIB_RAY_FAULTS": json.dumps({"images 8-11": f"exit-once:{flag}"})})
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert flag.exists()
    s = json.loads(stdout)  # stdout holds the JSON alone: Ray's own messages about dead workers go to stderr
    assert s["mode"] == "resume" and s["engine"] == "ray" and s["records"] == 24 and s["startup_seconds"] > 0
    assert s["encoded_this_run"] == 24 - 4 * committed - 4 * len(finished)
    assert_same_index(ref, out, atol=1e-3)
    assert_same_captions(ref, out)
    assert not (out / "incoming").exists() and read_manifest(out)["build"]["complete"]

    s2 = local_build(src, copy, tiny)  # the local engine finishes the interrupted distributed build
    assert s2.mode == "resume" and s2.records == 24 and s2.encoded_this_run == 24 - 4 * committed
    assert_same_index(ref, copy, atol=1e-3)
    assert_same_captions(ref, copy)


# ------------------------------------------------------------------------------------------- same index
@needs_ray
def test_a_ray_build_equals_a_local_build(tmp_path, tiny, ray_session):
    src = mixed_source(tmp_path / "src", images=10)
    local_build(src, tmp_path / "local", tiny)
    s = ray_build(src, tmp_path / "ray")
    assert (s.engine, s.mode, s.records, s.images, s.rejected, s.encoded_this_run) == ("ray", "build", 18, 18, 0, 18)
    assert s.startup_seconds > 0 and s.encode_seconds > 0 and s.segments == 1
    assert_same_index(tmp_path / "local", tmp_path / "ray", atol=1e-3)  # ids, rows, vectors, patch cells
    assert_same_captions(tmp_path / "local", tmp_path / "ray")  # caption CLIP embeddings and caption keys
    caps = caption_snapshot(tmp_path / "ray")
    assert sum(bool((c or "").strip()) for c, _, _ in caps.values()) >= 10  # the check compares real embeddings
    assert len({k for _, _, k in caps.values()}) > 1
    a, b = read_manifest(tmp_path / "local"), read_manifest(tmp_path / "ray")
    assert a["counts"] == b["counts"] and a["next_row"] == b["next_row"]
    assert a["codebooks"]["stores"] == b["codebooks"]["stores"] and a["dims"] == b["dims"]
    assert engine.verify(tmp_path / "ray", progress=False).ok
    idx = engine.open_index(tmp_path / "ray")
    idx.use_encoders(tiny)
    ref = engine.open_index(tmp_path / "local")
    ref.use_encoders(tiny)
    q = world.source_image(tmp_path / "ray", 3)
    got = idx.query(image=q, prompt="a red circle", k=5, weights="rrf")
    want = ref.query(image=q, prompt="a red circle", k=5, weights="rrf")
    assert [r.id for r in got.results] == [r.id for r in want.results]
    assert np.allclose([r.score for r in got.results], [r.score for r in want.results], atol=1e-3)
    assert a["text"] == b["text"]  # the same analysis chain for the one caption index
    caption = caps[sorted(caps)[0]][0]
    for prompt in ("a red circle", caption):  # every ranker on its own: bm25 (the chain), caption_clip, dups...
        qr, ql = idx.encode_query(q, prompt), ref.encode_query(q, prompt)
        for name in engine.RANKERS.names():
            got, want = idx.rank(name, qr, 8), ref.rank(name, ql, 8)
            assert got.rows.tolist() == want.rows.tolist(), (name, prompt)
            assert len(got.rows) or name not in ("bm25", "caption_clip", "clip", "dino"), (name, prompt)
            np.testing.assert_allclose(got.scores, want.scores, atol=1e-3, err_msg=f"{name}: {prompt}")
    idx.close()
    ref.close()


@needs_ray
def test_failing_units_become_rejects_dead_workers_are_replaced_and_duplicates_rejected(tmp_path, tiny, ray_session):
    """One unit raises on every attempt: it is one reject naming it and the error, the rest completes. One shard
    kills its worker the first time: Ray restarts the worker and the unit is done again. A corrupt image is the
    same reject as in a local build; an id that an earlier unit already has is rejected at commit (its segment is
    rewritten without it)."""
    src = mixed_source(tmp_path / "src", images=12, nested=False)  # units: images 0-3, 4-7, 8-11, two shards
    (src / "img0001.json").write_text(json.dumps({"id": "same", "caption": "first"}))  # unit 0
    (src / "img0009.json").write_text(json.dumps({"id": "same", "caption": "second"}))  # unit 2
    (src / "img0010.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupt")  # unit 2
    local_build(src, tmp_path / "local", tiny)
    flag = tmp_path / "died-once"
    s = ray_build(src, tmp_path / "ray", faults={"images 4-7": "raise", "shards/00000.tar": f"exit-once:{flag}"})
    assert flag.exists()  # the worker really died once
    rej = world.rejects(tmp_path / "ray")
    assert sorted((r["reason"], r["id"] or r["record"]) for r in rej) == \
        [(CORRUPT, "img0010.png"), ("duplicate id", "same"), ("unit failed", "images 4-7")]
    failed = next(r for r in rej if r["reason"] == "unit failed")
    assert "3 attempts" in failed["detail"] and "injected failure while encoding images 4-7" in failed["detail"]
    lost = {f"img{i:04d}.{'jpg' if i % 2 else 'png'}" for i in (4, 5, 6, 7)}
    local_ids, ray_ids = set(snapshot(tmp_path / "local")), set(snapshot(tmp_path / "ray"))
    assert local_ids - ray_ids == lost and ray_ids <= local_ids and "same" in ray_ids
    assert s.records == len(ray_ids) == 12 + 8 - 1 - 1 - 4
    assert sorted((r["id"], r["reason"]) for r in world.rejects(tmp_path / "local")) == \
        [("img0010.png", CORRUPT), ("same", "duplicate id")]
    assert snapshot(tmp_path / "ray")["same"][0] == snapshot(tmp_path / "local")["same"][0] == 1  # the first wins
    assert_same_records(tmp_path / "local", tmp_path / "ray", only=ray_ids)
    assert_same_captions(tmp_path / "local", tmp_path / "ray", only=ray_ids)  # also the segment rewritten at commit
    assert engine.verify(tmp_path / "ray", progress=False).ok


@needs_ray
def test_append_on_ray_continues_rows_and_rejects_ids_the_index_has(tmp_path, tiny, ray_session):
    world.image_folder(tmp_path / "a", 5, size=64, nested=False)
    table = world.table(tmp_path / "t", 6, "parquet", caption_only=2)
    import polars as pl

    df = pl.read_parquet(table).with_columns(pl.when(pl.col("id") == "rec-4").then(pl.lit("img0002.png"))
                                             .otherwise(pl.col("id")).alias("id"))  # an id the index has
    df.write_parquet(table)
    for out, build in ((tmp_path / "local", lambda s, o, **k: local_build(s, o, tiny, **k)),
                       (tmp_path / "ray", lambda s, o, **k: ray_build(s, o, **k))):
        local_build(tmp_path / "a", out, tiny)
        s = build(table, out, append=True)
        assert s.mode == "append" and s.added_this_run == 7 and s.records == 12
        assert [(r["id"], r["reason"]) for r in world.rejects(out)] == [("img0002.png", "duplicate id")]
    assert_same_records(tmp_path / "local", tmp_path / "ray")
    assert_same_captions(tmp_path / "local", tmp_path / "ray")
    rows = {k: v[0] for k, v in snapshot(tmp_path / "ray").items()}
    assert min(r for k, r in rows.items() if k.startswith(("rec-", "txt-"))) == 5  # rows continue the index's
    m = read_manifest(tmp_path / "ray")
    assert m["build"]["complete"] and m["build"]["source"]["path"] == str(table)
    # merged at its end with the index's 5 records (no more than its own 7), from the row the append started at
    assert len(m["segments"]) == 1 and s.merged["segments"] >= 2 and s.merged["records"] == 12
    assert engine.verify(tmp_path / "ray", progress=False).ok


@needs_ray
def test_the_cluster_must_fit_the_workers(tmp_path, ray_session):
    world.image_folder(tmp_path / "src", 2, size=64)
    with pytest.raises(engine.AttribError, match="2 CPUs and 0 GPUs; 3 workers x 1 CPUs do not fit"):
        ray_build(tmp_path / "src", tmp_path / "idx", cluster=ClusterSettings(workers=3, cpus_per_worker=1))
    with pytest.raises(engine.AttribError, match="x 1 GPUs do not fit"):
        ray_build(tmp_path / "src", tmp_path / "idx", cluster=ClusterSettings(gpus_per_worker=1))
    assert not (tmp_path / "idx").exists()
