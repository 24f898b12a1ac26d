"""Writing a synthetic benchmark folder (and replaying how one query was made)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
from PIL import Image

from engine import AttribError, OutputError
from engine.files import check_output_folder, is_nonempty, staged_folder
from engine.scenes import SceneSpec, caption_of, paraphrase_of, partial_of, random_scene, render, seeded_rng, signature
from engine.ui import progress_bar

from .._util import counts, foreign_entries
from .plan import (
    _P_DUP,
    _Q_CAPTION,
    _Q_IMAGE,
    _Q_NOVEL,
    _Q_PROMPT,
    KINDS,
    PROMPT_KINDS,
    SPLITS,
    VERSION,
    _make_plan,
    _Plan,
    _Query,
)
from .transforms import crop_and_paste, near_duplicate, png_bytes, template_spec, texture_spec, verbatim_copy


def _novel_spec(plan: _Plan, q: _Query) -> SceneSpec:
    rng = seeded_rng(q.seed, _Q_NOVEL)
    while True:
        spec = random_scene(rng)
        if signature(spec) not in plan.signatures:
            return spec


def _build_query(plan: _Plan, q: _Query, load: Callable[[int], Image.Image]) -> tuple[bytes, str, dict]:
    """The query image as encoded bytes, its file extension, and what went into it (boxes for crops/composites)."""
    rng = seeded_rng(q.seed, _Q_IMAGE)
    size = plan.image_size
    info: dict = {"boxes": []}
    if q.kind == "novel":
        return png_bytes(render(_novel_spec(plan, q), size)), "png", info
    a = q.groups[0]
    spec = plan.specs[a]
    if q.kind == "verbatim":
        info["member"] = q.member
        return verbatim_copy(load(int(q.member)), rng), "jpg", info
    if q.kind == "template":
        return png_bytes(render(template_spec(spec, rng), size)), "png", info
    if q.kind == "texture":
        return png_bytes(render(texture_spec(spec, rng), size)), "png", info
    if q.kind == "crop":
        background = render(random_scene(rng), size)
        img, boxes = crop_and_paste(render(spec, size), spec, background, rng)
        info["boxes"].append({"group": a, **boxes})
        return png_bytes(img), "png", info
    # composite
    b = q.groups[1]
    src = {a: render(spec, size), b: render(plan.specs[b], size)}
    vertical = rng.random() < 0.5
    if rng.random() < 0.5:  # first part of A, rest of B
        cut = int(round(float(rng.uniform(0.35, 0.65)) * size))
        box_a = (0, 0, cut, size) if vertical else (0, 0, size, cut)
        box_b = (cut, 0, size, size) if vertical else (0, cut, size, size)
        img = src[a].copy()
        img.paste(src[b].crop(box_b), box_b[:2])
        info["boxes"] += [{"group": a, "src_box": box_a, "dst_box": box_a},
                          {"group": b, "src_box": box_b, "dst_box": box_b}]
    else:  # two crops pasted into a new background, one per half
        img = render(random_scene(rng), size)
        half = size // 2
        regions = ([(0, 0, half, size), (half, 0, size, size)] if vertical
                   else [(0, 0, size, half), (0, half, size, size)])
        for g, region in zip((a, b), regions):
            img, boxes = crop_and_paste(src[g], plan.specs[g], img, rng, area=(0.2, 0.35), scale=(0.75, 1.0),
                                        region=region)
            info["boxes"].append({"group": g, **boxes})
    return png_bytes(img), "png", info


def _build_prompt(plan: _Plan, q: _Query) -> str:
    rng = seeded_rng(q.seed, _Q_PROMPT)
    if q.prompt_kind == "empty":
        return ""
    if q.prompt_kind == "misleading":
        while True:
            c = int(rng.integers(plan.train))
            if plan.rec_group[c] not in q.groups:
                return plan.rec_caption[c]
    if q.kind == "novel":
        spec = _novel_spec(plan, q)
        caption = caption_of(spec, seeded_rng(q.seed, _Q_CAPTION))
    else:
        spec, caption = plan.specs[q.groups[0]], plan.rec_caption[int(q.member)]
    if q.prompt_kind == "verbatim":
        return caption
    if q.prompt_kind == "paraphrase":
        return paraphrase_of(spec, rng)
    return partial_of(spec, caption, rng)



class SynthOptionError(AttribError, ValueError):
    """An argument of the generator is out of range, or the output folder cannot be written."""


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise SynthOptionError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def check_options(train: int, queries: int, seed: int, image_size: int) -> tuple[int, int, int, int]:
    """Validated generator parameters (each refusal names the parameter and its valid range)."""
    return (_check_int("train", train, 10, 10_000_000), _check_int("queries", queries, len(KINDS), 10_000_000),
            _check_int("seed", seed, 0, 2**63 - 1), _check_int("image_size", image_size, 32, 4096))


SYNTH_ENTRIES = ("corpus.parquet", "queries.parquet", "synth.json", "train", "queries")  # what it writes


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write over anything that is not an empty folder or a benchmark this generator wrote."""
    if out.exists() and not out.is_dir():
        raise SynthOptionError(f"{out} exists and is not a folder; choose another output folder")
    if not is_nonempty(out):
        return
    ours = _is_synth_benchmark(out)
    if not overwrite:
        what = "a synthetic benchmark" if ours else "a non-empty folder"
        raise SynthOptionError(f"output folder {out} already exists ({what}); pass --overwrite to replace it, or "
                               f"choose another folder")
    if not ours:
        raise SynthOptionError(f"{out} is a non-empty folder that was not written by `attrib bench synth` (no valid "
                               f"synth.json); refusing to replace it. Choose another output folder")
    why = foreign_entries(out, SYNTH_ENTRIES, "attrib bench synth")
    if why:
        raise SynthOptionError(why)


def _is_synth_benchmark(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "synth.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == "eval.synth"


def _summary(plan: _Plan) -> dict:
    sizes = [len(m) for m in plan.members]
    qs = plan.queries
    return {
        "generator": "eval.synth",
        "version": VERSION,
        "train": plan.train,
        "queries": plan.n_queries,
        "seed": plan.seed,
        "image_size": plan.image_size,
        "counts": {
            "corpus": {
                "records": plan.train,
                "groups": len(plan.members),
                "duplicate_groups": sum(1 for s in sizes if s > 1),
                "duplicate_records": sum(s for s in sizes if s > 1),
                "group_sizes": {str(k): sizes.count(k) for k in sorted(set(sizes))},
                "split_groups": counts(plan.group_split, SPLITS),
            },
            "queries": plan.n_queries,
            "kind": counts([q.kind for q in qs], KINDS),
            "prompt_kind": counts([q.prompt_kind for q in qs], PROMPT_KINDS),
            "split": counts([q.split for q in qs], SPLITS),
            "kind_by_split": {s: counts([q.kind for q in qs if q.split == s], KINDS) for s in SPLITS},
        },
    }


def generate(out: str | os.PathLike, train: int = 2000, queries: int = 1000, seed: int = 0, image_size: int = 256,
             progress: bool = True, overwrite: bool = False) -> dict:
    """Write the benchmark folder ``out`` and return its summary (also saved as synth.json).

    ``train`` counts corpus records (near duplicates included), ``queries`` counts queries. The folder is built in
    a temporary sibling and renamed into place at the end."""
    train, queries, seed, image_size = check_options(train, queries, seed, image_size)
    out = Path(out).expanduser().absolute()
    _check_out(out, overwrite)
    check_output_folder(out)  # a path under a file, or a folder we may not write: one line, before any work

    plan = _make_plan(train, queries, seed, image_size)
    try:
        return _write(out, plan, progress)
    except OSError as e:  # disk full, the folder removed or made read-only meanwhile...
        raise OutputError(f"cannot write the benchmark {out}: {e.strerror or e}; nothing was left behind") from None


def _write(out: Path, plan: _Plan, progress: bool) -> dict:
    train, queries, seed, image_size = plan.train, plan.n_queries, plan.seed, plan.image_size
    with staged_folder(out, "synth-tmp") as tmp:
        (tmp / "train").mkdir(parents=True)
        (tmp / "queries").mkdir()
        with progress_bar("synth", train + queries, enabled=progress, unit="items") as advance:
            for g, spec in enumerate(plan.specs):
                base = render(spec, image_size)
                for m, c in enumerate(plan.members[g]):
                    img = base if m == 0 else near_duplicate(base, seeded_rng(seed, c, _P_DUP))
                    (tmp / "train" / f"{plan.rec_id[c]}.png").write_bytes(png_bytes(img))
                    advance(1)

            def load(c: int) -> Image.Image:
                with Image.open(tmp / "train" / f"{plan.rec_id[c]}.png") as im:
                    return im.convert("RGB")

            rows = []
            for q in plan.queries:
                data, ext, _ = _build_query(plan, q, load)
                rel = f"queries/{q.query_id}.{ext}"
                (tmp / rel).write_bytes(data)
                relevant = sorted(plan.rec_id[c] for g in q.groups for c in plan.members[g])
                rows.append((q.query_id, rel, _build_prompt(plan, q), relevant, q.kind, q.split, q.prompt_kind, q.seed))
                advance(1)

        corpus = pl.DataFrame(
            {"id": plan.rec_id, "image": [f"train/{i}.png" for i in plan.rec_id], "caption": plan.rec_caption,
             "group": [plan.group_id(g) for g in plan.rec_group]},
            schema={"id": pl.Utf8, "image": pl.Utf8, "caption": pl.Utf8, "group": pl.Utf8},
        ).sort("id")
        corpus.write_parquet(tmp / "corpus.parquet")
        qschema = {"query_id": pl.Utf8, "image": pl.Utf8, "prompt": pl.Utf8, "relevant": pl.List(pl.Utf8),
                   "kind": pl.Utf8, "split": pl.Utf8, "prompt_kind": pl.Utf8, "seed": pl.Int64}
        pl.DataFrame(rows, schema=qschema, orient="row").write_parquet(tmp / "queries.parquet")
        summary = _summary(plan)
        (tmp / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def explain_query(out: str | os.PathLike, query_id: str) -> dict:
    """Replay how a query of the benchmark ``out`` was made (from synth.json's parameters and the corpus images).

    Returns {"query_id", "kind", "groups", "image" (the replayed PIL image), "sources": [{"source_id", "group",
    "src_box", "dst_box"}]}; boxes are (x0, y0, x1, y1) pixels in the source's corpus image and in the query image
    (crop and composite queries; the source is its group's original, un-degraded record)."""
    out = Path(out)
    meta = json.loads((out / "synth.json").read_text())
    plan = _make_plan(meta["train"], meta["queries"], meta["seed"], meta["image_size"])
    matches = [q for q in plan.queries if q.query_id == query_id]
    if not matches:
        raise SynthOptionError(f"no query {query_id!r} in {str(out)!r}")
    q = matches[0]

    def load(c: int) -> Image.Image:
        with Image.open(out / "train" / f"{plan.rec_id[c]}.png") as im:
            return im.convert("RGB")

    data, _, info = _build_query(plan, q, load)
    sources = [{"source_id": plan.rec_id[plan.members[b["group"]][0]], "group": plan.group_id(b["group"]),
                "src_box": tuple(b["src_box"]), "dst_box": tuple(b["dst_box"])} for b in info["boxes"]]
    return {"query_id": q.query_id, "kind": q.kind, "groups": [plan.group_id(g) for g in q.groups],
            "image": Image.open(io.BytesIO(data)).convert("RGB"), "sources": sources}
