"""`attrib demo`: the main job on a built-in default, with nothing downloaded by hand.

It generates a small training set of procedural scenes with captions into a cache folder, indexes it,
makes a "generated" query by transforming one training image (crop, colour shift, JPEG re-encode) and
prints the ranked attribution, plus an HTML report. A second run reuses the cached data and index.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance
from rich.markup import escape
from rich.panel import Panel

from ._errors import AttribError, IndexFormatError, ModelMismatchError, WeightsUnavailableError
from ._profiles import get_profile
from ._settings import cache_root
from .files import check_output_file
from .scenes import seeded_rng
from .ui import stderr_console

DEMO_TRAIN = 120
DEMO_SEED = 7
DEMO_SIZE = 224
DEMO_SOURCE = 17  # the training record the demo query is derived from


def _pretrained_here() -> tuple[bool, str]:
    """Whether the default profile's weights can be had without asking the user for anything."""
    from ._encoders import CLIP_WEIGHT_FILES, CLIP_WEIGHTS_ENV, DINO_WEIGHT_FILES, DINO_WEIGHTS_ENV, resolve_weights

    p = get_profile("default")
    try:
        resolve_weights("CLIP", p.clip.hf_hub or "", CLIP_WEIGHT_FILES, None, "--clip-weights", CLIP_WEIGHTS_ENV)
        resolve_weights("DINOv2", p.dino.hf_hub or "", DINO_WEIGHT_FILES, None, "--dino-weights", DINO_WEIGHTS_ENV)
    except WeightsUnavailableError as e:
        return False, str(e).split(". To get", 1)[0]
    return True, ""


def _training_set(folder: Path) -> Path:
    """A folder of procedural scenes with .txt sidecar captions (generated once, then cached)."""
    done = folder / ".complete"
    if done.exists():
        return folder
    from .scenes import caption_of, random_scene, render

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(DEMO_TRAIN):
        rng = seeded_rng(DEMO_SEED, i)
        spec = random_scene(rng)
        render(spec, DEMO_SIZE).save(folder / f"scene{i:04d}.png")
        (folder / f"scene{i:04d}.txt").write_text(caption_of(spec, rng) + "\n", encoding="utf-8")
    done.write_text("ok\n")
    return folder


def make_query(src: Path, out: Path) -> Path:
    """A 'generated' image: crop, colour shift and JPEG re-encode of a training image."""
    im = Image.open(src).convert("RGB")
    w, h = im.size
    im = im.crop((int(0.08 * w), int(0.05 * h), int(0.95 * w), int(0.9 * h))).resize((w, h), Image.BICUBIC)
    im = ImageEnhance.Color(im).enhance(1.4)
    im = ImageEnhance.Brightness(im).enhance(0.9)
    arr = np.asarray(im).astype(np.int16)
    arr[..., 0] = np.clip(arr[..., 0] + 18, 0, 255)  # a warm colour cast
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=70)
    out.write_bytes(buf.getvalue())
    return out


def _usable_index(path: Path, profile: str):
    """The cached index, if it is intact and was built with exactly the models that load here now."""
    from ._index import Index

    try:
        idx = Index(path)
        if idx.manifest["models"]["profile"] != profile:
            return None
        _ = idx.encoders  # loads the models and checks their weights against the index
    except (IndexFormatError, ModelMismatchError):
        return None
    return idx


def run_demo(cache: str | None = None, models: str | None = None, fresh: bool = False, json_out: bool = False,
             html: str | None = None) -> int:
    from ._build import build_index
    from .report.text import print_attribution

    con = stderr_console()
    if html:
        check_output_file(html)  # before the slow part; checked again when written
    root = Path(cache).expanduser() if cache else cache_root() / "demo"
    if fresh and root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)

    if models is None:
        ok, why = _pretrained_here()
        models = "default" if ok else "offline"
        if ok:
            banner = ("Using the 'default' profile: pretrained CLIP ViT-B-32 (laion2b_s34b_b79k) and DINOv2 ViT-S/14.",
                      "green")
        else:
            banner = (f"Pretrained weights are not available here ({why}). Using the 'offline' profile: the same "
                      "architectures with RANDOM, UNTRAINED weights. The pipeline is real, but the scores only "
                      "reflect low-level image statistics; they are not meaningful attributions. Run "
                      "`attrib demo --models default` once the weights are cached (see README) for real results.",
                      "yellow")
    else:
        p = get_profile(models)
        banner = (f"Using the {models!r} profile ({p.description}).", "green" if p.pretrained else "yellow")
    con.print(Panel(escape(banner[0]), title="attrib demo", border_style=banner[1]))

    data = _training_set(root / "train")
    index_dir = root / f"index-{models}"
    idx = _usable_index(index_dir, models)
    if idx is None:
        con.print(f"indexing the demo training set ({DEMO_TRAIN} generated scenes) into {escape(str(index_dir))}")
        build_index(data, index_dir, models=models, overwrite=index_dir.exists(), progress=True)
        from ._index import Index

        idx = Index(index_dir)
    else:
        con.print(f"reusing the cached index {escape(str(index_dir))}")

    src = data / f"scene{DEMO_SOURCE:04d}.png"
    query_img = make_query(src, root / "query.jpg")
    caption = (data / f"scene{DEMO_SOURCE:04d}.txt").read_text(encoding="utf-8").strip()
    prompt = caption
    con.print(f"query: {escape(str(query_img))} (a crop + colour shift + JPEG of scene{DEMO_SOURCE:04d}.png)\n"
              f"prompt: {escape(prompt)!r}")
    res = idx.query(image=query_img, prompt=prompt, k=5)
    failed = None
    try:
        report = idx.write_report(res, html or (root / "report.html"))
    except AttribError as e:  # the result is still printed below
        failed, report = e, None
    if json_out:
        d = res.to_dict()
        d["report"] = None if report is None else str(report)
        sys.stdout.write(json.dumps(d, indent=2, ensure_ascii=False) + "\n")
    else:
        print_attribution(res)
    top = res.results[0].id if res.results else None
    expected = f"scene{DEMO_SOURCE:04d}.png"
    if top == expected:
        con.print(f"[green]the true source {expected} is ranked first[/green]")
    else:
        con.print(f"[yellow]the true source {expected} is not ranked first (top: {escape(str(top))})[/yellow]")
    if failed is not None:
        raise AttribError(f"{failed} (the result above was computed and printed, but not saved)")
    con.print(f"HTML report: [bold]{escape(str(report))}[/bold]")
    if top is None:
        raise AttribError("the demo query returned no results")
    return 0
