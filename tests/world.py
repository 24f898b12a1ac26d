"""Tiny generated worlds for tests: images, sidecars, tables, shards and hostile files."""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "cross"]
RGB = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
       "purple": (140, 40, 160), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245)}


def scene(i: int, size: int = 96) -> tuple[Image.Image, str]:
    """A distinct picture and its caption, determined by i."""
    rng = np.random.default_rng(i)
    bg = COLOURS[i % len(COLOURS)]
    fg = COLOURS[(i // len(COLOURS) + 3) % len(COLOURS)]
    shape = SHAPES[(i // 3) % len(SHAPES)]
    arr = np.zeros((size, size, 3), np.uint8) + np.array(RGB[bg], np.uint8)
    arr = np.clip(arr.astype(int) + rng.integers(-25, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    d = ImageDraw.Draw(im)
    x0, y0 = rng.integers(5, size // 2, size=2)
    x1, y1 = x0 + rng.integers(size // 4, size // 2), y0 + rng.integers(size // 4, size // 2)
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=RGB[fg])
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=RGB[fg])
    elif shape == "triangle":
        d.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=RGB[fg])
    else:
        d.rectangle([x0, (y0 + y1) // 2 - 4, x1, (y0 + y1) // 2 + 4], fill=RGB[fg])
        d.rectangle([(x0 + x1) // 2 - 4, y0, (x0 + x1) // 2 + 4, y1], fill=RGB[fg])
    for _ in range(int(rng.integers(2, 6))):  # texture details so images differ beyond the shape
        cx, cy = rng.integers(0, size, size=2)
        d.point([(int(cx), int(cy))], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return im, f"a {fg} {shape} on a {bg} background, picture {i}"


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def image_folder(root: Path, n: int, sidecar: str = "txt", nested: bool = True, size: int = 96) -> list[str]:
    """n images with .txt or .json sidecars; returns their captions in file order."""
    caps = []
    for i in range(n):
        sub = root / (f"part{i % 2}" if nested else "")
        sub.mkdir(parents=True, exist_ok=True)
        im, cap = scene(i, size)
        name = f"img{i:04d}"
        if i % 2:
            (sub / f"{name}.jpg").write_bytes(jpeg_bytes(im))
        else:
            (sub / f"{name}.png").write_bytes(png_bytes(im))
        if sidecar == "txt":
            (sub / f"{name}.txt").write_text(cap + "\n", encoding="utf-8")
        elif sidecar == "json":
            (sub / f"{name}.json").write_text(json.dumps({"caption": cap, "url": f"http://x/{i}", "width": size}),
                                              encoding="utf-8")
        caps.append(cap)
    return caps


def table(root: Path, n: int, fmt: str, caption_col: str = "caption", image_col: str = "image",
          with_id: bool = True, caption_only: int = 0) -> Path:
    """A table of n image records (images in root/imgs) plus caption-only rows."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        im, cap = scene(100 + i)
        (root / "imgs" / f"{i}.png").write_bytes(png_bytes(im))
        rows.append({"id": f"rec-{i}", image_col: f"imgs/{i}.png", caption_col: cap, "score": float(i) / 10})
    for j in range(caption_only):
        rows.append({"id": f"txt-{j}", image_col: None, caption_col: f"caption only record {j} about a purple kite",
                     "score": 0.0})
    df = pl.DataFrame(rows, schema={"id": pl.String, image_col: pl.String, caption_col: pl.String, "score": pl.Float64})
    if not with_id:
        df = df.drop("id")
    path = root / f"table.{fmt}"
    if fmt == "parquet":
        df.write_parquet(path)
    elif fmt == "csv":
        df.write_csv(path)
    else:
        df.write_ndjson(path)
    return path


def tar_shard(path: Path, n: int, start: int = 0) -> list[str]:
    """An img2dataset/webdataset-style shard: KEY.jpg + KEY.txt + KEY.json per sample."""
    caps = []
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            im, cap = scene(500 + start + i)
            key = f"{start + i:09d}"
            for name, data in ((f"{key}.jpg", jpeg_bytes(im)), (f"{key}.txt", cap.encode()),
                               (f"{key}.json",
                                json.dumps({"key": key, "url": f"http://x/{key}", "caption": cap}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            caps.append(cap)
    return caps


def png_bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims a gigantic image (a decompression-bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def hostile_files(folder: Path) -> dict[str, str]:
    """One file of each bad kind; returns {file name: expected reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    good, _ = scene(999)
    (folder / "corrupt.jpg").write_bytes(
        b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 255, 500, dtype=np.uint8)))
    full = jpeg_bytes(good)
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "notimage.png").write_text("this is a text file pretending to be a png", encoding="utf-8")
    (folder / "bomb.png").write_bytes(png_bomb_header())
    (folder / "empty.png").write_bytes(b"")
    return {
        "corrupt.jpg": "corrupt or truncated image",
        "truncated.jpg": "corrupt or truncated image",
        "notimage.png": "not an image",
        "bomb.png": "image too large (decompression bomb)",
        "empty.png": "corrupt or truncated image",
    }


# ------------------------------------------------------------------------------------------- copies (reports)
def mosaic(seed: int, width: int, height: int, cell: int = 4) -> Image.Image:
    """A high-frequency texture of random colour blocks: distinctive wherever it is pasted."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // cell, width // cell, 3)).astype(np.uint8)
    return Image.fromarray(np.kron(small, np.ones((cell, cell, 1), np.uint8)))


def plain_background(seed: int, size: int = 96, rgb: tuple[int, int, int] = (20, 110, 120)) -> Image.Image:
    """A flat, lightly noisy background in a colour none of the scenes use (teal by default)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(np.clip(rng.normal(rgb, 6, size=(size, size, 3)), 0, 255).astype(np.uint8))


def noise_photo(seed: int, width: int = 640, height: int = 480) -> Image.Image:
    """A large, incompressible image (worst case for report size)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3)).astype(np.uint8))


HOSTILE_CAPTIONS = [
    '<script>alert("mosaic")</script> mosaic tile',
    '"><img src=x onerror=alert(1)> mosaic',
    "</style><b>bold</b> mosaic ' \" & end",
    "🐱 ünïcödé mosaic — « quotes » 数据",
]


def copy_corpus(root: Path, seed: int = 0, n_scenes: int = 26, n_large: int = 2) -> dict:
    """A table corpus for report tests: scenes, one "copy source" whose left half is a mosaic texture, records
    with hostile captions/ids, large noisy photos, a caption-only record and a record ("doomed") whose image a
    test can delete. Also writes the query: the mosaic pasted into the right half of a plain new background.

    Returns {"table", "query", "source_id", "doomed_id", "doomed_image", "caption_only_id", "hostile_ids"}."""
    imgs = root / "imgs"
    imgs.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_scenes):
        im, cap = scene(i)
        (imgs / f"s{i}.png").write_bytes(png_bytes(im))
        rows.append({"id": f"scene-{i}", "image": f"imgs/s{i}.png", "caption": cap})
    tex = mosaic(seed, 48, 96)
    src, _ = scene(300 + seed)
    src.paste(tex, (0, 0))  # the copied region: x < 48 of a 96 px image = grid columns c < G/2
    (imgs / "copy-src.png").write_bytes(png_bytes(src))
    rows.append({"id": "copy-src", "image": "imgs/copy-src.png",
                 "caption": "a colourful mosaic texture beside a shape, the original"})
    hostile_ids = ["javascript:alert(1)", '"><img src=x onerror=alert(2)>', "</style>id", "🐱-id"]
    for j, (cap, hid) in enumerate(zip(HOSTILE_CAPTIONS, hostile_ids)):
        im, _ = scene(40 + j)
        (imgs / f"h{j}.jpg").write_bytes(jpeg_bytes(im))
        rows.append({"id": hid, "image": f"imgs/h{j}.jpg", "caption": cap})
    for j in range(n_large):
        (imgs / f"large{j}.jpg").write_bytes(jpeg_bytes(noise_photo(60 + j), quality=95))
        rows.append({"id": f"large-{j}", "image": f"imgs/large{j}.jpg", "caption": f"a large noisy photo {j}"})
    im, _ = scene(77)
    (imgs / "doomed.png").write_bytes(png_bytes(im))
    rows.append({"id": "doomed", "image": "imgs/doomed.png", "caption": "a record whose mosaic image goes missing"})
    rows.append({"id": "text-only", "image": None, "caption": "caption only record about a mosaic texture"})
    path = root / "corpus.parquet"
    pl.DataFrame(rows, schema={"id": pl.String, "image": pl.String, "caption": pl.String}).write_parquet(path)
    q = plain_background(1000 + seed)
    q.paste(tex, (48, 0))  # pasted region: x >= 48 = grid columns c >= G/2
    (root / "query.png").write_bytes(png_bytes(q))
    return {"table": path, "query": root / "query.png", "source_id": "copy-src", "doomed_id": "doomed",
            "doomed_image": imgs / "doomed.png", "caption_only_id": "text-only", "hostile_ids": hostile_ids}


# --------------------------------------------------------------------------------------------- index helpers
BUILD_SETTINGS = None  # engine.IndexSettings(pca_sample=8, batch_size=8), made on first use


def build(src, out, tiny, **kw):
    """Build an index with the tiny encoders, small settings and no progress bar."""
    import engine

    global BUILD_SETTINGS
    if BUILD_SETTINGS is None:
        BUILD_SETTINGS = engine.IndexSettings(pca_sample=8, batch_size=8)
    settings = kw.pop("settings", BUILD_SETTINGS)
    return engine.build_index(src, out, encoders=tiny, progress=False, settings=settings, **kw)


def records(out: Path) -> pl.DataFrame:
    """The full record tables of every committed segment of an index, in row order."""
    from engine._manifest import read_manifest

    m = read_manifest(out)
    return pl.concat([pl.read_parquet(out / s["path"] / "records.parquet") for s in m["segments"]],
                     how="diagonal_relaxed").sort("row")


def rejects(out: Path) -> list[dict]:
    from engine._layout import path_of

    return [json.loads(x) for x in (out / path_of("rejects")).read_text(encoding="utf-8").splitlines()]


def source_image(index_dir: Path, n: int) -> str:
    """The image path of record ``imgNNNN`` of an index built from :func:`image_folder`."""
    df = records(index_dir)
    return df.filter(pl.col("id").str.contains(f"img{n:04d}"))["image"][0]


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def headless_chromium(profile: Path):
    """A headless Chromium (selenium) with no network of its own (no sync, updates or background requests),
    its profile in ``profile``, and the browser and performance logs kept for the test to read."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)


def opened(index_dir: Path, encoders):
    """The index at ``index_dir`` opened for querying with already-loaded encoders (the session's tiny ones)."""
    import engine

    idx = engine.open_index(index_dir)
    idx.use_encoders(encoders)
    return idx
