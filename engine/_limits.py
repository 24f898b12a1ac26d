"""Bounds of every numeric setting and option, in one place with no imports, so the CLI can check arguments
before it loads anything heavy and the library checks the same values (``IndexSettings``, ``QuerySettings``,
``Index.query``). Each bound keeps the memory a value sizes far below what one machine has."""
from __future__ import annotations

MAX_K = 10_000  # results per query (tantivy and faiss allocate k-sized heaps; a huge k panicked in Rust)
MAX_DEPTH = 10_000  # candidates per ranker in the fused pool
MAX_DINO_RERANK = 100_000  # global-descriptor candidates re-ranked with patch features
MAX_RRF_K = 100_000  # the k of reciprocal rank fusion (60 is the usual value)
MAX_NPROBE = 1_000_000  # IVF lists probed per search
MAX_BATCH_SIZE = 1024  # images per encoder forward pass
MAX_WORKERS = 256  # image decoding threads
MAX_PATCH_GRID = 64  # pooled DINOv2 grid side; also at most the model's own patch grid (checked at build)
MAX_PATCH_DIMS = 4096  # PCA dims per stored patch cell (clipped to the model's dims)
MAX_PCA_SAMPLE = 65_536  # images held in memory (raw patch tokens) to fit the patch PCA
MAX_PIXELS = 200_000_000  # the largest --max-pixels (PIL refuses images over ~179 M pixels anyway)
MAX_IMAGE_BYTES = 4 * 1024**3  # the largest max_bytes per image file
MAX_ANN_FLAT_MAX = 10**12  # ann_flat_max (a count of images, no allocation)
MAX_CHUNK = 10_000_000  # images per committed segment (held in memory until the commit)


def int_between(what: str, value: object, low: int, high: int) -> int:
    """``value`` as an int if it is an integer (not a bool) in [low, high]; ValueError naming ``what`` otherwise."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{what}={value!r} must be an integer in {low}..{high}")
    v = value.__index__()  # type: ignore[union-attr]
    if not low <= v <= high:
        raise ValueError(f"{what}={v} is out of range; valid: {low}..{high}")
    return v
