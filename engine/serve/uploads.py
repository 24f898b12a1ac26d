"""Reading an attribute request: the body under a size and time limit, the form, and the image.

Nothing here trusts the client: the body is counted while it arrives (a ``Content-Length`` over the limit is
refused before a byte is read), the form may hold only the known fields, the image's type is sniffed from its
bytes (the declared type is ignored), and its pixel count is checked from the header before it is decoded
(``engine.images.decode``). Every refusal is an :class:`ApiError` with a status, a code and a one-line message.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any, AsyncGenerator

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from ..images import ImageLimits, ImageRejected, decode

FIELD_BYTES = 64 * 1024  # the body may exceed the image limit by this much (the other fields, part headers)
FORM_FIELDS = ("image", "prompt", "k", "weights")
PRESHRINK_PIXELS = 4_000_000  # decoded uploads above this are downscaled at once (a queued query stays small)

#: Leading bytes of the image formats accepted, and their MIME types.
SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"),
)


class ApiError(Exception):
    """A refusal the client caused or must handle: HTTP status, a short code and a one-line message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def sniff_image_type(data: bytes) -> str | None:
    """The MIME type of an image from its first bytes (JPEG, PNG, GIF, WebP, BMP, TIFF), or None."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in SIGNATURES:
        if data.startswith(magic):
            return mime
    return None


async def limited_body(request: Request, limit: int, read_timeout_s: float) -> AsyncGenerator[bytes, None]:
    """The request body, chunk by chunk, refused (413) as soon as it passes ``limit`` bytes and (408) when it
    takes longer than ``read_timeout_s`` to arrive; a client that goes away mid-body raises ``ClientDisconnect``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad_request", f"Content-Length {declared[:40]!r} is not a number of bytes")
        if int(declared) > limit:
            raise ApiError(413, "upload_too_large",
                           f"the request body is {int(declared)} bytes, over the limit of {limit} bytes; "
                           "send a smaller image (see --max-upload-mb)")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + read_timeout_s
    chunks = request.stream().__aiter__()
    received = 0
    while True:
        left = deadline - loop.time()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(chunks.__anext__(), left)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise ApiError(408, "upload_timeout", f"the request body did not arrive within {read_timeout_s:g} s "
                                                  f"({received} bytes received); send it faster or smaller") from None
        received += len(chunk)
        if received > limit:
            raise ApiError(413, "upload_too_large", f"the request body passed the limit of {limit} bytes; send a "
                                                   "smaller image (see --max-upload-mb)")
        yield chunk


class _MultiPart(MultiPartParser):
    """Starlette's multipart parser, noting whether the closing boundary arrived: python-multipart ends a body
    cut short without an error, silently dropping the unfinished part (a truncated image)."""

    complete = False

    def on_end(self) -> None:
        self.complete = True


@dataclass
class AttributeForm:
    """The fields of one attribute request, checked."""

    image: bytes | None  # the uploaded bytes (not yet sniffed or decoded)
    filename: str | None  # the name the client gave its file (untrusted; shown escaped)
    prompt: str | None
    k: int
    weights: str


async def read_attribute_form(request: Request, *, max_upload: int, read_timeout_s: float, max_k: int,
                              max_prompt_chars: int, weights_names: tuple[str, ...]) -> AttributeForm:
    """Parse and check a multipart (or urlencoded, prompt-only) attribute request."""
    ctype = request.headers.get("content-type", "")
    main = ctype.split(";", 1)[0].strip().lower()
    body = limited_body(request, max_upload + FIELD_BYTES, read_timeout_s)
    if main == "multipart/form-data":
        parser: Any = _MultiPart(request.headers, body, max_files=1, max_fields=len(FORM_FIELDS),
                                 max_part_size=FIELD_BYTES)
    elif main == "application/x-www-form-urlencoded":
        parser = FormParser(request.headers, body, max_fields=len(FORM_FIELDS), max_part_size=FIELD_BYTES)
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data with the fields {', '.join(FORM_FIELDS)}; got content type "
                       f"{ctype[:80]!r}")
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, "bad_form", f"the form cannot be read: {e.message}") from None
    except ClientDisconnect:
        raise
    try:
        if isinstance(parser, _MultiPart) and not parser.complete:
            raise ApiError(400, "truncated_body", "the multipart body ends before its closing boundary (a truncated "
                                                  "upload?); send the whole request again")
        return await _checked(form, max_upload, max_k, max_prompt_chars, weights_names)
    finally:
        for _, v in form.multi_items():
            if isinstance(v, UploadFile):
                await v.close()


async def _checked(form, max_upload: int, max_k: int, max_prompt_chars: int,
                   weights_names: tuple[str, ...]) -> AttributeForm:
    items = form.multi_items()
    unknown = sorted({k for k, _ in items if k not in FORM_FIELDS})
    if unknown:
        raise ApiError(400, "bad_form", f"unknown form field(s) {', '.join(repr(u[:40]) for u in unknown)}; "
                                        f"valid: {', '.join(FORM_FIELDS)}")
    repeated = sorted({k for k, _ in items if len(form.getlist(k)) > 1})
    if repeated:
        raise ApiError(400, "bad_form", f"form field(s) {', '.join(repeated)} given more than once")
    image, filename = None, None
    up = form.get("image")
    if isinstance(up, UploadFile):
        if up.size is not None and up.size > max_upload:
            raise ApiError(413, "upload_too_large", f"the image is {up.size} bytes, over the limit of {max_upload} "
                                                    "bytes; send a smaller image (see --max-upload-mb)")
        data = await up.read()
        if len(data) > max_upload:
            raise ApiError(413, "upload_too_large", f"the image is over the limit of {max_upload} bytes")
        if data:
            image, filename = data, (up.filename or "upload")[:255]
        elif up.filename:  # a file that is empty (a browser form with no file chosen sends an unnamed empty part)
            raise ApiError(400, "empty_image", f"the uploaded image {up.filename[:255]!r} is empty (0 bytes); send "
                                               "the image file itself")
    elif isinstance(up, str) and up:
        raise ApiError(400, "bad_form", "the field 'image' must be a file part (filename=...), not text")
    prompt = form.get("prompt")
    prompt = prompt if isinstance(prompt, str) and prompt.strip() else None
    if prompt is not None and len(prompt) > max_prompt_chars:
        raise ApiError(400, "prompt_too_long", f"the prompt has {len(prompt)} characters, more than "
                                               f"{max_prompt_chars}; shorten it")
    raw_k = form.get("k")
    k = 10
    if isinstance(raw_k, str) and raw_k.strip():
        try:
            k = int(raw_k.strip(), 10)
        except ValueError:
            raise ApiError(400, "bad_k", f"k={raw_k[:40]!r} is not an integer; valid: 1..{max_k}") from None
    if not 1 <= k <= max_k:
        raise ApiError(400, "bad_k", f"k={k} is out of range; valid: 1..{max_k}")
    weights = form.get("weights")
    weights = weights.strip() if isinstance(weights, str) and weights.strip() else "auto"
    if weights not in weights_names:
        raise ApiError(400, "unknown_weights", f"unknown weights {weights[:64]!r}; valid: {', '.join(weights_names)}")
    if image is None and prompt is None:
        raise ApiError(400, "empty_query", "a query needs an image, a prompt, or both (form fields 'image', 'prompt')")
    return AttributeForm(image=image, filename=filename, prompt=prompt, k=k, weights=weights)


def decode_upload(data: bytes, limits: ImageLimits, draft: int | None) -> Image.Image:
    """Sniff, then decode an uploaded image exactly as a query file is decoded (same pixels as the CLI), the
    pixel limit checked from the header first; downscale it at once when it is over ``PRESHRINK_PIXELS``."""
    mime = sniff_image_type(data)
    if mime is None:
        raise ApiError(415, "not_an_image", "the upload is not an image: its bytes are no JPEG, PNG, GIF, WebP, "
                                            "BMP or TIFF (the type is sniffed from the content, not the header)")
    try:
        im = decode(data, limits, draft=draft)
    except ImageRejected as e:
        if "decompression bomb" in e.reason or "too large" in e.reason:
            raise ApiError(413, "image_too_large", f"{e.reason}: {e.detail[:200]}; this server takes at most "
                                                   f"{limits.max_pixels} pixels: send a smaller image") from None
        raise ApiError(422, "unreadable_image", f"the {mime} upload cannot be used: {e.reason}"
                                                f"{' (' + e.detail[:200] + ')' if e.detail else ''}") from None
    w, h = im.size
    if w * h > PRESHRINK_PIXELS:
        s = math.sqrt(PRESHRINK_PIXELS / (w * h))
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC, reducing_gap=3.0)
    return im
