"""Frozen settings dataclasses (one line of comment per field)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from . import _limits as L
from ._errors import AttribError
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

#: What one run of a build, resume or append may choose for itself.
RUN_SETTINGS = ("batch_size", "workers", "chunk", "max_pixels", "max_bytes")
#: The index's format: an append or a resume keeps it (the others, pca_sample and ann_flat_max, only act when the
#: first commit fits the codebooks).
FORMAT_SETTINGS = ("patch_grid", "patch_dims", "patch_pq_m", "ann", "codec", "caption_codec")


@dataclass(frozen=True)
class IndexSettings:
    batch_size: int = 32  # images per encoder forward pass
    workers: int = 2  # image decoding threads, overlapping with the model work
    patch_grid: int = 8  # DINOv2 patch tokens are average-pooled to grid x grid cells (16x16 -> 8x8)
    patch_dims: int = 64  # PCA-reduced dims per stored cell (fp16): 8*8*64*2 bytes = 8 KiB per image
    pca_sample: int = 512  # images whose features fit the patch PCA and the descriptor centring
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are rejected as decompression bombs
    max_bytes: int = DEFAULT_MAX_BYTES  # larger image files are rejected
    ann: str = "auto"  # first stage: flat (every code scanned), ivf (memory-mapped lists), auto (by size)
    codec: str = "auto"  # stored vectors: fp16 (exact reference), pq (IVF-PQ + 8-bit refine + PQ patches), auto
    ann_flat_max: int = 50_000  # with auto, corpora up to this many images are flat + fp16, larger ones ivf + pq
    chunk: int = 2000  # images per committed segment: a killed build re-encodes at most this many on resume
    patch_pq_m: int = 8  # sub-quantizers per patch cell with the pq codec (bytes per cell)
    caption_codec: str = "auto"  # caption embeddings with the pq codec: pq (128 B), int8 (516 B, finer), auto (pq)

    def __post_init__(self) -> None:
        _check_ints(self, "index setting", {
            "batch_size": (1, L.MAX_BATCH_SIZE), "workers": (0, L.MAX_WORKERS), "patch_grid": (1, L.MAX_PATCH_GRID),
            "patch_dims": (1, L.MAX_PATCH_DIMS), "pca_sample": (1, L.MAX_PCA_SAMPLE), "max_pixels": (1, L.MAX_PIXELS),
            "max_bytes": (1, L.MAX_IMAGE_BYTES), "ann_flat_max": (1, L.MAX_ANN_FLAT_MAX), "chunk": (1, L.MAX_CHUNK),
            "patch_pq_m": (1, 64)})
        if self.ann not in ("auto", "flat", "ivf"):
            raise AttribError(f"unknown ann kind {self.ann!r}; valid choices: auto, flat, ivf")
        if self.codec not in ("auto", "fp16", "pq"):
            raise AttribError(f"unknown codec {self.codec!r}; valid choices: auto, fp16, pq")
        check_caption_codec(self.caption_codec)

    def to_dict(self) -> dict:
        return asdict(self)

    def for_run(self, given: "IndexSettings | None") -> "IndexSettings":
        """These settings (an existing index's own) as a run that was given ``given`` uses them: an append or a
        resume takes the run's operational settings (``RUN_SETTINGS``: batch size, decoding threads, chunk, input
        limits), and keeps the index's own for the rest. A format setting (``FORMAT_SETTINGS``) given with another
        value than the index's (and than the default, which a caller may not have chosen; and unless the index's
        is "auto") is refused, never silently dropped."""
        if given is None:
            return self
        default = IndexSettings()
        for name in FORMAT_SETTINGS:
            mine, theirs = getattr(self, name), getattr(given, name)
            # "auto" was resolved when the codebooks were fit (fp16 or pq, flat or ivf): not compared here
            if theirs != mine and theirs != getattr(default, name) and mine != "auto":
                flag = "--" + name.replace("_", "-")
                raise AttribError(f"index setting {name} ({flag}) {theirs!r} differs from the index's own {mine!r}: "
                                  f"an append or a resume keeps the index's format; leave {flag} out (or build a new "
                                  f"index)")
        return replace(self, **{k: getattr(given, k) for k in RUN_SETTINGS})

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
    refine: int = 4  # compressed stores: candidates re-scored with finer codes per result wanted

    def __post_init__(self) -> None:
        bounds = {"depth": (1, L.MAX_DEPTH), "dino_rerank": (1, L.MAX_DINO_RERANK), "rrf_k": (1, L.MAX_RRF_K),
                  "refine": (1, 64)}
        if self.nprobe is not None:
            bounds["nprobe"] = (1, L.MAX_NPROBE)
        _check_ints(self, "query setting", bounds)


def check_caption_codec(value: str) -> None:
    """AttribError unless ``value`` names a caption codec (the setting, and ``attrib compact --caption-codec``)."""
    if value not in ("auto", "pq", "int8"):
        raise AttribError(f"unknown caption codec {value!r}; valid choices: auto, pq, int8")


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
