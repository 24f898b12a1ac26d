"""A hostile or careless user (issue 13): nothing is lost, nothing is silently wrong, every user error is one line
with exit code 2. Cases outside the index folder itself: outputs (reports, weights files, benchmarks), weights
files, numeric bounds, start-up interrupts, odd names and paths, and records dropped while reading a source."""
from __future__ import annotations

import io
import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest
import world
from world import build, records, rejects

import engine
import engine._encoders
import engine._index
import engine._ingest
from engine import images as engine_images
from engine._manifest import MANIFEST, read_manifest
from engine.cli import main
from engine.files import check_output_file, write_bytes_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(err: str, *needles: str) -> str:
    """The stderr of a refused command: exactly one non-empty line, an error, no traceback, naming the needles."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def fast_models(monkeypatch, tiny):
    """CLI commands in-process reuse the session's tiny encoders instead of loading them again."""
    import engine._encoders as enc

    real = enc.Encoders

    def encoders(models="default", *a, **kw):
        return tiny if models == "tiny" else real(models, *a, **kw)

    monkeypatch.setattr(enc, "Encoders", encoders)


# ============================================================================ 1. data loss outside index folders
def test_bench_synth_overwrite_replaces_only_a_synthetic_benchmark(tmp_path, capsys):
    small = ["--train", "10", "--queries", "6", "--size", "32", "--no-progress"]
    foreign = tmp_path / "ext"
    (foreign / "src").mkdir(parents=True)
    (foreign / "src" / "bg.js").write_text("code")
    (foreign / "synth.json").write_text('{"manifest_version": 3}')  # a look-alike, not ours
    assert main(["bench", "synth", str(foreign), "--overwrite", *small]) == 2
    one_line_error(capsys.readouterr().err, str(foreign), "refusing to replace it")
    assert (foreign / "src" / "bg.js").read_text() == "code"
    ours = tmp_path / "synth"
    assert main(["bench", "synth", str(ours), *small]) == 0
    (ours / "weights.json").write_text("from attrib tune --out")  # a user's file in the benchmark folder
    assert main(["bench", "synth", str(ours), *small]) == 2  # without --overwrite: refused
    capsys.readouterr()
    assert main(["bench", "synth", str(ours), "--overwrite", *small]) == 2  # it would be deleted: refused, named
    one_line_error(capsys.readouterr().err, "weights.json", "move it out first")
    assert (ours / "weights.json").read_text() == "from attrib tune --out"
    (ours / "weights.json").unlink()
    assert main(["bench", "synth", str(ours), "--overwrite", *small]) == 0
    assert (ours / "corpus.parquet").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bench_import_overwrite_replaces_only_an_imported_benchmark(tmp_path, capsys):
    csv = tmp_path / "m.csv"
    csv.write_text(";Caption;URL;type;mean_sscd;max_sscd;Index\n0;a red fox;http://x/1.jpg;VM;0.5;0.6;1\n"
                   "1;a blue car;http://x/2.jpg;TM;0.5;0.6;2\n", encoding="utf-8")
    foreign = tmp_path / "ext"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    assert main(["bench", "import-memorized", str(csv), "--out", str(foreign), "--overwrite"]) == 2
    one_line_error(capsys.readouterr().err, "not written by `attrib bench import-memorized`")
    assert (foreign / "keep.txt").read_text() == "precious"
    ours = tmp_path / "mem"
    assert main(["bench", "import-memorized", str(csv), "--out", str(ours), "--json"]) == 0
    (ours / "notes.txt").write_text("mine")
    assert main(["bench", "import-memorized", str(csv), "--out", str(ours), "--overwrite", "--json"]) == 2
    one_line_error(capsys.readouterr().err, "notes.txt", "move it out first")
    assert (ours / "notes.txt").read_text() == "mine"
    (ours / "notes.txt").unlink()
    assert main(["bench", "import-memorized", str(csv), "--out", str(ours), "--overwrite", "--json"]) == 0
    assert (ours / "import.json").is_file()


def _special(tmp_path: Path, kind: str) -> Path:
    """A path holding something that is not a regular file."""
    p = tmp_path / f"out-{kind}.html"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    elif kind == "device":  # a private null device node (never a real /dev entry); a FIFO where mknod is denied
        try:
            os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            os.mkfifo(p)
    elif kind == "symlink":
        (tmp_path / "target.html").write_text("the target")
        p.symlink_to(tmp_path / "target.html")
    elif kind == "dangling-symlink":
        p.symlink_to(tmp_path / "nowhere.html")
    elif kind == "folder":
        p.mkdir()
    elif kind == "under-a-file":
        (tmp_path / "afile").write_text("x")
        p = tmp_path / "afile" / "out.html"
    return p


SPECIAL = ["fifo", "socket", "device", "symlink", "dangling-symlink", "folder", "under-a-file"]


@pytest.mark.parametrize("kind", SPECIAL)
def test_atomic_writes_never_replace_special_files_or_links(tmp_path, kind):
    p = _special(tmp_path, kind)
    before = os.lstat(p) if os.path.lexists(p) else None
    for write in (lambda: write_text_atomic(p, "<html>report</html>"), lambda: write_bytes_atomic(p, b"\x89PNG"),
                  lambda: check_output_file(p)):
        with pytest.raises(engine.OutputError) as e:
            write()
        msg = str(e.value)
        assert str(p) in msg and "\n" not in msg
    if before is not None:  # untouched: same kind of file, same inode
        after = os.lstat(p)
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    if kind == "symlink":  # symbolic links are refused, not written through: the target keeps its content
        assert (tmp_path / "target.html").read_text() == "the target"
        assert "symbolic link" in msg
    assert not list(tmp_path.rglob(".*.tmp"))  # no temporary file left behind
    write_text_atomic(tmp_path / "new" / "ok.html", "fine")  # a regular path still works (folders created)
    assert (tmp_path / "new" / "ok.html").read_text() == "fine"


@pytest.mark.parametrize("kind", ["fifo", "device", "symlink", "folder", "under-a-file"])
def test_query_html_to_a_special_path_is_refused_before_any_work(tiny_index, tmp_path, capsys, kind, monkeypatch):
    p = _special(tmp_path, kind)
    before = os.lstat(p) if os.path.lexists(p) else None
    monkeypatch.setattr(engine._index.Index, "__init__", lambda *a, **k: pytest.fail("the index was opened"))
    assert main(["query", str(tiny_index), "--prompt", "a red circle", "--html", str(p)]) == 2
    one_line_error(capsys.readouterr().err, str(p))
    if before is not None:
        assert os.lstat(p).st_mode == before.st_mode


# ============================================================================ 2. weights files
def _weights_dict() -> dict:
    feats = ["clip", "dino_patch:z", "bm25:rr"]
    return engine.FusionWeights(features=feats, weights=[1.5, -0.25, 3.0], bias=0.1, mean=[0.1, 0.0, 0.01],
                                std=[0.2, 1.0, 0.005], models={"fingerprint": "abc", "profile": "tiny"},
                                threshold=0.7).to_dict()


def _nest(depth: int):
    x: object = 1
    for _ in range(depth):
        x = [x]
    return x


WEIGHTS_DAMAGE = [
    (lambda d: d["weights"].__setitem__(1, float("nan")), "weights[1] is nan"),
    (lambda d: d["weights"].__setitem__(0, float("inf")), "weights[0] is inf"),
    (lambda d: d["weights"].__setitem__(2, 1e308), "weights[2] is 1e+308"),
    (lambda d: d.update(bias=float("inf")), "bias is inf"),
    (lambda d: d.update(bias=-1e9), "bias is -1e+09"),
    (lambda d: d["mean"].__setitem__(0, float("nan")), "mean[0] is nan"),
    (lambda d: d["std"].__setitem__(2, float("inf")), "std[2] is inf"),
    (lambda d: d["std"].__setitem__(1, -1.0), "std[1] is -1.0"),
    (lambda d: d["std"].__setitem__(1, 1e-300), "std[1] is 1e-300"),
    (lambda d: d.update(threshold=float("nan")), "threshold is nan"),
    (lambda d: d.update(threshold=float("-inf")), "threshold is -inf"),
    (lambda d: d.update(rrf_k=-60), "rrf_k is -60"),
    (lambda d: d.update(rrf_k=10**12), "rrf_k is 1000000000000"),
    (lambda d: d.update(rrf_k=60.5), "rrf_k is 60.5"),
    (lambda d: d.update(rrf_k=True), "rrf_k is True"),
    (lambda d: d["weights"].__setitem__(0, "1.5"), "weights[0] is '1.5', not a number"),
    (lambda d: d["weights"].__setitem__(0, True), "weights[0] is True, not a number"),
    (lambda d: d.update(weights={"clip": 1.0}), "field 'weights' is dict"),
    (lambda d: d.update(features="clip"), "field 'features' is str"),
    (lambda d: d["features"].__setitem__(0, 7), "features[0] is 7"),
    (lambda d: d.update(mean=[0.0]), "'mean' has 1 values but 'features' has 3"),
    (lambda d: d.update(features=["clip", "clip", "bm25:rr"]), "feature 'clip' is listed twice"),
    (lambda d: d.pop("models"), "field 'models' is missing"),
    (lambda d: d["models"].pop("fingerprint"), "field 'models.fingerprint' is missing"),
    (lambda d: d["models"].update(fingerprint=None), "field 'models.fingerprint' is None"),
    (lambda d: d.update(provenance="x"), "field 'provenance' is str"),
    (lambda d: d.update(provenance={"benchmark_generator": {"generator": "eval.synth"}}),
     "field 'provenance.benchmark_generator.version' is missing"),
    (lambda d: d.update(provenance={"benchmark_generator": [1]}), "'provenance.benchmark_generator' is list"),
    (lambda d: d.update(provenance={"deep": _nest(40)}), "nested too deeply"),
]


@pytest.mark.parametrize("damage,needle", WEIGHTS_DAMAGE, ids=[n for _, n in WEIGHTS_DAMAGE])
def test_weights_files_are_validated_field_by_field(tmp_path, damage, needle):
    d = _weights_dict()
    damage(d)
    p = tmp_path / "w.json"
    p.write_text(json.dumps(d))  # NaN / Infinity are written as JSON's non-standard constants, as a user could
    with pytest.raises(engine.FusionWeightsError) as e:
        engine.FusionWeights.load(p)
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_weights_files_that_would_flip_the_verdict_are_refused_by_queries(idx, tmp_path, capsys, tiny_index,
                                                                          fast_models):
    d = _weights_dict()
    d["models"]["fingerprint"] = idx.fingerprint
    assert isinstance(idx.query(prompt="a red circle", k=3, weights=engine.FusionWeights.from_dict(d)),
                      engine.Attribution)  # the sane file works
    for change, needle in [({"threshold": float("nan")}, "threshold is nan"), ({"bias": float("inf")}, "bias is inf"),
                           ({"weights": [1e308, 0.0, 0.0]}, "weights[0] is 1e+308")]:
        bad = dict(d, **change)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(engine.FusionWeightsError, match=needle.replace("[", r"\[").replace("+", r"\+")):
            idx.query(prompt="a red circle", k=3, weights=str(tmp_path / "bad.json"))
        argv = ["query", str(tiny_index), "--prompt", "a red circle", "--weights", str(tmp_path / "bad.json")]
        assert main(argv) == 2
        one_line_error(capsys.readouterr().err, needle)
    # saving refuses what loading would refuse
    w = engine.FusionWeights.from_dict(d)
    w.std = [0.2, float("nan"), 0.1]
    with pytest.raises(engine.FusionWeightsError, match=r"std\[1\] is nan"):
        w.save(tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()


def test_weights_size_and_nesting_limits_are_checked_before_parsing(tmp_path, tiny_index, capsys):
    sparse = tmp_path / "huge.json"  # 64 GiB on paper, a few blocks on disk: reading it all would never end
    with open(sparse, "wb") as f:
        f.truncate(64 * 2**30)
    with pytest.raises(engine.FusionWeightsError, match="larger than 16 MiB"):
        engine.FusionWeights.load(sparse)
    with pytest.raises(engine.FusionWeightsError, match="larger than 16 MiB"):
        engine.FusionWeights.load("/dev/zero")  # endless: refused after 16 MiB + 1 byte
    assert main(["query", str(tiny_index), "--prompt", "x", "--weights", "/dev/zero"]) == 2
    one_line_error(capsys.readouterr().err, "/dev/zero", "larger than 16 MiB")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)  # the JSON parser's own recursion limit
    with pytest.raises(engine.FusionWeightsError, match="nested too deeply"):
        engine.FusionWeights.load(deep)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(engine.FusionWeightsError, match="not UTF-8"):
        engine.FusionWeights.load(binary)
    with pytest.raises(engine.FusionWeightsError, match="cannot be read"):
        engine.FusionWeights.load(tmp_path)  # a folder


# ============================================================================ 3. bounds on every numeric option
Q, IX = ["query", "IDX", "--prompt", "x"], ["index", "SRC", "--out", "OUT", "--models", "tiny"]
SYN, RUN = ["bench", "synth", "OUT"], ["bench", "run", "BENCH", "--models", "tiny"]
IMP, TUNE = ["bench", "import-memorized", "CSV", "--out", "OUT"], ["tune", "BENCH", "--out", "W", "--models", "tiny"]
BAD_OPTIONS = [
    (Q + ["-k", "0"], "-k"), (Q + ["-k", "2147483648"], "-k"), (Q + ["-k", "10001"], "-k"), (Q + ["-k", "1e3"], "-k"),
    (Q + ["-k", "9" * 5000], "-k"),
    (Q + ["--depth", "0"], "--depth"), (Q + ["--depth", "1e12"], "--depth"), (Q + ["--depth", "10001"], "--depth"),
    (Q + ["--nprobe", "0"], "--nprobe"), (Q + ["--nprobe", "10000001"], "--nprobe"),
    (IX + ["--batch-size", "0"], "--batch-size"), (IX + ["--batch-size", "4097"], "--batch-size"),
    (IX + ["--workers", "-1"], "--workers"), (IX + ["--workers", "1000"], "--workers"),
    (IX + ["--patch-grid", "0"], "--patch-grid"), (IX + ["--patch-grid", "1000"], "--patch-grid"),
    (IX + ["--patch-dims", "0"], "--patch-dims"), (IX + ["--patch-dims", "100000"], "--patch-dims"),
    (IX + ["--max-pixels", "0"], "--max-pixels"), (IX + ["--max-pixels", "3000000000"], "--max-pixels"),
    (SYN + ["--train", "9"], "--train"), (SYN + ["--train", "100000000"], "--train"),
    (SYN + ["--queries", "5"], "--queries"), (SYN + ["--seed", "-1"], "--seed"),
    (SYN + ["--size", "31"], "--size"), (SYN + ["--size", "5000"], "--size"),
    (RUN + ["--target-far", "-0.1"], "--target-far"), (RUN + ["--target-far", "1.5"], "--target-far"),
    (RUN + ["--target-far", "nan"], "--target-far"), (RUN + ["--target-far", "inf"], "--target-far"),
    (IMP + ["--timeout", "0"], "--timeout"), (IMP + ["--timeout", "1e9"], "--timeout"),
    (IMP + ["--timeout", "nan"], "--timeout"), (IMP + ["--seed", "-5"], "--seed"),
    (TUNE + ["--target-far", "2"], "--target-far"), (TUNE + ["--metric", "recall@0"], "--metric"),
    (TUNE + ["--metric", "map@100000"], "--metric"), (TUNE + ["--metric", "ndcg@99999999999999999999"], "--metric"),
]


@pytest.mark.parametrize("argv,option", BAD_OPTIONS, ids=[" ".join(a[-2:]) for a, _ in BAD_OPTIONS])
def test_every_numeric_cli_option_is_bounded(argv, option, capsys, monkeypatch):
    import eval.cli

    # refused while the arguments are parsed: no command starts, so nothing is opened, built or allocated
    for module in (engine.cli, eval.cli):
        for name in [n for n in vars(module) if n.startswith("cmd_")]:
            monkeypatch.setattr(module, name, lambda a: pytest.fail("a command started"))
    assert main(argv) == 2
    one_line_error(capsys.readouterr().err, option)


def test_patch_grid_larger_than_the_models_is_refused_before_decoding(tmp_path, tiny, capsys, monkeypatch):
    world.image_folder(tmp_path / "src", 3)
    monkeypatch.setattr(engine_images, "decode", lambda *a, **k: pytest.fail("an image was decoded"))
    argv = ["index", str(tmp_path / "src"), "--out", str(tmp_path / "idx"), "--models", "tiny", "--patch-grid", "9"]
    monkeypatch.setattr("engine._encoders.Encoders", lambda *a, **k: pytest.fail("models were loaded"))
    assert main(argv) == 2  # from the profile's config, before the models load
    one_line_error(capsys.readouterr().err, "patch grid 9", "8x8", "at most 8")
    with pytest.raises(engine.AttribError, match="at most 8"):  # and from loaded encoders
        build(tmp_path / "src", tmp_path / "idx", tiny, settings=engine.IndexSettings(patch_grid=9, pca_sample=8))
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("kw,needle", [
    ({"batch_size": 0}, "batch_size=0"), ({"batch_size": 10**6}, "batch_size=1000000"),
    ({"batch_size": True}, "batch_size=True"), ({"batch_size": 2.5}, "batch_size=2.5"),
    ({"workers": -1}, "workers=-1"), ({"patch_grid": 1000}, "patch_grid=1000"), ({"patch_dims": 0}, "patch_dims=0"),
    ({"pca_sample": 10**9}, "pca_sample="), ({"max_pixels": 10**12}, "max_pixels="), ({"max_bytes": 0}, "max_bytes=0"),
])
def test_index_settings_are_bounded(kw, needle):
    with pytest.raises(engine.AttribError, match=needle):
        engine.IndexSettings(**kw)


@pytest.mark.parametrize("kw,needle", [
    ({"depth": 10**12}, "depth=1000000000000"), ({"depth": 0}, "depth=0"), ({"dino_rerank": 10**9}, "dino_rerank="),
    ({"rrf_k": -60}, "rrf_k=-60"), ({"rrf_k": 10**9}, "rrf_k="), ({"nprobe": 0}, "nprobe=0"),
    ({"nprobe": 10**12}, "nprobe="), ({"depth": "100"}, "depth='100'"),
])
def test_query_settings_are_bounded(kw, needle):
    with pytest.raises(engine.AttribError, match=needle):
        engine.QuerySettings(**kw)


def test_query_counts_are_bounded_in_the_library(idx):
    q = idx.encode_query(prompt="a red circle")
    for k in (0, -1, 2**31, 2**63, 10**6, True, 2.5, "10"):
        with pytest.raises(engine.QueryInputError, match="k="):
            idx.query(prompt="a red circle", k=k)
        with pytest.raises(engine.QueryInputError, match="k="):
            idx.search(q, k=k)
        if k != 0:  # one ranker alone may be asked for nothing (an empty ranking)
            with pytest.raises(engine.QueryInputError, match="k="):
                idx.rank("bm25", q, k)  # a huge k used to panic in tantivy (Rust)
    with pytest.raises(engine.QueryInputError, match="depth="):
        idx.pool(q, depth=10**12)
    assert 0 < len(idx.query(prompt="a red circle", k=10_000).results) <= idx.reader.n_records  # the bound works


# ============================================================================ 4. one-line errors, never tracebacks
def _unreadable(monkeypatch, path: Path, module, name: str = "open") -> None:
    """Make ``path`` unreadable: chmod 000, and (as root, who reads anyway) the module's ``open`` refuses it."""
    os.chmod(path, 0)
    if os.geteuid() == 0:
        real = open

        def guarded(file, *a, **k):
            if os.path.realpath(os.fspath(file)) == os.path.realpath(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real(file, *a, **k)

        monkeypatch.setattr(module, name, guarded, raising=False)


def test_symlink_loop_and_unreadable_image_in_a_folder_are_rejects(tmp_path, tiny, monkeypatch):
    src = tmp_path / "src"
    world.image_folder(src, 3, nested=False)
    os.symlink("loop.jpg", src / "loop.jpg")  # a link to itself
    os.symlink("b.png", src / "a.png")
    os.symlink("a.png", src / "b.png")  # two links pointing at each other
    im, _ = world.scene(7)
    (src / "locked.png").write_bytes(world.png_bytes(im))
    _unreadable(monkeypatch, src / "locked.png", engine_images)
    try:
        s = build(src, tmp_path / "idx", tiny, settings=engine.IndexSettings(pca_sample=8, workers=0))
    finally:
        os.chmod(src / "locked.png", 0o644)
    assert s.records == 3
    by = {r["record"]: r for r in rejects(tmp_path / "idx")}
    assert set(by) == {"loop.jpg", "a.png", "b.png", "locked.png"}
    assert by["locked.png"]["reason"] == "unreadable file" and "Permission denied" in by["locked.png"]["detail"]
    assert all(r["reason"] in ("unreadable file", "missing file") for r in by.values())


def _bytes_name(folder: Path, raw: bytes) -> str:
    """Create a file whose name is the raw bytes ``raw`` (not UTF-8) and return the path as Python sees it."""
    path = os.fsencode(str(folder)) + b"/" + raw
    im, _ = world.scene(11)
    with open(path, "wb") as f:
        f.write(world.png_bytes(im))
    return os.fsdecode(path)


def test_non_utf8_names_are_rejected_by_name_and_never_reach_json(tmp_path, tiny, capsys, fast_models):
    src = tmp_path / "src"
    world.image_folder(src, 3, nested=False)
    _bytes_name(src, b"bad\xff.png")
    sub = os.fsencode(str(src)) + b"/dir\xe9"
    os.mkdir(sub)
    _bytes_name(Path(os.fsdecode(sub)), b"ok.png")
    with tarfile.open(src / "shard.tar", "w") as tf:  # a tar member with a non-UTF-8 name
        data = world.jpeg_bytes(world.scene(12)[0])
        info = tarfile.TarInfo(os.fsdecode(b"00\xfe.jpg"))
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    assert main(["index", str(src), "--out", str(tmp_path / "idx"), "--models", "tiny", "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out
    out.encode("utf-8")  # strict: no lone surrogates on stdout
    assert json.loads(out)["rejected"] == 3
    raw = (tmp_path / "idx" / "rejects.jsonl").read_bytes()
    raw.decode("utf-8")  # strict
    by = {r["record"]: r for r in rejects(tmp_path / "idx")}
    assert set(by) == {"bad\\xff.png", "dir\\xe9/ok.png", "shard.tar::00\\xfe.jpg"}
    assert {r["reason"] for r in by.values()} == {"file name is not valid UTF-8"}
    assert records(tmp_path / "idx").height == 3


def test_non_utf8_folder_names_on_the_command_line_are_one_line(tiny_index, tmp_path, capsys, fast_models):
    world.image_folder(tmp_path / "src", 2)
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/odd\xff")
    os.mkdir(odd)
    for argv, needle in [(["index", str(tmp_path / "src"), "--out", odd + "/idx", "--models", "tiny"], "index folder"),
                         (["index", odd, "--out", str(tmp_path / "i2"), "--models", "tiny"], "the source"),
                         (["query", odd, "--prompt", "x"], "the index folder"),
                         (["bench", "run", odd, "--models", "tiny"], "the benchmark folder")]:
        assert main(argv) == 2, argv
        one_line_error(capsys.readouterr().err, needle, "odd\\xff", "not valid UTF-8")
    assert os.listdir(odd) == [] and not (tmp_path / "i2").exists()


def test_non_utf8_prompt_and_image_name_on_the_command_line(tiny_index, tmp_path, capsys, fast_models):
    bad_prompt = os.fsdecode(b"a red \xff circle")  # how Python hands over argv bytes that are not UTF-8
    assert main(["query", str(tiny_index), "--prompt", bad_prompt]) == 2
    one_line_error(capsys.readouterr().err, "not valid UTF-8", "0xff")
    image = _bytes_name(tmp_path, b"q\xff.png")
    html = tmp_path / "r.html"
    assert main(["query", str(tiny_index), "--image", image, "-k", "2", "--json", "--html", str(html)]) == 0
    out = capsys.readouterr().out
    out.encode("utf-8")
    res = json.loads(out)
    assert res["query"]["image"].endswith("q\\xff.png") and len(res["results"]) == 2
    html.read_bytes().decode("utf-8")  # the report is valid UTF-8 too
    missing = os.fsdecode(os.fsencode(str(tmp_path)) + b"/gone\xfe.png")
    assert main(["query", str(tiny_index), "--image", missing]) == 2
    one_line_error(capsys.readouterr().err, "does not exist")


@pytest.mark.parametrize("kind", ["folder", "under-a-file", "fifo", "symlink", "proc"])
def test_query_html_that_cannot_be_written_gives_one_line(tiny_index, tmp_path, capsys, kind, fast_models):
    p = Path("/proc/attrib-no-such-folder/r.html") if kind == "proc" else _special(tmp_path, kind)
    assert main(["query", str(tiny_index), "--prompt", "a red circle", "-k", "2", "--json", "--html", str(p)]) == 2
    captured = capsys.readouterr()
    one_line_error(captured.err, str(p))
    if kind == "proc" and captured.out:  # refused only when written (root may "write" anywhere): result printed
        assert len(json.loads(captured.out)["results"]) == 2


def test_result_is_printed_when_only_the_html_report_fails(tiny_index, tmp_path, capsys, monkeypatch, fast_models):
    html = tmp_path / "report.html"
    real_query = engine._index.Index.query

    def query_then_block(self, *a, **k):  # the path becomes a folder while the query runs
        res = real_query(self, *a, **k)
        html.mkdir()
        return res

    monkeypatch.setattr(engine._index.Index, "query", query_then_block)
    assert main(["query", str(tiny_index), "--prompt", "a red circle", "-k", "3", "--json", "--html", str(html)]) == 2
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["results"]) == 3
    one_line_error(captured.err, str(html), "is a folder", "computed and printed, but not saved")
    # the table view is printed too
    html.rmdir()
    assert main(["query", str(tiny_index), "--prompt", "a red circle", "-k", "3", "--html", str(html)]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert lines[-1].startswith("error:") and "is a folder" in lines[-1]
    assert len(lines) > 5 and not any("Traceback" in x or x.startswith("error:") for x in lines[:-1])  # the table


def test_tune_out_and_bench_report_failures_still_print_the_result(bench, bidx, tmp_path, capsys, monkeypatch,
                                                                   fast_models):
    import eval.run
    import eval.tune

    out = tmp_path / "w.json"
    real_tune = eval.tune.tune

    def tune_then_block(*a, **k):
        res = real_tune(*a, **k)
        out.mkdir()  # the weights path becomes a folder while tune runs
        return res

    monkeypatch.setattr(eval.tune, "tune", tune_then_block)
    assert main(["tune", str(bench), "--models", "tiny", "--out", str(out), "--no-progress", "--json"]) == 2
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["written"] is False and res["scores"]["test"]["fused"] is not None and res["weights"]["features"]
    one_line_error(captured.err, str(out), "is a folder")

    rep = tmp_path / "rep"
    real_eval = eval.run.evaluate

    def evaluate_then_block(*a, **k):
        ev = real_eval(*a, **k)
        rep.write_text("now a file")
        return ev

    monkeypatch.setattr(eval.run, "evaluate", evaluate_then_block)
    assert main(["bench", "run", str(bench), "--models", "tiny", "--no-progress", "--json", "--report", str(rep)]) == 2
    captured = capsys.readouterr()
    assert "fused" in json.loads(captured.out)["metrics"]
    one_line_error(captured.err, str(rep), "not a folder")


def test_bad_output_paths_of_bench_and_tune_are_refused_before_any_work(bench, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    under = tmp_path / "afile" / "sub"
    monkeypatch.setattr("eval.bench.load_benchmark", lambda *a, **k: pytest.fail("work started"))
    for argv in (["tune", str(bench), "--models", "tiny", "--out", str(under / "w.json")],
                 ["tune", str(bench), "--models", "tiny", "--out", str(tmp_path)],
                 ["bench", "run", str(bench), "--models", "tiny", "--report", str(under)],
                 ["bench", "run", str(bench), "--models", "tiny", "--report", str(tmp_path / "afile")],
                 ["bench", "synth", str(under), "--train", "10", "--queries", "6", "--size", "32"],
                 ["bench", "synth", "/proc/attrib-no-such-folder/b", "--train", "10", "--queries", "6", "--size",
                  "32", "--no-progress"]):
        assert main(argv) == 2, argv
        one_line_error(capsys.readouterr().err)


def test_outputs_never_overwrite_an_index_or_the_commands_inputs(tiny_index, bench, tmp_path, capsys, monkeypatch):
    """A report or weights file named onto an index's own files (its manifest), into an index folder, onto the
    query image or onto a benchmark's table is refused before any work; the file is unchanged."""
    img = tmp_path / "gen.png"
    world.scene(3)[0].save(img)
    protected = [tiny_index / "manifest.json", img, bench / "corpus.parquet"]
    before = [p.read_bytes() for p in protected]
    monkeypatch.setattr(engine._index.Index, "__init__", lambda *a, **k: pytest.fail("the index was opened"))
    monkeypatch.setattr("eval.bench.load_benchmark", lambda *a, **k: pytest.fail("work started"))
    q = ["query", str(tiny_index), "--prompt", "a fox", "--html"]
    for argv, needle in (
            ([*q, str(tiny_index / "manifest.json")], "inside the index"),
            ([*q, str(tiny_index / "new.html")], "inside the index"),
            (["query", str(tiny_index), "--image", str(img), "--html", str(img)], "an input of this command"),
            (["tune", str(bench), "--models", "tiny", "--out", str(bench / "corpus.parquet")], "an input"),
            (["tune", str(bench), "--models", "tiny", "--out", str(tiny_index / "w.json")], "inside the index"),
            (["bench", "run", str(bench), "--models", "tiny", "--report", str(tiny_index / "rep")],
             "inside the index")):
        assert main(argv) == 2, argv
        one_line_error(capsys.readouterr().err, needle)
    assert [p.read_bytes() for p in protected] == before


def test_outputs_replace_only_their_own_kind_and_see_through_links(tiny_index, bench, tmp_path, capsys,
                                                                  monkeypatch):
    """A symbolic link into an index plus `..` still lands in the index; an existing training image, a weights
    file or a benchmark image is never replaced by a report or weights (a report replaces a report)."""
    (tmp_path / "lnk").mkdir()
    (tmp_path / "lnk" / "segs").symlink_to(tiny_index / "segments")
    w = tmp_path / "w.json"
    w.write_text(json.dumps(_weights_dict()))
    img = bench / "train" / sorted(p.name for p in (bench / "train").iterdir())[0]
    keep = [tiny_index / "manifest.json", w, img]
    before = [p.read_bytes() for p in keep]
    monkeypatch.setattr(engine._index.Index, "__init__", lambda *a, **k: pytest.fail("the index was opened"))
    monkeypatch.setattr("eval.bench.load_benchmark", lambda *a, **k: pytest.fail("work started"))
    q = ["query", str(tiny_index), "--prompt", "a fox"]
    for argv, needle in (
            ([*q, "--html", str(tmp_path / "lnk" / "segs" / ".." / "manifest.json")], "inside the index"),
            (["tune", str(bench), "--models", "tiny", "--out", str(tmp_path / "lnk" / "segs" / ".." / "m.json")],
             "inside the index"),
            ([*q, "--html", str(img)], "not an HTML report"),
            ([*q, "--weights", str(w), "--html", str(w)], "an input of this command"),
            (["tune", str(bench), "--models", "tiny", "--out", str(img)], "not an attrib weights file")):
        assert main(argv) == 2, argv
        one_line_error(capsys.readouterr().err, needle)
    assert [p.read_bytes() for p in keep] == before
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "bench.json").write_text(json.dumps(_weights_dict()))  # weights saved under the report's name
    assert main(["bench", "run", str(bench), "--models", "tiny", "--report", str(rep)]) == 2
    one_line_error(capsys.readouterr().err, "not a benchmark result")
    from engine.files import refuse_clobbering

    (tmp_path / "old.html").write_text("<!DOCTYPE html>\n<html>old report</html>")
    refuse_clobbering(tmp_path / "old.html", kind="html")  # a report may replace a report
    refuse_clobbering(w, kind="weights")  # and weights, weights
    (tmp_path / "empty.html").write_bytes(b"")
    refuse_clobbering(tmp_path / "empty.html", kind="html")  # an empty file (`mktemp`) may be filled


def test_bench_synth_argument_checks_are_one_line(tmp_path):
    from eval.synth import generate

    for kw, needle in [({"train": 5}, "train"), ({"queries": 2}, "queries"), ({"seed": -1}, "seed"),
                       ({"image_size": 10**6}, "image_size"), ({"train": "many"}, "train"), ({"train": 2.5}, "train"),
                       ({"image_size": True}, "image_size")]:
        with pytest.raises(engine.AttribError, match=needle):
            generate(tmp_path / "b", **{"train": 10, "queries": 6, "image_size": 32, **kw})
    assert not (tmp_path / "b").exists()


def _console_script(tmp_path: Path) -> Path:
    """A copy of the ``attrib`` console script pip writes (same code, same name), run with this interpreter."""
    script = tmp_path / "attrib"
    script.write_text("import re\nimport sys\nfrom engine.cli import main\nif __name__ == '__main__':\n"
                      "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n    sys.exit(main())\n")
    return script


def test_ctrl_c_in_the_first_half_second_is_one_line(tmp_path):
    world.image_folder(tmp_path / "src", 2)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = _console_script(tmp_path)
    # The interpreter's own start-up (site, the path finders) runs before any code of ours and answers Ctrl-C
    # with its own traceback: the moments are counted from a measured start-up, and one that still lands
    # before our first line (no frame of ours, on a loaded machine) is tried again a little later.
    startup = 0.0
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import re"], env=env, check=True)
        startup = max(startup, time.perf_counter() - t)
    argv = [sys.executable, str(script), "index", str(tmp_path / "src"), "--out", str(tmp_path / "idx"),
            "--models", "tiny", "--no-progress"]
    ours = (f'File "{ROOT / "engine"}', f'File "{ROOT / "eval"}')

    def interrupt_after(seconds: float) -> tuple[int, str]:
        p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(seconds)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=300)
        return p.returncode, err.decode("utf-8", "replace")

    for delay in (0.0, 0.03, 0.06, 0.1, 0.2, 0.3, 0.5):
        for retry in range(5):
            rc, text = interrupt_after(startup + delay + 0.05 * retry)
            before_our_code = rc != 130 and not any(o in text for o in ours)
            if not before_our_code:
                break
        assert "Traceback" not in text, (delay, text)
        assert rc == 130, (delay, rc, text)
        # CPython's own C warning when the interrupt lands inside the decimal module's initialisation (it is then
        # initialised again): the interpreter's, printed before any of our code can run
        lines = [x for x in text.splitlines() if x.strip() and "mpd_setminalloc" not in x]
        # before the command starts: the start-up line; once it has: the build's own line (resume advice), on one
        # line whatever the terminal width
        assert lines in (["interrupted: nothing half-written was left behind"],
                         ["interrupted before the first segment was committed: nothing of this build was kept; rerun "
                          "the same command to start it again"],
                         [f"interrupted: every committed segment of {tmp_path / 'idx'} is kept and nothing "
                          "half-written is visible; rerun the same command to resume the build"]), lines
        idx = tmp_path / "idx"
        if "first segment" in lines[0]:  # what it says is so: no index there
            assert not (idx / MANIFEST).exists()
        if (idx / MANIFEST).exists():  # a build that had started: what is there is a committed, resumable snapshot
            m = read_manifest(idx)
            assert not m["build"]["complete"]
            assert all((idx / s["path"]).is_dir() for s in m["segments"])
        assert not list(tmp_path.glob(".idx*"))


def test_import_engine_is_lazy():
    code = ("import sys, engine, engine.cli; heavy = [m for m in ('numpy', 'polars', 'faiss', 'torch', 'rich') "
            "if m in sys.modules]; print(','.join(heavy)); engine.Index; print('numpy' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["", "True"], out  # nothing heavy until a name is used; then it loads


# ============================================================================ 5. nothing dropped silently
def _member(tf: tarfile.TarFile, name: str, data: bytes | None = None, **kw) -> None:
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    if data is not None:
        info.size = len(data)
    tf.addfile(info, io.BytesIO(data) if data is not None else None)


def test_tar_links_devices_and_large_sidecars_are_rejects(tmp_path, tiny):
    src = tmp_path / "src"
    src.mkdir()
    jpg = world.jpeg_bytes(world.scene(3)[0])
    with tarfile.open(src / "s.tar", "w") as tf:
        _member(tf, "000.jpg", jpg)
        _member(tf, "000.txt", b"a good sample")
        _member(tf, "001.jpg", type=tarfile.SYMTYPE, linkname="000.jpg")
        _member(tf, "002.jpg", type=tarfile.LNKTYPE, linkname="000.jpg")
        _member(tf, "003.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        _member(tf, "004.jpg", type=tarfile.FIFOTYPE)
        _member(tf, "005.jpg", jpg)
        _member(tf, "005.txt", b"x" * (1024 * 1024 + 1))  # a sidecar over 1 MiB
        _member(tf, "006.jpg", world.jpeg_bytes(world.scene(4)[0]))
    s = build(src, tmp_path / "idx", tiny)
    assert records(tmp_path / "idx")["id"].to_list() == ["s.tar::000.jpg", "s.tar::006.jpg"]
    by = {r["record"]: r for r in rejects(tmp_path / "idx")}
    assert {k: v["reason"] for k, v in by.items()} == {
        "s.tar::001.jpg": "unsupported tar member", "s.tar::002.jpg": "unsupported tar member",
        "s.tar::003.jpg": "unsupported tar member", "s.tar::004.jpg": "unsupported tar member",
        "s.tar::005.jpg": "sidecar too large"}
    assert "symbolic link to 000.jpg" in by["s.tar::001.jpg"]["detail"]
    assert "hard link to 000.jpg" in by["s.tar::002.jpg"]["detail"] and "device" in by["s.tar::003.jpg"]["detail"]
    assert s.rejected == 5 and s.reject_reasons == {"unsupported tar member": 4, "sidecar too large": 1}


def test_unreadable_or_large_sidecars_and_unreadable_subfolders_are_rejects(tmp_path, tiny, monkeypatch):
    src = tmp_path / "src"
    world.image_folder(src, 4, nested=False)
    (src / "img0001.txt").unlink()
    (src / "img0001.txt").mkdir()  # a "sidecar" that is a folder
    (src / "img0002.txt").write_text("y" * (1024 * 1024 + 1))  # over 1 MiB
    (src / "img0004.png").write_bytes(world.png_bytes(world.scene(5)[0]))
    os.mkfifo(src / "img0004.txt")  # a FIFO sidecar: opening it would wait for a writer forever
    _unreadable(monkeypatch, src / "img0003.txt", engine._ingest)
    locked = src / "locked"
    world.image_folder(locked, 2, nested=False)
    os.chmod(locked, 0)
    if os.geteuid() == 0:  # root lists any folder: make os.walk's listing fail as it does for other users
        real = os.scandir

        def scandir(path="."):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(locked))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        s = build(src, tmp_path / "idx", tiny, settings=engine.IndexSettings(pca_sample=8, workers=0))
    finally:
        os.chmod(locked, 0o755)
        os.chmod(src / "img0003.txt", 0o644)
    by = {r["record"]: r for r in rejects(tmp_path / "idx")}
    assert {k: v["reason"] for k, v in by.items()} == {
        "img0001.jpg": "unreadable sidecar", "img0002.png": "sidecar too large", "img0003.jpg": "unreadable sidecar",
        "img0004.png": "unreadable sidecar", "locked/": "unreadable folder"}
    assert "Permission denied" in by["locked/"]["detail"] and "Permission denied" in by["img0003.jpg"]["detail"]
    assert records(tmp_path / "idx")["id"].to_list() == ["img0000.png"] and s.rejected == 5


def test_a_table_column_named_like_the_engines_own_is_renamed_and_reported(tmp_path, tiny, capsys, fast_models):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(world.png_bytes(world.scene(i)[0]))
        rows.append({"id": f"r{i}", "image": f"imgs/{i}.png", "caption": f"picture {i}", "row": 100 + i,
                     "extra_row": f"mine {i}"})
    pl.DataFrame(rows).write_parquet(tmp_path / "t.parquet")
    s = build(tmp_path / "t.parquet", tmp_path / "idx", tiny)
    assert s.renamed_columns == {"row": "extra_row_2"}
    df = records(tmp_path / "idx")
    assert df["row"].to_list() == [0, 1, 2]  # the engine's own
    assert df["extra_row_2"].to_list() == [100, 101, 102] and df["extra_row"].to_list() == ["mine 0", "mine 1",
                                                                                               "mine 2"]
    assert main(["index", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "idx2"), "--models", "tiny",
                 "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["renamed_columns"] == {"row": "extra_row_2"}
    assert main(["index", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "idx3"), "--models", "tiny",
                 "--no-progress"]) == 0
    assert "row -> extra_row_2" in capsys.readouterr().err


def test_a_corrupt_or_truncated_shard_in_a_folder_is_one_reject(tmp_path, tiny):
    src = tmp_path / "src"
    src.mkdir()
    world.tar_shard(src / "a-good.tar", 3)
    world.tar_shard(tmp_path / "full.tar", 4, start=10)
    with tarfile.open(tmp_path / "full.tar") as tf:
        third = tf.getmember("000000012.jpg")
    data = (tmp_path / "full.tar").read_bytes()
    (src / "b-truncated.tar").write_bytes(data[: third.offset_data + third.size // 2])  # cut in the third image
    (src / "c-corrupt.tar").write_bytes(b"this is not a tar archive at all" * 40)
    world.tar_shard(src / "d-good.tar", 2, start=20)
    s = build(src, tmp_path / "idx", tiny)
    by = {r["record"]: r for r in rejects(tmp_path / "idx")}
    assert {k: v["reason"] for k, v in by.items()} == {"b-truncated.tar": "unreadable tar shard",
                                                       "c-corrupt.tar": "unreadable tar shard"}
    assert "the rest of the shard" in by["b-truncated.tar"]["detail"]
    ids = records(tmp_path / "idx")["id"].to_list()
    assert [i for i in ids if i.startswith(("a-", "d-"))] == [
        "a-good.tar::000000000.jpg", "a-good.tar::000000001.jpg", "a-good.tar::000000002.jpg",
        "d-good.tar::000000020.jpg", "d-good.tar::000000021.jpg"]
    assert [i for i in ids if i.startswith("b-")] == ["b-truncated.tar::000000010.jpg",
                                                      "b-truncated.tar::000000011.jpg"]
    assert s.rejected == 2 and "000000012" in by["b-truncated.tar"]["detail"]


def test_a_null_split_is_reported_by_load_benchmark(tmp_path):
    from eval.bench import BenchmarkError, load_benchmark

    pl.DataFrame({"id": ["a", "b"], "image": [None, None], "caption": ["x", "y"]}).write_parquet(
        tmp_path / "corpus.parquet")
    pl.DataFrame({"query_id": ["q1", "q2", "q3"], "image": [None] * 3, "prompt": ["x", "y", "z"],
                  "relevant": [["a"], ["b"], []], "kind": ["k"] * 3, "split": ["tune", None, "test"]},
                 schema={"query_id": pl.String, "image": pl.String, "prompt": pl.String, "relevant": pl.List(pl.String),
                         "kind": pl.String, "split": pl.String}).write_parquet(tmp_path / "queries.parquet")
    with pytest.raises(BenchmarkError, match=r"split values \['null'\] in 1 rows \(e.g. q2\)"):
        load_benchmark(tmp_path)


def test_json_output_with_undecodable_text_is_valid_utf8(capsys):
    from engine.cli import json_text, print_json

    obj = {os.fsdecode(b"k\xff"): [os.fsdecode(b"/data/\xe9t\xe9.png"), "\ud800 lone", "ok ☕"], "n": math.pi}
    text = json_text(obj)
    text.encode("utf-8")
    assert json.loads(text) == {"k\\xff": ["/data/\\xe9t\\xe9.png", "\\ud800 lone", "ok ☕"], "n": math.pi}
    print_json(obj)
    assert json.loads(capsys.readouterr().out) == json.loads(text)


def test_a_ctrl_c_dropped_in_a_finaliser_prints_no_traceback(capsys, monkeypatch):
    """Python drops an exception raised in a finaliser and prints it ("Exception ignored in ... Traceback"): the
    CLI's hook keeps quiet about a Ctrl-C it has remembered (it is raised again), and passes anything else on."""
    from engine import _startup

    class Finaliser:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def __del__(self):
            raise self.exc

    monkeypatch.setattr(sys, "unraisablehook", _startup.quiet_unraisable)
    monkeypatch.setattr(_startup, "_pending", True)
    monkeypatch.setattr(_startup, "_dropped", False)  # restored afterwards: nothing leaks into later tests
    Finaliser(KeyboardInterrupt())
    assert capsys.readouterr().err == ""
    Finaliser(ValueError("a real problem"))
    assert "a real problem" in capsys.readouterr().err
    monkeypatch.setattr(_startup, "_pending", False)  # a KeyboardInterrupt the handler did not raise: shown
    Finaliser(KeyboardInterrupt())
    assert "KeyboardInterrupt" in capsys.readouterr().err


def test_an_import_lock_a_dropped_ctrl_c_stranded_is_given_back(monkeypatch):
    """importlib's weakref callback takes the global import lock and gives it back in a ``finally`` that begins
    after the call: a Ctrl-C raised as the call returns strands the lock, and every later import waits for ever (a
    CI run saw a build hang so, its decode threads importing an image plugin). Reproduced here to the opcode: the
    KeyboardInterrupt is raised on the instruction right after the lock is taken. The CLI's hook gives it back,
    and so does the end of an interrupted command (for a lock an interrupt stranded in the main thread)."""
    import _imp
    import importlib._bootstrap as bootstrap
    import types

    from engine import _startup

    cb_code = next(c for c in bootstrap._get_module_lock.__code__.co_consts if getattr(c, "co_name", "") == "cb")
    cb = types.FunctionType(cb_code, bootstrap.__dict__, "cb", ("no-such-module",))
    taken = []

    def tracer(frame, event, arg):
        if frame.f_code is not cb_code:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode" and _imp.lock_held() and not taken:
            taken.append(frame.f_lasti)
            raise KeyboardInterrupt  # the Ctrl-C, as the acquiring call returns
        return tracer

    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            cb(None)
    finally:
        sys.settrace(None)
    assert taken and _imp.lock_held()  # stranded: nothing would ever give it back
    monkeypatch.setattr(_startup, "_pending", True)
    monkeypatch.setattr(_startup, "_dropped", False)
    _startup.quiet_unraisable(types.SimpleNamespace(exc_value=caught.value, exc_traceback=caught.value.__traceback__,
                                                    exc_type=KeyboardInterrupt, err_msg=None, object=cb))
    assert not _imp.lock_held()
    _startup.quiet_unraisable(types.SimpleNamespace(exc_value=caught.value, exc_traceback=caught.value.__traceback__,
                                                    exc_type=KeyboardInterrupt, err_msg=None, object=cb))
    assert not _imp.lock_held()  # a second report gives back nothing it does not hold
    _imp.acquire_lock()
    _imp.acquire_lock()  # stranded twice in the main thread
    _startup.release_import_locks()
    assert not _imp.lock_held()


def test_a_ctrl_c_dropped_in_a_finaliser_ends_the_command_as_interrupted(tiny_index, tmp_path):
    """A Ctrl-C that lands while a finaliser runs during `attrib info` (Python drops the KeyboardInterrupt it
    raises there) is not lost: the command ends with the one-line message and exit code 130, no traceback."""
    script = tmp_path / "dropped.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, time
        import engine._info as info
        from engine.cli import main

        real = info.index_info

        class Finaliser:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)  # the Ctrl-C arrives while __del__ runs
                for _ in range(1000):
                    time.sleep(0)  # the handler raises KeyboardInterrupt here, inside the finaliser

        def index_info(path, *a, **k):
            Finaliser()  # dropped at once: its __del__ runs
            return real(path, *a, **k)

        info.index_info = index_info
        sys.exit(main(["info", sys.argv[1], "--json"]))
    """))
    p = subprocess.run([sys.executable, str(script), str(tiny_index)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 130, p.stderr
    assert "interrupted" in p.stderr and "Traceback" not in p.stderr and "Exception ignored" not in p.stderr


def test_an_interrupt_left_over_from_an_earlier_in_process_run_does_not_end_the_next_one(tiny_index, monkeypatch,
                                                                                         capsys):
    from engine import _startup
    from engine.cli import main

    monkeypatch.setattr(_startup, "_pending", True)
    monkeypatch.setattr(_startup, "_dropped", True)
    assert main(["info", str(tiny_index), "--json"]) == 0
    assert "interrupted" not in capsys.readouterr().err
