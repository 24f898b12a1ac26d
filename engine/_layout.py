"""The layout of an index folder: every component, its file name, whether an index needs it, what its size
grows with, and the exact size it must have where that follows from the manifest. The writer names files
from this table, the reader checks it, and ``attrib info`` reports sizes with it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Component:
    name: str  # key in the manifest's "components"
    path: str  # file or folder name inside the index folder
    required: bool  # an index without it cannot be opened
    grows_with: str  # "record", "image" or "index" (a fixed cost): what `attrib info` divides it by
    description: str  # one line for `attrib info` and README.md
    expected_bytes: Callable[[dict], int] | None = None  # exact size from the manifest, where it is fixed


def _patch_bytes(m: dict) -> int:
    return int(m["counts"]["images"]) * int(m["dims"]["patch_cells"]) * int(m["dims"]["patch_dims"]) * 2


def _npy_bytes(n_key: str, itemsize: int) -> Callable[[dict], int]:
    # np.save of a 1-d array: a 128-byte header (numpy format 1.0 pads the header to 64-byte multiples)
    return lambda m: 128 + int(m["counts"][n_key]) * itemsize


COMPONENTS: tuple[Component, ...] = (
    Component("records", "records.parquet", True, "record", "id, image reference, caption, slot, source columns"),
    Component("serving", "records.arrow", True, "record", "id, image, caption as memory-mapped Arrow IPC (queries)"),
    Component("clip", "clip.faiss", True, "image", "CLIP image embeddings (faiss, fp16 codes)"),
    Component("dino", "dino.faiss", True, "image", "DINOv2 global descriptors (faiss, fp16 codes)"),
    Component("patches", "patches.f16", True, "image", "pooled DINOv2 patch cells, float16", _patch_bytes),
    Component("projection", "projection.npz", True, "index", "corpus means, scales and the patch PCA basis"),
    Component("text", "text", True, "record", "tantivy caption index (BM25)"),
    Component("slots", "slots.npy", True, "image", "image slot -> record row (int64)", _npy_bytes("images", 8)),
    Component("row_slot", "row_slot.npy", True, "record", "record row -> image slot or -1 (int32)",
              _npy_bytes("records", 4)),
    Component("rejects", "rejects.jsonl", False, "index", "every skipped record and why"),
    Component("calibration", "calibration.json", False, "index", "fusion weights and threshold learned from the index"),
)

_BY_NAME = {c.name: c for c in COMPONENTS}


def component(name: str) -> Component:
    return _BY_NAME[name]


def path_of(name: str) -> str:
    """The file name of component ``name`` inside an index folder."""
    return _BY_NAME[name].path


def required() -> tuple[str, ...]:
    return tuple(c.name for c in COMPONENTS if c.required)
