"""Image transforms that make synthetic queries from corpus scenes the way generated images copy training
images: near duplicates, verbatim copies, crops pasted elsewhere, templates (same layout, new colours) and
re-used textures."""
from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
from PIL import Image

from engine.scenes import COLOURS, SHAPES, TEXTURE_KINDS, SceneSpec, Texture, jitter, pick, random_object


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def near_duplicate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A web-style near duplicate: 1-2 of JPEG re-encode, rescale, crop (<= 5% of the area), brightness shift."""
    ops = rng.permutation(4)[: int(rng.integers(1, 3))]
    for op in ops:
        w, h = img.size
        if op == 0:
            img = Image.open(io.BytesIO(jpeg_bytes(img, int(rng.integers(50, 91))))).convert("RGB")
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


def verbatim_copy(img: Image.Image, rng: np.random.Generator) -> bytes:
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
    return jpeg_bytes(img, int(rng.integers(40, 91)))


def object_crop_box(spec: SceneSpec, side: int, rng: np.random.Generator,
                    area: tuple[float, float] = (0.35, 0.6)) -> tuple[int, int, int, int]:
    """A crop box (x0, y0, x1, y1) of a side x side render covering ``area`` of it and containing one object
    (the whole object when the crop is wide enough, otherwise centred on it)."""
    obj = pick(rng, spec.objects)
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


def recolour(tex: Texture, rng: np.random.Generator, kind: str | None = None) -> Texture:
    """Same texture, new colours (different palette names) and changed period/angle/phase."""
    c1 = pick(rng, [c for c in COLOURS if c not in (tex.colour1, tex.colour2)])
    c2 = pick(rng, [c for c in COLOURS if c not in (c1, tex.colour2)])
    factor = float(rng.uniform(0.6, 0.85)) if rng.random() < 0.5 else float(rng.uniform(1.2, 1.6))
    return replace(tex, kind=kind or tex.kind, colour1=c1, colour2=c2, rgb1=jitter(c1, rng), rgb2=jitter(c2, rng),
                   period=min(0.2, max(0.025, tex.period * factor)),
                   angle=float((tex.angle + rng.uniform(20.0, 70.0)) % 180.0), phase=float(rng.uniform(0.0, 1.0)))


def template_spec(spec: SceneSpec, rng: np.random.Generator) -> SceneSpec:
    """Same layout (shapes, sizes, positions), new colours and details; maybe one texture kind swapped."""
    n = len(spec.objects) + 1
    swap = int(rng.integers(n)) if rng.random() < 0.5 else -1
    kinds = [None] * n
    if swap >= 0:
        old = spec.background.kind if swap == 0 else spec.objects[swap - 1].texture.kind
        kinds[swap] = pick(rng, [k for k in TEXTURE_KINDS if k != old])
    background = recolour(spec.background, rng, kinds[0])
    objects = [replace(o, texture=recolour(o.texture, rng, kinds[i + 1])) for i, o in enumerate(spec.objects)]
    return SceneSpec(background=background, objects=objects)


def texture_spec(spec: SceneSpec, rng: np.random.Generator) -> SceneSpec:
    """The source's exact texture instances on new shapes at new positions."""
    n = len(spec.objects)
    old_cells = {o.cell for o in spec.objects}
    fresh = [c for c in range(9) if c not in old_cells]
    cells = list(rng.choice(fresh, size=n, replace=False)) if len(fresh) >= n else list(rng.choice(9, n, replace=False))
    objects = [random_object(rng, int(c), o.texture, shape=pick(rng, [s for s in SHAPES if s != o.shape]))
               for c, o in zip(cells, spec.objects)]
    return SceneSpec(background=spec.background, objects=objects)


