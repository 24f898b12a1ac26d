"""Image and caption transforms that turn training records into queries resembling how generated images (and
their prompts) relate to training images: near copies, crops, colour and contrast shifts, blur and noise, flips
and rotations, text and emoji overlays, a record pasted into another image, two records composited, style and
texture changes; captions verbatim, reworded, partial, empty or taken from another record.

Self-calibration (``engine.calibrate``) makes its queries with them. Every function is a pure function of its
inputs and a ``numpy`` generator: the same seed gives the same pixels and words. Only PIL and numpy are used.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

WORK_SIDE = 384  # images are brought to at most this side before transforming (the encoders see 224 px)


def prepare(img: Image.Image, side: int = WORK_SIDE) -> Image.Image:
    """An RGB copy no larger than ``side`` on its longer side (aspect kept)."""
    img = img.convert("RGB")
    if max(img.size) > side:
        s = side / max(img.size)
        img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.Resampling.BICUBIC)
    return img


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


def _resize(img: Image.Image, f: float) -> Image.Image:
    w, h = img.size
    return img.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BICUBIC)


def _crop_area(img: Image.Image, rng: np.random.Generator, lo: float, hi: float) -> Image.Image:
    """A random crop keeping a fraction in [lo, hi] of the area, aspect jittered."""
    w, h = img.size
    area = _u(rng, lo, hi) * w * h
    aspect = math.exp(_u(rng, math.log(0.75), math.log(4 / 3))) * w / h
    cw = int(min(w, max(8, round(math.sqrt(area * aspect)))))
    ch = int(min(h, max(8, round(area / cw))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


# --------------------------------------------------------------------------------------------- single records
def near_copy(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A web-style near duplicate: one or two of JPEG re-encoding, rescaling, a sliver cropped off (at most 5% of
    the area) and a small brightness change."""
    for op in rng.permutation(4)[: int(rng.integers(1, 3))]:
        if op == 0:
            img = _jpeg(img, int(rng.integers(40, 91)))
        elif op == 1:
            img = _resize(img, _u(rng, 0.5, 0.9) if rng.random() < 0.6 else _u(rng, 1.1, 1.4))
        elif op == 2:
            img = _crop_area(img, rng, 0.95, 0.99)
        else:
            img = ImageEnhance.Brightness(img).enhance(_u(rng, 0.85, 1.15))
    return img


def crop_weak(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop keeping 60-90% of the area, rescaled."""
    return _resize(_crop_area(img, rng, 0.6, 0.9), _u(rng, 0.8, 1.3))


def crop_strong(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop keeping 20-50% of the area, enlarged."""
    return _resize(_crop_area(img, rng, 0.2, 0.5), _u(rng, 1.2, 2.0))


def colour(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation shifts, a hue rotation, or grey levels."""
    r = rng.random()
    if r < 0.15:
        return ImageOps.grayscale(img).convert("RGB")
    if r < 0.35:  # hue rotation
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(30, 226))) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")
    img = ImageEnhance.Brightness(img).enhance(_u(rng, 0.6, 1.4))
    img = ImageEnhance.Contrast(img).enhance(_u(rng, 0.5, 1.6))
    return ImageEnhance.Color(img).enhance(_u(rng, 0.0, 2.0))


def tone(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A mild global tone change (brightness, contrast, gamma): a generated image never reproduces the exact
    tones of its source."""
    img = ImageEnhance.Brightness(img).enhance(_u(rng, 0.8, 1.25))
    img = ImageEnhance.Contrast(img).enhance(_u(rng, 0.8, 1.25))
    g = _u(rng, 0.8, 1.25)
    return img.point([min(255, round(255 * (i / 255) ** g)) for i in range(256)] * 3)


def blur_noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur, additive Gaussian noise, pixelation, or sharpening plus noise."""
    r = rng.random()
    if r < 0.35:
        return img.filter(ImageFilter.GaussianBlur(_u(rng, 1.0, 4.0)))
    if r < 0.65:
        arr = np.asarray(img, np.float32)
        arr = arr + rng.normal(0.0, _u(rng, 6.0, 30.0), arr.shape)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if r < 0.85:
        w, h = img.size
        f = _u(rng, 0.08, 0.25)
        return img.resize((max(2, round(w * f)), max(2, round(h * f))), Image.Resampling.BILINEAR).resize(
            (w, h), Image.Resampling.NEAREST)
    img = img.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.integers(100, 250))))
    arr = np.asarray(img, np.float32) + rng.normal(0.0, _u(rng, 3.0, 10.0), (img.size[1], img.size[0], 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def geometry(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A mirror flip, a rotation (small, or a quarter turn), an aspect-ratio change, or letterbox bars."""
    r = rng.random()
    if r < 0.4:
        return ImageOps.mirror(img) if rng.random() < 0.8 else ImageOps.flip(img)
    if r < 0.6:
        if rng.random() < 0.4:
            return img.transpose(Image.Transpose.ROTATE_90 if rng.random() < 0.5 else Image.Transpose.ROTATE_270)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        return img.rotate(_u(rng, -25.0, 25.0), resample=Image.Resampling.BICUBIC, expand=rng.random() < 0.5,
                          fillcolor=fill)
    if r < 0.8:
        w, h = img.size
        return img.resize((max(8, round(w * _u(rng, 0.6, 1.6))), h), Image.Resampling.BICUBIC)
    w, h = img.size
    bar = int(round(_u(rng, 0.08, 0.25) * (h if rng.random() < 0.5 else w)))
    fill = (0, 0, 0) if rng.random() < 0.7 else tuple(int(v) for v in rng.integers(0, 256, 3))
    return ImageOps.expand(img, border=(0, bar, 0, bar) if rng.random() < 0.5 else (bar, 0, bar, 0), fill=fill)


_WORDS = ("when", "you", "finally", "get", "it", "mood", "me", "monday", "best", "ever", "sale", "new", "free",
          "love", "this", "wow", "look", "at", "that", "nope", "yes", "the", "real", "deal", "limited", "edition",
          "2024", "www", "shop", "com", "hello", "world", "vibes", "only", "omg", "lol", "art", "by", "studio")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed-size bitmap font
        return ImageFont.load_default()


def overlay_text(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Meme captions (outlined, or in a white band added above), a watermark, or a few words anywhere."""
    img = img.copy()
    d = ImageDraw.Draw(img)
    w, h = img.size
    n_words = int(rng.integers(2, 7))
    text = " ".join(_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), n_words))
    r = rng.random()
    size = max(8, int(h * _u(rng, 0.06, 0.14)))
    font = _font(size)
    colour_ = tuple(int(v) for v in rng.integers(0, 256, 3))
    if r < 0.2:  # meme format: a white band above the image with the caption in it
        band = int(h * _u(rng, 0.15, 0.35))
        out = ImageOps.expand(img, border=(0, band, 0, 0), fill=(255, 255, 255))
        ImageDraw.Draw(out).text((int(w * 0.04), max(0, (band - size) // 2)), text, font=font, fill=(0, 0, 0))
        return out
    if r < 0.5:  # meme style
        text = text.upper()
        for y in ([int(h * 0.03)] if rng.random() < 0.5 else [int(h * 0.03), int(h * 0.85)]):
            d.text((int(w * 0.04), y), text, font=font, fill=(255, 255, 255), stroke_width=max(1, size // 12),
                   stroke_fill=(0, 0, 0))
    elif r < 0.75:  # a translucent watermark
        layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
        ImageDraw.Draw(layer).text((int(rng.integers(0, max(1, w // 2))), int(rng.integers(0, max(1, h - size)))),
                                   text, font=font, fill=(*colour_, int(rng.integers(90, 200))))
        img = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
    else:
        for _ in range(int(rng.integers(1, 4))):
            d.text((int(rng.integers(0, max(1, w - size))), int(rng.integers(0, max(1, h - size)))), text,
                   font=font, fill=colour_)
    return img


def _emoji(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    kind = int(rng.integers(0, 4))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    if kind == 0:  # a smiley face
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 210, 40), outline=(40, 30, 10),
                  width=max(1, int(r / 12)))
        for ex in (-0.35, 0.35):
            d.ellipse([cx + ex * r - r * 0.1, cy - r * 0.35, cx + ex * r + r * 0.1, cy - r * 0.1], fill=(40, 30, 10))
        d.arc([cx - r * 0.55, cy - r * 0.4, cx + r * 0.55, cy + r * 0.6], 20, 160, fill=(40, 30, 10),
              width=max(1, int(r / 10)))
    elif kind == 1:  # a star
        pts = [(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(math.pi / 2 + i * math.pi / 5),
                cy - (r if i % 2 == 0 else r * 0.45) * math.sin(math.pi / 2 + i * math.pi / 5)) for i in range(10)]
        d.polygon(pts, fill=fill)
    elif kind == 2:  # a heart
        d.ellipse([cx - r, cy - r * 0.7, cx, cy + r * 0.1], fill=(230, 40, 70))
        d.ellipse([cx, cy - r * 0.7, cx + r, cy + r * 0.1], fill=(230, 40, 70))
        d.polygon([(cx - r * 0.97, cy - r * 0.15), (cx + r * 0.97, cy - r * 0.15), (cx, cy + r)], fill=(230, 40, 70))
    else:  # a sticker: a disc with a ring
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=(255, 255, 255), width=max(1, int(r / 6)))


def overlay_emoji(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One to four emoji-like stickers (smileys, stars, hearts, discs) drawn over the image."""
    img = img.copy()
    d = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(int(rng.integers(1, 5))):
        r = _u(rng, 0.07, 0.2) * min(w, h)
        _emoji(d, _u(rng, r, max(r + 1, w - r)), _u(rng, r, max(r + 1, h - r)), r, rng)
    return img


def style(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A style or texture change: posterised "cartoon", an oil-paint-like smoothing, edges or emboss, or the
    image cut into tiles and reshuffled (same textures, new layout)."""
    r = rng.random()
    if r < 0.3:
        img = img.filter(ImageFilter.MedianFilter(5))
        return ImageOps.posterize(img, int(rng.integers(2, 4))).filter(ImageFilter.EDGE_ENHANCE_MORE)
    if r < 0.5:
        return img.filter(ImageFilter.ModeFilter(int(rng.choice([5, 7])))).filter(ImageFilter.SMOOTH_MORE)
    if r < 0.65:
        f = ImageFilter.CONTOUR if rng.random() < 0.5 else ImageFilter.EMBOSS
        return Image.blend(img, img.filter(f), _u(rng, 0.4, 0.8))
    n = int(rng.integers(2, 4))
    w, h = img.size
    tw, th = w // n, h // n
    tiles = [img.crop((c * tw, r_ * th, (c + 1) * tw, (r_ + 1) * th)) for r_ in range(n) for c in range(n)]
    out = Image.new("RGB", (tw * n, th * n))
    for k, j in enumerate(rng.permutation(len(tiles))):
        out.paste(tiles[int(j)], ((k % n) * tw, (k // n) * th))
    return out


# --------------------------------------------------------------------------------------------- two images
def paste_into(img: Image.Image, background: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``img`` (or a crop of it) scaled to 40-80% of the background's side and pasted into ``background``."""
    bg = background.copy()
    if rng.random() < 0.4:
        img = _crop_area(img, rng, 0.5, 0.9)
    bw, bh = bg.size
    s = _u(rng, 0.4, 0.8) * min(bw / img.size[0], bh / img.size[1])
    patch = _resize(img, s)
    pw, ph = min(patch.size[0], bw), min(patch.size[1], bh)
    bg.paste(patch.crop((0, 0, pw, ph)), (int(rng.integers(0, bw - pw + 1)), int(rng.integers(0, bh - ph + 1))))
    return bg


def composite(a: Image.Image, b: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Two records in one image: one split at 35-65% with the rest taken from the other, or side by side."""
    if rng.random() < 0.6:
        side = max(a.size)
        a, b = a.resize((side, side), Image.Resampling.BICUBIC), b.resize((side, side), Image.Resampling.BICUBIC)
        cut = int(round(_u(rng, 0.35, 0.65) * side))
        out = a.copy()
        box = (cut, 0, side, side) if rng.random() < 0.5 else (0, cut, side, side)
        out.paste(b.crop(box), box[:2])
        return out
    h = min(a.size[1], b.size[1])
    a, b = _resize(a, h / a.size[1]), _resize(b, h / b.size[1])
    out = Image.new("RGB", (a.size[0] + b.size[0], h))
    out.paste(a, (0, 0))
    out.paste(b, (a.size[0], 0))
    return out


@dataclass(frozen=True)
class ImageTransform:
    name: str  # the kind of self-made query it makes
    fn: Callable  # (img, rng) -> img, or (img, other, rng) -> img when ``two`` is set
    two: bool = False  # takes a second image (a background, or a second source)
    description: str = ""  # one line


#: The transforms self-calibration makes sourced queries with, by name (``near_copy`` also calibrates what a
#: near-duplicate looks like to the index's models).
IMAGE_TRANSFORMS: dict[str, ImageTransform] = {t.name: t for t in (
    ImageTransform("near_copy", near_copy, description="JPEG re-encoding, rescaling, a sliver cropped, brightness"),
    ImageTransform("crop_weak", crop_weak, description="a crop keeping 60-90% of the area"),
    ImageTransform("crop_strong", crop_strong, description="a crop keeping 20-50% of the area"),
    ImageTransform("colour", colour, description="brightness, contrast, saturation, hue or grey levels"),
    ImageTransform("blur_noise", blur_noise, description="blur, noise, pixelation or sharpening"),
    ImageTransform("geometry", geometry, description="flips, rotations, aspect-ratio changes, letterbox bars"),
    ImageTransform("text", overlay_text, description="meme captions, watermarks or words drawn over it"),
    ImageTransform("emoji", overlay_emoji, description="emoji-like stickers drawn over it"),
    ImageTransform("style", style, description="posterised, smoothed, edges/emboss, or tiles reshuffled"),
    ImageTransform("paste", paste_into, True, "pasted (or a crop of it) into another image, 40-80% of its side"),
    ImageTransform("composite", composite, True, "two records split or side by side (both are sources)"),
)}


# --------------------------------------------------------------------------------------------- captions
def _words(caption: str) -> list[str]:
    return [w for w in (caption or "").split() if w]


def reword(caption: str, rng: np.random.Generator) -> str:
    """Some words dropped (20-40%) and neighbouring words or comma-separated parts reordered."""
    parts = [p.strip() for p in (caption or "").split(",") if p.strip()]
    if len(parts) > 1 and rng.random() < 0.5:
        parts = [parts[int(i)] for i in rng.permutation(len(parts))]
    words = _words(", ".join(parts))
    if len(words) <= 2:
        return " ".join(words[::-1])
    keep = rng.random(len(words)) >= _u(rng, 0.2, 0.4)
    keep[int(rng.integers(len(words)))] = True
    words = [w for w, k in zip(words, keep) if k]
    for _ in range(int(rng.integers(1, 3))):
        if len(words) > 1:
            i = int(rng.integers(len(words) - 1))
            words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def partial(caption: str, rng: np.random.Generator) -> str:
    """A contiguous run of 35-70% of the words."""
    words = _words(caption)
    if len(words) <= 2:
        return " ".join(words[:1])
    n = max(1, round(len(words) * _u(rng, 0.35, 0.7)))
    s = int(rng.integers(0, len(words) - n + 1))
    return " ".join(words[s:s + n])


#: Prompt kinds of self-made queries: how the prompt relates to the source record's caption ("misleading" is
#: another record's caption, chosen by the caller).
PROMPT_KINDS: tuple[str, ...] = ("verbatim", "reworded", "partial", "empty", "misleading")


def prompt_for(kind: str, caption: str, rng: np.random.Generator, other_caption: str = "") -> str:
    """The prompt of a self-made query of prompt kind ``kind`` (see :data:`PROMPT_KINDS`)."""
    if kind == "verbatim":
        return caption or ""
    if kind == "reworded":
        return reword(caption, rng)
    if kind == "partial":
        return partial(caption, rng)
    if kind == "empty":
        return ""
    if kind == "misleading":
        return other_caption or ""
    raise ValueError(f"unknown prompt kind {kind!r}; valid choices: {', '.join(PROMPT_KINDS)}")
