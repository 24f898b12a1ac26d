"""Frozen settings dataclasses (one line of comment per field)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from . import _limits as L
from ._errors import AttribError
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class IndexSettings:
    batch_size: int = 32  # images per encoder forward pass
    workers: int = 2  # image decoding threads, overlapping with the model work
    patch_grid: int = 8  # DINOv2 patch tokens are average-pooled to grid x grid cells (16x16 -> 8x8)
    patch_dims: int = 64  # PCA-reduced dims per stored cell (fp16): 8*8*64*2 bytes = 8 KiB per image
    pca_sample: int = 512  # images whose features fit the patch PCA and the descriptor centring
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are rejected as decompression bombs
    max_bytes: int = DEFAULT_MAX_BYTES  # larger image files are rejected
    ann: str = "auto"  # faiss structure: flat (exhaustive fp16), ivf (memory-mapped lists), auto (by size)
    ann_flat_max: int = 50_000  # with ann=auto, IVF is used above this many images (a flat scan costs ~0.1 ms/1k)

    def __post_init__(self) -> None:
        _check_ints(self, "index setting", {
            "batch_size": (1, L.MAX_BATCH_SIZE), "workers": (0, L.MAX_WORKERS), "patch_grid": (1, L.MAX_PATCH_GRID),
            "patch_dims": (1, L.MAX_PATCH_DIMS), "pca_sample": (1, L.MAX_PCA_SAMPLE), "max_pixels": (1, L.MAX_PIXELS),
            "max_bytes": (1, L.MAX_IMAGE_BYTES), "ann_flat_max": (1, L.MAX_ANN_FLAT_MAX)})
        if self.ann not in ("auto", "flat", "ivf"):
            raise AttribError(f"unknown ann kind {self.ann!r}; valid choices: auto, flat, ivf")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IndexSettings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class QuerySettings:
    depth: int = 100  # candidates each ranker contributes to the fused pool
    dino_rerank: int = 200  # global-descriptor candidates the dino ranker re-ranks with patch features
    rrf_k: int = 60  # the k of reciprocal rank fusion
    nprobe: int | None = None  # IVF lists probed per search (None: the value the index was built with)

    def __post_init__(self) -> None:
        bounds = {"depth": (1, L.MAX_DEPTH), "dino_rerank": (1, L.MAX_DINO_RERANK), "rrf_k": (1, L.MAX_RRF_K)}
        if self.nprobe is not None:
            bounds["nprobe"] = (1, L.MAX_NPROBE)
        _check_ints(self, "query setting", bounds)


def _check_ints(obj, what: str, bounds: dict[str, tuple[int, int]]) -> None:
    """Every named field an integer within its bounds (stored as a plain int); AttribError naming it otherwise."""
    for name, (low, high) in bounds.items():
        try:
            value = L.int_between(f"{what} {name}", getattr(obj, name), low, high)
        except ValueError as e:
            raise AttribError(str(e)) from None
        object.__setattr__(obj, name, value)  # frozen: numpy integers become plain ints


def cache_root() -> Path:
    """Where benchmarks and the demo keep their caches: ``$ATTRIB_CACHE``, else ``$XDG_CACHE_HOME/attrib``,
    else ``~/.cache/attrib``."""
    base = os.environ.get("ATTRIB_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "attrib")
    return Path(base).expanduser()
