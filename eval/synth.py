"""Deterministic synthetic memorization benchmark.

Procedural scenes (a textured background plus 1-3 textured shapes) make a training corpus with near-duplicate
groups, and queries that copy the corpus the way generated images are known to: verbatim copies, templates (same
layout, new colours), crops pasted into new scenes, composites of two sources, re-used textures, and novel scenes
with no source. Every file is a pure function of ``(train, queries, seed, image_size)``.

Folder layout written by :func:`generate`::

    OUT/corpus.parquet   id, image, caption, group
    OUT/queries.parquet  query_id, image, prompt, relevant, kind, split, prompt_kind, seed
    OUT/synth.json       generator parameters and counts
    OUT/train/*.png      corpus images
    OUT/queries/*        query images (verbatim copies are JPEG, the rest PNG)
"""
from __future__ import annotations

import io
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import polars as pl
from PIL import Image, ImageDraw

from engine._fs import is_nonempty, staged_folder

VERSION = 1

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 45), "green": (50, 165, 70),
    "teal": (30, 145, 145), "blue": (45, 85, 215), "purple": (130, 60, 185), "pink": (240, 125, 180),
    "brown": (125, 80, 40), "black": (25, 25, 30), "white": (242, 242, 238), "gray": (128, 128, 128),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
TEXTURE_KINDS: tuple[str, ...] = ("solid", "stripes", "dots", "checker", "zigzag", "gradient", "speckle", "waves")
# Caption adjective for each texture kind ("" for solid: "a red circle").
TEXTURE_WORDS: dict[str, str] = {
    "solid": "", "stripes": "striped", "dots": "dotted", "checker": "checkered", "zigzag": "zigzag",
    "gradient": "gradient", "speckle": "speckled", "waves": "wavy",
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "ring", "cross", "diamond",
                           "pentagon", "crescent")
SIZES: dict[str, float] = {"small": 0.09, "medium": 0.13, "large": 0.18}  # radius as a fraction of the side
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right")
_POSITION_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right", "left": "on the left",
    "center": "in the center", "right": "on the right", "bottom left": "at the bottom left",
    "bottom": "at the bottom", "bottom right": "at the bottom right",
}
_PREFIXES = ("", "", "", "stock photo of", "illustration of", "vector art of", "digital art of", "photo of",
             "clipart of", "an image of", "cartoon of")
_SUFFIXES = ("", "", "", "hd wallpaper", "vector art", "digital art", "free download", "stock image", "4k",
             "high resolution", "royalty free")
_SEPARATORS = (", ", " - ", " | ")

# Paraphrase vocabulary: synonyms that avoid the caption's own words where possible.
_SYN_SHAPE = {
    "circle": ("round disc", "disk", "round blob"), "square": ("box", "block", "tile"),
    "triangle": ("three-sided shape", "wedge", "pyramid shape"), "star": ("pentagram", "starburst", "spiky shape"),
    "hexagon": ("six-sided shape", "honeycomb cell", "hex tile"), "ring": ("donut", "hoop", "loop"),
    "cross": ("plus sign", "plus shape"), "diamond": ("rhombus", "lozenge"),
    "pentagon": ("five-sided shape", "home plate shape"), "crescent": ("moon shape", "half moon", "sickle shape"),
}
_SYN_COLOUR = {
    "red": ("crimson", "scarlet"), "orange": ("tangerine", "amber"), "yellow": ("golden", "lemon"),
    "green": ("emerald", "lime"), "teal": ("turquoise", "cyan"), "blue": ("navy", "cobalt"),
    "purple": ("violet", "lilac"), "pink": ("rose", "magenta"), "brown": ("chocolate", "tan"),
    "black": ("dark", "charcoal"), "white": ("ivory", "snow"), "gray": ("grey", "silver"),
}
_SYN_TEXTURE = {
    "solid": ("", "in a solid colour", "plain"), "stripes": ("with stripes", "with lines", "with bands"),
    "dots": ("with dots", "with polka dots", "with spots"),
    "checker": ("with a checkerboard pattern", "with checks", "with a grid of squares"),
    "zigzag": ("with zigzags", "with chevrons", "with a zigzag pattern"),
    "gradient": ("with a colour fade", "with a smooth gradient", "fading"),
    "speckle": ("with speckles", "with flecks", "with a noisy pattern"),
    "waves": ("with waves", "with wavy lines", "with ripples"),
}
_SYN_SIZE = {"small": ("tiny", "little"), "medium": ("mid-sized", "average-sized"), "large": ("big", "huge")}
_SYN_POSITION = {
    "top left": ("in the upper left corner", "at upper left"), "top": ("near the top", "at the top edge"),
    "top right": ("in the upper right corner", "at upper right"), "left": ("on the left side", "at the left edge"),
    "center": ("in the middle", "at the centre"), "right": ("on the right side", "at the right edge"),
    "bottom left": ("in the lower left corner", "at lower left"), "bottom": ("near the bottom", "along the bottom"),
    "bottom right": ("in the lower right corner", "at lower right"),
}
_PARA_PREFIXES = ("", "a picture showing", "artwork with", "render of", "graphic of", "image featuring")
_PARA_SUFFIXES = ("", "high quality", "wallpaper", "clip art", "poster", "trending")
_PARA_BACKGROUNDS = ("set against {a} {c} backdrop {t}", "over {a} {c} background {t}",
                     "in front of {a} {c} backdrop {t}")

KINDS: tuple[str, ...] = ("verbatim", "template", "crop", "composite", "texture", "novel")
KIND_WEIGHTS: tuple[float, ...] = (0.20, 0.15, 0.15, 0.15, 0.15, 0.20)
PROMPT_KINDS: tuple[str, ...] = ("verbatim", "paraphrase", "partial", "empty", "misleading")
PROMPT_WEIGHTS: tuple[float, ...] = (0.30, 0.20, 0.20, 0.15, 0.15)
SPLITS: tuple[str, ...] = ("tune", "test")

SOURCE_FRACTION = 0.83  # share of the corpus that are distinct source scenes
_DUP_EXTRA = (1, 2, 3)  # extra members per duplicate group (groups of 2-4)
_DUP_EXTRA_P = (0.55, 0.30, 0.15)

# Seed purposes for np.random.default_rng([seed, ..., purpose]).
_P_CORPUS, _P_SCENE, _P_DUP, _P_CAPTION, _P_QPLAN, _P_QSEED = 1, 2, 3, 4, 5, 6
# Streams under a query's own seed.
_Q_IMAGE, _Q_PROMPT, _Q_CAPTION, _Q_NOVEL = 0, 1, 2, 3


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


# ---------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Texture:
    """A specific texture instance: kind plus every parameter needed to render it."""
    kind: str
    colour1: str
    colour2: str
    rgb1: tuple[int, int, int]
    rgb2: tuple[int, int, int]
    period: float  # fraction of the image side
    angle: float  # degrees
    phase: float  # fraction of a period
    seed: int  # speckle pattern


@dataclass(frozen=True)
class SceneObject:
    """A textured shape at one cell of the 3x3 grid (with a little jitter)."""
    shape: str
    size: str
    cell: int  # 0..8, row-major from the top left
    dx: float
    dy: float
    rotation: float  # degrees
    texture: Texture

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def geometry(self, side: int) -> tuple[float, float, float]:
        """Centre x, centre y and radius in pixels on a side x side canvas."""
        r = SIZES[self.size]
        cx = min(max((self.cell % 3 + 0.5) / 3 + self.dx, 0.9 * r), 1 - 0.9 * r)
        cy = min(max((self.cell // 3 + 0.5) / 3 + self.dy, 0.9 * r), 1 - 0.9 * r)
        return cx * side, cy * side, r * side


@dataclass
class SceneSpec:
    """A scene: a background texture and 1-3 objects, drawn in list order."""
    background: Texture
    objects: list[SceneObject] = field(default_factory=list)


def _jitter(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    rgb = np.clip(np.array(PALETTE[name]) + rng.integers(-12, 13, 3), 0, 255)
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def random_texture(rng: np.random.Generator, kind: str | None = None, avoid: Sequence[str] = ()) -> Texture:
    """A random texture instance; ``avoid`` lists colour names its main colour must not take."""
    kind = kind if kind is not None else _pick(rng, TEXTURE_KINDS)
    c1 = _pick(rng, [c for c in COLOURS if c not in avoid])
    c2 = _pick(rng, [c for c in COLOURS if c != c1])
    return Texture(kind=kind, colour1=c1, colour2=c2, rgb1=_jitter(c1, rng), rgb2=_jitter(c2, rng),
                   period=float(rng.uniform(0.04, 0.12)), angle=float(rng.uniform(0.0, 180.0)),
                   phase=float(rng.uniform(0.0, 1.0)), seed=int(rng.integers(0, 2**31)))


def _random_object(rng: np.random.Generator, cell: int, texture: Texture, shape: str | None = None) -> SceneObject:
    return SceneObject(shape=shape if shape is not None else _pick(rng, SHAPES), size=_pick(rng, tuple(SIZES)),
                       cell=int(cell), dx=float(rng.uniform(-0.035, 0.035)), dy=float(rng.uniform(-0.035, 0.035)),
                       rotation=float(rng.uniform(-20.0, 20.0)), texture=texture)


def random_scene(rng: np.random.Generator) -> SceneSpec:
    """A random scene: a background texture and 1-3 objects on distinct grid cells."""
    background = random_texture(rng)
    n = int(rng.integers(1, 4))
    cells = rng.choice(9, size=n, replace=False)
    objects = [_random_object(rng, int(c), random_texture(rng, avoid=(background.colour1,))) for c in cells]
    return SceneSpec(background=background, objects=objects)


@lru_cache(maxsize=8)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    t = (np.arange(side, dtype=np.float64) + 0.5) / side
    y, x = np.meshgrid(t, t, indexing="ij")
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def render_texture(tex: Texture, side: int) -> np.ndarray:
    """The texture over a whole side x side canvas, as a uint8 (side, side, 3) array."""
    return _texture_at(tex, *_grid(side))


def _texture_at(tex: Texture, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The texture at canvas coordinates x, y (fractions of the side); any window of the canvas grid."""
    c1 = np.array(tex.rgb1, dtype=np.uint8)
    c2 = np.array(tex.rgb2, dtype=np.uint8)
    if tex.kind == "solid":
        return np.broadcast_to(c1, (*x.shape, 3)).copy()
    th = math.radians(tex.angle)
    p = tex.period
    u = x * (math.cos(th) / p) + y * (math.sin(th) / p)  # in periods
    v = y * (math.cos(th) / p) - x * (math.sin(th) / p)
    if tex.kind == "gradient":
        corners = [c * math.cos(th) + d * math.sin(th) for c in (0.0, 1.0) for d in (0.0, 1.0)]
        lo, hi = min(corners) / p, max(corners) / p
        w = np.clip((u - lo) / (hi - lo), 0.0, 1.0)[..., None]
        out = c1.astype(np.float64) * (1.0 - w) + c2.astype(np.float64) * w
        return np.rint(out).astype(np.uint8)
    if tex.kind == "stripes":
        mask = (u + tex.phase) % 1.0 < 0.5
    elif tex.kind == "dots":
        du = (u + tex.phase) % 1.0 - 0.5
        dv = v % 1.0 - 0.5
        mask = du * du + dv * dv < 0.32**2
    elif tex.kind == "checker":
        mask = (np.floor(u + tex.phase) + np.floor(v)) % 2.0 > 0.5
    elif tex.kind == "zigzag":
        tri = np.abs((u / 1.5) % 1.0 - 0.5) * 2.0
        mask = (v + tex.phase + 0.8 * tri) % 1.0 < 0.5
    elif tex.kind == "speckle":
        cell = p / 3.0
        n = int(math.ceil(1.0 / cell)) + 1
        grains = np.random.default_rng(tex.seed).random((n, n)) < 0.35
        mask = grains[(y / cell).astype(np.int64), (x / cell).astype(np.int64)]
    elif tex.kind == "waves":
        mask = np.sin(2 * math.pi * (v + tex.phase) + 1.5 * np.sin(2 * math.pi * u / 2.5)) > 0
    else:
        raise ValueError(f"unknown texture kind {tex.kind!r}")
    return np.where(mask[..., None], c2, c1)


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, deg: float) -> list[tuple[float, float]]:
    a = math.radians(deg)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + (px - cx) * ca - (py - cy) * sa, cy + (px - cx) * sa + (py - cy) * ca) for px, py in points]


def _regular(n: int, cx: float, cy: float, r: float, start: float = -90.0) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(math.radians(start + 360.0 * k / n)),
             cy + r * math.sin(math.radians(start + 360.0 * k / n))) for k in range(n)]


def shape_mask(obj: SceneObject, side: int) -> Image.Image:
    """The object's silhouette as an "L" image (255 inside)."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = obj.geometry(side)
    rot = obj.rotation
    box = [cx - r, cy - r, cx + r, cy + r]
    if obj.shape == "circle":
        draw.ellipse(box, fill=255)
    elif obj.shape == "ring":
        draw.ellipse(box, fill=255)
        ri = 0.55 * r
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif obj.shape == "crescent":
        draw.ellipse(box, fill=255)
        ox, oy = _rotate([(cx + 0.45 * r, cy - 0.15 * r)], cx, cy, rot)[0]
        ri = 0.85 * r
        draw.ellipse([ox - ri, oy - ri, ox + ri, oy + ri], fill=0)
    else:
        if obj.shape == "square":
            pts = _regular(4, cx, cy, r, start=-45.0)
        elif obj.shape == "triangle":
            pts = _regular(3, cx, cy, 1.1 * r)
        elif obj.shape == "hexagon":
            pts = _regular(6, cx, cy, r)
        elif obj.shape == "pentagon":
            pts = _regular(5, cx, cy, r)
        elif obj.shape == "star":
            outer, inner = _regular(5, cx, cy, r), _regular(5, cx, cy, 0.45 * r, start=-54.0)
            pts = [pt for pair in zip(outer, inner) for pt in pair]
        elif obj.shape == "diamond":
            pts = [(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)]
        elif obj.shape == "cross":
            a, b = r, 0.33 * r
            pts = [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                   (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                   (cx - a, cy - b), (cx - b, cy - b)]
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
        draw.polygon(_rotate(pts, cx, cy, rot), fill=255)
    return mask


def render(spec: SceneSpec, size: int) -> Image.Image:
    """Render a scene as a size x size RGB image (textures pasted through PIL-drawn shape masks)."""
    canvas = render_texture(spec.background, size)
    x, y = _grid(size)
    for obj in spec.objects:
        mask = shape_mask(obj, size)
        box = mask.getbbox()
        if box is None:
            continue
        x0, y0, x1, y1 = box  # textures are computed only where the shape is
        inside = np.asarray(mask.crop(box)) > 127
        window = canvas[y0:y1, x0:x1]
        window[inside] = _texture_at(obj.texture, x[y0:y1, x0:x1], y[y0:y1, x0:x1])[inside]
    return Image.fromarray(canvas, "RGB")


def _signature(spec: SceneSpec) -> tuple:
    """What a caption can say about a scene; two scenes with equal signatures count as the same scene."""
    objs = sorted((o.shape, o.size, o.cell, o.texture.kind, o.texture.colour1) for o in spec.objects)
    return (spec.background.kind, spec.background.colour1, tuple(objs))


# ---------------------------------------------------------------------------------------------------------------
# Captions and prompts
# ---------------------------------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _colour_words(tex: Texture, both: bool) -> str:
    return f"{tex.colour1} and {tex.colour2}" if both and tex.kind != "solid" else tex.colour1


def _object_phrase(obj: SceneObject, both: bool = False) -> str:
    words = [obj.size, _colour_words(obj.texture, both), TEXTURE_WORDS[obj.texture.kind], obj.shape]
    return f"a {' '.join(w for w in words if w)} {_POSITION_PHRASES[obj.position]}"


def _background_phrase(tex: Texture, both: bool = False) -> str:
    words = " ".join(w for w in (_colour_words(tex, both), TEXTURE_WORDS[tex.kind]) if w)
    return f"on {_article(words)} {words} background"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _wrap(body: str, prefix: str, suffix: str, sep: str) -> str:
    if prefix:
        body = f"{prefix} {body}"
    return f"{body}{sep}{suffix}" if suffix else body


def caption_of(spec: SceneSpec, rng: np.random.Generator) -> str:
    """A LAION-like compositional caption, e.g. "stock photo of a large red striped circle at the top left on a
    green gradient background, hd wallpaper"; ``rng`` picks the prefix/suffix and whether second colours show."""
    both = rng.random(len(spec.objects) + 1) < 0.25
    prefix, suffix, sep = _pick(rng, _PREFIXES), _pick(rng, _SUFFIXES), _pick(rng, _SEPARATORS)
    if suffix and prefix.startswith(suffix):  # no "vector art of ... - vector art"
        suffix = ""
    objects = _join([_object_phrase(o, bool(b)) for o, b in zip(spec.objects, both[1:])])
    return _wrap(f"{objects} {_background_phrase(spec.background, bool(both[0]))}", prefix, suffix, sep)


def paraphrase_of(spec: SceneSpec, rng: np.random.Generator) -> str:
    """The scene's content reworded: synonyms, objects in another order, a different prefix/suffix."""
    order = list(rng.permutation(len(spec.objects)))
    if len(order) > 1 and order == sorted(order):
        order.reverse()
    phrases = []
    for i in order:
        o = spec.objects[int(i)]
        words = [_pick(rng, _SYN_SIZE[o.size]), _pick(rng, _SYN_COLOUR[o.texture.colour1]),
                 _pick(rng, _SYN_SHAPE[o.shape]), _pick(rng, _SYN_TEXTURE[o.texture.kind]),
                 _pick(rng, _SYN_POSITION[o.position])]
        text = " ".join(w for w in words if w)
        phrases.append(f"{_article(text)} {text}")
    bg = spec.background
    colour = _pick(rng, _SYN_COLOUR[bg.colour1])
    background = _pick(rng, _PARA_BACKGROUNDS).format(a=_article(colour), c=colour, t=_pick(rng, _SYN_TEXTURE[bg.kind]))
    body = f"{_join(phrases)} {background}".strip()
    return _wrap(body, _pick(rng, _PARA_PREFIXES), _pick(rng, _PARA_SUFFIXES), ", ")


def partial_of(spec: SceneSpec, caption: str, rng: np.random.Generator) -> str:
    """A fragment: one object's description, or about 40-60% of the caption's words kept in order."""
    if rng.random() < 0.5:
        return _object_phrase(_pick(rng, spec.objects))
    words = caption.split()
    keep = max(1, int(round(len(words) * rng.uniform(0.4, 0.6))))
    idx = np.sort(rng.choice(len(words), size=keep, replace=False))
    return " ".join(words[int(i)] for i in idx)


# ---------------------------------------------------------------------------------------------------------------
# Image transforms
# ---------------------------------------------------------------------------------------------------------------

def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _near_duplicate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A web-style near duplicate: 1-2 of JPEG re-encode, rescale, crop (<= 5% of the area), brightness shift."""
    ops = rng.permutation(4)[: int(rng.integers(1, 3))]
    for op in ops:
        w, h = img.size
        if op == 0:
            img = Image.open(io.BytesIO(_jpeg_bytes(img, int(rng.integers(50, 91))))).convert("RGB")
        elif op == 1:
            f = float(rng.uniform(0.6, 0.9) if rng.random() < 0.6 else rng.uniform(1.1, 1.3))
            img = img.resize((max(16, round(w * f)), max(16, round(h * f))), Image.Resampling.BICUBIC)
        elif op == 2:
            m = [int(v) for v in rng.uniform(0.0, 0.0125, 4) * (w, h, w, h)]  # per side; keeps >= 95% of the area
            if not any(m):
                m[int(rng.integers(4))] = 1
            img = img.crop((m[0], m[1], w - m[2], h - m[3]))
        else:
            sign = 1.0 if rng.random() < 0.5 else -1.0
            arr = np.asarray(img, dtype=np.float64)
            if rng.random() < 0.5:
                arr = arr * (1.0 + sign * rng.uniform(0.05, 0.15))
            else:
                arr = arr + sign * rng.uniform(6.0, 20.0)
            img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img


def _verbatim_copy(img: Image.Image, rng: np.random.Generator) -> bytes:
    """Resize (0.7-1.3x, back or kept), brightness/contrast, mild Gaussian noise, JPEG quality 40-90."""
    w, h = img.size
    f = float(rng.uniform(0.7, 1.3))
    img = img.resize((max(16, round(w * f)), max(16, round(h * f))), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float64)
    mean = arr.mean()
    arr = (arr - mean) * rng.uniform(0.9, 1.1) + mean + rng.uniform(-12.0, 12.0)
    arr = arr + rng.normal(0.0, rng.uniform(1.0, 4.0), arr.shape)
    img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return _jpeg_bytes(img, int(rng.integers(40, 91)))


def object_crop_box(spec: SceneSpec, side: int, rng: np.random.Generator,
                    area: tuple[float, float] = (0.35, 0.6)) -> tuple[int, int, int, int]:
    """A crop box (x0, y0, x1, y1) of a side x side render covering ``area`` of it and containing one object
    (the whole object when the crop is wide enough, otherwise centred on it)."""
    obj = _pick(rng, spec.objects)
    cx, cy, r = obj.geometry(side)
    target = float(rng.uniform(*area)) * side * side
    aspect = math.exp(float(rng.uniform(math.log(0.75), math.log(4 / 3))))
    w = min(side, max(1, round(math.sqrt(target * aspect))))
    h = min(side, max(1, round(target / w)))

    def start(c: float, length: int) -> int:
        lo, hi = max(0, math.ceil(c + r) - length), min(math.floor(c - r), side - length)
        if lo > hi:
            return int(min(max(round(c - length / 2), 0), side - length))
        return int(rng.integers(max(0, lo), max(0, hi) + 1))

    x0, y0 = start(cx, w), start(cy, h)
    return x0, y0, x0 + w, y0 + h


def crop_and_paste(source: Image.Image, spec: SceneSpec, background: Image.Image, rng: np.random.Generator,
                   area: tuple[float, float] = (0.35, 0.6), scale: tuple[float, float] = (0.6, 1.0),
                   region: tuple[int, int, int, int] | None = None) -> tuple[Image.Image, dict]:
    """Crop part of ``source`` (a render of ``spec``) holding an object, scale it and paste it into a copy of
    ``background`` inside ``region`` (default: anywhere). Returns the image and {"src_box", "dst_box"}."""
    side = source.size[0]
    box = object_crop_box(spec, side, rng, area)
    rx0, ry0, rx1, ry1 = region if region is not None else (0, 0, *background.size)
    fit = min(1.0, (rx1 - rx0) / (box[2] - box[0]), (ry1 - ry0) / (box[3] - box[1]))
    s = fit * float(rng.uniform(*scale))
    nw, nh = max(1, round((box[2] - box[0]) * s)), max(1, round((box[3] - box[1]) * s))
    patch = source.crop(box).resize((nw, nh), Image.Resampling.BILINEAR)
    x = int(rng.integers(rx0, rx1 - nw + 1))
    y = int(rng.integers(ry0, ry1 - nh + 1))
    out = background.copy()
    out.paste(patch, (x, y))
    return out, {"src_box": tuple(int(v) for v in box), "dst_box": (x, y, x + nw, y + nh)}


def _recolour(tex: Texture, rng: np.random.Generator, kind: str | None = None) -> Texture:
    """Same texture, new colours (different palette names) and changed period/angle/phase."""
    c1 = _pick(rng, [c for c in COLOURS if c not in (tex.colour1, tex.colour2)])
    c2 = _pick(rng, [c for c in COLOURS if c not in (c1, tex.colour2)])
    factor = float(rng.uniform(0.6, 0.85)) if rng.random() < 0.5 else float(rng.uniform(1.2, 1.6))
    return replace(tex, kind=kind or tex.kind, colour1=c1, colour2=c2, rgb1=_jitter(c1, rng), rgb2=_jitter(c2, rng),
                   period=min(0.2, max(0.025, tex.period * factor)),
                   angle=float((tex.angle + rng.uniform(20.0, 70.0)) % 180.0), phase=float(rng.uniform(0.0, 1.0)))


def template_spec(spec: SceneSpec, rng: np.random.Generator) -> SceneSpec:
    """Same layout (shapes, sizes, positions), new colours and details; maybe one texture kind swapped."""
    n = len(spec.objects) + 1
    swap = int(rng.integers(n)) if rng.random() < 0.5 else -1
    kinds = [None] * n
    if swap >= 0:
        old = spec.background.kind if swap == 0 else spec.objects[swap - 1].texture.kind
        kinds[swap] = _pick(rng, [k for k in TEXTURE_KINDS if k != old])
    background = _recolour(spec.background, rng, kinds[0])
    objects = [replace(o, texture=_recolour(o.texture, rng, kinds[i + 1])) for i, o in enumerate(spec.objects)]
    return SceneSpec(background=background, objects=objects)


def texture_spec(spec: SceneSpec, rng: np.random.Generator) -> SceneSpec:
    """The source's exact texture instances on new shapes at new positions."""
    n = len(spec.objects)
    old_cells = {o.cell for o in spec.objects}
    fresh = [c for c in range(9) if c not in old_cells]
    cells = list(rng.choice(fresh, size=n, replace=False)) if len(fresh) >= n else list(rng.choice(9, n, replace=False))
    objects = [_random_object(rng, int(c), o.texture, shape=_pick(rng, [s for s in SHAPES if s != o.shape]))
               for c, o in zip(cells, spec.objects)]
    return SceneSpec(background=spec.background, objects=objects)


# ---------------------------------------------------------------------------------------------------------------
# Plan: everything except pixels, cheap to rebuild from the parameters
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Query:
    index: int
    query_id: str
    kind: str
    split: str
    prompt_kind: str
    groups: tuple[int, ...]  # source group A (and B for composites); () for novel
    member: int | None  # record (creation index) of group A whose caption is the verbatim prompt
    seed: int


@dataclass
class _Plan:
    train: int
    n_queries: int
    seed: int
    image_size: int
    specs: list[SceneSpec]  # per group
    members: list[list[int]]  # per group, records by creation index; the first is the pristine render
    rec_group: list[int]
    rec_id: list[str]
    rec_caption: list[str]
    group_split: list[str]
    signatures: set
    queries: list[_Query]

    def group_id(self, g: int) -> str:
        return f"g{g:05d}"


def _allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of total * weights with every entry at least 1 (total >= len(weights))."""
    raw = [total * w / sum(weights) for w in weights]
    counts = [int(math.floor(x)) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):
        while counts[i] < 1:
            j = max(range(len(counts)), key=lambda k: (counts[k], -k))
            counts[j] -= 1
            counts[i] += 1
    return counts


class _Cycle:
    """Draws items without replacement, reshuffling when the list runs out."""

    def __init__(self, items: list[int], rng: np.random.Generator):
        self.items, self.rng, self.order, self.pos = items, rng, [], 0

    def next(self) -> int:
        if self.pos >= len(self.order):
            self.order = [self.items[int(i)] for i in self.rng.permutation(len(self.items))]
            self.pos = 0
        self.pos += 1
        return self.order[self.pos - 1]


def _make_plan(train: int, queries: int, seed: int, image_size: int) -> _Plan:
    rng = _rng(seed, train, _P_CORPUS)
    n_groups = min(train - 1, max(2, int(round(train * SOURCE_FRACTION))))
    extras, left = [], train - n_groups
    while left > 0:
        k = min(left, int(rng.choice(_DUP_EXTRA, p=_DUP_EXTRA_P)))
        extras.append(k)
        left -= k
    n_extra = dict.fromkeys(range(n_groups), 0)
    for g, k in zip(rng.choice(n_groups, size=len(extras), replace=False), extras):
        n_extra[int(g)] = k

    specs = [random_scene(_rng(seed, g, _P_SCENE)) for g in range(n_groups)]
    members: list[list[int]] = []
    rec_group: list[int] = []
    rec_caption: list[str] = []
    for g, spec in enumerate(specs):
        members.append([])
        for m in range(1 + n_extra[g]):
            c = len(rec_group)
            crng = _rng(seed, c, _P_CAPTION)
            same = crng.random() < 0.35
            caption = rec_caption[members[g][0]] if m > 0 and same else caption_of(spec, crng)
            members[g].append(c)
            rec_group.append(g)
            rec_caption.append(caption)
    perm = rng.permutation(train)
    rec_id = [f"t{int(perm[c]):06d}" for c in range(train)]
    group_split = [""] * n_groups
    for rank, g in enumerate(rng.permutation(n_groups)):
        group_split[int(g)] = SPLITS[0] if rank < (n_groups + 1) // 2 else SPLITS[1]

    # Queries: kinds balanced across splits, prompt kinds independent of kinds.
    qrng = _rng(seed, train, queries, _P_QPLAN)
    entries: list[tuple[str, str]] = []
    for kind, n in zip(KINDS, _allocate(queries, KIND_WEIGHTS)):
        n_tune = n // 2 + (int(qrng.integers(2)) if n % 2 else 0)
        entries += [(kind, SPLITS[0])] * n_tune + [(kind, SPLITS[1])] * (n - n_tune)
    entries = [entries[int(i)] for i in qrng.permutation(len(entries))]
    prompt_kinds = [pk for pk, n in zip(PROMPT_KINDS, _allocate(queries, PROMPT_WEIGHTS)) for _ in range(n)]
    prompt_kinds = [prompt_kinds[int(i)] for i in qrng.permutation(queries)]
    by_split = {s: [g for g in range(n_groups) if group_split[g] == s] for s in SPLITS}
    cycles = {s: _Cycle(by_split[s], qrng) for s in SPLITS}
    plan_queries = []
    for qi, ((kind, split), pk) in enumerate(zip(entries, prompt_kinds)):
        qseed = int(_rng(seed, train, queries, qi, _P_QSEED).integers(0, 2**62))
        groups: tuple[int, ...] = ()
        member = None
        if kind != "novel":
            a = cycles[split].next()
            groups = (a,)
            if kind == "composite":
                groups = (a, _pick(qrng, [g for g in by_split[split] if g != a]))
            member = members[a][int(qrng.integers(len(members[a])))]
        plan_queries.append(_Query(qi, f"q{qi:06d}", kind, split, pk, groups, member, qseed))
    return _Plan(train, queries, seed, image_size, specs, members, rec_group, rec_id, rec_caption, group_split,
                 {_signature(s) for s in specs}, plan_queries)


def _novel_spec(plan: _Plan, q: _Query) -> SceneSpec:
    rng = _rng(q.seed, _Q_NOVEL)
    while True:
        spec = random_scene(rng)
        if _signature(spec) not in plan.signatures:
            return spec


def _build_query(plan: _Plan, q: _Query, load: Callable[[int], Image.Image]) -> tuple[bytes, str, dict]:
    """The query image as encoded bytes, its file extension, and what went into it (boxes for crops/composites)."""
    rng = _rng(q.seed, _Q_IMAGE)
    size = plan.image_size
    info: dict = {"boxes": []}
    if q.kind == "novel":
        return _png_bytes(render(_novel_spec(plan, q), size)), "png", info
    a = q.groups[0]
    spec = plan.specs[a]
    if q.kind == "verbatim":
        info["member"] = q.member
        return _verbatim_copy(load(int(q.member)), rng), "jpg", info
    if q.kind == "template":
        return _png_bytes(render(template_spec(spec, rng), size)), "png", info
    if q.kind == "texture":
        return _png_bytes(render(texture_spec(spec, rng), size)), "png", info
    if q.kind == "crop":
        background = render(random_scene(rng), size)
        img, boxes = crop_and_paste(render(spec, size), spec, background, rng)
        info["boxes"].append({"group": a, **boxes})
        return _png_bytes(img), "png", info
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
    return _png_bytes(img), "png", info


def _build_prompt(plan: _Plan, q: _Query) -> str:
    rng = _rng(q.seed, _Q_PROMPT)
    if q.prompt_kind == "empty":
        return ""
    if q.prompt_kind == "misleading":
        while True:
            c = int(rng.integers(plan.train))
            if plan.rec_group[c] not in q.groups:
                return plan.rec_caption[c]
    if q.kind == "novel":
        spec = _novel_spec(plan, q)
        caption = caption_of(spec, _rng(q.seed, _Q_CAPTION))
    else:
        spec, caption = plan.specs[q.groups[0]], plan.rec_caption[int(q.member)]
    if q.prompt_kind == "verbatim":
        return caption
    if q.prompt_kind == "paraphrase":
        return paraphrase_of(spec, rng)
    return partial_of(spec, caption, rng)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda desc: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn()]
    with Progress(*cols, console=Console(stderr=True)) as prog:
        task = prog.add_task("synth", total=total)
        yield lambda desc: prog.update(task, advance=1, description=desc)


def _counts(values: Sequence[str], keys: Sequence[str]) -> dict[str, int]:
    return {k: sum(1 for v in values if v == k) for k in keys}


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
                "split_groups": _counts(plan.group_split, SPLITS),
            },
            "queries": plan.n_queries,
            "kind": _counts([q.kind for q in qs], KINDS),
            "prompt_kind": _counts([q.prompt_kind for q in qs], PROMPT_KINDS),
            "split": _counts([q.split for q in qs], SPLITS),
            "kind_by_split": {s: _counts([q.kind for q in qs if q.split == s], KINDS) for s in SPLITS},
        },
    }


def generate(out: str | os.PathLike, train: int = 2000, queries: int = 1000, seed: int = 0, image_size: int = 256,
             progress: bool = True, overwrite: bool = False) -> dict:
    """Write the benchmark folder ``out`` and return its summary (also saved as synth.json).

    ``train`` counts corpus records (near duplicates included), ``queries`` counts queries. The folder is built in
    a temporary sibling and renamed into place at the end."""
    train = _check_int("train", train, 10)
    queries = _check_int("queries", queries, len(KINDS))
    seed = _check_int("seed", seed, 0)
    image_size = _check_int("image_size", image_size, 32, 4096)
    out = Path(out).absolute()
    if is_nonempty(out) and not overwrite:
        raise ValueError(f"output folder {str(out)!r} is not empty; pass overwrite=True to replace it")

    plan = _make_plan(train, queries, seed, image_size)
    with staged_folder(out, "synth-tmp") as tmp:
        (tmp / "train").mkdir(parents=True)
        (tmp / "queries").mkdir()
        with _progress(progress, train + queries) as advance:
            for g, spec in enumerate(plan.specs):
                base = render(spec, image_size)
                for m, c in enumerate(plan.members[g]):
                    img = base if m == 0 else _near_duplicate(base, _rng(seed, c, _P_DUP))
                    (tmp / "train" / f"{plan.rec_id[c]}.png").write_bytes(_png_bytes(img))
                    advance("corpus")

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
                advance("queries")

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
        raise ValueError(f"no query {query_id!r} in {str(out)!r}")
    q = matches[0]

    def load(c: int) -> Image.Image:
        with Image.open(out / "train" / f"{plan.rec_id[c]}.png") as im:
            return im.convert("RGB")

    data, _, info = _build_query(plan, q, load)
    sources = [{"source_id": plan.rec_id[plan.members[b["group"]][0]], "group": plan.group_id(b["group"]),
                "src_box": tuple(b["src_box"]), "dst_box": tuple(b["dst_box"])} for b in info["boxes"]]
    return {"query_id": q.query_id, "kind": q.kind, "groups": [plan.group_id(g) for g in q.groups],
            "image": Image.open(io.BytesIO(data)).convert("RGB"), "sources": sources}
