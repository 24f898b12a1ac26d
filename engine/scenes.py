"""Procedural scenes with LAION-like captions: the built-in world of the demo, the synthetic memorization
benchmark (``eval.synth``) and tests. A scene is a textured background plus 1-3 textured shapes on a 3x3 grid;
everything is a pure function of a seeded ``numpy`` generator (see :func:`seeded_rng`)."""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

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



def seeded_rng(*parts: int | str) -> np.random.Generator:
    """A generator seeded by a tuple of integers (strings count as their CRC-32), so streams for different
    purposes are independent and reproducible."""
    return np.random.default_rng([int(p) if not isinstance(p, str) else zlib.crc32(p.encode()) for p in parts])


def pick(rng: np.random.Generator, items: Sequence):
    """One item of ``items``, uniformly."""
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


def jitter(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    rgb = np.clip(np.array(PALETTE[name]) + rng.integers(-12, 13, 3), 0, 255)
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def random_texture(rng: np.random.Generator, kind: str | None = None, avoid: Sequence[str] = ()) -> Texture:
    """A random texture instance; ``avoid`` lists colour names its main colour must not take."""
    kind = kind if kind is not None else pick(rng, TEXTURE_KINDS)
    c1 = pick(rng, [c for c in COLOURS if c not in avoid])
    c2 = pick(rng, [c for c in COLOURS if c != c1])
    return Texture(kind=kind, colour1=c1, colour2=c2, rgb1=jitter(c1, rng), rgb2=jitter(c2, rng),
                   period=float(rng.uniform(0.04, 0.12)), angle=float(rng.uniform(0.0, 180.0)),
                   phase=float(rng.uniform(0.0, 1.0)), seed=int(rng.integers(0, 2**31)))


def random_object(rng: np.random.Generator, cell: int, texture: Texture, shape: str | None = None) -> SceneObject:
    return SceneObject(shape=shape if shape is not None else pick(rng, SHAPES), size=pick(rng, tuple(SIZES)),
                       cell=int(cell), dx=float(rng.uniform(-0.035, 0.035)), dy=float(rng.uniform(-0.035, 0.035)),
                       rotation=float(rng.uniform(-20.0, 20.0)), texture=texture)


def random_scene(rng: np.random.Generator) -> SceneSpec:
    """A random scene: a background texture and 1-3 objects on distinct grid cells."""
    background = random_texture(rng)
    n = int(rng.integers(1, 4))
    cells = rng.choice(9, size=n, replace=False)
    objects = [random_object(rng, int(c), random_texture(rng, avoid=(background.colour1,))) for c in cells]
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


def signature(spec: SceneSpec) -> tuple:
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
    prefix, suffix, sep = pick(rng, _PREFIXES), pick(rng, _SUFFIXES), pick(rng, _SEPARATORS)
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
        words = [pick(rng, _SYN_SIZE[o.size]), pick(rng, _SYN_COLOUR[o.texture.colour1]),
                 pick(rng, _SYN_SHAPE[o.shape]), pick(rng, _SYN_TEXTURE[o.texture.kind]),
                 pick(rng, _SYN_POSITION[o.position])]
        text = " ".join(w for w in words if w)
        phrases.append(f"{_article(text)} {text}")
    bg = spec.background
    colour = pick(rng, _SYN_COLOUR[bg.colour1])
    background = pick(rng, _PARA_BACKGROUNDS).format(a=_article(colour), c=colour, t=pick(rng, _SYN_TEXTURE[bg.kind]))
    body = f"{_join(phrases)} {background}".strip()
    return _wrap(body, pick(rng, _PARA_PREFIXES), pick(rng, _PARA_SUFFIXES), ", ")


def partial_of(spec: SceneSpec, caption: str, rng: np.random.Generator) -> str:
    """A fragment: one object's description, or about 40-60% of the caption's words kept in order."""
    if rng.random() < 0.5:
        return _object_phrase(pick(rng, spec.objects))
    words = caption.split()
    keep = max(1, int(round(len(words) * rng.uniform(0.4, 0.6))))
    idx = np.sort(rng.choice(len(words), size=keep, replace=False))
    return " ".join(words[int(i)] for i in idx)


