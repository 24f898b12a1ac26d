"""engine._build / _writer / _txn / _lock: builds commit segments and resume after any kill; --overwrite replaces
only what is ours and survives a crash at every step; one writer at a time; appends; the manifest."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import world
from world import build

import engine
from engine._layout import MANIFEST
from engine._lock import WriterLock
from engine._manifest import read_manifest, write_manifest
from engine._reader import IndexReader
from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]


def snapshot(index: Path) -> dict:
    """id -> (row, clip vector, dino descriptor, patch cells) of every live record: what a query can read."""
    r = IndexReader(index)
    rows, ids = r.all_ids()
    has, clip = r.vectors("clip", rows)
    _, dino = r.vectors("dino", rows)
    _, cells = r.patch_cells(rows)
    out, j = {}, 0
    for row, rid, h in zip(rows.tolist(), ids.tolist(), has.tolist()):
        out[rid] = (row, clip[j], dino[j], cells[j]) if h else (row, None, None, None)
        j += h
    r.close()
    return out


def assert_same_index(a: Path, b: Path, atol: float = 1e-6) -> None:
    sa, sb = snapshot(a), snapshot(b)
    assert sa.keys() == sb.keys()
    for rid in sa:
        assert sa[rid][0] == sb[rid][0], rid
        for x, y in zip(sa[rid][1:], sb[rid][1:]):
            if x is None:
                assert y is None
            else:
                np.testing.assert_allclose(x, y, atol=atol, err_msg=rid)


def cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


INDEX_ARGS = ("--models", "tiny", "--batch-size", "4", "--workers", "1", "--chunk", "8", "--no-progress")


# ------------------------------------------------------------------------------------------- overwrite rules
def test_overwrite_rules(tmp_path, tiny):
    world.image_folder(tmp_path / "src", 3)
    build(tmp_path / "src", tmp_path / "idx", tiny)
    with pytest.raises(engine.AttribError, match="already exists .an index of .*pass --overwrite"):
        build(tmp_path / "src", tmp_path / "idx", tiny)
    build(tmp_path / "src", tmp_path / "idx", tiny, overwrite=True)
    assert read_manifest(tmp_path / "idx")["counts"]["records"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "src"]  # no staging or old copy left
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not delete")
    with pytest.raises(engine.AttribError, match="not an attrib index; refusing"):
        build(tmp_path / "src", tmp_path / "precious", tiny, overwrite=True)
    assert (tmp_path / "precious" / "thesis.tex").exists()


def test_overwrite_refuses_a_folder_that_merely_has_a_manifest(tmp_path, tiny, capsys):
    """The reported data loss: a folder with some manifest.json and other files is not ours."""
    world.image_folder(tmp_path / "imgs", 3)
    ext = tmp_path / "ext"
    (ext / "src").mkdir(parents=True)
    (ext / MANIFEST).write_text('{"manifest_version":3}')
    (ext / "src" / "bg.js").write_text("code")
    for bad in ('{"manifest_version":3}', "not json at all", '{"format": "attrib-index"'):
        (ext / MANIFEST).write_text(bad)
        with pytest.raises(engine.AttribError, match="refusing"):
            build(tmp_path / "imgs", ext, tiny, overwrite=True)
        assert (ext / "src" / "bg.js").read_text() == "code"
    assert main(["index", str(tmp_path / "imgs"), "--out", str(ext), "--models", "tiny", "--overwrite"]) == 2
    assert "refusing" in capsys.readouterr().err and (ext / "src" / "bg.js").exists()


class Crash(BaseException):
    """A crash (or kill -9) injected between the steps of the swap."""


def _raise(*a, **k):
    raise Crash


@pytest.mark.parametrize("step", ["first-rename", "between-renames", "between-renames-unfinished", "cleanup"])
def test_a_crash_at_each_step_of_the_overwrite_swap_loses_nothing(tmp_path, tiny, monkeypatch, step):
    """Fault injection in the swap; whatever happens, the next reader or writer of the index restores the old
    index or completes the new one, and nothing stays hidden."""
    import engine._txn as txn

    world.image_folder(tmp_path / "old", 3)
    world.image_folder(tmp_path / "new", 5)
    out, staged = tmp_path / "idx", txn.staging_path(tmp_path / "idx")
    build(tmp_path / "old", out, tiny)
    build(tmp_path / "new", tmp_path / "n", tiny)
    os.replace(tmp_path / "n", staged)
    if step == "between-renames-unfinished":  # the new index is not complete: the old one must come back
        m = json.loads((staged / MANIFEST).read_text())
        m["build"]["complete"] = False
        from engine._manifest import write_manifest

        write_manifest(staged, m)
    real = os.replace
    calls = []

    def first_rename_fails(a, b):
        calls.append(a)
        if len(calls) == 1:
            raise Crash
        return real(a, b)

    with pytest.raises(Crash):
        if step == "first-rename":
            monkeypatch.setattr(txn.os, "replace", first_rename_fails)
            txn.swap_in(staged, out)
        elif step == "cleanup":
            monkeypatch.setattr(txn, "remove", _raise)
            txn.swap_in(staged, out)
        else:
            txn.swap_in(staged, out, between=_raise)
    monkeypatch.undo()
    n = engine.open_index(out).reader.n_records  # opening recovers
    want = {"first-rename": 3, "between-renames": 5, "between-renames-unfinished": 3, "cleanup": 5}[step]
    assert n == want
    assert not txn.old_path(out).exists()


def test_a_crashed_overwrite_build_is_recovered_by_the_next_command(tmp_path, tiny, monkeypatch):
    import engine._build as b
    import engine._txn as txn

    world.image_folder(tmp_path / "old", 3)
    world.image_folder(tmp_path / "new", 5)
    out = tmp_path / "idx"
    build(tmp_path / "old", out, tiny)
    real_swap = txn.swap_in
    monkeypatch.setattr(b, "swap_in", lambda staged, o: real_swap(staged, o, between=_raise))
    with pytest.raises(Crash):
        build(tmp_path / "new", out, tiny, overwrite=True)
    monkeypatch.undo()
    assert not out.exists() and txn.old_path(out).exists()  # the state a kill -9 at that moment leaves
    assert engine.open_index(out).reader.n_records == 5  # the complete new index is swapped in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "new", "old"]


def test_overwrite_keeps_the_old_index_until_the_new_one_is_complete(tmp_path, tiny):
    world.image_folder(tmp_path / "old", 3)
    out = tmp_path / "idx"
    build(tmp_path / "old", out, tiny)
    (tmp_path / "empty").mkdir()
    with pytest.raises(engine.EmptyCorpusError):
        build(tmp_path / "empty", out, tiny, overwrite=True)
    assert read_manifest(out)["counts"]["records"] == 3  # a failed replacement leaves the old index as it was


# ------------------------------------------------------------------------------------------- one writer
def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_recovered(tmp_path, tiny, capsys):
    world.image_folder(tmp_path / "src", 4)
    out = tmp_path / "idx"
    build(tmp_path / "src", out, tiny)
    holder = WriterLock(out, "compact").acquire()
    try:
        with pytest.raises(engine.IndexBusyError, match=rf"pid {os.getpid()}.*compact"):
            build(tmp_path / "src", out, tiny, append=True)
        with pytest.raises(engine.IndexBusyError):
            engine.delete_records(out, ids=["part0/img0000.png"])
        assert main(["compact", str(out)]) == 2
        assert "being written by another attrib process" in capsys.readouterr().err
        assert engine.open_index(out).reader.n_records == 4  # readers never wait for writers
    finally:
        holder.release()
    # a lock file left by a process that died (kill -9) holds no lock: the next writer goes on
    (out / ".attrib-lock").write_text('{"pid": 999999, "host": "gone"}')
    engine.delete_records(out, ids=["part0/img0000.png"])
    assert read_manifest(out)["counts"]["records"] == 3


def test_two_builds_into_the_same_new_folder_do_not_both_succeed(tmp_path):
    world.image_folder(tmp_path / "a", 40, size=64)
    world.image_folder(tmp_path / "b", 40, size=64)
    out = tmp_path / "idx"
    p1 = cli("index", str(tmp_path / "a"), "--out", str(out), *INDEX_ARGS)
    time.sleep(0.3)
    p2 = cli("index", str(tmp_path / "b"), "--out", str(out), *INDEX_ARGS)
    rc = sorted([p1.wait(timeout=300), p2.wait(timeout=300)])
    err = p1.stderr.read().decode() + p2.stderr.read().decode()
    assert rc == [0, 2], err
    assert "being written by another attrib process" in err or "already exists" in err or "unfinished build" in err
    m = read_manifest(out)
    assert m["build"]["complete"] and m["counts"]["records"] == 40


def test_a_build_planned_before_another_finished_there_stops_instead_of_appending(tmp_path, tiny, monkeypatch):
    """The race the subprocess test above can lose on a loaded machine, made deterministic: this build plans a
    new index, then (while it would be loading its models) another build completes into the same folder. Once
    it holds the lock it must see that and stop, not append to (or resume) the other build's index."""
    import engine._build as b

    world.image_folder(tmp_path / "a", 6, size=64)
    world.image_folder(tmp_path / "b", 6, size=64)
    out = tmp_path / "idx"
    real_plan = b._plan
    calls = []

    def plan_then_lose_the_race(*args):
        planned = real_plan(*args)
        if not calls:
            calls.append(planned)
            build(tmp_path / "b", out, tiny, calibrate=False)  # the other process wins meanwhile
        return planned

    monkeypatch.setattr(b, "_plan", plan_then_lose_the_race)
    with pytest.raises(engine.AttribError, match="already exists"):
        build(tmp_path / "a", out, tiny, calibrate=False)
    assert calls[0][0] == "build"
    m = read_manifest(out)
    assert m["build"]["complete"] and m["counts"]["records"] == 6
    assert m["build"]["source"]["path"] == str(tmp_path / "b")
    assert not (out / ".attrib-lock").read_text()  # the loser released the lock

    # the same for a replacement build: a staged folder another --overwrite is writing is not removed under it
    staged = out.parent / f".{out.name}.next"
    staged.mkdir()
    holder = WriterLock(staged, "build").acquire()
    try:
        with pytest.raises(engine.IndexBusyError):
            b._plan(out, True, False, {"path": str(tmp_path / "a"), "fingerprint": "x"})
        assert staged.exists()
    finally:
        holder.release()


def test_an_overwrite_does_not_continue_another_sources_unfinished_replacement(tmp_path, tiny, monkeypatch):
    """Between this --overwrite's plan and its lock, another --overwrite (of another source) leaves an unfinished
    build in the staged folder: this one stops and leaves that folder alone, and the index stays as it was. An
    --append whose index disappears meanwhile stops too and leaves nothing behind."""
    import engine._build as b

    for name in ("a", "c", "d"):
        world.image_folder(tmp_path / name, 6, size=64)
    out = tmp_path / "idx"
    build(tmp_path / "a", out, tiny, calibrate=False)
    staged = out.parent / f".{out.name}.next"
    real_plan = b._plan

    def plan_then_another_overwrite_starts(*args):
        planned = real_plan(*args)
        monkeypatch.setattr(b, "_plan", real_plan)
        build(tmp_path / "c", staged, tiny, calibrate=False)  # stands for C's build, killed after a commit
        m = read_manifest(staged)
        m["build"]["complete"] = False
        write_manifest(staged, m)
        return planned

    monkeypatch.setattr(b, "_plan", plan_then_another_overwrite_starts)
    with pytest.raises(engine.AttribError, match=r"changed by another attrib process.*unfinished build of .*c "):
        build(tmp_path / "d", out, tiny, calibrate=False, overwrite=True)
    assert read_manifest(out)["build"]["source"]["path"] == str(tmp_path / "a")
    assert read_manifest(staged)["build"]["source"]["path"] == str(tmp_path / "c")  # not taken over, not removed

    def plan_then_the_index_goes(*args):
        planned = real_plan(*args)
        shutil.rmtree(out)
        return planned

    monkeypatch.setattr(b, "_plan", plan_then_the_index_goes)
    with pytest.raises(engine.AttribError, match="--append needs an existing index"):
        build(tmp_path / "d", out, tiny, calibrate=False, append=True)
    assert not out.exists()  # no lock file, rejects or empty caption index left where the index was


# ------------------------------------------------------------------------------------------- resume
def _wait_for_commits(out: Path, proc: subprocess.Popen, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if len(json.loads((out / MANIFEST).read_text())["segments"]) >= n:
                return
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            raise AssertionError(f"build ended before it could be interrupted: {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError("build never committed")


def test_killed_builds_resume_to_the_same_index(tmp_path, tiny):
    """kill -9 at random moments (several times), rerun the same command: the result equals an uninterrupted
    build (same ids, rows and vectors), and each resume re-encodes at most one chunk beyond what was committed."""
    src = tmp_path / "src"
    world.image_folder(src, 48, size=64)
    (src / "part0" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")  # a reject survives resumes once
    ref = tmp_path / "ref"
    assert cli("index", str(src), "--out", str(ref), *INDEX_ARGS).wait(timeout=300) == 0
    out = tmp_path / "idx"
    rng = random.Random(7)
    kills = 0
    for attempt in range(6):
        proc = cli("index", str(src), "--out", str(out), *INDEX_ARGS, "--json")
        if attempt < 3:
            if attempt:
                _wait_for_commits(out, proc, 1)
            # during start-up (model loading) at first; then within a chunk or two of a commit: on a fast machine
            # the rest of this small build takes well under a second
            time.sleep(rng.uniform(0.0, 1.5 if attempt == 0 else 0.3))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=60)
            if not (out / MANIFEST).exists():
                continue
            m = read_manifest(out)
            if m["build"]["complete"]:  # finished before it was killed, or killed on its way out: the whole index
                assert_same_index(ref, out)
                break
            with pytest.raises(engine.IndexFormatError, match="unfinished build|holds no records") \
                    if not m["segments"] else _nothing():
                r = engine.open_index(out)  # a partial index is a consistent snapshot of what was committed
                assert r.reader.n_records == sum(s["records"] for s in m["segments"])
            continue
        out_json, err = proc.communicate(timeout=300)
        out_json = out_json.decode()
        assert proc.returncode == 0, err.decode()[-3000:]
        summary = json.loads(out_json)
        assert summary["encoded_this_run"] <= 48 - (summary["records"] - summary["added_this_run"]) + 8
        break
    assert kills >= 1
    assert_same_index(ref, out)
    rejects = (out / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 1 and "corrupt.jpg" in rejects[0]  # no duplicate reject lines from the resumes
    assert read_manifest(out)["counts"]["rejected"] == 1


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_sigint_says_the_build_can_resume_and_the_rerun_skips_committed_work(tmp_path):
    src = tmp_path / "src"
    world.image_folder(src, 40, size=64)
    out = tmp_path / "idx"
    proc = cli("index", str(src), "--out", str(out), *INDEX_ARGS)
    _wait_for_commits(out, proc, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert "rerun the same command" in err.decode()
    committed = read_manifest(out)["counts"]["records"]
    proc = cli("index", str(src), "--out", str(out), *INDEX_ARGS, "--json")
    out_json, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    s = json.loads(out_json)
    assert s["mode"] == "resume" and s["records"] == 40 and s["encoded_this_run"] <= 40 - committed + 8


def test_a_resume_refuses_a_changed_source(tmp_path, tiny):
    src = tmp_path / "src"
    world.image_folder(src, 20, size=64)
    out = tmp_path / "idx"
    proc = cli("index", str(src), "--out", str(out), *INDEX_ARGS)
    _wait_for_commits(out, proc, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if read_manifest(out)["build"]["complete"]:
        pytest.fail("the build finished before it could be killed")
    world.scene(99)[0].save(src / "part0" / "img9999.png")
    with pytest.raises(engine.AttribError, match="changed since its build .* was interrupted; pass --overwrite"):
        build(src, out, tiny)
    world.image_folder(tmp_path / "other", 2)
    with pytest.raises(engine.AttribError, match="holds an unfinished build of .*src"):
        build(tmp_path / "other", out, tiny)


def test_an_append_takes_the_runs_chunk_and_refuses_another_format(tmp_path, capsys):
    """--chunk, --batch-size, --workers and the input limits are the run's own on an append (they were silently
    dropped for the index's: an append with --chunk 4 committed segments of 8); a format setting (--patch-grid)
    that differs from the index's is refused by name, and the index is left as it was."""
    world.image_folder(tmp_path / "src", 16, size=64)
    world.image_folder(tmp_path / "more", 12, size=64)
    for d in (tmp_path / "more").iterdir():
        d.rename(d.with_name("more-" + d.name))  # other ids than the first folder's
    out = tmp_path / "idx"
    assert main(["index", str(tmp_path / "src"), "--out", str(out), *INDEX_ARGS]) == 0
    before = read_manifest(out)
    assert main(["index", str(tmp_path / "more"), "--out", str(out), *INDEX_ARGS, "--append", "--patch-grid", "4"]) == 2
    assert "patch_grid (--patch-grid) 4 differs from the index's own 8" in capsys.readouterr().err
    assert read_manifest(out)["generation"] == before["generation"]
    args = [a if a != "8" else "4" for a in INDEX_ARGS]  # --chunk 4
    assert main(["index", str(tmp_path / "more"), "--out", str(out), *args, "--append", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["added_this_run"] == 12 and s["merged"]["segments"] == 3  # 3 segments of 4 (of 8: 2, before)
    assert read_manifest(out)["settings"]["chunk"] == 8  # the index's own settings are what its manifest keeps


def test_for_run_takes_the_runs_settings_and_keeps_the_format():
    """IndexSettings.for_run: the run's chunk, batch size, threads and limits; the index's format, a different
    explicit value refused by name, except where the index's own is "auto" (resolved when it was built)."""
    stored = engine.IndexSettings(chunk=64, batch_size=8, patch_grid=8, codec="auto")
    run = stored.for_run(engine.IndexSettings(chunk=16, batch_size=32, workers=0, max_pixels=1000, codec="fp16"))
    assert (run.chunk, run.batch_size, run.workers, run.max_pixels) == (16, 32, 0, 1000)
    assert (run.patch_grid, run.codec) == (8, "auto") and stored.for_run(None) is stored
    with pytest.raises(engine.AttribError, match=r"patch_grid \(--patch-grid\) 4 differs from the index's own 8"):
        stored.for_run(engine.IndexSettings(patch_grid=4))


# ------------------------------------------------------------------------------------------- a full disk
def _disk_full_after(monkeypatch, n_segments: int) -> None:
    """The disk is full for every segment written after the first ``n_segments`` (a compaction's included): its
    first file's blocks cannot be reserved, as on a real full disk (engine.files.allocate)."""
    import engine._segment as seg

    real, folders = seg.allocate, []

    def allocate(path: Path) -> None:
        if path.parent not in folders:
            folders.append(path.parent)
        if len(folders) > n_segments:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path)

    monkeypatch.setattr(seg, "allocate", allocate)


def test_a_full_disk_stops_a_build_with_one_line_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of a build: exit code 1 and one line saying what was kept (no traceback); the committed
    segments stay, nothing half-written is left, and the same command, once there is space, finishes the build."""
    src = tmp_path / "src"
    world.image_folder(src, 40, size=64)  # 5 segments of 8 images
    ref, out = tmp_path / "ref", tmp_path / "idx"
    assert main(["index", str(src), "--out", str(ref), *INDEX_ARGS]) == 0
    capsys.readouterr()
    _disk_full_after(monkeypatch, 2)
    assert main(["index", str(src), "--out", str(out), *INDEX_ARGS]) == 1
    err = capsys.readouterr().err
    assert "stopped by a full disk" in err and "rerun the same command to resume the build" in err, err
    assert "free some space" in err and "Traceback" not in err
    m = read_manifest(out)
    assert len(m["segments"]) == 2 and not m["build"]["complete"]
    assert not [p.name for p in (out / "segments").iterdir() if p.name.startswith(".")]  # no half-written folder
    monkeypatch.undo()
    assert main(["index", str(src), "--out", str(out), *INDEX_ARGS, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["mode"] == "resume" and s["records"] == 40 and s["encoded_this_run"] == 24
    assert_same_index(ref, out)


def test_a_full_disk_in_the_last_compaction_leaves_a_complete_index(tmp_path, capsys, monkeypatch):
    """Every record committed, then no room to merge the segments: the build succeeds and says the segments were
    not merged and how to merge them (a rerun would be refused: the index is complete); attrib compact then does."""
    src = tmp_path / "src"
    world.image_folder(src, 40, size=64)
    out = tmp_path / "idx"
    _disk_full_after(monkeypatch, 5)
    assert main(["index", str(src), "--out", str(out), *INDEX_ARGS[:-1]]) == 0
    err = capsys.readouterr().err
    assert "every record are committed, but the segments were not merged" in err, err
    assert "No space left on device" in err and f"`attrib compact {out}`" in err
    m = read_manifest(out)
    assert m["build"]["complete"] and len(m["segments"]) == 5 and m["counts"]["records"] == 40
    assert not [p.name for p in (out / "segments").iterdir() if p.name.startswith(".")]
    assert engine.open_index(out).reader.n_records == 40
    monkeypatch.undo()
    assert main(["compact", str(out)]) == 0
    assert len(read_manifest(out)["segments"]) == 1


def test_an_interrupt_in_the_last_steps_says_the_index_is_complete(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the finished build merges its segments: the message says the index is complete and names
    attrib compact, not "rerun the same command" (a rerun is refused: the index exists and is complete)."""
    import engine._maintain

    src = tmp_path / "src"
    world.image_folder(src, 24, size=64)
    out = tmp_path / "idx"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine._maintain, "compact", interrupted)
    old = signal.getsignal(signal.SIGINT)
    try:
        assert main(["index", str(src), "--out", str(out), *INDEX_ARGS]) == 130
    finally:
        signal.signal(signal.SIGINT, old)
    err = capsys.readouterr().err
    assert "interrupted after every record was committed" in err and "is complete" in err, err
    assert f"attrib compact {out}` to merge its 3 segments" in err
    assert read_manifest(out)["build"]["complete"]


def test_an_overwrite_stopped_before_its_swap_is_finished_without_encoding_again(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the new index of --overwrite merges its segments (every record committed, the old index still
    in place): the message says so, and the same command then finishes it (merge, swap) without encoding."""
    import engine._maintain

    src = tmp_path / "src"
    world.image_folder(src, 24, size=64)
    (src / "part1" / "zz.tar").write_bytes(b"not a tar shard")  # the source's last item: one reject
    ref, out = tmp_path / "ref", tmp_path / "idx"
    assert main(["index", str(src), "--out", str(ref), *INDEX_ARGS]) == 0
    world.image_folder(tmp_path / "old", 8, size=64)
    assert main(["index", str(tmp_path / "old"), "--out", str(out), *INDEX_ARGS]) == 0
    real = engine._maintain.compact

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine._maintain, "compact", interrupted)
    old = signal.getsignal(signal.SIGINT)
    try:
        assert main(["index", str(src), "--out", str(out), *INDEX_ARGS, "--overwrite"]) == 130
    finally:
        signal.signal(signal.SIGINT, old)
    err = capsys.readouterr().err
    assert "every record of the new index was committed, before it replaced" in err, err
    assert "nothing is encoded again" in err and read_manifest(out)["counts"]["records"] == 8
    monkeypatch.setattr(engine._maintain, "compact", real)
    assert main(["index", str(src), "--out", str(out), *INDEX_ARGS, "--overwrite", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["mode"] == "overwrite" and s["encoded_this_run"] == 0 and s["records"] == 24 and s["segments"] == 1
    assert_same_index(ref, out)
    m = read_manifest(out)
    assert [x["path"] for x in m["sources"]] == [str(src)]  # the build is in its history once
    assert m["counts"]["rejected"] == 1 and len((out / "rejects.jsonl").read_text().splitlines()) == 1  # not read again


def test_an_error_caused_by_ctrl_c_is_an_interrupt_not_a_traceback(monkeypatch, capsys):
    """An OSError raised while handling Ctrl-C (a worker's broken pipe) ends as an interrupt: exit code 130."""
    import engine.cli

    def broken(a):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe") from None

    monkeypatch.setattr(engine.cli, "cmd_info", broken)
    old = signal.getsignal(signal.SIGINT)
    try:
        assert main(["info", "anything"]) == 130
    finally:
        signal.signal(signal.SIGINT, old)
    assert "interrupted" in capsys.readouterr().err


def test_faiss_writes_and_reserved_files_report_a_full_disk_as_oserror(tmp_path):
    """/dev/full fails every write with ENOSPC: a faiss write raises that OSError naming the file (faiss's own
    writer said nothing when only the close failed), and engine.files.allocate reserves a sparse file's blocks
    (so a memory-mapped write cannot die of SIGBUS later)."""
    import faiss

    from engine._codebooks import faiss_write
    from engine.files import allocate

    small, large = faiss.IndexFlatL2(4), faiss.IndexFlatL2(4)
    large.add(np.zeros((1 << 16, 4), np.float32))
    for index in (small, large):  # faiss's own writer: a RuntimeError (large), or only a line on stderr (small)
        with pytest.raises(OSError) as e:
            faiss_write(faiss.write_index, index, Path("/dev/full"))
        assert e.value.errno == errno.ENOSPC and e.value.filename == "/dev/full"
    faiss_write(faiss.write_index, large, tmp_path / "large.index")
    assert faiss.read_index(str(tmp_path / "large.index")).ntotal == 1 << 16
    p = tmp_path / "sparse.npy"
    a = np.lib.format.open_memmap(p, "w+", np.float32, (1 << 20,))
    assert p.stat().st_blocks * 512 < a.nbytes  # sparse: its blocks are taken only when first written
    allocate(p)
    assert p.stat().st_blocks * 512 >= a.nbytes


# ------------------------------------------------------------------------------------------- append
def test_append_adds_records_rejects_existing_ids_and_enforces_models(tmp_path, tiny, capsys):
    world.image_folder(tmp_path / "a", 6, nested=False)
    build(tmp_path / "a", tmp_path / "idx", tiny)
    b = tmp_path / "b"
    b.mkdir()
    for i in (3, 40, 41):  # img0003.jpg already exists in the index (same relative path = same id)
        im, cap = world.scene(i)
        im.save(b / f"img{i:04d}.{'jpg' if i % 2 else 'png'}")
        (b / f"img{i:04d}.txt").write_text(cap)
    s = build(b, tmp_path / "idx", tiny, append=True)
    assert s.mode == "append" and s.added_this_run == 2 and s.records == 8
    rejects = world.rejects(tmp_path / "idx")
    assert [(r["id"], r["reason"]) for r in rejects] == [("img0003.jpg", "duplicate id")]
    idx = engine.open_index(tmp_path / "idx")
    idx.use_encoders(tiny)
    top = idx.query(image=b / "img0040.png", k=1, weights="rrf").results[0]
    assert top.id == "img0040.png" and top.row == 6  # rows continue after the index's 0..5
    other = engine.load_encoders(engine.get_profile("tiny").__class__(**{
        **engine.get_profile("tiny").__dict__, "seed": 5}), device="cpu")
    with pytest.raises(engine.AttribError, match="was built with models 'tiny' .*Use the same models"):
        build(b, tmp_path / "idx", other, append=True)
    with pytest.raises(engine.AttribError, match="--append needs an existing index"):
        build(b, tmp_path / "none", tiny, append=True)
    assert main(["info", str(tmp_path / "idx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["live"] == 8 and info["deleted"] == 0 and info["segments"] == 2


# ------------------------------------------------------------------------------------------- manifest
def test_manifest_round_trip_and_info(tmp_path, tiny, capsys):
    world.image_folder(tmp_path / "src", 5)
    s = build(tmp_path / "src", tmp_path / "idx", tiny)
    m = read_manifest(tmp_path / "idx")
    assert m == json.loads(json.dumps(s.manifest))
    assert m["models"]["profile"] == "tiny" and m["format_version"] == 3 and m["build"]["complete"]
    assert m["models"]["fingerprint"] == tiny.identity["fingerprint"]
    assert len(m["models"]["clip"]["weights_sha256"]) == 64
    assert m["dims"] == {"clip": 64, "dino": 64, "dino_global": 128, "patch_grid": 8, "patch_cells": 64,
                         "patch_dims": 64}
    assert m["counts"]["records"] == 5 and m["settings"]["patch_grid"] == 8 and len(m["segments"]) == 1
    assert {"torch", "faiss-cpu", "tantivy", "open_clip_torch", "timm"} <= set(m["versions"])
    assert main(["info", str(tmp_path / "idx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["manifest"] == m
    for key in ("records", "images", "live", "deleted", "segments", "disk_bytes_per_record", "ram_bytes_per_record"):
        assert key in info
    assert info["disk_bytes_per_record"]["total"] > 0 and info["ram_bytes_per_record"]["total"] > 0
    assert "UNTRAINED" in info["warning"]
    assert main(["info", str(tmp_path / "idx")]) == 0
    err = capsys.readouterr().err
    assert "UNTRAINED" in err and "size on disk" in err and "patches" in err


def test_the_untrained_flag_comes_from_the_model_identity(tmp_path, tiny):
    world.image_folder(tmp_path / "src", 3)
    build(tmp_path / "src", tmp_path / "idx", tiny)
    p = tmp_path / "idx" / MANIFEST
    m = json.loads(p.read_text())
    m["models"]["pretrained"] = True
    p.write_text(json.dumps(m))
    with pytest.raises(engine.IndexFormatError, match="changed after it was written"):
        engine.open_index(tmp_path / "idx")
    from engine._manifest import is_pretrained

    assert not is_pretrained(m["models"])  # even a consistent manifest cannot claim it: the profile decides
