"""Tests for eval.importer: the memorized-prompt CSV importer (format, splits, distractors, errors, fetching)."""
from __future__ import annotations

import csv
import http.server
import io
import json
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

import engine
from eval import importer
from eval.bench import BenchmarkError, load_benchmark
from eval.importer import import_memorized

MEM_HEADER = ["", "Caption", "URL", "type", "mean_sscd", "max_sscd", "Index"]
UNMEM_HEADER = ["", "Caption", "URL", "Index"]

# Captions that exercise the CSV dialect: ';' inside quotes, doubled quotes, HTML, emoji, non-ASCII.
TRICKY = {
    101: ("The No Limits Business Woman Podcast", "VM", "0.84", "0.85"),
    102: ("Full body U-Zip; main opening on front of bag", "TM", "0.19", "0.21"),
    103: ('Watch: Passion Pit\'s New Video, "Lifted Up (1985)"', "VM", "0.87", "0.87"),
    104: ("Sony Won't Release <i>The Interview</i> on VOD", "VM", "0.92", "0.93"),
    105: ("Café crème ☕ 🎉 at Zürich – «Straße»", "TM", "", ""),
    106: ("Talks on the Precepts and Buddhist Ethics", "TM", "0.20", "0.22"),
}


def _write(path: Path, header: list[str], rows: list[list]) -> Path:
    """Write like pandas' to_csv(sep=';'): unnamed row-number column, minimal quoting, doubled quotes."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=";", quotechar='"', doublequote=True, lineterminator="\n")
        w.writerow(header)
        for i, r in enumerate(rows):
            w.writerow([i, *r])
    return path


def _tricky_csv(path: Path) -> Path:
    rows = [[cap, f"http://img.example/{idx}.jpg", kind, mean, mx, idx]
            for idx, (cap, kind, mean, mx) in TRICKY.items()]
    rows.insert(3, ["A different caption for an index seen before", "http://img.example/dup.jpg", "TM", "0.1",
                    "0.1", 102])  # row 3: duplicate Index
    rows.append(["   ", "http://img.example/empty.jpg", "VM", "0.9", "0.9", 107])  # row 7: empty caption
    rows.append(["No index here", "http://img.example/none.jpg", "TM", "0.2", "0.2", ""])  # row 8: missing Index
    return _write(path, MEM_HEADER, rows)


def _many_csv(path: Path, n_vm: int, n_tm: int, start: int = 1000) -> Path:
    rows = [[f"memorized caption {i}", f"http://img.example/{start + i}.jpg", "VM" if i < n_vm else "TM",
             "0.5", "0.6", start + i] for i in range(n_vm + n_tm)]
    return _write(path, MEM_HEADER, rows)


def _unmem_csv(path: Path, n: int, start: int = 5000, extra: list[list] | None = None) -> Path:
    rows = [[f"plain LAION caption number {i} 📷", f"http://img.example/u{i}.jpg", start + i] for i in range(n)]
    return _write(path, UNMEM_HEADER, rows + (extra or []))


def test_import_tricky_csv(tmp_path):
    src = _tricky_csv(tmp_path / "memorized.csv")
    raw = src.read_text(encoding="utf-8")
    assert '"Full body U-Zip; main opening on front of bag"' in raw and '""Lifted Up (1985)""' in raw
    out = tmp_path / "bench"
    summary = import_memorized(src, out)

    bench = load_benchmark(out)
    corpus, queries = bench.corpus, bench.queries
    assert corpus["id"].to_list() == [f"laion-{i}" for i in TRICKY]
    assert corpus["caption"].to_list() == [c for c, *_ in TRICKY.values()]
    assert corpus["image"].null_count() == corpus.height
    assert corpus["url"].to_list() == [f"http://img.example/{i}.jpg" for i in TRICKY]
    assert corpus["memorization"].to_list() == [k for _, k, *_ in TRICKY.values()]
    assert corpus["laion_index"].to_list() == list(TRICKY)
    assert corpus["mean_sscd"].to_list() == [0.84, 0.19, 0.87, 0.92, None, 0.20]
    assert corpus["max_sscd"].to_list() == [0.85, 0.21, 0.87, 0.93, None, 0.22]
    # The duplicate Index kept its first caption.
    assert (corpus.filter(pl.col("id") == "laion-102")["caption"].item()
            == "Full body U-Zip; main opening on front of bag")

    assert queries["query_id"].to_list() == [f"q-laion-{i}" for i in TRICKY]
    assert queries["prompt"].to_list() == [c for c, *_ in TRICKY.values()]
    assert queries["relevant"].to_list() == [[f"laion-{i}"] for i in TRICKY]
    assert queries["kind"].to_list() == ["VM", "TM", "VM", "VM", "TM", "TM"]
    assert queries["image"].null_count() == queries.height
    assert set(queries["prompt_kind"].to_list()) == {"verbatim"}
    assert set(queries["split"].to_list()) <= {"tune", "test"}

    assert summary["corpus"]["records"] == 6
    assert summary["corpus"]["by_memorization"] == {"VM": 3, "TM": 3, "none": 0}
    assert summary["queries"]["by_kind"] == {"VM": 3, "TM": 3}
    for kind in ("VM", "TM"):
        assert sorted(summary["queries"]["by_kind_split"][kind].values()) == [1, 2]
    assert summary["duplicates"]["count"] == 1
    dup = summary["duplicates"]["rows"][0]
    assert (dup["row"], dup["index"], dup["file"]) == ("3", 102, "memorized.csv")
    assert summary["skipped"]["count"] == 2
    assert [(s["row"], s["reason"]) for s in summary["skipped"]["rows"]] == [
        ("7", "empty caption"), ("8", "missing Index")]
    assert summary["rows"]["memorized"] == {"data_rows": 9, "skipped": 2, "duplicates": 1, "kept": 6}
    assert summary["sources"]["memorized"]["name"] == "memorized.csv"
    assert summary["sources"]["unmemorized"] is None
    assert summary["fetch"] == {"enabled": False, "fetched": 0, "failed": 0}
    assert json.loads((out / "import.json").read_text(encoding="utf-8")) == summary
    assert not (out / "fetch_failures.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary sibling left


def test_splits_balanced_within_kind_and_deterministic(tmp_path):
    src = _many_csv(tmp_path / "m.csv", n_vm=31, n_tm=50)
    a = import_memorized(src, tmp_path / "a", seed=7)
    b = import_memorized(src, tmp_path / "b", seed=7)
    c = import_memorized(src, tmp_path / "c", seed=8)
    ba, bb, bc = (load_benchmark(tmp_path / n) for n in "abc")

    assert ba.queries.equals(bb.queries) and ba.corpus.equals(bb.corpus)
    assert ba.content_hash == bb.content_hash
    assert a == b
    assert ba.queries["split"].to_list() != bc.queries["split"].to_list()  # the seed matters
    for summary in (a, c):
        assert summary["queries"]["by_kind_split"]["TM"] == {"tune": 25, "test": 25}
        vm = summary["queries"]["by_kind_split"]["VM"]
        assert sorted(vm.values()) == [15, 16]
    counts = ba.queries.group_by("kind", "split").len().sort("kind", "split")
    assert dict(zip(zip(counts["kind"], counts["split"]), counts["len"])) == {
        ("TM", "test"): 25, ("TM", "tune"): 25,
        ("VM", "test"): a["queries"]["by_kind_split"]["VM"]["test"],
        ("VM", "tune"): a["queries"]["by_kind_split"]["VM"]["tune"]}

    # The split depends on the set of rows, not on their order in the file.
    with open(src, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter=";"))
    _write(tmp_path / "rev.csv", MEM_HEADER, [r[1:] for r in reversed(rows[1:])])
    import_memorized(tmp_path / "rev.csv", tmp_path / "rev", seed=7)
    rev = load_benchmark(tmp_path / "rev").queries
    assert dict(zip(rev["query_id"], rev["split"])) == dict(zip(ba.queries["query_id"], ba.queries["split"]))


def test_unmemorized_gives_distractors_and_novel_queries(tmp_path):
    mem = _many_csv(tmp_path / "m.csv", n_vm=4, n_tm=6)
    collide = [["a memorized index again", "http://img.example/c.jpg", 1003]]  # Index of a memorized row
    unmem = _unmem_csv(tmp_path / "u.csv", 20, extra=collide)
    s = import_memorized(mem, tmp_path / "bench", unmemorized=unmem, seed=3)
    bench = load_benchmark(tmp_path / "bench")
    corpus, queries = bench.corpus, bench.queries

    distractors = corpus.filter(pl.col("memorization") == "none")
    novel = queries.filter(pl.col("kind") == "novel")
    assert distractors.height == 10 and novel.height == 10
    assert corpus.height == 20
    assert distractors["image"].null_count() == 10
    assert distractors["mean_sscd"].null_count() == 10
    assert all(x.startswith("laion-50") for x in distractors["id"].to_list())
    assert novel["relevant"].to_list() == [[]] * 10
    assert set(novel["prompt_kind"].to_list()) == {"verbatim"}
    corpus_captions = set(corpus["caption"].to_list())
    assert not corpus_captions & set(novel["prompt"].to_list())
    # Together the two halves are exactly the unmemorized rows, and no novel record is in the corpus.
    novel_idx = {int(q.removeprefix("q-laion-")) for q in novel["query_id"].to_list()}
    dis_idx = set(distractors["laion_index"].to_list())
    assert novel_idx.isdisjoint(dis_idx)
    assert novel_idx | dis_idx == set(range(5000, 5020))
    assert not {f"laion-{i}" for i in novel_idx} & set(corpus["id"].to_list())
    assert sorted(novel.group_by("split").len()["len"].to_list()) == [5, 5]
    # The colliding Index stays the memorized record's.
    assert corpus.filter(pl.col("id") == "laion-1003")["caption"].item() == "memorized caption 3"
    assert s["duplicates"]["count"] == 1 and s["duplicates"]["rows"][0]["file"] == "u.csv"
    assert s["rows"]["unmemorized"] == {"data_rows": 21, "skipped": 0, "duplicates": 1, "distractors": 10, "novel": 10}
    assert s["queries"]["by_kind"] == {"VM": 4, "TM": 6, "novel": 10}
    assert s["corpus"]["by_memorization"] == {"VM": 4, "TM": 6, "none": 10}

    import_memorized(mem, tmp_path / "again", unmemorized=unmem, seed=3)
    assert load_benchmark(tmp_path / "again").content_hash == bench.content_hash


def test_novel_caption_equal_to_a_corpus_caption_is_dropped(tmp_path):
    mem = _many_csv(tmp_path / "m.csv", n_vm=2, n_tm=2)
    # Every unmemorized row repeats a memorized caption, so whichever half becomes novel clashes with the corpus.
    extra = [[f"memorized caption {i % 4}", f"http://img.example/x{i}.jpg", 9000 + i] for i in range(6)]
    unmem = _write(tmp_path / "u.csv", UNMEM_HEADER, extra)
    s = import_memorized(mem, tmp_path / "bench", unmemorized=unmem)
    queries = load_benchmark(tmp_path / "bench").queries
    assert queries.filter(pl.col("kind") == "novel").height == 0
    assert s["novel_dropped"]["count"] == 3
    assert {r["reason"] for r in s["novel_dropped"]["rows"]} == {"caption is also a corpus caption"}


def _product_csv(path: Path, n: int = 16) -> Path:
    """Memorized captions with LAION-like product words, so that rewordings have something to work on."""
    items = ["Throw Pillow", "Area Rug", "Canvas Art Print", "iPhone Case", "Backpack", "Wall Clock"]
    names = ["Red Mums", "Tiger Wisdom", "Sunset Forest", "Lilah Gray", "Blue Ocean Waves", "Golden Echoes",
             "Quiet Comfort", "Royal Purple"]
    rows = [[f"{names[i % len(names)]} {i} - {items[i % len(items)]} by Andover Mills", f"http://img.example/{i}.jpg",
             "VM" if i % 3 == 0 else "TM", "0.5", "0.6", 7000 + i] for i in range(n)]
    return _write(path, MEM_HEADER, rows)


def test_reword_makes_rule_kinds_in_the_caption_split_and_reports_bm25_losses(tmp_path):
    from eval.reword import RULES

    mem, unmem = _product_csv(tmp_path / "m.csv"), _unmem_csv(tmp_path / "u.csv", 8)
    s = import_memorized(mem, tmp_path / "rw", unmemorized=unmem, reword=3, seed=4)
    b = load_benchmark(tmp_path / "rw")
    q = b.queries
    sourced = q.filter(pl.col("relevant").list.len() > 0)
    assert sourced.height == 16 * 3 and q.filter(pl.col("kind") == "novel").height == 4  # one per novel caption
    assert set(sourced["kind"].to_list()) <= set(RULES) and set(sourced["prompt_kind"].to_list()) == {"reworded"}
    assert sourced["kind"].to_list() == sourced["rule"].to_list()
    assert set(q.filter(pl.col("kind") == "novel")["rule"].to_list()) <= set(RULES)
    assert set(sourced["memorization"].to_list()) == {"VM", "TM"}
    cap = dict(zip(b.corpus["id"].to_list(), b.corpus["caption"].to_list()))
    for row in sourced.iter_rows(named=True):
        assert row["prompt"] != cap[row["relevant"][0]]
        assert row["query_id"].startswith(f"q-laion-{row['laion_index']}-r")
    # the three rewordings of a caption use three rules and share the caption's split
    per_caption = sourced.group_by("laion_index").agg(pl.col("kind").n_unique(), pl.col("split").n_unique())
    assert per_caption["kind"].to_list() == [3] * 16 and per_caption["split"].to_list() == [1] * 16
    assert s["reword"] == 3 and s["queries"]["total"] == q.height
    assert list(s["queries"]["by_kind"])[:3] == [r for r in RULES if r in set(sourced["kind"].to_list())][:3]

    losses = json.loads((tmp_path / "rw" / "bm25_losses.json").read_text(encoding="utf-8"))
    assert set(losses) == set(sourced["kind"].to_list())
    for rule, d in losses.items():
        n = sourced.filter(pl.col("kind") == rule).height
        assert d["queries"] == n and d["recall@1"] == round(d["hits_at_1"] / n, 4)
        assert s["bm25_by_rule"][rule] == {"queries": n, "recall@1": d["recall@1"], "not_found": d["not_found"]}
        for m in d["misses"]:
            assert m["expected"] in cap.values() and m["rank"] != 1

    # deterministic; --split-seed keeps the corpus and the splits while the rewordings change
    import_memorized(mem, tmp_path / "rw2", unmemorized=unmem, reword=3, seed=4)
    assert load_benchmark(tmp_path / "rw2").content_hash == b.content_hash
    import_memorized(mem, tmp_path / "rw5", unmemorized=unmem, reword=3, seed=5, split_seed=4)
    b5 = load_benchmark(tmp_path / "rw5")
    assert b5.corpus.equals(b.corpus)
    assert b5.queries["split"].to_list() == q["split"].to_list()
    assert b5.queries["prompt"].to_list() != q["prompt"].to_list()
    # the verbatim import of the same seed has the same captions in the same splits
    import_memorized(mem, tmp_path / "plain", unmemorized=unmem, seed=4)
    plain = load_benchmark(tmp_path / "plain").queries
    split_of = dict(zip(plain["laion_index"].to_list(), plain["split"].to_list()))
    assert all(split_of[i] == sp for i, sp in zip(q["laion_index"].to_list(), q["split"].to_list()))
    assert plain["rule"].null_count() == plain.height and not (tmp_path / "plain" / "bm25_losses.json").exists()


def test_reword_from_the_command_line(tmp_path, capsys):
    from engine.cli import main

    mem = _product_csv(tmp_path / "m.csv", 8)
    assert main(["bench", "import-memorized", str(mem), "--out", str(tmp_path / "rw"), "--reword", "2",
                 "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "where BM25 loses, per rewording rule" in err and "recall@1" in err
    assert main(["bench", "import-memorized", str(mem), "--out", str(tmp_path / "x"), "--reword", "-1"]) == 2
    assert "--reword" in capsys.readouterr().err
    with pytest.raises(engine.AttribError, match="reword must be at most 64"):
        import_memorized(mem, tmp_path / "y", reword=65)
    with pytest.raises(engine.AttribError, match="split_seed must be an integer >= 0"):
        import_memorized(mem, tmp_path / "z", split_seed=-1)


def test_bad_inputs_give_clear_errors(tmp_path):
    good = _tricky_csv(tmp_path / "good.csv")

    with pytest.raises(engine.SourceError, match="does not exist"):
        import_memorized(tmp_path / "nope.csv", tmp_path / "o1")

    bad_cols = tmp_path / "cols.csv"
    bad_cols.write_text(";Caption;Link;kind;Index\n0;a cat;http://x/1.jpg;VM;1\n", encoding="utf-8")
    with pytest.raises(engine.SourceError) as e:
        import_memorized(bad_cols, tmp_path / "o2")
    msg = str(e.value)
    assert "URL" in msg and "type" in msg and "'Link'" in msg and "'kind'" in msg

    comma = tmp_path / "comma.csv"
    comma.write_text(",Caption,URL,type,mean_sscd,max_sscd,Index\n0,a,b,VM,1,1,1\n", encoding="utf-8")
    with pytest.raises(engine.SourceError, match="Caption,URL,type"):
        import_memorized(comma, tmp_path / "o3")

    unknown = _write(tmp_path / "unknown.csv", MEM_HEADER, [["a cat", "http://x/1.jpg", "VM", "1", "1", 1],
                                                             ["a dog", "http://x/2.jpg", "XM", "1", "1", 2]])
    with pytest.raises(engine.SourceError, match=r"unknown type value\(s\) 'XM' \(rows 1\); valid values: VM, TM"):
        import_memorized(unknown, tmp_path / "o4")

    bad_score = _write(tmp_path / "score.csv", MEM_HEADER, [["a cat", "http://x/1.jpg", "VM", "high", "1", 1]])
    with pytest.raises(engine.SourceError, match="'mean_sscd' has the value 'high'"):
        import_memorized(bad_score, tmp_path / "o5")

    unmem_cols = tmp_path / "ucols.csv"
    unmem_cols.write_text(";Caption;URL\n0;a;b\n", encoding="utf-8")
    with pytest.raises(engine.SourceError, match="Index"):
        import_memorized(good, tmp_path / "o6", unmemorized=unmem_cols)

    with pytest.raises(engine.AttribError, match="timeout"):
        import_memorized(good, tmp_path / "o7", timeout=0)

    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))

    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(BenchmarkError, match="not empty; pass overwrite=True"):
        import_memorized(good, out)
    assert (out / "keep.txt").read_text() == "precious"
    with pytest.raises(BenchmarkError, match="not written by `attrib bench import-memorized`"):
        import_memorized(good, out, overwrite=True)  # --overwrite replaces only what the importer wrote
    assert (out / "keep.txt").read_text() == "precious"
    out = tmp_path / "imported"
    import_memorized(good, out)
    (out / "stale.txt").write_text("left by an older import, or a user's")
    with pytest.raises(BenchmarkError, match=r"also holds .*stale\.txt.*move it out first"):
        import_memorized(good, out, overwrite=True)  # it would be deleted with the folder
    (out / "stale.txt").unlink()
    s = import_memorized(good, out, overwrite=True)
    assert load_benchmark(out).corpus.height == s["corpus"]["records"] == 6
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------------------------------------- fetching
def _png_bytes() -> bytes:
    im = Image.new("RGBA", (40, 30), (200, 30, 30, 255))
    im.paste((20, 40, 200, 128), (0, 0, 20, 30))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def server():
    png = _png_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/slow.jpg":  # answers nothing for longer than the client waits
                time.sleep(3)
                return
            files = {"/cat.png": (png, "image/png"), "/notes.txt": (b"not an image at all\n", "text/plain")}
            if self.path not in files:
                self.send_error(404, "Not Found")
                return
            body, ctype = files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    for v in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(v, raising=False)


def test_fetch_local_server_and_unreachable(tmp_path, server, no_proxy):
    urls = {1: f"{server}/cat.png", 2: f"{server}/notes.txt", 3: "http://127.0.0.1:9/x.jpg",
            4: f"{server}/missing.jpg", 5: f"{server}/slow.jpg", 6: "ftp://127.0.0.1/y.jpg"}
    rows = [[f"caption {i}", u, "VM" if i % 2 else "TM", "0.5", "0.5", i] for i, u in urls.items()]
    src = _write(tmp_path / "m.csv", MEM_HEADER, rows)
    out = tmp_path / "bench"
    t0 = time.monotonic()
    s = import_memorized(src, out, fetch=True, timeout=0.5)
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0

    bench = load_benchmark(out)  # checks that every image path exists
    images = dict(zip(bench.corpus["id"], bench.corpus["image"]))
    assert images == {"laion-1": "images/laion-1.jpg", "laion-2": None, "laion-3": None, "laion-4": None,
                      "laion-5": None, "laion-6": None}
    with Image.open(out / "images" / "laion-1.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (40, 30))
        r, g, b = im.getpixel((30, 15))
        assert r > 170 and g < 70 and b < 70
        r, g, b = im.getpixel((5, 15))  # half-transparent blue over white
        assert b > 200 and r > 100
    assert sorted(p.name for p in (out / "images").iterdir()) == ["laion-1.jpg"]

    lines = [json.loads(x) for x in (out / "fetch_failures.jsonl").read_text(encoding="utf-8").splitlines()]
    reasons = {f["id"]: f["reason"] for f in lines}
    assert {f["id"]: f["url"] for f in lines} == {f"laion-{i}": urls[i] for i in (2, 3, 4, 5, 6)}
    assert "not an image" in reasons["laion-2"] and "text/plain" in reasons["laion-2"]
    assert "refused" in reasons["laion-3"].lower()
    assert reasons["laion-4"].startswith("HTTP 404")
    assert "timed out" in reasons["laion-5"]
    assert "unsupported URL scheme 'ftp'" == reasons["laion-6"]
    assert (s["fetch"]["enabled"], s["fetch"]["fetched"], s["fetch"]["failed"]) == (True, 1, 5)
    assert s["fetch"]["not_attempted"] == 0 and s["fetch"]["deadline_s"] == pytest.approx(0.5 * 4 + 6 * 0.05)
    assert json.loads((out / "import.json").read_text(encoding="utf-8"))["fetch"] == s["fetch"]


def _timed_fetch_import(tmp_path, rows, timeout: float, release: threading.Event) -> tuple[dict, float]:
    """Import ``rows`` with fetching on; the stalled fake downloads are released afterwards, whatever happens."""
    src = _write(tmp_path / "m.csv", MEM_HEADER, rows)
    try:
        t0 = time.monotonic()
        s = import_memorized(src, tmp_path / "bench", fetch=True, timeout=timeout)
        return s, time.monotonic() - t0
    finally:
        release.set()


def test_fetch_overall_deadline_reports_the_rest(tmp_path, monkeypatch):
    release = threading.Event()
    calls = []

    def hang(url, timeout):  # a fetch that ignores its timeout, like a stuck DNS lookup
        calls.append(url)
        release.wait(30)
        raise importer._FetchFailure("released")

    monkeypatch.setattr(importer, "_fetch_one", hang)
    monkeypatch.setattr(importer, "FETCH_GRACE_S", 100.0)  # the per-URL watchdog stays out of the way
    rows = [[f"caption {i}", f"http://img.example/{i}.jpg", "TM", "0.1", "0.1", i] for i in range(12)]
    s, elapsed = _timed_fetch_import(tmp_path, rows, 0.1, release)
    deadline = 0.1 * 4 + 12 * 0.05
    assert s["fetch"]["deadline_s"] == pytest.approx(deadline)
    assert deadline <= elapsed < deadline + 1.5
    assert (s["fetch"]["fetched"], s["fetch"]["failed"]) == (0, 12)
    assert (s["fetch"]["unfinished"], s["fetch"]["not_attempted"]) == (8, 4)
    assert len(calls) == 8
    lines = [json.loads(x) for x in (tmp_path / "bench" / "fetch_failures.jsonl").read_text().splitlines()]
    assert sorted(f["reason"] for f in lines) == [importer.NOT_ATTEMPTED] * 4 + [importer.UNFINISHED] * 8
    assert load_benchmark(tmp_path / "bench").corpus["image"].null_count() == 12


def test_fetch_watchdog_gives_up_stalled_urls_and_keeps_going(tmp_path, monkeypatch):
    release = threading.Event()
    calls = []

    def fetch(url, timeout):  # odd URLs stall (like a dropped DNS query), even ones fail at once
        calls.append(url)
        if url.endswith(("1.jpg", "3.jpg", "5.jpg", "7.jpg", "9.jpg")):
            release.wait(30)
        raise importer._FetchFailure("HTTP 404 Not Found")

    monkeypatch.setattr(importer, "_fetch_one", fetch)
    monkeypatch.setattr(importer, "FETCH_GRACE_S", 0.1)
    rows = [[f"caption {i}", f"http://img.example/{i}.jpg", "VM", "0.9", "0.9", i] for i in range(20)]
    s, elapsed = _timed_fetch_import(tmp_path, rows, 0.2, release)
    assert elapsed < 0.2 * 4 + 20 * 0.05  # done before the overall deadline
    assert len(calls) == 20
    f = s["fetch"]
    assert (f["fetched"], f["failed"], f["stalled"], f["unfinished"], f["not_attempted"]) == (0, 20, 10, 0, 0)
    lines = [json.loads(x) for x in (tmp_path / "bench" / "fetch_failures.jsonl").read_text().splitlines()]
    reasons = {x["id"]: x["reason"] for x in lines}
    assert all(reasons[f"laion-{i}"] == "HTTP 404 Not Found" for i in range(0, 20, 2))
    assert all(reasons[f"laion-{i}"].startswith("timed out: no result after 0.3s") for i in range(1, 20, 2))
