"""Safe image reading and resizing (PIL + numpy only).

Image references are file paths, or ``/path/shard.tar::member.jpg`` for a member of a tar shard
(img2dataset / webdataset output). Every failure becomes :class:`ImageRejected` with a short reason.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

TAR_SEP = "::"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 40_000_000  # e.g. 8000 x 5000; larger is treated as a decompression bomb
DEFAULT_MAX_BYTES = 100 * 1024 * 1024


_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


class ImageRejected(Exception):
    """An image that cannot be used; ``reason`` is a short phrase for the rejects file."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS  # width x height above which an image is rejected
    max_bytes: int = DEFAULT_MAX_BYTES  # encoded file size above which an image is rejected


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def read_bytes(ref: str, limits: ImageLimits = ImageLimits()) -> bytes:
    """The encoded bytes of an image reference (a path or ``shard.tar::member``)."""
    if TAR_SEP in ref:
        shard, member = ref.split(TAR_SEP, 1)
        try:
            with tarfile.open(shard) as tf:
                info = tf.getmember(member)
                if info.size > limits.max_bytes:
                    raise ImageRejected("file too large", f"{info.size} bytes > {limits.max_bytes}")
                f = tf.extractfile(info)
                if f is None:
                    raise ImageRejected("not an image", "tar member is not a regular file")
                return f.read()
        except FileNotFoundError:
            raise ImageRejected("missing file", shard) from None
        except KeyError:
            raise ImageRejected("missing file", f"{member} is not in {shard}") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ImageRejected("unreadable tar shard", str(e)) from None
    try:
        size = os.path.getsize(ref)
    except FileNotFoundError:
        raise ImageRejected("missing file", ref) from None
    except OSError as e:
        raise ImageRejected("unreadable file", str(e)) from None
    if os.path.isdir(ref):
        raise ImageRejected("not an image", "path is a folder")
    if not os.path.isfile(ref):  # a device (/dev/zero), a FIFO, a socket: never read (it may never end)
        raise ImageRejected("not an image", "not a regular file (a device, a pipe or a socket)")
    if size > limits.max_bytes:
        raise ImageRejected("file too large", f"{size} bytes > {limits.max_bytes}")
    if size == 0:
        raise ImageRejected("corrupt or truncated image", "empty file")
    try:
        with open(ref, "rb") as f:
            data = f.read(limits.max_bytes + 1)
    except OSError as e:  # no permission, an I/O error, a file that vanished...
        raise ImageRejected("unreadable file", e.strerror or str(e)) from None
    if len(data) > limits.max_bytes:  # it grew after the size check
        raise ImageRejected("file too large", f"over {limits.max_bytes} bytes")
    return data


def _check_size(im: Image.Image, limits: ImageLimits) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageRejected("corrupt or truncated image", f"size {w}x{h}")
    if w * h > limits.max_pixels:
        raise ImageRejected(
            "image too large (decompression bomb)", f"{w}x{h} = {w * h} pixels > limit {limits.max_pixels}"
        )


def to_rgb(im: Image.Image) -> Image.Image:
    """EXIF orientation applied; transparency flattened onto white; any mode converted to RGB."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im if im.mode == "RGB" else im.convert("RGB")


def decode(data: bytes, limits: ImageLimits = ImageLimits(), draft: int | None = None) -> Image.Image:
    """Decode to an RGB image, fully loaded, EXIF orientation applied. Raises ImageRejected.

    The pixel limit is checked from the header, before any decoding. (No warning filters are touched here:
    decoding runs on several threads and ``warnings.catch_warnings`` is not thread-safe.)"""
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data.startswith(_MAGIC):
            raise ImageRejected("corrupt or truncated image", "has an image signature but cannot be decoded") from None
        raise ImageRejected("not an image", "no known image format") from None
    except Image.DecompressionBombError as e:
        raise ImageRejected("image too large (decompression bomb)", str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types on hostile headers
        raise ImageRejected("corrupt or truncated image", f"{e.__class__.__name__}: {e}") from None
    _check_size(im, limits)
    try:
        if draft and im.format == "JPEG":
            im.draft("RGB", (draft, draft))  # decode at reduced scale: much faster on big photos
        im.load()
        return to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ImageRejected("image too large (decompression bomb)", str(e)) from None
    except Exception as e:  # noqa: BLE001 - truncated data surfaces as OSError, SyntaxError, ValueError...
        raise ImageRejected("corrupt or truncated image", f"{e.__class__.__name__}: {e}") from None


def load_image(ref: str, limits: ImageLimits = ImageLimits(), draft: int | None = None) -> Image.Image:
    return decode(read_bytes(ref, limits), limits, draft)


def encoder_inputs(
    source: bytes | Image.Image, limits: ImageLimits, clip_spec, dino_spec
) -> tuple[np.ndarray, np.ndarray]:
    """The two uint8 encoder inputs of an image: the one preparation shared by indexing and querying, so that
    the same file gives the same pixels on both sides. ``source`` is encoded bytes or an in-memory image;
    the specs have ``size`` and ``resize`` (see ``_encoders.InputSpec``)."""
    if isinstance(source, Image.Image):
        _check_size(source, limits)
        im = to_rgb(source)
    else:
        im = decode(source, limits, draft=max(clip_spec.size, dino_spec.size))
    return resize_square(im, clip_spec.size, clip_spec.resize), resize_square(im, dino_spec.size, dino_spec.resize)


def resize_square(im: Image.Image, size: int, mode: str) -> np.ndarray:
    """uint8 (size, size, 3). ``center_crop``: shortest side to ``size`` then centre crop; ``squash``: whole image."""
    if mode == "squash":
        out = im.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    elif mode == "center_crop":
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        r = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        out = r.crop((left, top, left + size, top + size))
    else:
        raise ValueError(f"unknown resize mode {mode!r}; valid choices: center_crop, squash")
    return np.asarray(out, dtype=np.uint8)


def thumbnail_jpeg(im: Image.Image, max_side: int, quality: int = 82) -> tuple[str, bytes]:
    """Re-encode a (possibly hostile) image as a fresh small JPEG; returns (mime type, bytes)."""
    t = im.copy()
    t.thumbnail((max_side, max_side), Image.BICUBIC)
    buf = io.BytesIO()
    t.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    return "image/jpeg", buf.getvalue()
