"""`attrib`: a thin command line over the library API. Tables and progress go to stderr; --json to stdout.

The parser is built from command groups: the engine's own (index, info, models, query, serve, demo) and every group
another installed package declares under the entry-point group ``attrib.commands`` (the ``eval`` package adds
``bench`` and ``tune`` that way), so the engine never imports those packages itself.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

# Only the standard library and light engine modules at import time: the console script reaches main()'s
# KeyboardInterrupt handler within milliseconds; numpy, polars, faiss, rich and torch load inside main().
from ._errors import AttribError
from ._limits import (
    MAX_BATCH_SIZE,
    MAX_CHUNK,
    MAX_DEPTH,
    MAX_K,
    MAX_NPROBE,
    MAX_PATCH_DIMS,
    MAX_PATCH_GRID,
    MAX_PIXELS,
    MAX_WORKERS,
)
from ._profiles import PROFILES
from ._startup import (
    EXIT_INTERRUPTED,
    INTERRUPTED,
    clear_interrupt,
    interrupted_at_start_up,
    quiet_unraisable,
    raise_interrupt,
    release_import_locks,
    was_dropped,
)
from .files import DISK_FULL

EXIT_USER_ERROR = 2
EXIT_FAILED = 1  # the work could not be done (a full disk)

COMMAND_GROUPS = "attrib.commands"  # entry-point group: callables add_commands(subparsers)

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(m: re.Match) -> str:
    c = ord(m.group(0))
    # a byte that was not UTF-8 (surrogateescape, as in file names and argv) reads as \xNN; JSON needs "\\"
    return f"\\\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\\\u{c:04x}"


def json_text(obj) -> str:
    """``obj`` as indented JSON that is always valid UTF-8: text that is not (the lone surrogates Python uses for
    undecodable bytes of a file name or an argument) is written as a visible ``\\xNN`` escape."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str)
    return _SURROGATE.sub(_escape_surrogate, text)


def print_json(obj) -> None:
    """Machine-readable output: JSON on stdout (rich output goes to stderr)."""
    sys.stdout.write(json_text(obj) + "\n")
    sys.stdout.flush()


def stderr_console():
    from .ui import stderr_console as console

    return console()


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def printable(text: str) -> str:
    """``text`` with undecodable bytes (lone surrogates) shown as ``\\xNN``: safe on any stream."""
    return _SURROGATE.sub(lambda m: _escape_surrogate(m).replace("\\\\", "\\"), text)


def print_error(message: str) -> None:
    """A user error: one line on stderr."""
    stderr_console().print(f"[bold red]error:[/bold red] {escape(printable(message))}", highlight=False,
                           soft_wrap=True)


# --------------------------------------------------------------------------------------------- argument types
def int_in(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range; valid: {low}..{high}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float) -> Callable[[str], float]:
    """argparse type: a finite number in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; valid: {low}..{high}")
        return value

    parse.__name__ = "number"
    return parse


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), like every other user error of the CLI."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{self.prog}: {message} (see `{self.prog} --help`)")
        raise SystemExit(EXIT_USER_ERROR)


def add_model_args(p: argparse.ArgumentParser, with_profile: bool = True) -> None:
    """--models, --device and the local weights options shared by commands that load models."""
    if with_profile:
        p.add_argument("--models", default=None, metavar="PROFILE", choices=PROFILES.names(),
                       help=f"model profile: {', '.join(PROFILES.names())} "
                            "(default: 'default' to build; the index's own to query)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--clip-weights", default=None, metavar="PATH",
                   help="local CLIP weights file or folder (env ATTRIB_CLIP_WEIGHTS); default: Hugging Face cache/hub")
    p.add_argument("--dino-weights", default=None, metavar="PATH",
                   help="local DINOv2 weights file or folder (env ATTRIB_DINO_WEIGHTS); "
                        "default: Hugging Face cache/hub")


# --------------------------------------------------------------------------------------------- index / info
def cmd_index(a: argparse.Namespace) -> int:
    from ._build import build_index
    from ._settings import IndexSettings
    from .report.text import print_build_summary

    given = {k: getattr(a, k) for k in ("batch_size", "workers", "patch_grid", "patch_dims", "max_pixels", "ann",
                                         "codec", "chunk", "caption_codec")}
    settings = IndexSettings(**{k: v for k, v in given.items() if v is not None})  # invalid values are named
    from ._manifest import manifest_stamp as stamp
    from ._txn import staging_path

    out_path = Path(a.out).expanduser().absolute()

    before = stamp(out_path)  # a commit replaces the manifest: unchanged means nothing of this run was committed
    staged_before = stamp(staging_path(out_path))

    def interrupted(how: str = "interrupted") -> str:  # said when it stops: whether anything was committed by then
        now = stamp(out_path)
        if a.overwrite and stamp(staging_path(out_path)) is None and now is not None and now != before:
            return (f"{how} after the new index replaced the old one in {a.out}: it is complete and in use "
                    "(run `attrib calibrate` on it if its calibration was cut short)")
        if (a.overwrite and a.engine != "ray" and stamp(out_path) == before  # this run's staging build, complete
                and stamp(staging_path(out_path)) != staged_before
                and _complete_build(staging_path(out_path)) is not None):
            return (f"{how} after every record of the new index was committed, before it replaced {a.out}: {a.out} "
                    "is as it was; rerun the same command to finish the new one (nothing is encoded again)")
        if a.overwrite:
            now = stamp(staging_path(out_path))
        if now is None or (a.append and now == before):
            return (f"{how} before the first segment was committed: nothing of this build was kept"
                    + (f"; {a.out} is as it was" if a.overwrite or a.append else "")
                    + "; rerun the same command to start it again")
        if not a.overwrite:
            done = _complete_build(out_path)
            if done is not None:  # stopped in the last steps (merging segments, measuring, calibrating)
                return (f"{how} after every record was committed: the index {a.out} is complete and can be queried"
                        + (f"; run `attrib compact {a.out}` to merge its {done} segments" if done > 1 else "")
                        + f" (run `attrib calibrate {a.out}` if its calibration was cut short)")
        return (f"{how}: every committed segment of {a.out} is kept and nothing half-written is "
                f"visible; rerun the same command to resume the build"
                + (" (the previous index stays in place until the new one is complete)" if a.overwrite else ""))

    a.interrupted = interrupted
    kw = dict(models=a.models or "default", device=a.device, settings=settings, overwrite=a.overwrite,
              append=a.append, progress=not a.no_progress, clip_weights=a.clip_weights, dino_weights=a.dino_weights,
              calibrate=False if a.no_calibrate else None)
    ray_only = {"--address": a.address, "--ray-workers": a.ray_workers, "--gpus-per-worker": a.gpus_per_worker,
                "--cpus-per-worker": a.cpus_per_worker}
    from .calibrate import CalibrationInterrupted

    try:
        if a.engine == "ray":
            from ._cluster import ClusterSettings
            from ._ray import build_index_ray, import_ray

            import_ray()  # a missing Ray is one line, before any work
            cluster = ClusterSettings(address=a.address, workers=a.ray_workers or 1,
                                      gpus_per_worker=a.gpus_per_worker or 0.0, cpus_per_worker=a.cpus_per_worker)
            s = build_index_ray(a.source, a.out, cluster=cluster, **kw)
        else:
            given_ray = [k for k, v in ray_only.items() if v is not None]
            if given_ray:
                raise AttribError(f"{', '.join(given_ray)} only apply to --engine ray")
            s = build_index(a.source, a.out, **kw)
    except CalibrationInterrupted:
        a.interrupted = (f"interrupted while calibrating: the index {a.out} is complete and its previous "
                         f"calibration, if any, is unchanged; run `attrib calibrate {a.out}` to calibrate it")
        raise
    if a.json:
        from ._info import index_info

        info = index_info(s.index_dir)
        print_json({"index": str(s.index_dir), "mode": s.mode, "records": s.records, "images": s.images,
                    "live": info["live"], "deleted": info["deleted"], "segments": s.segments,
                    "encoded_this_run": s.encoded_this_run, "added_this_run": s.added_this_run,
                    "rejected": s.rejected, "reject_reasons": s.reject_reasons, "ignored_files": len(s.ignored_files),
                    "seconds": round(s.seconds, 3), "records_per_second": round(s.throughput, 3),
                    "disk_bytes_per_record": info["disk_bytes_per_record"],
                    "ram_bytes_per_record": info["ram_bytes_per_record"],
                    "untrained": "warning" in info, "warning": info.get("warning"),
                    "renamed_columns": s.renamed_columns, "engine": s.engine,
                    "startup_seconds": round(s.startup_seconds, 3), "calibration": s.calibration,
                    "search": s.search, "merged": s.merged})
    else:
        print_build_summary(s)
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    from ._index import Index
    from .calibrate import CalibrationSettings, calibrate, calibration_summary
    from .report.text import print_calibration

    fixed = {"min_queries": a.queries, "max_queries": a.queries} if a.queries is not None else {}
    settings = CalibrationSettings(far=a.far, seed=a.seed, **fixed)  # invalid values are named
    idx = Index(a.index, device=a.device, clip_weights=a.clip_weights, dino_weights=a.dino_weights)
    res = calibrate(idx, settings=settings, progress=not a.no_progress, write=not a.dry_run)
    if a.json:
        print_json({**calibration_summary(res), "weights": res.weights.to_dict()})
    else:
        print_calibration(res.weights, res.path)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from ._info import index_info
    from .report.text import print_info

    info = index_info(a.index)
    if a.json:
        print_json(info)
    else:
        print_info(info)
    return 0


def cmd_delete(a: argparse.Namespace) -> int:
    from ._maintain import delete_records, read_id_list

    ids, urls = list(a.id or []), []
    for f in a.ids or []:
        more_ids, more_urls = read_id_list(f)
        ids += more_ids
        urls += more_urls
    if not ids and not urls:
        if a.ids:
            raise AttribError(f"{', '.join(a.ids)} lists no id or URL: nothing to delete")
        raise AttribError("give the records to delete with --id ID (repeatable) or --ids FILE")
    s = delete_records(a.index, ids, urls)
    out = {"index": a.index, "deleted": s.deleted, "not_found": len(s.not_found),
           "not_found_examples": s.not_found[:20], "live": s.live, "deleted_total": s.total_deleted,
           "generation": s.generation}
    if a.json:
        print_json(out)
    else:
        c = stderr_console()
        c.print(f"[bold]deleted {s.deleted} records[/bold] from {escape(a.index)}: {s.live} live, "
                f"{s.total_deleted} deleted and not yet compacted (`attrib compact` removes them physically)")
        if s.not_found:
            c.print(f"[yellow]{len(s.not_found)} ids/URLs are not live records of this index[/yellow] "
                    f"(unknown, or deleted before), e.g. {escape(', '.join(s.not_found[:5]))}")
    return 0


def cmd_compact(a: argparse.Namespace) -> int:
    from ._maintain import compact

    s = compact(a.index, retrain=a.retrain, progress=not a.no_progress, codec=a.codec, ann=a.ann,
                caption_codec=a.caption_codec)
    out = {"index": a.index, "segments_before": s.segments_before, "segments_after": s.segments_after,
           "records": s.records, "purged": s.purged, "retrained": s.retrained, "seconds": round(s.seconds, 3),
           "codebooks": s.codebooks, "search": s.search}
    if a.json:
        print_json(out)
    else:
        from .report.text import print_search_settings

        stderr_console().print(
            f"[bold green]compacted[/bold green] {escape(a.index)}: {s.segments_before} segments -> "
            f"{s.segments_after}, {s.records} records kept, {s.purged} deleted records removed"
            + (", codebooks retrained" if s.retrained else "") + f" in {s.seconds:.1f}s")
        print_search_settings(s.search)
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from ._maintain import verify

    r = verify(a.index, progress=not a.no_progress)
    if a.json:
        print_json(r.to_dict())
    else:
        c = stderr_console()
        if r.ok:
            c.print(f"[bold green]ok[/bold green]: {escape(a.index)} - {r.checked['files']} files "
                    f"({r.checked['bytes']} bytes), {r.checked['records']} records and {r.checked['images']} images "
                    f"checked")
        for p in r.problems:
            c.print(f"[bold red]damaged[/bold red] {escape(p['component'])} ({escape(p['where'])}): "
                    f"{escape(p['problem'])}", soft_wrap=True)
    return 0 if r.ok else 1


def cmd_models(a: argparse.Namespace) -> int:
    rows = [PROFILES.get(n).to_dict() for n in PROFILES.names()]
    if a.json:
        print_json(rows)
        return 0
    from rich.table import Table

    t = Table(title="model profiles")
    for c in ("name", "pretrained", "clip", "dino", "description"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], str(r["pretrained"]), f"{r['clip']['arch']} / {r['clip']['pretrained'] or 'random'}",
                  f"{r['dino']['arch']} / {r['dino']['tag'] or 'random'} @ {r['dino']['img_size']}px", r["description"])
    stderr_console().print(t)
    return 0


# --------------------------------------------------------------------------------------------- query
def weights_arg(value: str | None):
    """The --weights option as the library takes it ("auto" when not given)."""
    return "auto" if value in (None, "auto") else value


def report_failed(error: AttribError) -> int:
    """The result was printed but an output file could not be written: one line, exit code 2 (1 on a full
    disk)."""
    print_error(f"{error} (the result above was computed and printed, but not saved)")
    return exit_code(error)


def exit_code(error: AttribError) -> int:
    """2 for what the user can change in the command; 1 when a file could not be written for a full disk."""
    return EXIT_FAILED if getattr(error, "errno", None) in DISK_FULL else EXIT_USER_ERROR


def cmd_query(a: argparse.Namespace) -> int:
    from ._encode import check_prompt
    from ._index import Index
    from ._settings import QuerySettings
    from .files import refuse_clobbering
    from .report.text import print_attribution

    if a.image is None and not (a.prompt or "").strip():
        raise AttribError("give --image, --prompt, or both")
    check_prompt(a.prompt)
    if a.html:
        # before the slow part; checked again (links, special files) when written
        refuse_clobbering(a.html, inputs=[a.image, a.weights], kind="html")
    settings = QuerySettings(**({"depth": a.depth} if a.depth is not None else {}), nprobe=a.nprobe)
    idx = Index(a.index, models=a.models, device=a.device, clip_weights=a.clip_weights,
                dino_weights=a.dino_weights, settings=settings)
    res = idx.query(image=a.image, prompt=a.prompt, k=a.k, weights=weights_arg(a.weights))
    failed = None
    if a.html:
        try:
            path = idx.write_report(res, a.html)
            stderr_console().print(f"report written to [bold]{escape(str(path))}[/bold]")
        except AttribError as e:  # the result is still printed below
            failed = e
    if a.json:
        print_json(res.to_dict())
    else:
        print_attribution(res)
    return report_failed(failed) if failed is not None else 0


def cmd_serve(a: argparse.Namespace) -> int:
    import os

    from ._settings import QuerySettings
    from .serve import ServeSettings, serve

    weights = []
    for item in a.weights or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise AttribError(f"--weights {item!r} is not NAME=FILE (e.g. --weights tuned=weights.json)")
        weights.append((name, path))
    settings = ServeSettings(
        max_upload_mb=a.max_upload_mb, max_pixels=a.max_pixels, max_k=a.max_k, queue=a.queue, max_batch=a.max_batch,
        batch_window_ms=a.batch_window_ms, timeout_s=a.timeout, token=a.token or os.environ.get("ATTRIB_TOKEN") or None,
        cors_origins=tuple(a.cors_origin or ()), weights=tuple(weights))
    qs = QuerySettings(**({"depth": a.depth} if a.depth is not None else {}), nprobe=a.nprobe)
    return serve(a.index, host=a.host, port=a.port, workers=a.workers, settings=settings, models=a.models,
                 device=a.device, clip_weights=a.clip_weights, dino_weights=a.dino_weights, query_settings=qs,
                 log_level=a.log_level, access_log=not a.no_access_log)


def cmd_demo(a: argparse.Namespace) -> int:
    from ._demo import run_demo

    if a.html:
        from .files import refuse_clobbering

        refuse_clobbering(a.html, kind="html")
    return run_demo(cache=a.cache, models=a.models, fresh=a.fresh, json_out=a.json, html=a.html)


# --------------------------------------------------------------------------------------------- parser
def add_commands(sub) -> None:
    """The engine's own command group."""
    s = sub.add_parser("index", help="index a training set (folder, tar shard, parquet/CSV/JSONL table)")
    s.add_argument("source", help="folder of images (+ .txt/.json sidecars), .tar shard, or .parquet/.csv/.jsonl table")
    s.add_argument("--out", required=True, help="index folder to create")
    add_model_args(s)
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing index at --out (built beside it and swapped in when complete)")
    s.add_argument("--append", action="store_true",
                   help="add the records of SOURCE to the existing index at --out (same models; existing ids are "
                        "rejected)")
    s.add_argument("--chunk", type=int_in(1, MAX_CHUNK), default=None,
                   help="images per committed segment: a killed build re-encodes at most this many (default 2000)")
    s.add_argument("--codec", choices=("auto", "fp16", "pq"), default=None,
                   help="stored vectors: fp16 (exact), pq (compressed: IVF-PQ + 8-bit refine + PQ patches); "
                        "default auto (pq above 50,000 images)")
    s.add_argument("--caption-codec", choices=("auto", "pq", "int8"), default=None,
                   help="caption embeddings with the pq codec: pq (128 B per record, cosines within about 0.01), "
                        "int8 (516 B, within 0.001); default auto (pq)")
    s.add_argument("--batch-size", type=int_in(1, MAX_BATCH_SIZE), default=None,
                   help="images per forward pass (default 32)")
    s.add_argument("--workers", type=int_in(0, MAX_WORKERS), default=None, help="image decoding threads (default 2)")
    s.add_argument("--patch-grid", type=int_in(1, MAX_PATCH_GRID), default=None,
                   help="pooled DINOv2 patch grid side, at most the model's patch grid (default 8)")
    s.add_argument("--patch-dims", type=int_in(1, MAX_PATCH_DIMS), default=None,
                   help="PCA dims per stored patch cell (default 64)")
    s.add_argument("--max-pixels", type=int_in(1, MAX_PIXELS), default=None,
                   help=f"reject larger images (default 40,000,000; at most {MAX_PIXELS:,})")
    s.add_argument("--ann", choices=("auto", "flat", "ivf"), default=None, help="faiss structure (default auto)")
    s.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="where images are encoded: local (this process, default) or ray (worker actors on a Ray "
                        "cluster; needs pip install 'attrib-engine[ray]'; see README: cluster guide)")
    s.add_argument("--address", default=None, metavar="ADDR",
                   help="ray: the cluster to join: auto (one started with `ray start`), HOST:PORT or "
                        "ray://HOST:PORT (default: start Ray on this machine)")
    s.add_argument("--ray-workers", type=int_in(1, 10_000), default=None, metavar="N",
                   help="ray: worker actors, each loads the models once and encodes one unit at a time (default 1)")
    s.add_argument("--gpus-per-worker", type=float_in(0, 64), default=None, metavar="G",
                   help="ray: GPUs per worker (default 0: encode on CPU)")
    s.add_argument("--cpus-per-worker", type=int_in(1, 4096), default=None, metavar="C",
                   help="ray: CPUs per worker (default: this machine's CPUs / workers when Ray runs here, else 1)")
    s.add_argument("--no-calibrate", action="store_true",
                   help="skip learning the index's own fusion weights after the build (done by default from "
                        "300 images on; see `attrib calibrate`)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("calibrate", help="learn fusion weights and the 'no source' threshold from an index itself")
    s.add_argument("index")
    s.add_argument("--far", type=float_in(0.001, 0.5), default=0.05,
                   help="target false-attribution rate of the threshold on self-made novel queries (default 0.05)")
    s.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0, help="seed of every self-made query (default 0)")
    s.add_argument("--queries", type=int_in(10, 1_000_000), default=None,
                   help="encoded self-made query images (default: a fifth of the indexed images, 240..1500)")
    s.add_argument("--dry-run", action="store_true", help="report the fit without storing the weights")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true", help="print the summary and the weights as JSON on stdout")
    add_model_args(s, with_profile=False)
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("info", help="describe an index folder")
    s.add_argument("index")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("delete", help="delete records from an index (by id, or by a removal list)")
    s.add_argument("index")
    s.add_argument("--id", action="append", metavar="ID", help="a record id (repeatable)")
    s.add_argument("--ids", action="append", metavar="FILE",
                   help="a file with one id per line, or a parquet/CSV/JSONL table with an id or url column "
                        "(e.g. a LAION removal list); repeatable")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("compact", help="merge an index's segments into one and drop deleted records physically")
    s.add_argument("index")
    s.add_argument("--retrain", action="store_true",
                   help="refit the codebooks (IVF, PQ, refine) on the live records first (after large appends)")
    s.add_argument("--codec", choices=("fp16", "pq"), default=None,
                   help="with --retrain: store the vectors with this codec from now on")
    s.add_argument("--ann", choices=("flat", "ivf"), default=None,
                   help="with --retrain: first-stage structure from now on")
    s.add_argument("--caption-codec", choices=("pq", "int8"), default=None,
                   help="with --retrain: caption embeddings as product codes or int8 from now on")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_compact)

    s = sub.add_parser("verify", help="check every byte of an index and name damaged components (exit 1 if any)")
    s.add_argument("index")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("models", help="list the model profiles")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("query", help="attribute a generated image and/or prompt")
    s.add_argument("index")
    s.add_argument("--image", default=None, help="the generated image")
    s.add_argument("--prompt", default=None, help="the prompt that generated it (plain text, never query syntax)")
    s.add_argument("-k", type=int_in(1, MAX_K), default=10, help=f"results to return (default 10, at most {MAX_K})")
    s.add_argument("--weights", default=None, metavar="FILE",
                   help="fusion weights file from `attrib tune` or `attrib calibrate`; 'rrf' for plain RRF; default: "
                        "the index's own calibration, else shipped weights for its models, else RRF")
    s.add_argument("--depth", type=int_in(1, MAX_DEPTH), default=None,
                   help=f"candidates per ranker in the fused pool (default 100, at most {MAX_DEPTH})")
    s.add_argument("--nprobe", type=int_in(1, MAX_NPROBE), default=None,
                   help="IVF lists probed (large indexes; default: as built)")
    s.add_argument("--html", default=None, metavar="OUT.html", help="also write a self-contained visual report")
    s.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    add_model_args(s)
    s.set_defaults(func=cmd_query)

    s = sub.add_parser(
        "serve", help="serve an index over HTTP: a JSON API (POST /v1/attribute) and a web page",
        description="Serve an index over HTTP (FastAPI on uvicorn): POST /v1/attribute answers the JSON of "
                    "`attrib query --json`; / is a web page; /docs the API docs. Models and index load once at "
                    "start-up; one worker thread per process uses them, batching queries that arrive together.")
    s.add_argument("index")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int_in(0, 65535), default=8000, help="port (default 8000)")
    s.add_argument("--workers", type=int_in(1, 64), default=1,
                   help="worker processes; each loads its own models and index (memory x N) and has its own queue "
                        "(default 1)")
    s.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on every endpoint but /healthz and the page's static "
                        "files (default: env ATTRIB_TOKEN; prefer it: a command line is visible to other users)")
    s.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="allow this origin (e.g. https://example.org) by CORS; repeatable (default: no CORS)")
    s.add_argument("--max-upload-mb", type=float_in(0.01, 1024), default=20.0, help="largest image upload (default 20)")
    s.add_argument("--max-pixels", type=int_in(1, 2_000_000_000), default=None,
                   help="refuse uploads with more pixels, from their header (default: the index's --max-pixels)")
    s.add_argument("--max-k", type=int_in(1, MAX_K), default=100, help="largest k a request may ask (default 100)")
    s.add_argument("--queue", type=int_in(1, 10_000), default=32,
                   help="attribute requests admitted at once per process; more get 503 + Retry-After (default 32)")
    s.add_argument("--max-batch", type=int_in(1, 256), default=16, help="queries encoded in one batch (default 16)")
    s.add_argument("--batch-window-ms", type=float_in(0, 1000), default=5.0,
                   help="how long a batch waits for more queries (default 5)")
    s.add_argument("--timeout", type=float_in(0.1, 3600), default=60.0, help="per-request timeout, s (default 60)")
    s.add_argument("--weights", action="append", metavar="NAME=FILE",
                   help="a fusion weights file requests may name (form field weights=NAME); repeatable. "
                        "'auto' and 'rrf' are always known")
    s.add_argument("--depth", type=int_in(1, MAX_DEPTH), default=None,
                   help="candidates per ranker in the fused pool (default 100)")
    s.add_argument("--nprobe", type=int_in(1, 1_000_000), default=None, help="IVF lists probed (default: as built)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.add_argument("--no-access-log", action="store_true", help="do not log every request")
    add_model_args(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("demo", help="build a small generated training set, index it and attribute a query")
    s.add_argument("--cache", default=None, help="cache folder (default ~/.cache/attrib/demo or $ATTRIB_CACHE/demo)")
    s.add_argument("--models", default=None, choices=PROFILES.names(),
                   help="profile (default: 'default' when its weights are here, else 'offline')")
    s.add_argument("--fresh", action="store_true", help="rebuild the demo data and index")
    s.add_argument("--html", default=None, help="where to write the HTML report (default: in the cache folder)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_demo)


def _plugin_groups() -> list[tuple[str, Callable | Exception]]:
    """(name, add_commands or the error loading it) for every installed command group, sorted by name."""
    from importlib import metadata

    out: list[tuple[str, Callable | Exception]] = []
    for ep in sorted(metadata.entry_points(group=COMMAND_GROUPS), key=lambda e: e.name):
        try:
            out.append((ep.name, ep.load()))
        except Exception as e:  # noqa: BLE001 - reported below, never hidden
            if _caused_by_interrupt(e):
                raise KeyboardInterrupt from None
            out.append((ep.name, e))
    return out


def _caused_by_interrupt(e: BaseException) -> bool:
    """Whether Ctrl-C is behind ``e``: Python 3.11 wraps exceptions raised while a class is being created
    (``__set_name__``) in a RuntimeError, so a KeyboardInterrupt during an import can arrive disguised."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="attrib",
        description="Attribute AI-generated images to their training data (CLIP + DINOv2 patches + BM25, fused).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    add_commands(sub)
    for name, add in _plugin_groups():
        if isinstance(add, Exception):
            print_error(f"the command group {name!r} ({COMMAND_GROUPS}) failed to load and is left out: "
                        f"{add.__class__.__name__}: {add}. Reinstall the package that provides it.")
            continue
        add(sub)
    return p




def _complete_build(folder: Path) -> int | None:
    """The number of segments of a complete index at ``folder`` (None when it is not one)."""
    from ._manifest import read_manifest

    try:
        m = read_manifest(folder)
    except Exception:  # noqa: BLE001 - no index, or not a readable one: not complete
        return None
    return len(m["segments"]) if (m.get("build") or {}).get("complete") else None


def full_disk_message(e: OSError, args=None) -> str:
    """One line for a full disk (or quota): the file being written, and what of the work was kept (the command's
    own account when it set a callable ``args.interrupted``; every writer commits by renaming a complete file or
    folder into place, so what was committed before is unchanged)."""
    where = f" (writing {e.filename})" if e.filename else ""
    said = getattr(args, "interrupted", None)
    if callable(said):
        try:
            return f"{said('stopped by a full disk' + where)}; free some space on that disk first"
        except Exception:  # noqa: BLE001 - the generic line rather than none
            pass
    return (f"no space left on the device{where}; nothing written before was changed (files and index generations "
            "are replaced whole): free some space on that disk and run the command again")


def _interrupted(args=None) -> int:
    """Ctrl-C (or SIGTERM): one line (the command's own, when it set ``args.interrupted``), exit code 130. A
    second Ctrl-C while saying so is ignored."""
    release_import_locks()  # one an interrupt stranded would hang the message's imports and the exit
    message = getattr(args, "interrupted", None) or INTERRUPTED
    if callable(message):
        try:
            message = message()
        except Exception:  # noqa: BLE001 - the generic line rather than none
            message = INTERRUPTED
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass
    try:
        stderr_console().print(f"[yellow]{escape(message)}[/yellow]", soft_wrap=True)  # one line
    except Exception:  # noqa: BLE001 - interrupted while rich itself was loading: say it plainly
        sys.stderr.write(message + "\n")
    return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; ``main([...])`` runs the CLI in-process (tests) and returns the exit code.

    Everything heavy (numpy, polars, faiss, rich, torch, the command groups of other packages) is imported in
    here, inside the handlers: Ctrl-C at any moment, the first half second included, ends with one line and exit
    code 130, and user errors with one line and exit code 2."""
    old_term = old_int = None
    clear_interrupt()  # nothing of an earlier in-process run carries over
    old_hook, sys.unraisablehook = sys.unraisablehook, quiet_unraisable
    try:
        try:
            old_int = signal.getsignal(signal.SIGINT)
            if old_int in (interrupted_at_start_up, signal.default_int_handler):  # from here on, Ctrl-C raises
                signal.signal(signal.SIGINT, raise_interrupt)  # KeyboardInterrupt, remembered (see _startup)
                old_int = None if old_int is interrupted_at_start_up else old_int
            else:
                old_int = None
            old_term = signal.signal(signal.SIGTERM, raise_interrupt)
        except ValueError:  # not the main thread
            pass
        parser = build_parser()
        try:
            a = parser.parse_args(argv)
        except SystemExit as e:  # --help, or a one-line argument error already printed
            return int(e.code or 0)
        func: Callable[[argparse.Namespace], int] = a.func
        rc = func(a)
        if rc != EXIT_INTERRUPTED and was_dropped():  # a Ctrl-C Python dropped in a finaliser, never raised again
            return _interrupted(a)
        return rc
    except AttribError as e:
        print_error(str(e))
        return exit_code(e)
    except KeyboardInterrupt:
        return _interrupted(locals().get("a"))
    except Exception as e:
        if _caused_by_interrupt(e):  # Ctrl-C while a module was being imported, wrapped by Python
            return _interrupted(locals().get("a"))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            print_error(full_disk_message(e, locals().get("a")))
            return EXIT_FAILED
        raise
    finally:
        clear_interrupt()
        sys.unraisablehook = old_hook
        for signum, old in ((signal.SIGTERM, old_term), (signal.SIGINT, old_int)):
            if old is not None:
                try:
                    signal.signal(signum, old)
                except ValueError:
                    pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
