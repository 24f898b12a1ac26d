"""The layout of an index folder: every component, where it lives, whether it must be there, what its size grows
with and, where it follows from the counts, its exact size. The writer names files from this table, the reader
and ``attrib verify`` check them with it, and ``attrib info`` reports sizes with it.

An index is a set of immutable **segments** listed by a manifest that is replaced atomically (one write =
one new generation). Vectors in every segment are encoded against the same frozen **codebooks** (the DINO
projection, faiss IVF centroids and PQ/SQ codebooks), so segments can be searched together and merged::

    INDEX/manifest.json                the current generation (the only file ever replaced)
    INDEX/.attrib-lock                 writer lock (see engine._lock)
    INDEX/codebooks/cb-NNNN/...        frozen codebooks of one codebook generation
    INDEX/segments/seg-NNNNNN/...      one immutable segment
    INDEX/deletes/del-NNNNNN.npy       the deleted rows (cumulative) as of a generation
    INDEX/text/                        one tantivy caption index for every segment (global BM25 statistics)
    INDEX/rejects.jsonl                every skipped record and why (append-only)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

MANIFEST = "manifest.json"
CODEBOOKS_DIR = "codebooks"
SEGMENTS_DIR = "segments"
DELETES_DIR = "deletes"


@dataclass(frozen=True)
class Component:
    name: str  # key in the manifest
    path: str  # file or folder name, relative to its level's folder
    level: str  # "index", "codebook" or "segment": which folder it lives in
    required: bool  # whether every index (resp. codebook / segment) has it
    grows_with: str  # "record", "image" or "index" (a fixed cost): what `attrib info` divides its size by
    description: str  # one line for `attrib info` and README.md
    expected_bytes: Callable[[dict], int] | None = None  # exact size from the level's entry, where it is fixed


def _npy(n_key: str, itemsize: int, width_key: str | None = None) -> Callable[[dict], int]:
    """np.save of an (n,) or (n, width) array: a 128-byte header (format 1.0, padded to 64 bytes) + data."""
    return lambda e: 128 + int(e[n_key]) * itemsize * (int(e[width_key]) if width_key else 1)


COMPONENTS: tuple[Component, ...] = (
    # index level
    Component("manifest", MANIFEST, "index", True, "index", "the current generation: models, dims, segments, counts"),
    Component("text", "text", "index", True, "record", "tantivy caption index, one document per record (BM25)"),
    Component("deletes", DELETES_DIR, "index", False, "index", "deleted record rows, one file per generation"),
    Component("rejects", "rejects.jsonl", "index", False, "index", "every skipped record and why"),
    Component("calibration", "calibration.json", "index", False, "index",
              "fusion weights and threshold learned on this index (attrib calibrate)"),
    Component("search", "search.json", "index", False, "index",
              "IVF lists probed and PQ candidates re-scored per search, measured on this index for a recall target"),
    # codebook level
    Component("projection", "projection.npz", "codebook", True, "index",
              "DINOv2 corpus means, scales and the patch PCA basis"),
    Component("clip_ivf", "clip.ivf", "codebook", True, "index", "trained empty faiss index of CLIP vectors"),
    Component("dino_ivf", "dino.ivf", "codebook", True, "index", "trained empty faiss index of DINO descriptors"),
    Component("clip_sq", "clip.sq", "codebook", False, "index", "8-bit scalar quantizer of CLIP refine codes"),
    Component("dino_sq", "dino.sq", "codebook", False, "index", "8-bit scalar quantizer of DINO refine codes"),
    Component("patch_pq", "patches.pq", "codebook", False, "index", "product quantizer of patch cells"),
    Component("caption_pq", "captions.pq", "codebook", False, "index",
              "product quantizer of caption embeddings (pq codec, when the first chunk had enough captions)"),
    # segment level
    Component("records", "records.parquet", "segment", True, "record",
              "row, id, image reference, caption and source columns"),
    Component("serving", "records.arrow", "segment", True, "record",
              "id, image, caption as memory-mapped Arrow IPC (queries)"),
    Component("rows", "rows.npy", "segment", True, "record", "global row of each record (int64, ascending)",
              _npy("records", 8)),
    Component("image_rows", "image_rows.npy", "segment", True, "image",
              "global row of each image, in vector order (int64, ascending)", _npy("images", 8)),
    Component("record_crc", "record_crc.npy", "segment", True, "record",
              "CRC-32 of each record's id, image and caption (checked whenever a record is read)",
              _npy("records", 4)),
    Component("image_sums", "image_sums.npy", "segment", True, "image",
              "checksums of each image's CLIP and DINO refine codes and patch cells (checked whenever read)",
              lambda e: 128 + int(e["images"]) * 3 * 8),
    Component("clip", "clip.ivf", "segment", True, "image", "CLIP image embeddings: faiss IVF lists, ids = rows"),
    Component("dino", "dino.ivf", "segment", True, "image", "DINOv2 global descriptors: faiss IVF lists, ids = rows"),
    Component("clip_refine", "clip.refine", "segment", False, "image",
              "CLIP embeddings as 8-bit codes (re-scores compressed first-stage candidates)"),
    Component("dino_refine", "dino.refine", "segment", False, "image",
              "DINO descriptors as 8-bit codes (re-scores compressed first-stage candidates)"),
    Component("patches", "patches.bin", "segment", True, "image",
              "pooled DINOv2 patch cells: float16, or product-quantized codes"),
    Component("caption_clip", "caption_clip.bin", "segment", False, "record",
              "CLIP text embedding of each caption: float16, product codes (pq) or int8 with a per-record scale; "
              "zeros: no caption"),
    Component("caption_sums", "caption_sums.npy", "segment", False, "record",
              "checksum of each record's caption embedding codes (checked whenever read)", _npy("records", 8)),
    Component("caption_keys", "caption_keys.npy", "segment", False, "record",
              "64-bit key of each caption's words, for duplicate counts (0: a caption without words)",
              _npy("records", 8)),
)

_BY_NAME = {c.name: c for c in COMPONENTS}


def component(name: str) -> Component:
    return _BY_NAME[name]


def path_of(name: str) -> str:
    """The file name of component ``name`` inside its level's folder."""
    return _BY_NAME[name].path


def at_level(level: str) -> tuple[Component, ...]:
    return tuple(c for c in COMPONENTS if c.level == level)


def segment_dir(seg_id: int) -> str:
    return f"{SEGMENTS_DIR}/seg-{seg_id:06d}"


def codebook_dir(gen: int) -> str:
    return f"{CODEBOOKS_DIR}/cb-{gen:04d}"


def deletes_file(generation: int) -> str:
    return f"{DELETES_DIR}/del-{generation:06d}.npy"
