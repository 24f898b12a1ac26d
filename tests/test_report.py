"""HTML reports: escaping of hostile text, embedded re-encoded images, the patch heatmaps of a known copy,
the hard-cases page, and a real headless-Chromium check (marked ``browser``)."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import world
from PIL import Image

import engine
from engine.report.html import (
    CSP,
    THUMB_SIDE,
    VIEW_SIDE,
    banner,
    esc,
    highlight,
    write_hard_cases_report,
    write_query_report,
)

COPY_SEED = 7  # mosaic seed; seeds 0-9 all pass the heat checks, this one with the widest margin (~0.8 / 0.8)
PROMPT = "a mosaic texture pasted on teal"
SHOTS_DIR = Path("/tmp/attrib-report-shots")

HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "'><svg onload=alert(1)>",
    "</style><script>alert(2)</script>",
    "javascript:alert(document.cookie)",
]


# --------------------------------------------------------------------------------------------- helpers
class PageAudit(HTMLParser):
    """Everything a safety check needs from a page: tags, event-handler attributes, image sources, texts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.handlers: list[tuple[str, str]] = []
        self.img_srcs: list[str] = []
        self.other_urls: list[tuple[str, str, str]] = []
        self.csp: list[str] = []
        self.uses: list[str] = []
        self.ids: list[str] = []
        self.text: list[str] = []
        self.h2: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            value = value or ""
            if name == "id":
                self.ids.append(value)
            if name.startswith("on"):
                self.handlers.append((tag, name))
            if tag == "img" and name == "src":
                self.img_srcs.append(value)
            elif tag == "image" and name in ("href", "xlink:href"):
                self.img_srcs.append(value)
            elif tag == "use" and name in ("href", "xlink:href"):
                self.uses.append(value)
            elif name in ("href", "src", "action", "formaction", "data", "poster", "srcset", "background"):
                self.other_urls.append((tag, name, value))
            if name == "style" and "url(" in value:
                self.other_urls.append((tag, name, value))
        if tag == "meta" and dict(attrs).get("http-equiv", "").lower() == "content-security-policy":
            self.csp.append(dict(attrs).get("content", ""))
        if tag == "h2":
            self._in_h2 = True
            self.h2.append("")

    handle_startendtag = handle_starttag

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.h2[-1] += data


def audit(path: Path) -> tuple[str, PageAudit]:
    page = path.read_text(encoding="utf-8")
    a = PageAudit()
    a.feed(page)
    a.close()
    return page, a


def assert_safe(page: str, a: PageAudit) -> None:
    assert "script" not in a.tags, "a <script> element made it into the page"
    for tag in ("iframe", "object", "embed", "link", "base", "form", "frame"):
        assert tag not in a.tags, f"<{tag}> in the page"
    assert a.handlers == [], f"event-handler attributes: {a.handlers}"
    assert a.img_srcs and all(s.startswith("data:image/") for s in a.img_srcs)
    assert a.other_urls == [], f"non-image URLs: {a.other_urls[:3]}"
    assert all(u.startswith("#") and u[1:] in a.ids for u in a.uses), "<use> may only point inside the page"
    assert a.csp == [CSP]
    assert "default-src 'none'" in CSP and "img-src data:" in CSP and "style-src 'unsafe-inline'" in CSP
    assert "<script" not in page.lower()
    assert '"><img src=x' not in page and "'><svg" not in page.lower()


def data_images(page: str) -> list[tuple[str, bytes]]:
    return [(m.group(1), base64.b64decode(m.group(2)))
            for m in re.finditer(r'"data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"', page)]


def card(page: str, record_id: str) -> str:
    """The HTML of the result card whose id heading is ``record_id`` (escaped)."""
    cards = re.findall(r'<article class="card[^"]*".*?</article>', page, flags=re.S)
    hit = [c for c in cards if f'<h3 class="id">{esc(record_id)}</h3>' in c]
    assert len(hit) == 1, f"expected one card for {record_id!r}, found {len(hit)}"
    return hit[0]


def heat_alpha(card_html: str, which: str) -> np.ndarray:
    m = re.search(rf'<image class="heat {which}" href="data:image/png;base64,([A-Za-z0-9+/=]+)"', card_html)
    assert m, f"no {which} heat overlay in the card"
    im = Image.open(io.BytesIO(base64.b64decode(m.group(1))))
    assert im.mode == "RGBA"
    return np.asarray(im, np.float64)[..., 3]


# --------------------------------------------------------------------------------------------- a tiny world
@pytest.fixture(scope="module")
def copy_world(tmp_path_factory, tiny):
    """A ~35-record index with a known copy, hostile captions/ids, large photos, a caption-only record and a
    record whose image is deleted after indexing (so it is missing at report time)."""
    root = tmp_path_factory.mktemp("report-world")
    w = world.copy_corpus(root / "src", COPY_SEED)
    engine.build_index(w["table"], root / "idx", encoders=tiny, progress=False,
                       settings=engine.IndexSettings(pca_sample=16))
    w["doomed_image"].unlink()
    idx = engine.open_index(root / "idx")
    idx.use_encoders(tiny)
    w["index"] = idx
    w["root"] = root
    return w


@pytest.fixture(scope="module")
def full_result(copy_world):
    return copy_world["index"].query(image=str(copy_world["query"]), prompt=PROMPT, k=20)


# --------------------------------------------------------------------------------------------- unit: escaping
@pytest.mark.parametrize("text", HOSTILE)
def test_esc_escapes_markup_and_quotes(text):
    out = esc(text)
    for ch in "<>\"'":
        assert ch not in out
    assert html_unescape(out) == text
    assert esc(None) == ""


def html_unescape(s: str) -> str:
    import html

    return html.unescape(s)


def test_esc_keeps_unicode_and_cuts_long_text():
    assert esc("🐱 ünïcödé 数据") == "🐱 ünïcödé 数据"
    long = "x" * 5000
    cut = esc(long, 100)
    assert len(cut) == 100 and cut.endswith("…")
    assert esc('"' * 50, 10) == "&quot;" * 9 + "…"  # cut before escaping: no half entity


def test_highlight_marks_shared_words_inside_escaped_text():
    out = highlight('<script>alert("Mosaic")</script> a RED mosaic on the teal', "mosaic on teal, red!")
    assert out == ('&lt;script&gt;alert(&quot;<mark>Mosaic</mark>&quot;)&lt;/script&gt; a <mark>RED</mark> '
                   '<mark>mosaic</mark> on the <mark>teal</mark>')  # "on"/"the"/"a" are stopwords
    assert highlight("a cat", "") == "a cat"
    assert highlight('"><img src=x onerror=alert(1)>', "img onerror") == (
        "&quot;&gt;&lt;<mark>img</mark> src=x <mark>onerror</mark>=alert(1)&gt;")
    assert highlight("word" * 1000, "", limit=50).endswith("…")


def test_highlight_marks_shared_phrases_from_the_result_spans():
    from engine.text import Analyzer, shared_text

    cap = 'Red Mums <b>&</b> "Throw Pillows"'
    spans = shared_text("a throw pillow with red mums", [cap], Analyzer())[0]["spans"]
    assert highlight(cap, None, spans=spans) == (
        '<span class="phrase"><mark>Red</mark> <mark>Mums</mark></span> &lt;b&gt;&amp;&lt;/b&gt; &quot;'
        '<span class="phrase"><mark>Throw</mark> <mark>Pillows</mark></span>&quot;')
    assert highlight(cap, None, limit=12, spans=spans) == (  # spans past the cut are dropped
        '<span class="phrase"><mark>Red</mark> <mark>Mums</mark></span> &lt;b…')
    assert highlight("no match", None, spans=[]) == "no match"


def test_terminal_caption_marks_words_and_phrases():
    from engine.report.text import _marked

    cap = "Red Mums - [Throw] it\\"
    spans = [[0, 8, "phrase"], [0, 3, "word"], [4, 8, "word"], [12, 17, "word"]]
    t = _marked(cap, spans)
    assert t.plain == cap  # markup-like text in a caption stays text
    assert [(x.start, x.end, str(x.style)) for x in t.spans] == [
        (0, 8, "underline"), (0, 3, "bold yellow"), (4, 8, "bold yellow"), (12, 17, "bold yellow")]
    assert _marked("a" * 200, [[150, 160, "word"]]).spans == []  # past the cut


def test_banner_only_for_untrained_models():
    assert "UNTRAINED" in banner({"profile": "tiny", "pretrained": False})
    assert "&lt;b&gt;" in banner({"profile": "<b>", "pretrained": False})
    assert banner({"profile": "default", "pretrained": True}) == ""
    assert "UNTRAINED" in banner({"pretrained": True}, ["UNTRAINED WEIGHTS: x"])


# --------------------------------------------------------------------------------------------- the query report
def test_query_report_is_safe_embedded_and_small(copy_world, full_result, tmp_path):
    res = full_result
    assert len(res.results) == 20
    out = write_query_report(copy_world["index"], res, tmp_path / "a" / "b" / "report.html")
    assert out == (tmp_path / "a" / "b" / "report.html").absolute() and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp files left behind
    page, a = audit(out)
    assert_safe(page, a)
    size = out.stat().st_size
    assert size < 3_000_000, f"report is {size} bytes"

    # every record is shown, hostile text as escaped text
    cards = re.findall(r'<article class="card', page)
    assert len(cards) == 20
    text = "".join(a.text)
    for rid in copy_world["hostile_ids"]:
        if any(r.id == rid for r in res.results):
            assert esc(rid) in page and rid in text
    shown = [r for r in res.results if r.caption in world.HOSTILE_CAPTIONS]
    assert len(shown) == len(world.HOSTILE_CAPTIONS)
    for r in shown:
        assert highlight(r.caption, PROMPT, spans=r.text["spans"]) in page
        assert r.caption in text  # the parser reads it back as plain text
    assert "🐱 ünïcödé" in page

    # images: re-encoded by the engine, downscaled, never the source files' bytes
    imgs = data_images(page)
    sources = {p.read_bytes() for p in (copy_world["root"] / "src" / "imgs").iterdir()}
    assert len(imgs) >= 2 * 18
    for _mime, data in imgs:
        assert data not in sources
        im = Image.open(io.BytesIO(data))
        assert max(im.size) <= VIEW_SIDE
    thumbs = re.findall(r'<img class="thumb" src="data:image/jpeg;base64,([^"]+)"', page)
    assert thumbs and all(max(Image.open(io.BytesIO(base64.b64decode(t))).size) <= THUMB_SIDE for t in thumbs)
    large = [Image.open(io.BytesIO(d)).size for _, d in imgs if Image.open(io.BytesIO(d)).size == (VIEW_SIDE, 240)]
    assert large, "the 640x480 photos are shown at 320x240"

    # the query, models, fusion, untrained banner and verdict
    assert "UNTRAINED WEIGHTS" in page and 'class="banner"' in page
    assert esc(res.fusion["note"]) in page and esc(res.models.clip) in page
    assert esc(PROMPT) in page
    assert "No calibrated threshold: ranked candidates only" in text

    # a record whose image vanished after indexing: a placeholder with the reason
    doomed = card(page, copy_world["doomed_id"])
    assert "image unavailable: missing file" in doomed and "<img" not in doomed
    # a caption-only record: no image, no heatmap
    if any(r.id == copy_world["caption_only_id"] for r in res.results):
        txt = card(page, copy_world["caption_only_id"])
        assert "caption-only record" in txt and "<img" not in txt and "heat" not in txt


def test_query_image_is_embedded_once_for_all_cards(copy_world, full_result, tmp_path):
    page, a = audit(write_query_report(copy_world["index"], full_result, tmp_path / "r.html"))
    q_uri = re.search(r'<img class="view" src="(data:image/jpeg;base64,[^"]+)"', page).group(1)
    assert page.count(q_uri) == 2  # the query panel's <img> and the one <symbol> every patch view uses
    views = sum(r.image is not None for r in full_result.results)
    assert page.count('<use class="view q" href="#attrib-query-view"') == views == page.count('class="heat q"')
    assert a.ids.count("attrib-query-view") == 1


def test_report_of_20_large_photos_stays_small(tiny, tmp_path):
    """Worst case for size: 640x480 noise (incompressible) for the query and all 20 results."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(22):
        (src / f"p{i}.jpg").write_bytes(world.jpeg_bytes(world.noise_photo(i), quality=95))
        (src / f"p{i}.txt").write_text(f"noise photo {i}", encoding="utf-8")
    engine.build_index(src, tmp_path / "idx", encoders=tiny, progress=False,
                       settings=engine.IndexSettings(pca_sample=16))
    idx = engine.open_index(tmp_path / "idx")
    idx.use_encoders(tiny)
    query = tmp_path / "q.png"
    world.noise_photo(99).save(query)
    res = idx.query(image=str(query), prompt="noise photo", k=20)
    assert len(res.results) == 20
    out = write_query_report(idx, res, tmp_path / "big.html")
    size = out.stat().st_size
    page = out.read_text(encoding="utf-8")
    raw = sum(p.stat().st_size for p in src.glob("*.jpg"))
    print(f"20-result report of 640x480 noise photos: {size} bytes (sources {raw} bytes)")
    assert size < 3_000_000, f"a 20-result report is {size} bytes"
    assert size < raw / 3  # far below the source files: everything was downscaled and re-encoded
    sizes = [Image.open(io.BytesIO(d)).size for mime, d in data_images(page) if mime == "image/jpeg"]
    assert max(max(s) for s in sizes) == VIEW_SIDE and (VIEW_SIDE, 240) in sizes
    assert page.count('<article class="card') == 20


def test_evidence_bars_and_ranks(copy_world, full_result, tmp_path):
    res = full_result
    page = write_query_report(copy_world["index"], res, tmp_path / "r.html").read_text(encoding="utf-8")
    r = next(r for r in res.results if r.id == copy_world["source_id"])
    html_card = card(page, r.id)
    widths = [float(x) for x in re.findall(r'<span style="width:([0-9.]+)%"></span>', html_card)]
    ev = r.evidence
    expect = []
    for f in engine.features():  # cosines on 0..1 as they are; scores against the largest among the results
        v = ev[f.name]
        if v is None:
            continue
        top = max((x.evidence[f.name] for x in res.results if x.evidence[f.name] is not None), default=0)
        frac = v if f.kind == "cosine" else (v / top if top > 0 else 0.0)
        expect.append(round(100 * min(1.0, max(0.0, frac)), 1))
    assert len(expect) >= 9  # image, caption and text evidence
    assert widths == pytest.approx(expect, abs=0.051)
    assert f"{ev['clip']:.3f}" in html_card
    ranks = r.ranks
    line = re.search(r'<div class="ranks muted">ranks: (.*?)</div>', html_card).group(1)
    assert line == " · ".join(f"{n} {'#' + str(v) if v else '–'}" for n, v in ranks.items())
    assert '<span class="phrase"><mark>mosaic</mark> <mark>texture</mark></span>' in html_card
    assert "shared phrases: “mosaic texture”" in html_card and r.text["phrases"] == ["mosaic texture"]
    # the duplicate count: a badge when other records share the caption's words
    dup = dataclasses.replace(r, text=dict(r.text, duplicates=3))
    page3 = write_query_report(copy_world["index"], dataclasses.replace(res, results=[dup]), tmp_path / "r3.html")
    assert "caption shared by 3 other records" in page3.read_text(encoding="utf-8")
    assert "caption shared by" not in html_card  # no duplicate in this world
    # a feature that is missing is drawn as n/a
    n_na = sum(v is None for v in ev.values())
    fake = dataclasses.replace(res, results=[dataclasses.replace(r, evidence=dict(ev, clip_text=None, bm25=None))])
    page2 = write_query_report(copy_world["index"], fake, tmp_path / "r2.html").read_text(encoding="utf-8")
    assert page2.count('class="bar na"') == n_na + 2 and page2.count(">n/a<") == n_na + 2


def test_known_copy_lights_up_where_it_sits(copy_world, full_result, tmp_path):
    """The mosaic sits in columns c >= G/2 of the query and c < G/2 of the source: the heat must be there."""
    idx, res = copy_world["index"], full_result
    src_row = int(idx.reader.rows_of([copy_world["source_id"]])[0])
    assert any(r.row == src_row for r in res.results[:5]), "the copy source should rank in the top 5"
    corr = idx.correspondences(res.query_input, [src_row])[0]
    g = corr.grid
    assert g == idx.reader.grid and corr.query_heat.shape == (g, g) and g % 2 == 0
    q, s = corr.query_heat, corr.source_heat
    q_in = q[:, g // 2:].sum() / q.sum()
    s_in = s[:, : g // 2].sum() / s.sum()
    assert q_in > 0.5, f"only {q_in:.2f} of the query heat is on the pasted region"
    assert s_in > 0.5, f"only {s_in:.2f} of the source heat is on the copied region"
    # the strongest matched cells map the pasted half onto the copied half, moved by G/2 columns
    top = corr.matches[:6]
    assert len(top) >= 3
    assert all(qc % g >= g // 2 and sc % g < g // 2 for qc, sc, _ in top)
    assert sum((qc % g) - (sc % g) == g // 2 and qc // g == sc // g for qc, sc, _ in top) >= len(top) // 2

    # the report draws the same: its overlays put most of their opacity on those halves
    page = write_query_report(idx, res, tmp_path / "copy.html").read_text(encoding="utf-8")
    html_card = card(page, copy_world["source_id"])
    qa, sa = heat_alpha(html_card, "q"), heat_alpha(html_card, "s")
    w = qa.shape[1]
    assert qa[:, w // 2:].sum() / qa.sum() > 0.6
    assert sa[:, : w // 2].sum() / sa.sum() > 0.6
    assert html_card.count('<g class="link"') == min(8, len(corr.matches))
    # lines go from the query's right half to the source's left half (panels at x 0-320 and 368-688)
    x1s = [float(x) for x in re.findall(r'<line x1="([0-9.]+)"', html_card)]
    x2s = [float(x) for x in re.findall(r'<line x1="[0-9.]+" y1="[0-9.]+" x2="([0-9.]+)"', html_card)]
    assert sum(160 <= x <= 320 for x in x1s) > len(x1s) / 2 and sum(368 <= x <= 528 for x in x2s) > len(x2s) / 2


def test_verdicts_and_shares(copy_world, full_result, tmp_path):
    res, idx = full_result, copy_world["index"]
    note = ("attribution shares are similarity-based estimates normalised over the results above the threshold, "
            "not causal claims")
    top = [dataclasses.replace(r, above_threshold=True, share=s) for r, s in zip(res.results[:2], (0.75, 0.25))]
    rest = [dataclasses.replace(r, above_threshold=False, share=None) for r in res.results[2:5]]
    found = dataclasses.replace(res, results=top + rest,
                                verdict=engine.Verdict(True, 0.5, 2, "Likely sources found", note))
    page, a = audit(write_query_report(idx, found, tmp_path / "found.html"))
    assert_safe(page, a)
    assert '<p class="verdict good">Likely sources found</p>' in page
    assert "75.0%" in page and "25.0%" in page and note in page
    assert page.count('<article class="card above"') == 2 and page.count("below threshold") == 3
    share_bars = re.findall(r'<div class="bar share"><span style="width:([0-9.]+)%"></span>', page)
    assert [float(x) for x in share_bars] == [75.0, 25.0]

    none = dataclasses.replace(res, results=[dataclasses.replace(r, above_threshold=False, share=None)
                                             for r in res.results[:3]],
                               verdict=engine.Verdict(False, 0.9, 0, "No likely source in this index", note))
    page = write_query_report(idx, none, tmp_path / "none.html").read_text(encoding="utf-8")
    assert '<p class="verdict none">No likely source in this index</p>' in page and "share " not in page

    trained = dataclasses.replace(res, models=dataclasses.replace(res.models, pretrained=True, warning=None),
                                  warnings=[w for w in res.warnings if "UNTRAINED" not in w])
    page = write_query_report(idx, trained, tmp_path / "trained.html").read_text(encoding="utf-8")
    assert 'class="banner"' not in page and "UNTRAINED WEIGHTS" not in page


def test_prompt_only_query_has_no_patch_views(copy_world, tmp_path):
    res = copy_world["index"].query(prompt='mosaic <script>alert("p")</script>', k=5)
    page, a = audit(write_query_report(copy_world["index"], res, tmp_path / "p.html"))
    assert_safe(page, a)
    assert "no query image" in page and 'class="heat' not in page
    assert page.count("no patch view: the query has no image") == sum(r.image is not None for r in res.results)
    assert '&lt;script&gt;alert(&quot;p&quot;)&lt;/script&gt;' in page


# --------------------------------------------------------------------------------------------- hard cases
def test_hard_cases_report(copy_world, tmp_path):
    imgs = copy_world["root"] / "src" / "imgs"
    item = lambda i, **kw: {"id": f"scene-{i}", "image": str(imgs / f"s{i}.png"), "caption": f"cap {i}", **kw}  # noqa: E731
    cases = [
        {"kind": "copy", "query_id": "q1", "reason": "miss", "image": str(copy_world["query"]), "prompt": PROMPT,
         "expected": [item(1)], "returned": [item(2, score=0.4, relevant=False), item(1, score=0.3, relevant=True)],
         "first_relevant_rank": 2, "top_score": 0.4, "threshold": 0.5},
        {"kind": "copy", "query_id": HOSTILE[1], "reason": "false attribution", "image": str(imgs / "nope.png"),
         "prompt": HOSTILE[0], "expected": [],
         "returned": [{"id": HOSTILE[4], "image": None, "caption": HOSTILE[3], "score": 0.9, "relevant": False}],
         "first_relevant_rank": None, "top_score": 0.9, "threshold": 0.5},
        {"kind": "</style><b>style</b>", "query_id": "q3", "reason": "miss", "image": None, "prompt": "🐱 " * 3,
         "expected": [item(3)], "returned": [], "first_relevant_rank": None, "top_score": None, "threshold": None},
    ]
    models = {"profile": "tiny", "pretrained": False, "clip": HOSTILE[2], "dino": "dino (random init)"}
    out = write_hard_cases_report(cases, tmp_path / "bench" / "hard.html", "Hard <cases>", models,
                                  notes=["split test, " + HOSTILE[0]])
    page, a = audit(out)
    assert_safe(page, a)
    assert a.h2 == ["</style><b>style</b> (1 case)", "copy (2 cases)"]
    assert "<title>Hard &lt;cases&gt;</title>" in page
    assert "UNTRAINED WEIGHTS" in page
    assert page.count('<article class="case">') == 3
    assert "image unavailable: missing file" in page and "no query image" in page
    assert "caption-only record (no image)" in page
    assert "nothing: this query has no source in the corpus" in page and "nothing came back" in page
    assert page.count('class="tile rel"') == 3  # two expected + the one relevant returned
    assert "0.400" in page and "✓ relevant" in page and "first relevant rank: 2" in page
    text = "".join(a.text)
    for h in HOSTILE:
        assert h in text
    assert len(data_images(page)) == 5  # query, s1 expected, s2 + s1 returned, s3 expected: the rest are placeholders
    trained = write_hard_cases_report(cases[:1], tmp_path / "t.html", "t", dict(models, pretrained=True))
    assert 'class="banner"' not in trained.read_text(encoding="utf-8")


def test_unreadable_images_get_placeholders_with_the_reason(tmp_path):
    reasons = world.hostile_files(tmp_path / "bad")
    returned = [{"id": name, "image": str(tmp_path / "bad" / name), "caption": name, "score": 0.1, "relevant": False}
                for name in sorted(reasons)]
    case = {"kind": "k", "query_id": "q", "reason": "miss", "image": str(tmp_path / "bad" / "bomb.png"), "prompt": "p",
            "expected": [], "returned": returned, "first_relevant_rank": None, "top_score": 0.1, "threshold": None}
    page, a = audit(write_hard_cases_report([case], tmp_path / "bad.html", "bad", {"pretrained": True}))
    assert_safe_without_images(page, a)
    for name, reason in reasons.items():
        tile = re.search(rf'<figure class="tile">.*?{re.escape(esc(name))}</span>', page, flags=re.S).group(0)
        assert f"image unavailable: {esc(reason)}" in tile.rsplit('<figure class="tile">', 1)[1]
    assert page.count('aria-label="image unavailable: image too large (decompression bomb)"') == 2  # + the query


def test_in_memory_query_image(copy_world, tmp_path):
    im = Image.open(copy_world["query"]).convert("RGB")
    res = copy_world["index"].query(image=im, prompt=PROMPT, k=3)
    assert res.query["image"] == "<PIL image>"
    page, a = audit(write_query_report(copy_world["index"], res, tmp_path / "mem.html"))
    assert_safe(page, a)
    assert "the image was given in memory" in page and "attrib-query-view" not in page
    assert page.count('class="heat s"') == sum(r.image is not None and r.id != "doomed" for r in res.results)
    page, a = audit(write_query_report(copy_world["index"], res, tmp_path / "mem2.html", query_image=im))
    assert_safe(page, a)
    assert "given in memory" not in page and page.count('href="#attrib-query-view"') == 3
    assert "(in memory)" in page


def test_pages_are_written_atomically(tmp_path):
    models = {"profile": "default", "pretrained": True}
    out = tmp_path / "new" / "deeper" / "hard.html"
    out.parent.mkdir(parents=True)
    out.write_text("old contents", encoding="utf-8")
    (tmp_path / "plain.txt").write_text("x", encoding="utf-8")
    assert write_hard_cases_report([], out, "empty", models) == out.absolute()
    page, a = audit(out)
    assert_safe_without_images(page, a)
    assert "No hard cases" in page and "old contents" not in page
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777  # not mkstemp's 0600
    blocked = tmp_path / "blocked.html"
    blocked.mkdir()  # a file is never put over a folder: the write is refused and leaves nothing behind
    with pytest.raises(engine.OutputError, match="is a folder"):
        write_hard_cases_report([], blocked, "x", models)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.html", "new", "plain.txt"]
    assert list(blocked.iterdir()) == [] and [p.name for p in out.parent.iterdir()] == ["hard.html"]


def assert_safe_without_images(page: str, a: PageAudit) -> None:
    assert "script" not in a.tags and a.handlers == [] and a.other_urls == [] and a.img_srcs == []
    assert a.csp == [CSP]


# --------------------------------------------------------------------------------------------- real browser


@pytest.mark.browser
def test_report_in_headless_chromium(chromium, copy_world, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    res = copy_world["index"].query(image=str(copy_world["query"]), prompt=PROMPT, k=5)
    hostile = [r.caption for r in res.results if r.caption in world.HOSTILE_CAPTIONS]
    assert any("<script>" in c for c in hostile) and any("onerror" in c for c in hostile)
    report = write_query_report(copy_world["index"], res, tmp_path / "browser" / "report.html")

    driver = world.headless_chromium(tmp_path / "profile")
    try:
        driver.set_page_load_timeout(60)
        driver.set_window_size(1280, 900)
        url = report.as_uri()
        driver.get_log("performance")  # drop what the browser did on its own before the page (its new-tab page)
        driver.get(url)
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text  # noqa: B018 - nothing may have opened a dialog
        assert driver.execute_script("return document.scripts.length") == 0
        assert driver.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('data:'))")

        cards = driver.find_elements(By.CSS_SELECTOR, "article.card")
        assert len(cards) == 5
        for c in cards:
            assert c.is_displayed() and c.size["width"] > 200 and c.size["height"] > 100
        captions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "p.caption")]
        for h in hostile:
            assert h in captions, f"hostile caption not shown as text: {h!r}"
        assert driver.find_element(By.CSS_SELECTOR, ".banner").is_displayed()
        assert driver.find_elements(By.CSS_SELECTOR, "mark")

        # the patch views draw the query through <use> of one embedded symbol: it must actually render
        pair = next(c for c in cards if "copy-src" in c.text).find_element(By.CSS_SELECTOR, ".pair svg")
        shot = np.asarray(Image.open(io.BytesIO(pair.screenshot_as_png)).convert("RGB"), np.float64)
        teal = shot[shot.shape[0] // 4: 3 * shot.shape[0] // 4, : shot.shape[1] // 8].reshape(-1, 3).mean(axis=0)
        assert teal[1] > teal[0] + 40 and teal[2] > teal[0] + 40, f"query panel not drawn (mean colour {teal})"
        mosaic = shot[:, int(shot.shape[1] * 0.35): int(shot.shape[1] * 0.45)].reshape(-1, 3).mean(axis=0)
        assert mosaic[0] > mosaic[2] + 30, f"no red heat over the pasted mosaic (mean colour {mosaic})"

        shots = {}
        for name, (w, h) in {"laptop-1280": (1280, 900), "phone-390": (390, 844)}.items():
            driver.set_window_size(w, h)
            driver.execute_script("window.scrollTo(0, 0)")
            inner = driver.execute_script("return window.innerWidth")
            scroll = driver.execute_script("return document.documentElement.scrollWidth")
            assert scroll <= inner, f"horizontal scrolling at {w}px: scrollWidth {scroll} > innerWidth {inner}"
            widest = driver.execute_script(
                "return Math.max(...[...document.querySelectorAll('main *')]"
                ".map(e => e.getBoundingClientRect().right))")
            assert widest <= inner + 0.5, f"an element sticks out at {w}px ({widest} > {inner})"
            for c in driver.find_elements(By.CSS_SELECTOR, "article.card"):
                assert c.is_displayed() and 0 < c.size["width"] <= inner
            shots[name] = tmp_path / f"report-{name}.png"
            assert driver.save_screenshot(str(shots[name]))
            full_h = min(int(driver.execute_script("return document.documentElement.scrollHeight")), 6000)
            driver.set_window_size(w, full_h)
            shots[name + "-full"] = tmp_path / f"report-{name}-full.png"
            assert driver.save_screenshot(str(shots[name + "-full"]))
        phone = Image.open(shots["phone-390"])
        assert phone.size[0] == 390 and Image.open(shots["laptop-1280"]).size[0] == 1280
        SHOTS_DIR.mkdir(parents=True, exist_ok=True)
        for p in shots.values():
            shutil.copy2(p, SHOTS_DIR / p.name)

        console = driver.get_log("browser")
        severe = [e for e in console if e.get("level") == "SEVERE"]
        assert severe == [], f"console errors: {severe}"
        requests = []
        for entry in driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg.get("method") == "Network.requestWillBeSent":
                requests.append(msg["params"]["request"]["url"])
        assert url in requests and any(u.startswith("data:image/") for u in requests)  # the log does see them
        others = [u for u in requests if u != url and not u.startswith("data:")]
        assert others == [], f"the page made network requests: {others[:5]}"
    finally:
        driver.quit()
