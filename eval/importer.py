"""Import the public memorization lists (memorized / unmemorized LAION prompts) as a benchmark folder.

Input: a semicolon-separated CSV in the format of ``memorized_laion_prompts.csv`` (an unnamed row-number column,
then ``Caption;URL;type;mean_sscd;max_sscd;Index``; CSV quoting with doubled quotes) and, optionally, one in the
format of ``unmemorized_laion_prompts.csv`` (``;Caption;URL;Index``).

Folder layout written by :func:`import_memorized`::

    OUT/corpus.parquet        id, image, caption, url, memorization, mean_sscd, max_sscd, laion_index
    OUT/queries.parquet       query_id, image, prompt, relevant, kind, split, prompt_kind, laion_index,
                              mean_sscd, max_sscd, memorization, rule
    OUT/import.json           the summary :func:`import_memorized` returns
    OUT/bm25_losses.json      with ``reword > 0``: per rewording rule, BM25's recall@1 and example misses
    OUT/images/{id}.jpg       with ``fetch=True``: the images that could be downloaded (re-encoded JPEG)
    OUT/fetch_failures.jsonl  with ``fetch=True``: one {"id", "url", "reason"} line per image that was not fetched
"""
from __future__ import annotations

import csv as _csv
import hashlib
import io
import json
import os
import queue
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine import AttribError, EmptyCorpusError, OutputError, SourceError
from engine.files import check_output_folder, is_nonempty, staged_folder
from engine.images import DEFAULT_MAX_PIXELS
from engine.scenes import seeded_rng

from ._util import counts, foreign_entries
from .bench import CORPUS, QUERIES, SPLITS, BenchmarkError, load_benchmark

VERSION = 1
IMPORT_ENTRIES = (CORPUS, QUERIES, "import.json", "images", "fetch_failures.jsonl", "bm25_losses.json")  # it writes
IMPORT_FORMAT = "attrib-import-memorized"  # import.json names it: only such folders are replaced on --overwrite
KINDS = ("VM", "TM")  # the memorization labels of the lists: verbatim / template memorization
NOVEL = "novel"
MAX_LISTED = 20  # skipped / duplicate rows listed by number in the summary
FETCH_WORKERS = 8
FETCH_GRACE_S = 1.0  # per-URL watchdog: a URL gets timeout + this (decoding included) before it is given up
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS  # the same decompression-bomb limit as indexing
JPEG_QUALITY = 90
USER_AGENT = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/124.0 Safari/537.36")
NOT_ATTEMPTED = "not attempted (deadline)"
UNFINISHED = "unfinished at the deadline"

MEMORIZED_COLUMNS = ("Caption", "URL", "type", "Index")  # required; mean_sscd / max_sscd are optional
UNMEMORIZED_COLUMNS = ("Caption", "URL", "Index")
_ROW_LABEL_HEADERS = ("", "unnamed: 0")  # how pandas writes / reads its index column

CORPUS_SCHEMA = {"id": pl.String, "image": pl.String, "caption": pl.String, "url": pl.String,
                 "memorization": pl.String, "mean_sscd": pl.Float64, "max_sscd": pl.Float64,
                 "laion_index": pl.Int64}
QUERY_SCHEMA = {"query_id": pl.String, "image": pl.String, "prompt": pl.String, "relevant": pl.List(pl.String),
                "kind": pl.String, "split": pl.String, "prompt_kind": pl.String, "laion_index": pl.Int64,
                "mean_sscd": pl.Float64, "max_sscd": pl.Float64, "memorization": pl.String, "rule": pl.String}
MAX_REWORD = 64  # rewordings per caption at most


class ImportOptionError(AttribError, ValueError):
    """An argument of :func:`import_memorized` has a value it cannot use."""


@dataclass
class _Row:
    file: str  # source file name
    row: str  # the file's own row number (its unnamed first column), else the 0-based data row position
    line: int  # 1-based line of the file where the record starts
    caption: str
    url: str
    index: int
    kind: str | None  # VM / TM; None for the unmemorized list
    mean_sscd: float | None
    max_sscd: float | None


# ------------------------------------------------------------------------------------------------- reading
def _check_file(path, what: str) -> Path:
    if path is None or str(path) == "":
        raise SourceError(f"no {what} CSV given")
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"{what} CSV {str(p)!r} does not exist")
    if not p.is_file():
        raise SourceError(f"{what} CSV {str(p)!r} is not a file")
    return p


def _parse_index(raw: str) -> int | None:
    s = raw.strip()
    if not s:
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:  # pandas writes integer columns with missing values as floats ("123.0")
        f = float(s)
    except ValueError:
        return None
    return int(f) if f.is_integer() else None


def _parse_score(raw: str, col: str, file: str, row: str) -> float | None:
    s = raw.strip()
    if not s or s.lower() in ("nan", "none", "null"):
        return None
    try:
        return float(s)
    except ValueError:
        raise SourceError(f"{file}, row {row}: column {col!r} has the value {s!r}, which is not a number") from None


def _read_csv(path: Path, required: tuple[str, ...], memorized: bool, skipped: list[dict]) -> list[_Row]:
    """Parse one list. Rows without a caption or a usable Index go to ``skipped``; bad values raise."""
    name = path.name
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{name} is not UTF-8 text ({e})") from None
    except OSError as e:
        raise SourceError(f"cannot read {str(path)!r}: {e}") from None
    reader = _csv.reader(io.StringIO(text, newline=""), delimiter=";", quotechar='"', doublequote=True)
    try:
        header = next(reader, None)
        if header is None:
            raise SourceError(f"{name} is empty: expected a header with the columns {';'.join(required)}")
        names = [h.strip() for h in header]
        lower = [h.lower() for h in names]
        missing = [c for c in required if c.lower() not in lower]
        if missing:
            found = ", ".join(repr(h) for h in names) or "none"
            raise SourceError(f"{name} lacks the column(s) {', '.join(missing)} (separator ';'); "
                              f"its columns are {found}; expected {';'.join(('',) + required)}")
        col = {c: lower.index(c.lower()) for c in required + ("mean_sscd", "max_sscd") if c.lower() in lower}
        label_col = 0 if lower[0] in _ROW_LABEL_HEADERS else None

        rows: list[_Row] = []
        bad_kinds: dict[str, list[str]] = {}
        position, line = 0, reader.line_num + 1
        for fields in reader:
            start, line = line, reader.line_num + 1
            if not fields or all(not f.strip() for f in fields):
                continue  # blank line
            label = fields[0].strip() if label_col is not None and fields[0].strip() else str(position)
            position += 1

            def get(c: str, fields: list[str] = fields) -> str:
                i = col.get(c)
                return fields[i] if i is not None and i < len(fields) else ""

            if len(fields) != len(names):
                skipped.append({"file": name, "row": label, "line": start,
                                "reason": f"{len(fields)} fields where the header has {len(names)}"})
                continue
            caption, raw_index = get("Caption"), get("Index")
            if not caption.strip():
                skipped.append({"file": name, "row": label, "line": start, "reason": "empty caption"})
                continue
            index = _parse_index(raw_index)
            if index is None:
                reason = "missing Index" if not raw_index.strip() else f"Index {raw_index.strip()!r} is not an integer"
                skipped.append({"file": name, "row": label, "line": start, "reason": reason})
                continue
            kind = mean = mx = None
            if memorized:
                kind = get("type").strip()
                if kind not in KINDS:
                    bad_kinds.setdefault(kind, []).append(label)
                    continue
                mean = _parse_score(get("mean_sscd"), "mean_sscd", name, label)
                mx = _parse_score(get("max_sscd"), "max_sscd", name, label)
            rows.append(_Row(name, label, start, caption, get("URL").strip(), index, kind, mean, mx))
    except _csv.Error as e:
        raise SourceError(f"{name}, line {reader.line_num}: not a readable ';'-separated CSV ({e})") from None
    if bad_kinds:
        vals = "; ".join(f"{k!r} (rows {', '.join(r[:5])}{', ...' if len(r) > 5 else ''})"
                         for k, r in list(bad_kinds.items())[:5])
        raise SourceError(f"{name} has unknown type value(s) {vals}; valid values: {', '.join(KINDS)}")
    return rows


def _dedupe(rows: list[_Row], seen: dict[int, _Row], duplicates: list[dict]) -> list[_Row]:
    """Keep the first row of each LAION index (``seen`` carries indices already used, across files)."""
    kept = []
    for r in rows:
        first = seen.get(r.index)
        if first is not None:
            same = "same caption" if first.caption == r.caption else "another caption"
            duplicates.append({"file": r.file, "row": r.row, "line": r.line, "index": r.index,
                               "reason": f"Index {r.index} already used by {first.file} row {first.row} ({same})"})
            continue
        seen[r.index] = r
        kept.append(r)
    return kept


# ------------------------------------------------------------------------------------------------- splitting
def _assign_splits(ids: list[str], seed: int, tag: str) -> dict[str, str]:
    """Half of ``ids`` to tune, half to test (an odd one out goes either way), as a pure function of the id set."""
    order = sorted(ids)
    rng = seeded_rng(seed, f"split/{tag}")
    perm = rng.permutation(len(order))
    n_tune = len(order) // 2 + (int(rng.integers(2)) if len(order) % 2 else 0)
    return {order[i]: (SPLITS[0] if k < n_tune else SPLITS[1]) for k, i in enumerate(perm)}


def _halve(rows: list[_Row], seed: int) -> tuple[list[_Row], list[_Row]]:
    """Split the unmemorized rows into (corpus distractors, novel queries), keeping file order in each half."""
    order = sorted(range(len(rows)), key=lambda i: rows[i].index)
    perm = seeded_rng(seed, "unmemorized").permutation(len(order))
    n_corpus = (len(rows) + 1) // 2
    to_corpus = {order[i] for i in perm[:n_corpus]}
    return ([r for i, r in enumerate(rows) if i in to_corpus], [r for i, r in enumerate(rows) if i not in to_corpus])


# ------------------------------------------------------------------------------------------------- fetching
class _FetchFailure(Exception):
    """One URL could not be turned into an image; the message is the reason written to fetch_failures.jsonl."""


def _is_timeout(e: BaseException | None) -> bool:
    return isinstance(e, (TimeoutError, socket.timeout))


def _download(url: str, timeout: float) -> tuple[bytes, str]:
    """GET ``url`` within ``timeout`` seconds; returns (body, content type)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise _FetchFailure(f"unsupported URL scheme {scheme!r}" if scheme else "not an http(s) URL")
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT,
                                               "Accept": "image/avif,image/webp,image/png,image/*,*/*;q=0.8"})
    until = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            ctype = resp.headers.get("Content-Type", "") or ""
            length = resp.headers.get("Content-Length")
            if length and length.strip().isdigit() and int(length) > MAX_IMAGE_BYTES:
                raise _FetchFailure(f"too large: {int(length)} bytes (limit {MAX_IMAGE_BYTES})")
            chunks, total = [], 0
            while True:
                chunk = resp.read(64 * 1024)
                if not chunk:
                    break
                total += len(chunk)
                if total > MAX_IMAGE_BYTES:
                    raise _FetchFailure(f"too large: more than {MAX_IMAGE_BYTES} bytes")
                if time.monotonic() > until:
                    raise _FetchFailure(f"timed out after {timeout:g}s (download too slow)")
                chunks.append(chunk)
            return b"".join(chunks), ctype
    except _FetchFailure:
        raise
    except urllib.error.HTTPError as e:
        raise _FetchFailure(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if _is_timeout(e.reason):
            raise _FetchFailure(f"timed out after {timeout:g}s") from None
        raise _FetchFailure(f"cannot connect: {e.reason}") from None
    except (TimeoutError, socket.timeout):
        raise _FetchFailure(f"timed out after {timeout:g}s") from None
    except (OSError, ValueError) as e:  # http.client errors (RemoteDisconnected, IncompleteRead, InvalidURL ...)
        raise _FetchFailure(f"{type(e).__name__}: {e}") from None


def _to_jpeg(data: bytes, ctype: str) -> bytes:
    """Decode-check ``data`` with the engine's safe decoder and re-encode it as an RGB JPEG."""
    from engine.images import ImageLimits, ImageRejected, decode

    try:
        rgb = decode(data, ImageLimits(max_pixels=MAX_IMAGE_PIXELS, max_bytes=MAX_IMAGE_BYTES))
    except ImageRejected as e:
        what = f"Content-Type {ctype.split(';')[0].strip()!r}" if ctype else "no Content-Type"
        raise _FetchFailure(f"{e.reason} ({len(data)} bytes, {what}): {e.detail}") from None
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _fetch_one(url: str, timeout: float) -> bytes:
    """JPEG bytes of the image at ``url``, or :class:`_FetchFailure` with the reason."""
    if not url:
        raise _FetchFailure("no URL")
    data, ctype = _download(url, timeout)
    return _to_jpeg(data, ctype)


def _fetch_all(items: list[tuple[str, str]], timeout: float) -> tuple[dict[str, bytes], list[dict], dict]:
    """Fetch (id, url) pairs with a pool of daemon threads, a per-URL watchdog and an overall deadline.

    Socket timeouts do not cover DNS lookups (a resolver that drops queries stalls ``getaddrinfo`` for 5-10 s), so a
    URL still running ``timeout + FETCH_GRACE_S`` seconds after it started is failed by the watchdog and its worker
    is replaced; the stalled thread finishes on its own and its result is dropped. Daemon threads (not
    concurrent.futures, whose workers are joined at interpreter exit) so that a stalled lookup delays neither this
    function past the deadline nor the program's exit."""
    n = len(items)
    budget = timeout * 4 + n * 0.05
    cap = timeout + FETCH_GRACE_S
    started = time.monotonic()
    deadline = started + budget
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(n):
        todo.put(i)
    results: dict[int, tuple] = {}  # i -> ("ok", jpeg bytes) | ("fail", reason)
    running: dict[int, tuple[float, int]] = {}  # i -> (start time, id of the worker that owns it)
    cond = threading.Condition()
    stop = threading.Event()
    workers = [0]
    stalled = [0]

    def worker(wid: int) -> None:
        while True:
            with cond:
                if stop.is_set():
                    return
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                running[i] = (time.monotonic(), wid)
            try:
                res = ("ok", _fetch_one(items[i][1], timeout))
            except _FetchFailure as e:
                res = ("fail", str(e))
            except Exception as e:  # noqa: BLE001 - a failure to report, never to raise
                res = ("fail", f"{type(e).__name__}: {e}")
            with cond:
                if running.get(i, (0.0, -1))[1] != wid:
                    return  # the watchdog gave this URL up and started a replacement worker
                del running[i]
                if stop.is_set():
                    return
                results[i] = res
                cond.notify_all()

    def spawn() -> None:
        workers[0] += 1
        threading.Thread(target=worker, args=(workers[0],), name=f"attrib-fetch-{workers[0]}", daemon=True).start()

    for _ in range(min(FETCH_WORKERS, n)):
        spawn()
    with cond:
        while len(results) < n:
            now = time.monotonic()
            if now >= deadline:
                break
            for i in [i for i, (t0, _) in running.items() if now - t0 >= cap]:
                del running[i]
                results[i] = ("fail", f"timed out: no result after {cap:g}s (stalled, e.g. in a DNS lookup)")
                stalled[0] += 1
                spawn()
            if len(results) >= n:
                break
            wake = min([deadline] + [t0 + cap for t0, _ in running.values()])
            cond.wait(max(wake - now, 0.001))
        stop.set()
        final = dict(results)
        unfinished = set(running)

    images: dict[str, bytes] = {}
    failures: list[dict] = []
    for i, (rid, url) in enumerate(items):
        res = final.get(i)
        if res is not None and res[0] == "ok":
            images[rid] = res[1]
        else:
            reason = res[1] if res is not None else (UNFINISHED if i in unfinished else NOT_ATTEMPTED)
            failures.append({"id": rid, "url": url, "reason": reason})
    stats = {"attempted": len(final) + len(unfinished), "fetched": len(images), "failed": len(failures),
             "stalled": stalled[0], "unfinished": len(unfinished), "not_attempted": n - len(final) - len(unfinished),
             "deadline_s": round(budget, 3), "seconds": round(time.monotonic() - started, 3)}
    return images, failures, stats


# ------------------------------------------------------------------------------------------------- writing
def _source_info(path: Path) -> dict:
    return {"name": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _queries(mem: list[_Row], novel: list[_Row], split_of: dict[str, str], reword: int, seed: int) -> pl.DataFrame:
    """One verbatim query per caption, or (``reword`` > 0) ``reword`` reworded queries per memorized caption whose
    kind is the rewording rule, and one reworded query per novel caption (kind ``novel``: they only calibrate and
    measure the "no source" threshold). Every query records its rule in ``rule``; all rewordings of a caption
    share the caption's split."""
    from .reword import reword as reworded
    from .reword import rule_for

    rows = []
    for pos, r in enumerate(mem + novel):
        base = f"q-laion-{r.index}"
        rel = [f"laion-{r.index}"] if r.kind is not None else []
        memo = r.kind if r.kind is not None else "none"
        tail = (r.index, r.mean_sscd, r.max_sscd, memo)
        if not reword:
            rows.append((base, None, r.caption, rel, r.kind or NOVEL, split_of[base], "verbatim", *tail, None))
            continue
        for j in range(reword if r.kind is not None else 1):
            rule = rule_for(pos, j)
            prompt = reworded(r.caption, rule, seeded_rng(seed, "reword", r.index, j))
            kind = rule if r.kind is not None else NOVEL
            rows.append((f"{base}-r{j}", None, prompt, rel, kind, split_of[base], "reworded", *tail, rule))
    return pl.DataFrame(rows, schema=QUERY_SCHEMA, orient="row")


def import_memorized(csv: str | os.PathLike, out: str | os.PathLike, unmemorized: str | os.PathLike | None = None,
                     fetch: bool = False, timeout: float = 5.0, overwrite: bool = False, seed: int = 0,
                     reword: int = 0, split_seed: int | None = None) -> dict:
    """Write the benchmark folder ``out`` from a memorized-prompt CSV and return its summary (saved as import.json).

    Each distinct LAION ``Index`` of ``csv`` becomes a caption-only corpus record ``laion-{Index}`` and a
    prompt-only query ``q-laion-{Index}`` (kind VM / TM, relevant = [the record]), split tune/test half and half
    within each kind. ``unmemorized`` rows are halved: corpus distractors, and ``novel`` queries with no source.
    ``fetch=True`` tries to download the corpus images (``timeout`` seconds per URL, failures reported, never
    raised). ``reword`` > 0 replaces each verbatim query by that many rewordings of its caption (``eval.reword``:
    the rule is the query's kind) and adds a per-rule report of where BM25 loses (``bm25_losses.json``).
    ``seed`` seeds the splits, the distractor halves and the rewordings; ``split_seed`` (default ``seed``) seeds
    only the first two, so benchmarks reworded with different seeds can share their corpus and splits.
    The folder is built in a temporary sibling, validated, and renamed into place."""
    for name, v in (("seed", seed), ("split_seed", seed if split_seed is None else split_seed), ("reword", reword)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ImportOptionError(f"{name} must be an integer >= 0, got {v!r}")
    if reword > MAX_REWORD:
        raise ImportOptionError(f"reword must be at most {MAX_REWORD} rewordings per caption, got {reword!r}")
    seed, reword = int(seed), int(reword)
    split_seed = seed if split_seed is None else int(split_seed)
    try:
        timeout = float(timeout)
    except (TypeError, ValueError):
        raise ImportOptionError(f"timeout must be a number of seconds, got {timeout!r}") from None
    if not (timeout > 0 and timeout != float("inf")):
        raise ImportOptionError(f"timeout must be a positive number of seconds, got {timeout!r}")
    mem_path = _check_file(csv, "memorized")
    unmem_path = _check_file(unmemorized, "unmemorized") if unmemorized is not None else None
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise BenchmarkError(f"output {str(out)!r} exists and is not a folder")
    if is_nonempty(out) and not overwrite:
        raise BenchmarkError(
            f"output folder {str(out)!r} is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    if is_nonempty(out) and not _is_import(out):
        raise BenchmarkError(
            f"{str(out)!r} is a non-empty folder that was not written by `attrib bench import-memorized` (no valid "
            f"import.json); refusing to replace it. Choose another output folder"
        )
    why = foreign_entries(out, IMPORT_ENTRIES, "attrib bench import-memorized")
    if why:
        raise BenchmarkError(why)
    check_output_folder(out)  # a path under a file, or a folder we may not write: one line, before any work

    skipped: list[dict] = []
    duplicates: list[dict] = []
    seen: dict[int, _Row] = {}
    mem_rows = _read_csv(mem_path, MEMORIZED_COLUMNS, True, skipped)
    mem = _dedupe(mem_rows, seen, duplicates)
    rows_info = {"memorized": {"data_rows": len(mem_rows) + len(skipped), "skipped": len(skipped),
                               "duplicates": len(duplicates), "kept": len(mem)}, "unmemorized": None}
    if not mem:
        raise EmptyCorpusError(f"{mem_path.name} has no usable rows ({len(skipped)} skipped, "
                               f"{len(duplicates)} duplicates)")
    distractors: list[_Row] = []
    novel: list[_Row] = []
    novel_dropped: list[dict] = []
    if unmem_path is not None:
        n_skip, n_dup = len(skipped), len(duplicates)
        unmem_rows = _read_csv(unmem_path, UNMEMORIZED_COLUMNS, False, skipped)
        distractors, novel = _halve(_dedupe(unmem_rows, seen, duplicates), split_seed)
        rows_info["unmemorized"] = {"data_rows": len(unmem_rows) + len(skipped) - n_skip,
                                    "skipped": len(skipped) - n_skip, "duplicates": len(duplicates) - n_dup,
                                    "distractors": len(distractors), "novel": len(novel)}
        # A novel query whose exact caption is a corpus caption would have a source after all: drop it.
        corpus_captions = {r.caption for r in mem} | {r.caption for r in distractors}
        novel_dropped = [{"file": r.file, "row": r.row, "line": r.line, "index": r.index,
                          "reason": "caption is also a corpus caption"} for r in novel if r.caption in corpus_captions]
        novel = [r for r in novel if r.caption not in corpus_captions]

    corpus = pl.DataFrame(
        {"id": [f"laion-{r.index}" for r in mem + distractors], "image": [None] * (len(mem) + len(distractors)),
         "caption": [r.caption for r in mem + distractors], "url": [r.url or None for r in mem + distractors],
         "memorization": [r.kind for r in mem] + ["none"] * len(distractors),
         "mean_sscd": [r.mean_sscd for r in mem] + [None] * len(distractors),
         "max_sscd": [r.max_sscd for r in mem] + [None] * len(distractors),
         "laion_index": [r.index for r in mem + distractors]},
        schema=CORPUS_SCHEMA)

    split_of: dict[str, str] = {}
    for kind in KINDS:
        split_of.update(_assign_splits([f"q-laion-{r.index}" for r in mem if r.kind == kind], split_seed, kind))
    split_of.update(_assign_splits([f"q-laion-{r.index}" for r in novel], split_seed, NOVEL))
    queries = _queries(mem, novel, split_of, reword, seed)

    present = set(queries["kind"].to_list())
    kinds = [k for k in KINDS + (NOVEL,) if k in present] + sorted(present - set(KINDS) - {NOVEL})
    losses = None
    if reword:
        from .reword import RULES, bm25_losses

        kinds = [k for k in RULES if k in present] + [k for k in kinds if k not in RULES]
        losses = bm25_losses(corpus["caption"].to_list(), corpus["id"].to_list(), queries.to_dicts())
    summary: dict = {
        "format": IMPORT_FORMAT, "version": VERSION, "seed": seed, "split_seed": split_seed,
        "reword": reword,
        "sources": {"memorized": _source_info(mem_path),
                    "unmemorized": _source_info(unmem_path) if unmem_path is not None else None},
        "corpus": {"records": corpus.height, "memorized": len(mem), "distractors": len(distractors),
                   "by_memorization": counts(corpus["memorization"].to_list(), KINDS + ("none",))},
        "queries": {"total": queries.height, "by_kind": counts(queries["kind"].to_list(), kinds),
                    "by_split": counts(queries["split"].to_list(), SPLITS),
                    "by_kind_split": {k: counts(queries.filter(pl.col("kind") == k)["split"].to_list(), SPLITS)
                                      for k in kinds}},
        "rows": rows_info,
        "skipped": {"count": len(skipped), "rows": skipped[:MAX_LISTED]},
        "duplicates": {"count": len(duplicates), "rows": duplicates[:MAX_LISTED]},
        "novel_dropped": {"count": len(novel_dropped), "rows": novel_dropped[:MAX_LISTED]},
        "fetch": {"enabled": bool(fetch), "fetched": 0, "failed": 0},
    }
    if losses is not None:
        summary["bm25_by_rule"] = {k: {x: v[x] for x in ("queries", "recall@1", "not_found")}
                                   for k, v in losses.items()}

    try:
        _write(out, corpus, queries, summary, fetch, timeout, losses)
    except OSError as e:  # disk full, the folder removed or made read-only meanwhile...
        raise OutputError(f"cannot write the benchmark {out}: {e.strerror or e}; nothing was left behind") from None
    load_benchmark(out)
    return summary


def _is_import(folder: Path) -> bool:
    """Whether ``folder`` holds a benchmark this importer wrote (its import.json names the format)."""
    try:
        meta = json.loads((folder / "import.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == IMPORT_FORMAT


def _write(out: Path, corpus: pl.DataFrame, queries: pl.DataFrame, summary: dict, fetch: bool, timeout: float,
           losses: dict | None = None) -> None:
    with staged_folder(out, "import-tmp") as tmp:
        if fetch:
            items = [(rid, url or "") for rid, url in zip(corpus["id"].to_list(), corpus["url"].to_list())]
            images, failures, stats = _fetch_all(items, timeout)
            if images:
                (tmp / "images").mkdir()
                for rid, data in images.items():
                    (tmp / "images" / f"{rid}.jpg").write_bytes(data)
                corpus = corpus.with_columns(
                    pl.col("id").replace_strict({rid: f"images/{rid}.jpg" for rid in images}, default=None,
                                                return_dtype=pl.String).alias("image"))
            with open(tmp / "fetch_failures.jsonl", "w", encoding="utf-8") as fh:
                for f in failures:
                    fh.write(json.dumps(f, ensure_ascii=False) + "\n")
            summary["fetch"] = {"enabled": True, **stats, "timeout_s": timeout}
        corpus.write_parquet(tmp / CORPUS)
        queries.write_parquet(tmp / QUERIES)
        (tmp / "import.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if losses is not None:
            (tmp / "bm25_losses.json").write_text(json.dumps(losses, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
        load_benchmark(tmp)  # validate before anything replaces ``out``
