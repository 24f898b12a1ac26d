"""Codebooks: everything that turns encoder outputs into stored codes, trained once per index on a sample
(the first chunk of a build) and frozen, so that every segment is encoded the same way and segments can be
searched together and merged. ``attrib compact --retrain`` makes a new codebook generation from the index.

Two codecs:

* ``fp16`` (small corpora, and the exact reference): vectors and patch cells are stored as float16;
  the first stage scans them (``flat``: one list) or an IVF over them.
* ``pq`` (large corpora): the first stage is IVF + product quantization with 4-bit sub-quantizers (one per 4
  dimensions: 64 B per CLIP vector, 96 B per DINO descriptor). The lists are stored in faiss's ordinary IVF
  format (memory-mapped, merged and pruned like any IVF index); a reader packs each segment's once into a faiss
  fast-scan index (``IndexIVFPQFastScan``: SIMD lookups in registers, about 8x faster than 8-bit PQ at the same bytes
  per vector). Its top candidates are re-scored with 8-bit scalar codes (``refine``: one byte per dimension); patch
  cells are product-quantized (8 B per cell by default), and so are caption embeddings when the first chunk
  has enough captions to train on (``caption_codec`` "pq": 8-bit codes, one per 4 dimensions, 128 B per 512-d
  embedding; otherwise, or with the setting ``caption_codec="int8"``, int8 with a per-record scale, 516 B).
  Indexes built before 4-bit codes (``nbits`` 8 in the manifest) are searched as they were, with 8-bit PQ lists.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from ._errors import AttribError, IndexFormatError
from ._layout import path_of
from ._stores import DinoProjection

FP16, PQ = "fp16", "pq"
FLAT, IVF = "flat", "ivf"
PATCH_ENCODE_BLOCK = 4096  # images whose patch cells are converted and product-quantized at a time
REFINE_BLOCK = 1024  # re-scored candidates whose 8-bit codes are converted to float32 at a time
PQ_MIN_TRAIN = 256  # images the first chunk needs for product quantizers with 256 centroids
IVF_MIN_PER_LIST = 39  # faiss wants this many training points per list
SUBVECTOR_DIMS = 4  # dims per (4-bit) PQ sub-quantizer of the first stage: as many bytes as 8-bit PQ over 8
PQ_NBITS = 4  # bits per first-stage sub-quantizer code: 4 is what faiss's fast-scan SIMD kernels take
CAPTION_PQ_DIMS = 4  # dims per caption-embedding sub-quantizer (8-bit codes: 128 B for a 512-d embedding)
CAPTION_PQ_NBITS = 8
CAPTION_PQ_MIN_TRAIN = 1000  # captions the first chunk needs to train them; else int8 codes
CAPTION_PQ_MAX_TRAIN = 65_536
INT8 = "int8"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def file_entry(path: Path) -> dict:
    """{"bytes", "sha256"} of a file, as the manifest records it."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}



def faiss_write(write, obj, path: Path) -> None:
    """``write(obj, ...)`` with a faiss writer (``faiss.write_index``, ``faiss.write_ProductQuantizer``) into the
    file ``path``, through Python's file object. faiss's own file writer reports a failed write as a RuntimeError,
    and a failed close (the last buffered bytes on a full disk) only as a line on stderr: the file was then cut
    short without an error. Here every failure is the ``OSError`` of the write, naming the file."""
    try:
        with open(path, "wb") as f:
            writer = faiss.PyCallbackIOWriter(f.write)
            try:
                write(obj, writer)
            finally:
                del writer
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e

@dataclass
class StoreSpec:
    """How one vector store (clip or dino) is encoded."""

    dim: int  # vector dimensions
    ann: str  # "flat" (one list, every code scanned) or "ivf"
    codec: str  # "fp16" or "pq"
    nlist: int = 1  # IVF lists
    nprobe: int = 1  # lists scanned per search (default; --nprobe overrides)
    m: int = 0  # PQ sub-quantizers (pq codec)
    nbits: int = 8  # bits per PQ code (pq codec): 4 (fast-scan) for new indexes; 8 in indexes made before

    @property
    def fast_scan(self) -> bool:
        """Searched through a fast-scan index (4-bit PQ lists packed in blocks at a reader's first search)."""
        return self.codec == PQ and self.nbits == 4

    @property
    def code_bytes(self) -> int:
        """Bytes of one vector's code in the lists."""
        return (self.m * self.nbits + 7) // 8 if self.codec == PQ else 2 * self.dim

    @property
    def refine_dtype(self) -> np.dtype:
        return np.dtype(np.float16) if self.codec == FP16 else np.dtype(np.uint8)

    def to_dict(self) -> dict:
        return {"dim": self.dim, "ann": self.ann, "codec": self.codec, "nlist": self.nlist, "nprobe": self.nprobe,
                "m": self.m, "nbits": self.nbits}


@dataclass
class Codebooks:
    """One frozen codebook generation (see the module docstring)."""

    generation: int
    projection: DinoProjection
    stores: dict[str, StoreSpec]  # "clip" / "dino" -> spec
    templates: dict[str, faiss.Index]  # trained, empty faiss indexes (ids are record rows)
    sq: dict[str, faiss.ScalarQuantizer] = field(default_factory=dict)  # 8-bit refine quantizers (pq codec)
    patch_codec: str = FP16
    patch_pq: faiss.ProductQuantizer | None = None
    patch_cells: int = 64
    patch_dims: int = 64
    caption_pq: faiss.ProductQuantizer | None = None  # caption embeddings' quantizer (pq codec, enough captions)

    # ----------------------------------------------------------------------------------------- training
    @classmethod
    def train(cls, generation: int, projection: DinoProjection, clip: np.ndarray, dino: np.ndarray,
              cells: np.ndarray, ann: str, codec: str, expected_images: int, flat_max: int,
              patch_m: int, captions: np.ndarray | None = None, caption_codec: str = "auto",
              keep: "Codebooks | None" = None, ranges: dict | None = None) -> "Codebooks":
        """Train on a sample: ``clip`` (n, Dc), ``dino`` (n, Dg) global descriptors and projected ``cells``
        (n, C, Dp), and the records' caption embeddings ``captions`` (zeros: no caption; None: none encoded).
        ``ann``/``codec`` may be "auto": decided from ``expected_images`` and ``flat_max``. With the pq codec,
        ``caption_codec`` "auto" or "pq" product-quantizes caption embeddings (when there are enough to train
        on), "int8" keeps them as int8 with a per-record scale.

        A retraining passes the codebooks it replaces as ``keep``: where both use the pq codec, their 8-bit refine
        quantizers and their patch and caption product quantizers (the finest codes an index holds) are kept, not
        fitted again, since fitting them on their own decoded values learns nothing and coding those values again
        only adds error; the caller then copies those codes as they are. Only the first stage (IVF centroids and
        the fast-scan codes) is refitted. ``ranges``: store -> (min, max) per dimension over every vector, for
        refine quantizers fitted here on a sample (their range is then that of all the data, as if fitted on it)."""
        n = clip.shape[0]
        big = expected_images > flat_max
        if codec == "auto":
            codec = PQ if big and n >= PQ_MIN_TRAIN else FP16
        if codec == PQ and n < PQ_MIN_TRAIN:
            raise AttribError(f"--codec pq needs at least {PQ_MIN_TRAIN} images in the first chunk to train its "
                              f"quantizers (this one has {n}); use a larger --chunk or --codec fp16")
        if ann == "auto":
            ann = IVF if big else FLAT
        kept = keep if keep is not None and codec == PQ and keep.stores["clip"].codec == PQ else None
        stores, templates, sq = {}, {}, {}
        for name, x in (("clip", clip), ("dino", dino)):
            spec = _store_spec(x.shape[1], ann, codec, n, expected_images)
            stores[name] = spec
            templates[name] = _train_template(spec, x)
            if kept is not None:
                sq[name] = kept.sq[name]
            elif codec == PQ:
                q = faiss.ScalarQuantizer(spec.dim, faiss.ScalarQuantizer.QT_8bit)
                q.train(np.ascontiguousarray(x, np.float32))
                if ranges and name in ranges:  # faiss's 8-bit range: the min and max of each dimension
                    lo, hi = (np.asarray(v, np.float32) for v in ranges[name])
                    faiss.copy_array_to_vector(np.concatenate([lo, hi - lo]).astype(np.float32), q.trained)
                sq[name] = q
        C, Dp = cells.shape[1], cells.shape[2]
        pq = None
        if kept is not None and kept.patch_pq is not None:
            pq = kept.patch_pq
        elif codec == PQ:
            m = max(1, min(patch_m, Dp))
            while Dp % m:
                m -= 1
            pq = faiss.ProductQuantizer(Dp, m, 8)
            pq.cp.min_points_per_centroid = 1
            flat = cells.reshape(-1, Dp)  # the sample is taken first, then converted: no float32 copy of all cells
            rng = np.random.default_rng(0)
            pick = np.sort(rng.choice(len(flat), size=min(len(flat), 65536), replace=False))
            pq.train(np.ascontiguousarray(flat[pick], np.float32))
        if codec != PQ or caption_codec == INT8:
            cap_pq = None
        elif kept is not None and kept.caption_pq is not None:
            cap_pq = kept.caption_pq
        else:
            cap_pq = _train_caption_pq(captions)
        if caption_codec == PQ and cap_pq is None:
            have = 0 if captions is None else int(np.count_nonzero(np.asarray(captions).any(axis=1)))
            why = ("caption embeddings are product codes only with --codec pq" if codec != PQ else
                   f"--caption-codec pq needs at least {CAPTION_PQ_MIN_TRAIN} captions in the first chunk to train "
                   f"its quantizer (this one has {have}); use a larger --chunk")
            raise AttribError(f"{why}, or --caption-codec auto")
        return cls(generation, projection, stores, templates, sq, codec if pq is not None else FP16, pq, C, Dp,
                   cap_pq)

    # ----------------------------------------------------------------------------------------- files
    def save(self, folder: Path) -> dict:
        """Write every codebook file into ``folder``; returns the manifest entry."""
        folder.mkdir(parents=True, exist_ok=True)
        self.projection.save(folder / path_of("projection"))
        for name in ("clip", "dino"):
            faiss_write(faiss.write_index, self.templates[name], folder / path_of(f"{name}_ivf"))
            if name in self.sq:
                with open(folder / path_of(f"{name}_sq"), "wb") as f:
                    np.save(f, faiss.vector_to_array(self.sq[name].trained), allow_pickle=False)
        if self.patch_pq is not None:
            faiss_write(faiss.write_ProductQuantizer, self.patch_pq, folder / path_of("patch_pq"))
        if self.caption_pq is not None:
            faiss_write(faiss.write_ProductQuantizer, self.caption_pq, folder / path_of("caption_pq"))
        files = {p.name: file_entry(p) for p in sorted(folder.iterdir()) if p.is_file()}
        out = {"generation": self.generation, "stores": {k: v.to_dict() for k, v in self.stores.items()},
               "patch_codec": self.patch_codec, "patch_m": self.patch_pq.M if self.patch_pq is not None else 0,
               "patch_cells": self.patch_cells, "patch_dims": self.patch_dims, "files": files}
        if self.caption_pq is not None:  # absent otherwise: older engines read such manifests as before
            out["caption_codec"] = PQ
        return out

    @classmethod
    def load(cls, folder: Path, entry: dict) -> "Codebooks":
        try:
            projection = DinoProjection.load(folder / path_of("projection"))
            stores = {k: StoreSpec(**v) for k, v in entry["stores"].items()}
            templates = {k: faiss.read_index(str(folder / path_of(f"{k}_ivf"))) for k in stores}
            sq = {}
            for k, spec in stores.items():
                if spec.codec == PQ:
                    q = faiss.ScalarQuantizer(spec.dim, faiss.ScalarQuantizer.QT_8bit)
                    faiss.copy_array_to_vector(np.load(folder / path_of(f"{k}_sq"), allow_pickle=False)
                                               .astype(np.float32), q.trained)
                    sq[k] = q
            pq = cap_pq = None
            if entry.get("patch_codec") == PQ:
                pq = faiss.read_ProductQuantizer(str(folder / path_of("patch_pq")))
            if entry.get("caption_codec") == PQ:
                cap_pq = faiss.read_ProductQuantizer(str(folder / path_of("caption_pq")))
                if cap_pq.d != stores["clip"].dim:
                    raise ValueError(f"its caption quantizer has {cap_pq.d} dims, CLIP {stores['clip'].dim}")
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
            raise IndexFormatError(f"the codebooks in {folder} are damaged ({e.__class__.__name__}: {e}); "
                                   f"rebuild the index") from None
        return cls(int(entry["generation"]), projection, stores, templates, sq, entry.get("patch_codec", FP16), pq,
                   int(entry.get("patch_cells", projection.components.shape[1])),
                   int(entry.get("patch_dims", projection.cell_dim)), cap_pq)

    # ----------------------------------------------------------------------------------------- coding
    def new_store(self, name: str) -> faiss.Index:
        """An empty faiss index for one segment's vectors of store ``name``."""
        return faiss.clone_index(self.templates[name])

    def refine_codes(self, name: str, x: np.ndarray) -> np.ndarray:
        """Row-aligned codes that re-score candidates: float16, or 8-bit scalar codes."""
        x = np.ascontiguousarray(x, np.float32)
        if self.stores[name].codec == FP16:
            return x.astype(np.float16)
        if len(x) == 0:  # a segment of caption-only records
            return np.zeros((0, self.sq[name].code_size), np.uint8)
        return self.sq[name].compute_codes(x).reshape(len(x), -1)

    def decode_refine(self, name: str, codes: np.ndarray) -> np.ndarray:
        """float32 vectors from refine codes."""
        if self.stores[name].codec == FP16:
            return _fp16_to_f32(codes)
        return self.sq[name].decode(np.ascontiguousarray(codes, np.uint8)).reshape(len(codes), -1)

    def refine_scores(self, name: str, codes: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Inner products of one query vector with the vectors of refine codes, without decoding them. An 8-bit
        code c of dimension j stands for vmin_j + (c + 0.5) / 255 * vdiff_j (faiss's QT_8bit), so the product
        is codes @ (q * vdiff / 255) plus a constant: the codes are only converted to float, with no affine
        decoding (3,200 DINO candidates: about 1 ms against 8 ms through faiss's decoder). Equal to
        ``decode_refine(codes) @ q`` within float rounding (about 1e-6). Each row's sum is taken on its own
        (einsum, not BLAS, whose blocking can give two identical rows different roundings), so duplicates of an
        image score exactly alike and their order is the row order, whatever segment or position they sit in."""
        q = np.asarray(q, np.float32)
        if self.stores[name].codec == FP16:
            return np.einsum("ij,j->i", _fp16_to_f32(codes), q)
        vmin, vdiff = self._sq_affine(name)
        w = (q * vdiff / np.float32(255.0)).astype(np.float32)
        codes = np.asarray(codes, np.uint8)
        out = np.empty(len(codes), np.float32)
        for a in range(0, len(codes), REFINE_BLOCK):  # float32 copies of a block at a time: cache-sized temporaries
            out[a:a + REFINE_BLOCK] = np.einsum("ij,j->i", codes[a:a + REFINE_BLOCK].astype(np.float32), w)
        return (out + np.float32(q @ vmin + 0.5 * w.sum())).astype(np.float32)

    def _sq_affine(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(vmin, vdiff) of store ``name``'s 8-bit scalar quantizer (its trained array holds both)."""
        cache = self.__dict__.setdefault("_affine", {})
        if name not in cache:
            d = self.stores[name].dim
            trained = faiss.vector_to_array(self.sq[name].trained).astype(np.float32)
            cache[name] = (trained[:d].copy(), trained[d:2 * d].copy())
        return cache[name]

    @property
    def patch_code_shape(self) -> tuple[int, int, np.dtype]:
        """(cells, values per cell, dtype) of one image's stored patch codes."""
        if self.patch_pq is not None:
            return self.patch_cells, self.patch_pq.code_size, np.dtype(np.uint8)
        return self.patch_cells, self.patch_dims, np.dtype(np.float16)

    def encode_patches(self, cells: np.ndarray) -> np.ndarray:
        """Stored codes of projected cells (n, C, Dp), float16 or float32. Encoded in blocks of images, so that a
        chunk of 100,000 images never exists as float32 all at once (1.6 GB for 64 cells of 64 dims)."""
        if self.patch_pq is None:
            return np.asarray(cells, np.float16)
        n, c, d = cells.shape
        out = np.empty((n, c, self.patch_pq.code_size), np.uint8)
        for a in range(0, n, PATCH_ENCODE_BLOCK):
            block = np.ascontiguousarray(cells[a:a + PATCH_ENCODE_BLOCK].reshape(-1, d), np.float32)
            out[a:a + PATCH_ENCODE_BLOCK] = self.patch_pq.compute_codes(block).reshape(-1, c, self.patch_pq.code_size)
        return out

    def decode_patches(self, codes: np.ndarray) -> np.ndarray:
        """float32 cells (n, C, Dp), L2-normalised, from stored codes."""
        if self.patch_pq is None:
            n, c, d = codes.shape
            return _fp16_to_f32(codes.reshape(n * c, d)).reshape(n, c, d)
        n, c, b = codes.shape
        out = self.patch_pq.decode(np.ascontiguousarray(codes.reshape(-1, b), np.uint8))
        norms = np.sqrt(np.einsum("ij,ij->i", out, out))
        out /= np.maximum(norms, 1e-12)[:, None]
        return out.reshape(n, c, -1)

    # caption embeddings (CLIP text vectors of captions, one per record). Their quantizer is trained on the
    # captions themselves: the image codebooks would not fit them, since text embeddings lie elsewhere in CLIP
    # space (the modality gap).
    @property
    def caption_codec(self) -> str:
        """fp16 (fp16 codec), pq (product codes; pq codec with enough captions to train on), or int8."""
        if self.stores["clip"].codec == FP16:
            return FP16
        return PQ if self.caption_pq is not None else INT8

    @property
    def caption_code_shape(self) -> tuple[int, np.dtype]:
        """(bytes per record, dtype) of stored caption embeddings: float16; int8 values scaled per record with the
        float32 scale in the last 4 bytes (cosines within about 1e-3); or product codes followed by one byte that
        is 1 for a caption and 0 for none (cosines within a few hundredths: see ``_train_caption_pq``)."""
        d, codec = self.stores["clip"].dim, self.caption_codec
        if codec == FP16:
            return d, np.dtype(np.float16)
        return (self.caption_pq.code_size + 1 if codec == PQ else d + 4), np.dtype(np.uint8)

    def encode_captions(self, x: np.ndarray) -> np.ndarray:
        """Stored codes of caption embeddings (n, Dc); all-zero rows (empty captions) decode as all zero."""
        x = np.ascontiguousarray(x, np.float32)
        codec = self.caption_codec
        if codec == FP16:
            return x.astype(np.float16)
        if codec == PQ:
            out = np.zeros((len(x), self.caption_pq.code_size + 1), np.uint8)
            present = x.any(axis=1)
            if present.any():
                out[present, :-1] = self.caption_pq.compute_codes(np.ascontiguousarray(x[present]))
                out[present, -1] = 1
            return out
        scale = np.abs(x).max(axis=1) / 127.0 if len(x) else np.zeros(0, np.float32)
        q = np.round(x / np.maximum(scale, 1e-30)[:, None]).clip(-127, 127).astype(np.int8)
        return np.concatenate([q.view(np.uint8), scale.astype("<f4")[:, None].view(np.uint8)], axis=1)

    def decode_captions(self, codes: np.ndarray) -> np.ndarray:
        """float32 caption embeddings (n, Dc) from stored codes (product codes: L2-normalised, as encoded)."""
        codec = self.caption_codec
        if codec == FP16:
            return _fp16_to_f32(codes)
        codes = np.ascontiguousarray(codes, np.uint8)
        if codec == PQ:
            out = np.zeros((len(codes), self.stores["clip"].dim), np.float32)
            present = codes[:, -1] != 0
            if present.any():
                v = self.caption_pq.decode(np.ascontiguousarray(codes[present, :-1]))
                v /= np.maximum(np.sqrt(np.einsum("ij,ij->i", v, v)), 1e-12)[:, None]
                out[present] = v
            return out
        d = codes.shape[1] - 4
        scale = codes[:, d:].copy().view("<f4")[:, 0]
        return codes[:, :d].view(np.int8).astype(np.float32) * scale[:, None]

    def describe(self) -> dict:
        return {"generation": self.generation, "stores": {k: v.to_dict() for k, v in self.stores.items()},
                "patch_codec": self.patch_codec, "caption_codec": self.caption_codec}


_FP16_DECODERS: dict[int, faiss.ScalarQuantizer] = {}


def _fp16_to_f32(x: np.ndarray) -> np.ndarray:
    """float16 -> float32 with faiss's SIMD decoder (about 3x numpy's cast)."""
    x = np.ascontiguousarray(x, np.float16)
    if x.size == 0:
        return x.astype(np.float32)
    d = x.shape[-1]
    dec = _FP16_DECODERS.get(d)
    if dec is None:
        dec = _FP16_DECODERS[d] = faiss.ScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16)
    return dec.decode(x.view(np.uint8).reshape(-1, 2 * d)).reshape(x.shape)


def _train_caption_pq(captions: np.ndarray | None) -> faiss.ProductQuantizer | None:
    """A product quantizer of caption embeddings (8-bit codes, one per ``CAPTION_PQ_DIMS`` dims) trained on the
    non-empty ones of the sample, or None (int8 codes) when there are fewer than ``CAPTION_PQ_MIN_TRAIN``. Their
    cosines to a prompt are within about 0.01-0.015 of the exact ones, against 0.0003 for int8, and a ranking by
    them keeps about 0.9 of its top 100 (0.995 with int8): see the README's measured figures."""
    if captions is None:
        return None
    x = np.asarray(captions, np.float32)
    x = x[x.any(axis=1)]
    d = x.shape[1]
    if len(x) < CAPTION_PQ_MIN_TRAIN or d % CAPTION_PQ_DIMS:
        return None
    pick = np.sort(np.random.default_rng(0).choice(len(x), size=min(len(x), CAPTION_PQ_MAX_TRAIN), replace=False))
    pq = faiss.ProductQuantizer(d, d // CAPTION_PQ_DIMS, CAPTION_PQ_NBITS)
    pq.cp.min_points_per_centroid = 1
    pq.train(np.ascontiguousarray(x[pick]))
    return pq


def _store_spec(dim: int, ann: str, codec: str, n_train: int, expected: int) -> StoreSpec:
    if ann == FLAT:
        nlist = 1
    else:
        nlist = max(1, min(65536, int(2 * math.sqrt(max(expected, 1))), n_train // IVF_MIN_PER_LIST))
    nprobe = 1 if nlist == 1 else min(nlist, max(16, nlist // 32))
    m = 0
    if codec == PQ:
        m = min(dim, max(32, dim // SUBVECTOR_DIMS))  # small vectors keep at least 32 sub-quantizers (16 B)
        while dim % m:
            m -= 1
    return StoreSpec(dim, FLAT if nlist == 1 else IVF, codec, nlist, nprobe, m, PQ_NBITS if codec == PQ else 8)


def _train_template(spec: StoreSpec, x: np.ndarray) -> faiss.Index:
    x = np.ascontiguousarray(x, np.float32)
    quantizer = faiss.IndexFlatIP(spec.dim)
    if spec.codec == PQ:
        index = faiss.IndexIVFPQ(quantizer, spec.dim, spec.nlist, spec.m, spec.nbits, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFScalarQuantizer(quantizer, spec.dim, spec.nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
        index.by_residual = False  # codes are the fp16 vectors themselves: same scores as a flat fp16 scan
    index.cp.min_points_per_centroid = 1  # small first chunks: no warning per training (quality is measured)
    if spec.codec == PQ:
        index.pq.cp.min_points_per_centroid = 1
    rng = np.random.default_rng(0)
    # 64 points per list are plenty for k-means centroids, and 64k for the PQ sub-quantizers' 256 centroids
    sample = x[np.sort(rng.choice(len(x), size=min(len(x), max(64 * spec.nlist, 65_536)), replace=False))]
    index.train(sample)
    index.nprobe = spec.nprobe
    return index
