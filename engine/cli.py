"""`attrib`: a thin command line over the library API. Tables and progress go to stderr; --json to stdout.

The parser is built from command groups: the engine's own (index, info, models, query, demo) and every group
another installed package declares under the entry-point group ``attrib.commands`` (the ``eval`` package adds
``bench`` and ``tune`` that way), so the engine never imports those packages itself.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from importlib import metadata
from typing import Callable, NoReturn, Sequence

from rich.markup import escape

from ._errors import AttribError
from ._profiles import PROFILES
from ._settings import IndexSettings, QuerySettings
from .ui import stderr_console

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
COMMAND_GROUPS = "attrib.commands"  # entry-point group: callables add_commands(subparsers)

# Bounds of numeric options, checked before any work (and before any allocation they would size).
MAX_K = 10_000
MAX_DEPTH = 10_000


def print_json(obj) -> None:
    """Machine-readable output: JSON on stdout (rich output goes to stderr)."""
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def print_error(message: str) -> None:
    """A user error: one line on stderr."""
    stderr_console().print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


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
    from .report.text import print_build_summary

    given = {k: getattr(a, k) for k in ("batch_size", "workers", "patch_grid", "patch_dims", "max_pixels", "ann")}
    settings = IndexSettings(**{k: v for k, v in given.items() if v is not None})  # invalid values are named
    s = build_index(a.source, a.out, models=a.models or "default", device=a.device, settings=settings,
                    overwrite=a.overwrite, progress=not a.no_progress, clip_weights=a.clip_weights,
                    dino_weights=a.dino_weights, calibrate=False if a.no_calibrate else None)
    if a.json:
        print_json({"index": str(s.index_dir), "records": s.records, "images": s.images, "rejected": s.rejected,
                    "reject_reasons": s.reject_reasons, "ignored_files": len(s.ignored_files),
                    "seconds": round(s.seconds, 3), "records_per_second": round(s.throughput, 3),
                    "untrained": s.manifest.get("untrained"), "calibration": s.calibration})
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


def cmd_query(a: argparse.Namespace) -> int:
    from ._index import Index
    from .report.text import print_attribution

    if a.image is None and not (a.prompt or "").strip():
        raise AttribError("give --image, --prompt, or both")
    settings = QuerySettings(**({"depth": a.depth} if a.depth is not None else {}), nprobe=a.nprobe)
    idx = Index(a.index, models=a.models, device=a.device, clip_weights=a.clip_weights,
                dino_weights=a.dino_weights, settings=settings)
    res = idx.query(image=a.image, prompt=a.prompt, k=a.k, weights=weights_arg(a.weights))
    if a.html:
        path = idx.write_report(res, a.html)
        stderr_console().print(f"report written to [bold]{escape(str(path))}[/bold]")
    if a.json:
        print_json(res.to_dict())
    else:
        print_attribution(res)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(cache=a.cache, models=a.models, fresh=a.fresh, json_out=a.json, html=a.html)


# --------------------------------------------------------------------------------------------- parser
def add_commands(sub) -> None:
    """The engine's own command group."""
    s = sub.add_parser("index", help="index a training set (folder, tar shard, parquet/CSV/JSONL table)")
    s.add_argument("source", help="folder of images (+ .txt/.json sidecars), .tar shard, or .parquet/.csv/.jsonl table")
    s.add_argument("--out", required=True, help="index folder to create")
    add_model_args(s)
    s.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    s.add_argument("--batch-size", type=int_in(1, 4096), default=None, help="images per forward pass (default 32)")
    s.add_argument("--workers", type=int_in(0, 256), default=None, help="image decoding threads (default 2)")
    s.add_argument("--patch-grid", type=int_in(1, 64), default=None,
                   help="pooled DINOv2 patch grid side, at most the model's patch grid (default 8)")
    s.add_argument("--patch-dims", type=int_in(1, 4096), default=None,
                   help="PCA dims per stored patch cell (default 64)")
    s.add_argument("--max-pixels", type=int_in(1, 2_000_000_000), default=None,
                   help="reject larger images (default 40,000,000)")
    s.add_argument("--ann", choices=("auto", "flat", "ivf"), default=None, help="faiss structure (default auto)")
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
    s.add_argument("--nprobe", type=int_in(1, 1_000_000), default=None,
                   help="IVF lists probed (large indexes; default: as built)")
    s.add_argument("--html", default=None, metavar="OUT.html", help="also write a self-contained visual report")
    s.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    add_model_args(s)
    s.set_defaults(func=cmd_query)

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
    out: list[tuple[str, Callable | Exception]] = []
    for ep in sorted(metadata.entry_points(group=COMMAND_GROUPS), key=lambda e: e.name):
        try:
            out.append((ep.name, ep.load()))
        except Exception as e:  # noqa: BLE001 - reported below, never hidden
            out.append((ep.name, e))
    return out


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


def _sigterm(signum, frame):  # pragma: no cover - exercised by the kill test in a subprocess
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; ``main([...])`` runs the CLI in-process (tests) and returns the exit code."""
    old = None
    try:
        old = signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        parser = build_parser()
        try:
            a = parser.parse_args(argv)
        except SystemExit as e:  # --help, or a one-line argument error already printed
            return int(e.code or 0)
        func: Callable[[argparse.Namespace], int] = a.func
        return func(a)
    except AttribError as e:
        print_error(str(e))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        stderr_console().print("[yellow]interrupted: nothing half-written was left behind[/yellow]")
        return EXIT_INTERRUPTED
    finally:
        if old is not None:
            try:
                signal.signal(signal.SIGTERM, old)
            except ValueError:
                pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
