"""Self-contained HTML reports: one query's attribution (with patch correspondences) and a benchmark's hard cases.

Every page is a single file that works offline: images are decoded and re-encoded small by the engine and
embedded as ``data:`` URIs, the CSS is inline, there is no JavaScript, and a Content-Security-Policy forbids
every fetch. All text that comes from data (captions, prompts, ids, paths, model names) is untrusted and goes
through :func:`esc`, in text and in attributes alike.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from .._manifest import UNTRAINED_BANNER
from ..files import write_text_atomic
from ..images import ImageRejected, load_image, thumbnail_jpeg
from ..rankers import EVIDENCE, KINDS, features
from . import fmt_number

VIEW_SIDE = 320  # max side (px) of the query/source images in the patch views
THUMB_SIDE = 112  # max side (px) of card thumbnails
HEAT_UPSAMPLE = 8  # heat overlay pixels per grid cell (bilinear); the browser stretches it over the image
HEAT_ALPHA = 175  # opacity (0-255) of the overlay at the report's peak heat
MAX_LINKS = 8  # lines drawn between the strongest matched cells
MAX_CAPTION = 1000  # characters of a caption/prompt shown; the rest is cut (pages stay small)
MAX_ID = 300  # characters of an id/path shown
CASE_SIDE = 240  # max side (px) of a hard case's query image
PANEL, GAP = 320, 48  # patch view geometry in SVG user units: two square panels side by side

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

STOPWORDS = frozenset("""a an and are as at be but by for from has have in into is it its of on or over so than that the
their then there these this those to under was were with without very""".split())

_WORD = re.compile(r"\w+")


# --------------------------------------------------------------------------------------------- text
def esc(value: Any, limit: int | None = None) -> str:
    """Escape untrusted text for HTML text *and* attribute values (quotes included); cut to ``limit`` chars."""
    text = "" if value is None else str(value)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return html.escape(text, quote=True)


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text or "")} - STOPWORDS


def highlight(caption: str | None, prompt: str | None, limit: int = MAX_CAPTION, spans: list | None = None) -> str:
    """Escaped caption with the (non-stopword) words it shares with the prompt wrapped in <mark>. With ``spans``
    (a result's ``text["spans"]``: words and phrases found by the index's analysis chain, so "pillows" matches
    "pillow"), those words are marked and each shared phrase is wrapped in ``<span class="phrase">``."""
    text = caption or ""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    if spans is not None:
        return _marked(text, spans)
    shared = _words(prompt or "")
    out, pos = [], 0
    for m in _WORD.finditer(text):
        if m.group(0).lower() in shared:
            out.append(esc(text[pos:m.start()]))
            out.append(f"<mark>{esc(m.group(0))}</mark>")
            pos = m.end()
    out.append(esc(text[pos:]))
    return "".join(out)


def _marked(text: str, spans: list) -> str:
    """``text`` escaped, with word spans in <mark> and phrase spans in <span class="phrase"> (spans past the end
    of a cut caption are dropped; a phrase span holds whole words)."""
    words = sorted((int(s), int(e)) for s, e, kind in spans if kind == "word" and int(e) <= len(text))
    phrases = sorted((int(s), int(e)) for s, e, kind in spans if kind == "phrase" and int(e) <= len(text))
    cuts = sorted({0, len(text)} | {x for w in words + phrases for x in w})
    out = []
    for a, b in zip(cuts, cuts[1:]):
        piece = esc(text[a:b])
        if any(s <= a and b <= e for s, e in words):
            piece = f"<mark>{piece}</mark>"
        if any(s == a for s, _ in phrases):
            out.append('<span class="phrase">')
        out.append(piece)
        if any(e == b for _, e in phrases):
            out.append("</span>")
    return "".join(out)


def _text_html(text: dict | None) -> str:
    """The shared phrases and the caption's duplicate count, under the highlighted caption."""
    if not text:
        return ""
    parts = []
    if text.get("phrases"):
        parts.append("shared phrases: " + ", ".join(f"“{esc(p, 120)}”" for p in text["phrases"][:8]))
    dups = text.get("duplicates")
    if dups:
        parts.append(f'<span class="badge warn">caption shared by {int(dups)} other record{"s" if dups != 1 else ""}'
                     "</span>")
    return f'<div class="textev muted"><small>{" · ".join(parts)}</small></div>' if parts else ""


def _num(v: float | None, fmt: str = "{:.3f}") -> str:
    return fmt_number(v, fmt, missing="n/a")


# --------------------------------------------------------------------------------------------- images
@dataclass
class Embedded:
    """One embedded image: a data: URI and its pixel size, or the reason it could not be shown."""

    uri: str | None
    width: int = 0
    height: int = 0
    reason: str | None = None


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class ImageEmbedder:
    """Decodes each referenced image once (through the engine's safe reader) and re-encodes it small.

    Raw source bytes never reach the page: every image is decoded, downscaled and encoded afresh. Only a copy
    reduced to ``VIEW_SIDE`` is kept per image, so a report over huge photos does not hold them all decoded."""

    def __init__(self) -> None:
        self._decoded: dict[str, Image.Image | str] = {}
        self._done: dict[tuple[str, int], Embedded] = {}

    def _decode(self, ref: Any) -> Image.Image | str:
        if isinstance(ref, Image.Image):
            return ref.convert("RGB")
        key = os.fspath(ref)
        if key not in self._decoded:
            try:
                im = load_image(key, draft=2 * VIEW_SIDE)
                im.thumbnail((VIEW_SIDE, VIEW_SIDE), Image.BICUBIC, reducing_gap=3.0)
                self._decoded[key] = im
            except ImageRejected as e:
                self._decoded[key] = e.reason
            except Exception as e:  # noqa: BLE001 - a report must be written even when one image breaks
                self._decoded[key] = f"unreadable image ({e.__class__.__name__})"
        return self._decoded[key]

    def embed(self, ref: Any, max_side: int) -> Embedded:
        if ref is None:
            return Embedded(None, reason="caption-only record (no image)")
        if isinstance(ref, str) and ref.startswith("<"):  # e.g. "<PIL image>": given in memory, not kept
            return Embedded(None, reason="the image was given in memory and is not available to the report")
        cache_key = (f"<pil:{id(ref)}>" if isinstance(ref, Image.Image) else os.fspath(ref), max_side)
        if cache_key in self._done:
            return self._done[cache_key]
        im = self._decode(ref)
        if isinstance(im, str):
            out = Embedded(None, reason=f"image unavailable: {im}")
        else:
            mime, data = thumbnail_jpeg(im, min(max_side, VIEW_SIDE))
            w, h = Image.open(io.BytesIO(data)).size  # our own fresh encoding: only its header is read
            out = Embedded(_data_uri(mime, data), w, h)
        self._done[cache_key] = out
        return out


def img_tag(e: Embedded, alt: str, cls: str = "thumb") -> str:
    """An <img> for an embedded image, or a placeholder box that says why there is none."""
    if e.uri is None:
        return (f'<div class="ph {esc(cls)}" role="img" aria-label="{esc(e.reason)}">'
                f'<span>{esc(e.reason)}</span></div>')
    return (f'<img class="{esc(cls)}" src="{esc(e.uri)}" width="{e.width}" height="{e.height}" '
            f'alt="{esc(alt, MAX_ID)}" title="{esc(alt, MAX_ID)}">')


def heat_png(heat: np.ndarray, scale: float) -> str:
    """A G x G heat grid as a small semi-transparent RGBA PNG (bilinear-upsampled), as a data: URI.

    Transparent where there is no evidence; yellow to red, and more opaque (quadratically), as the heat grows to
    ``scale`` (the report's peak), so one colour means the same strength on every card."""
    h = np.asarray(heat, np.float32)
    g0, g1 = h.shape
    t = np.clip(h / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(h)
    up = Image.fromarray(t.astype(np.float32)).resize((g1 * HEAT_UPSAMPLE, g0 * HEAT_UPSAMPLE), Image.BILINEAR)
    t = np.clip(np.asarray(up, np.float32), 0.0, 1.0)
    rgba = np.zeros(t.shape + (4,), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = np.round(235 * (1.0 - t) ** 1.5).astype(np.uint8)  # yellow (weak) -> red (strong)
    rgba[..., 2] = 0
    rgba[..., 3] = np.round(HEAT_ALPHA * t ** 2).astype(np.uint8)  # weak evidence stays faint
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG", optimize=True)
    return _data_uri("image/png", buf.getvalue())


# --------------------------------------------------------------------------------------------- page parts
CSS = (Path(__file__).with_name("report.css")).read_text(encoding="utf-8")  # package data


def page(title: str, body: str) -> str:
    """The shared page shell: strict CSP, inline CSS, no scripts."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{esc(CSP)}\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta name=\"referrer\" content=\"no-referrer\">"
        f"<title>{esc(title, 200)}</title><style>{CSS}</style></head>\n"
        f"<body><main>\n{body}\n<footer>Generated by attrib. Self-contained: every image is embedded; "
        "nothing is fetched.</footer></main></body></html>\n"
    )


def untrained_text(models: dict | None, warnings: Iterable[str] = ()) -> str | None:
    """The untrained-weights warning for these models/warnings, or None when the weights are trained."""
    models = models or {}
    for w in [models.get("warning"), *warnings]:
        if w and "UNTRAINED" in str(w):
            return str(w)
    if models.get("pretrained") is False:
        return UNTRAINED_BANNER.format(profile=models.get("profile", "?"))
    return None


def banner(models: dict | None, warnings: Iterable[str] = ()) -> str:
    """A prominent banner when the weights are untrained (empty string otherwise)."""
    text = untrained_text(models, warnings)
    if text is None:
        return ""
    return ('<div class="banner" role="alert"><strong>⚠ Untrained weights: not a real attribution</strong>'
            f'{esc(text)}</div>')


def prompt_html(prompt: str | None) -> str:
    """The prompt as a prominent paragraph (escaped), or a muted "(no prompt)"."""
    if not (prompt or "").strip():
        return '<p class="prompt"><span class="muted">(no prompt)</span></p>'
    return f'<p class="prompt">{esc(prompt, MAX_CAPTION)}</p>'


def models_dl(models: dict) -> str:
    """<dt>/<dd> rows describing the models (profile, weights, clip, dino)."""
    trained = models.get("pretrained")
    rows = [("profile", models.get("profile")),
            ("weights", "pretrained" if trained else "unknown" if trained is None else "UNTRAINED (random init)"),
            ("clip", models.get("clip")), ("dino", models.get("dino"))]
    return "".join(f"<dt>{esc(k)}</dt><dd>{esc(v, MAX_ID)}</dd>" for k, v in rows if v is not None)


# --------------------------------------------------------------------------------------------- query report


def _bar(fraction: float | None, cls: str = "") -> str:
    if fraction is None:
        return f'<div class="{" ".join(["bar", "na", *cls.split()])}" title="n/a"></div>'
    pct = 100.0 * min(1.0, max(0.0, fraction))
    return f'<div class="{" ".join(["bar", *cls.split()])}"><span style="width:{pct:.1f}%"></span></div>'


def _evidence_html(ev: dict, scales: dict[str, float]) -> str:
    """One bar per registered feature: cosines drawn on 0..1 as they are, scores against the largest value
    among the results shown (``scales``)."""
    parts = []
    for f in features():
        v = ev.get(f.name)
        ok = v is not None and math.isfinite(float(v))
        if not ok:
            frac = None
        elif KINDS[f.kind]["bar"] == "relative":
            frac = float(v) / scales[f.name] if scales.get(f.name, 0) > 0 else 0.0
        else:
            frac = float(v)  # e.g. a cosine in [-1, 1], drawn on 0..1, clipped
        parts.append(f'<span>{esc(f.label)}</span>{_bar(frac)}<span class="v">{_num(v if ok else None)}</span>')
    return f'<div class="ev" aria-label="evidence per ranker">{"".join(parts)}</div>'


def evidence_scales(results: Sequence[Any]) -> dict[str, float]:
    """The largest finite value of each relative-bar feature among ``results`` (candidates)."""
    out = {}
    for f in features():
        if KINDS[f.kind]["bar"] == "relative":
            vals = [float(r.evidence[f.name]) for r in results if r.evidence.get(f.name) is not None
                    and math.isfinite(float(r.evidence[f.name]))]
            out[f.name] = max(vals, default=0.0)
    return out


def _fit(w: int, h: int, side: int) -> tuple[float, float, float, float]:
    """Where a w x h image sits, aspect kept and centred, in a side x side square: x, y, width, height."""
    s = side / max(w, h, 1)
    rw, rh = w * s, h * s
    return (side - rw) / 2, (side - rh) / 2, rw, rh


def _cell_xy(cell: int, grid: int, rect: tuple[float, float, float, float], dx: float) -> tuple[float, float]:
    r, c = divmod(int(cell), grid)
    x, y, w, h = rect
    return dx + x + (c + 0.5) / grid * w, y + (r + 0.5) / grid * h


QUERY_SYMBOL = "attrib-query-view"  # the query image is embedded once and drawn in every card with <use>


def svg_symbol(e: Embedded, symbol_id: str) -> str:
    """A hidden SVG holding ``e`` once as a <symbol>, so every patch view can <use> it instead of a copy."""
    return (f'<svg width="0" height="0" style="position:absolute" aria-hidden="true" focusable="false"><defs>'
            f'<symbol id="{esc(symbol_id)}" viewBox="0 0 {e.width} {e.height}" preserveAspectRatio="none">'
            f'<image href="{esc(e.uri)}" width="{e.width}" height="{e.height}"/></symbol></defs></svg>')


def _svg_panel(e: Embedded, heat_uri: str | None, dx: float, label: str, cls: str,
               symbol: str | None = None) -> tuple[str, tuple]:
    if e.uri is None:
        rect = (0.0, 0.0, float(PANEL), float(PANEL))
        head, _, why = (e.reason or "image unavailable").partition(": ")
        lines = [head, why] if why else [head]
        text = "".join(f'<text x="{dx + PANEL / 2}" y="{PANEL / 2 + 30 * (i - (len(lines) - 1) / 2):.0f}" '
                       f'text-anchor="middle" font-size="24" fill="#59636e">{esc(t, 40)}</text>'
                       for i, t in enumerate(lines))
        return (f'<rect x="{dx}" y="0" width="{PANEL}" height="{PANEL}" fill="#eaeef2" stroke="#8c959f" '
                f'stroke-dasharray="6 4"/>{text}'), rect
    rect = _fit(e.width, e.height, PANEL)
    x, y, w, h = rect
    pos = f'x="{dx + x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}"'
    if symbol is not None:
        out = f'<use class="view {cls}" href="#{esc(symbol)}" {pos}><title>{esc(label, MAX_ID)}</title></use>'
    else:
        out = (f'<image class="view {cls}" href="{esc(e.uri)}" {pos} preserveAspectRatio="none">'
               f'<title>{esc(label, MAX_ID)}</title></image>')
    if heat_uri is not None:
        out += f'<image class="heat {cls}" href="{esc(heat_uri)}" {pos} preserveAspectRatio="none"/>'
    out += f'<rect {pos} fill="none" stroke="#8c959f" stroke-width="1"/>'
    return out, rect


def pair_view(q_img: Embedded, s_img: Embedded, corr: Any, scale: float, source_label: str,
              q_symbol: str | None = None) -> str:
    """Query and source side by side in one SVG, heat overlays on both, lines between the strongest matches."""
    grid = int(corr.grid)
    q_svg, q_rect = _svg_panel(q_img, heat_png(corr.query_heat, scale), 0.0, "query", "q", q_symbol)
    s_svg, s_rect = _svg_panel(s_img, heat_png(corr.source_heat, scale) if s_img.uri else None,
                               float(PANEL + GAP), source_label, "s")
    links = []
    strongest = max((m[2] for m in corr.matches), default=0.0)
    if q_img.uri is not None and s_img.uri is not None:
        for qc, sc, heat in corr.matches[:MAX_LINKS]:
            x1, y1 = _cell_xy(qc, grid, q_rect, 0.0)
            x2, y2 = _cell_xy(sc, grid, s_rect, float(PANEL + GAP))
            op = 0.35 + 0.65 * (heat / strongest if strongest > 0 else 0)
            links.append(
                f'<g class="link" opacity="{op:.2f}"><line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                f'stroke="#0b1f3a" stroke-width="4"/><line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                f'stroke="#7ee2ff" stroke-width="2"/><circle cx="{x1:.1f}" cy="{y1:.1f}" r="4" fill="#7ee2ff" '
                f'stroke="#0b1f3a"/><circle cx="{x2:.1f}" cy="{y2:.1f}" r="4" fill="#7ee2ff" stroke="#0b1f3a"/></g>')
    peak = max(float(np.max(corr.query_heat)), float(np.max(corr.source_heat)))
    note = (f"{len(corr.matches)} mutual cell matches; strongest {strongest:.3f}" if corr.matches
            else "no cell of this record matches the query better than the other candidates do")
    return (
        f'<figure class="pair" style="margin:0"><svg viewBox="0 0 {2 * PANEL + GAP} {PANEL}" role="img" '
        f'aria-label="patch correspondences between the query and {esc(source_label, MAX_ID)}">'
        f'{q_svg}{s_svg}{"".join(links)}</svg>'
        f'<p class="muted">Left: query · right: this record. Heat <span class="legend" title="weak to strong">'
        f'</span> = where this record explains the query better than the other candidates do (peak {peak:.3f}, '
        f'{grid}×{grid} cells); lines = strongest matched cells. {esc(note)}.</p></figure>'
    )


def _ranks_html(ranks: dict) -> str:
    parts = [f"{esc(n)} {('#' + str(int(v))) if v else '–'}" for n, v in (ranks or {}).items()]
    return f'<div class="ranks muted">ranks: {" · ".join(parts)}</div>'


def _support_html(r: Any) -> str:
    """Which kinds of evidence carried the result: each kind's part of the fused score above what the strongest
    unrelated record reaches (learned fusion only)."""
    support = getattr(r, "support", None)
    if support is None:
        return ""
    parts = [f'{esc(k)} {"+" if v is not None and v > 0 else ""}{_num(v, "{:.2f}")}' for k, v in support.items()]
    carried = ", ".join(esc(k) for k in (getattr(r, "carried_by", None) or [])) or "nothing on its own"
    return (f'<div class="support muted" title="{esc(", ".join(f"{k}: {d}" for k, d in EVIDENCE.items()))}">'
            f'carried by: <b>{carried}</b> (log-odds above the best unrelated record: {" · ".join(parts)})</div>')


def _result_card(r: Any, prompt: str, images: ImageEmbedder, q_img: Embedded, corr: Any, scale: float,
                 scales: dict[str, float], query_has_image: bool) -> str:
    rid = r.id
    thumb = images.embed(r.image, THUMB_SIDE)
    above = r.above_threshold
    badges = []
    if above is True:
        badges.append('<span class="badge yes">above threshold</span>')
    elif above is False:
        badges.append('<span class="badge no">below threshold</span>')
    if r.share is not None:
        badges.append(f'<span class="badge yes">share {100 * float(r.share):.1f}%</span>')
    if getattr(r, "caption_match_only", None):
        badges.append('<span class="badge warn" title="above the threshold on the prompt alone: its image evidence '
                      'is at the level of unrelated records">caption match only</span>')
    head = (f'<header><span class="rank">#{int(r.rank)}</span><h3 class="id">{esc(rid, MAX_ID)}</h3>'
            f'<span>fused score <b>{_num(r.score, "{:.4f}")}</b></span>{"".join(badges)}</header>')
    left = (f'<div><div class="meta">{img_tag(thumb, f"record {rid}")}<div>'
            f'<p class="caption">{highlight(r.caption, prompt, spans=(r.text or {}).get("spans"))}</p>'
            f'{_text_html(r.text)}'
            f'<div class="muted"><small>{esc(r.image or "no image", MAX_ID)}</small></div></div></div>'
            f'{_evidence_html(r.evidence or {}, scales)}{_ranks_html(r.ranks or {})}{_support_html(r)}</div>')
    if r.image is None:
        right = '<div class="ph">caption-only record: no image, no patch view</div>'
    elif corr is not None:
        right = pair_view(q_img, images.embed(r.image, VIEW_SIDE), corr, scale, f"record {rid}",
                          QUERY_SYMBOL if q_img.uri is not None else None)
    elif not query_has_image:
        right = '<div class="ph">no patch view: the query has no image</div>'
    else:
        right = '<div class="ph">no patch view: no patch features for this record</div>'
    cls = "card above" if above else "card"
    return f'<article class="{cls}" data-rank="{int(r.rank)}">{head}{left}<div>{right}</div></article>'


def _verdict_html(result: Any) -> str:
    v = result.verdict
    like = v.likely_source
    cls = "good" if like else ("none" if like is False else "unk")
    out = [f'<p class="verdict {cls}">{esc(v.label)}</p>']
    thr = v.threshold
    out.append(f'<p class="muted">threshold: {_num(thr, "{:.4f}") if thr is not None else "none (not calibrated)"}'
               f'{" · results above it: " + str(int(v.n_above)) if v.n_above is not None else ""}</p>')
    shared = [r for r in result.results if r.share is not None]
    if shared:
        rows = "".join(f'<span class="id">#{int(r.rank)} {esc(r.id, 80)}</span>'
                       f'{_bar(float(r.share), "share")}<span>{100 * float(r.share):.1f}%</span>'
                       for r in shared)
        out.append(f'<h3>Attribution share (estimate)</h3><div class="shares">{rows}</div>')
        out.append(f'<p class="muted"><small>{esc(v.share_note or "similarity-based estimates, not causal claims")}'
                   f'</small></p>')
    return "".join(out)


def report_correspondences(index: Any, result: Any) -> list[Any]:
    """The patch correspondences a query report draws, one per result (None where there is none). This is the
    only part of a report that reads the index; a server computes it where the index is used and renders the
    page elsewhere (:func:`query_report_html`)."""
    qin = getattr(result, "query_input", None)
    rows = [int(r.row) for r in result.results]
    if qin is None or qin.get("dino_cells") is None or not rows:
        return [None] * len(rows)
    # the pool the results came from is the baseline: no second search
    return list(index.correspondences(qin, rows, baseline_rows=getattr(result, "pool_rows", None)))


def write_query_report(index: Any, result: Any, out_path: str | os.PathLike, *, query_image: Any = None) -> Path:
    """Write one query's attribution (an :class:`engine.Attribution`) as a self-contained HTML page; returns its path.

    ``query_image`` (a path or PIL image) overrides ``result.query["image"]``, e.g. for in-memory queries."""
    return write_text_atomic(out_path, query_report_html(index, result, query_image=query_image))


def query_report_html(index: Any, result: Any, *, query_image: Any = None,
                      correspondences: Sequence[Any] | None = None, index_label: str | None = None,
                      query_label: str | None = None) -> str:
    """One query's attribution as a self-contained HTML page (the text :func:`write_query_report` writes).

    ``correspondences`` (from :func:`report_correspondences`) are computed from ``index`` when not given;
    ``index_label`` replaces the index's path in the page, ``query_label`` the query image's name (e.g. for an
    upload given in memory)."""
    images = ImageEmbedder()
    prompt = (result.query or {}).get("prompt") or ""
    q_ref = query_image if query_image is not None else (result.query or {}).get("image")
    q_view = images.embed(q_ref, VIEW_SIDE) if q_ref is not None else Embedded(None, reason="no query image")
    qin = getattr(result, "query_input", None)
    query_has_image = qin is not None and qin.get("dino_cells") is not None
    corrs = list(correspondences) if correspondences is not None else report_correspondences(index, result)
    if len(corrs) != len(result.results):
        raise ValueError(f"{len(corrs)} correspondences for {len(result.results)} results")
    heats = [float(np.max(h)) for c in corrs if c is not None for h in (c.query_heat, c.source_heat)]
    scale = max(heats, default=0.0)
    scales = evidence_scales(result.results)
    models = result.models.to_dict()
    q_name = (query_label if query_label is not None else q_ref if isinstance(q_ref, str)
              else "none" if q_ref is None else "(in memory)")
    warnings = list(result.warnings or [])
    other_warnings = [w for w in warnings if "UNTRAINED" not in w]
    fusion = result.fusion or {}
    query_panel = (
        f'<section class="panel"><h2 style="margin-top:0">Query</h2><div class="query">'
        f'{img_tag(q_view, "query image", "view")}<div>'
        f'{prompt_html(prompt)}<dl class="kv"><dt>image</dt><dd>{esc(q_name, MAX_ID)}</dd>'
        f'{models_dl(models)}<dt>fusion</dt><dd>{esc(fusion.get("note") or fusion.get("method"))}</dd>'
        + (f'<dt>weights</dt><dd>{esc(fusion.get("weights"), MAX_ID)}: learned by {esc(fusion.get("learned_by"))} '
           f'{esc(fusion.get("learned_at") or "")} on {esc(fusion.get("learned_on"), 300)}</dd>'
           if fusion.get("learned_by") else "")
        + f'<dt>index</dt><dd>{esc(index_label if index_label is not None else getattr(index, "path", ""), MAX_ID)}'
        f'</dd></dl>'
        + ("".join(f'<p class="muted"><small>{esc(w)}</small></p>' for w in other_warnings))
        + "</div></div></section>"
    )
    verdict = f'<section class="panel"><h2 style="margin-top:0">Verdict</h2>{_verdict_html(result)}</section>'
    cards = "".join(_result_card(r, prompt, images, q_view, c, scale, scales, query_has_image)
                    for r, c in zip(result.results, corrs))
    if not result.results:
        cards = '<p class="muted">No candidates were found.</p>'
    shared_defs = svg_symbol(q_view, QUERY_SYMBOL) if q_view.uri and any(c is not None for c in corrs) else ""
    body = (
        f'{shared_defs}{banner(models, warnings)}<h1>Attribution report</h1>{query_panel}{verdict}'
        f'<h2>Candidates ({len(result.results)})</h2><div class="cards">{cards}</div>'
    )
    return page("attrib report: " + (prompt[:80] or str(q_ref or "query")), body)


# --------------------------------------------------------------------------------------------- hard cases
def _tile(images: ImageEmbedder, item: dict, extra: str = "", relevant: bool = False) -> str:
    e = images.embed(item.get("image"), THUMB_SIDE)
    cls = "tile rel" if relevant else "tile"
    cap = esc(item.get("caption"), 200)
    return (f'<figure class="{cls}">{img_tag(e, str(item.get("id")), "timg")}<figcaption><span class="id">'
            f'{esc(item.get("id"), 80)}</span>{extra}<br><span class="muted">{cap}</span></figcaption></figure>')


def _case_card(c: dict, images: ImageEmbedder) -> str:
    reason = c.get("reason") or ""
    badge = "no" if reason == "miss" else "warn"
    frr = c.get("first_relevant_rank")
    facts = [f'first relevant rank: {int(frr) if frr is not None else "not found"}',
             f'top score: {_num(c.get("top_score"), "{:.4f}")}',
             f'threshold: {_num(c.get("threshold"), "{:.4f}")}']
    head = (f'<header><h3 class="id">{esc(c.get("query_id"), MAX_ID)}</h3><span class="badge {badge}">'
            f'{esc(reason)}</span><span class="muted"><small>{esc(" · ".join(facts))}</small></span></header>')
    q = images.embed(c.get("image"), CASE_SIDE) if c.get("image") else Embedded(None, reason="no query image")
    left = f'<div class="q">{img_tag(q, "query " + str(c.get("query_id")), "view")}{prompt_html(c.get("prompt"))}</div>'
    expected = c.get("expected") or []
    exp_html = ("".join(_tile(images, e, relevant=True) for e in expected) if expected
                else '<p class="muted">nothing: this query has no source in the corpus</p>')
    returned = c.get("returned") or []
    ret_html = "".join(
        _tile(images, r, f' #{i} <b>{_num(r.get("score"), "{:.3f}")}</b>{" ✓ relevant" if r.get("relevant") else ""}',
              relevant=bool(r.get("relevant")))
        for i, r in enumerate(returned, 1)) or '<p class="muted">nothing came back</p>'
    right = (f'<div><h4>Expected ({len(expected)})</h4><div class="strip">{exp_html}</div>'
             f'<h4>Returned ({len(returned)})</h4><div class="strip">{ret_html}</div></div>')
    return f'<article class="case">{head}{left}{right}</article>'


def write_hard_cases_report(cases: Sequence[dict], out_path: str | os.PathLike, title: str, models: dict,
                            notes: Sequence[str] | None = None) -> Path:
    """Write a benchmark's hardest cases, grouped by query kind, as a self-contained HTML page."""
    images = ImageEmbedder()
    kinds: dict[str, list[dict]] = {}
    for c in cases:
        kinds.setdefault(str(c.get("kind") or "unknown"), []).append(c)
    notes_html = ("<ul class=\"notes\">" + "".join(f"<li>{esc(n, MAX_CAPTION)}</li>" for n in notes) + "</ul>"
                  if notes else "")
    head = (f'{banner(models)}<h1>{esc(title, 200)}</h1><section class="panel"><dl class="kv">{models_dl(models or {})}'
            f'<dt>cases</dt><dd>{len(cases)} in {len(kinds)} kinds</dd></dl>{notes_html}</section>')
    sections = []
    for kind in sorted(kinds):
        group = kinds[kind]
        cards = "".join(_case_card(c, images) for c in group)
        sections.append(f'<section><h2>{esc(kind, 200)} <span class="muted">({len(group)} '
                        f'case{"s" if len(group) != 1 else ""})</span></h2><div class="cards">{cards}</div></section>')
    if not cases:
        sections.append('<p class="muted">No hard cases: every query was answered correctly.</p>')
    return write_text_atomic(out_path, page(title, head + "".join(sections)))
