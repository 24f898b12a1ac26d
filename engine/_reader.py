"""Read side of an index folder: opens and validates every store (no models needed)."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc  # noqa: F401 - pa.ipc

from ._captions import CaptionSignals
from ._errors import IndexFormatError
from ._layout import path_of, required
from ._manifest import check_components, dir_size, read_manifest
from ._stores import DinoProjection, PatchStore, TextStore, VectorStore


class IndexReader:
    """The stores of one index folder. Vectors are searched by faiss; patches are read by record; record
    metadata is read lazily. Rows are record positions; slots are positions among records with an image."""

    def __init__(self, path: str | Path, nprobe: int | None = None) -> None:
        self.path = Path(path).expanduser().absolute()
        self.manifest = read_manifest(self.path)
        missing = [c for c in required() if c not in self.manifest["components"]]
        if missing:
            raise IndexFormatError(
                f"index {self.path} lacks the components {', '.join(missing)} (written by an older attrib?); rebuild "
                f"it with `attrib index SOURCE --out {self.path} --overwrite`"
            )
        check_components(self.path, self.manifest)
        m = self.manifest
        self.n_records = int(m["counts"]["records"])
        self.n_images = int(m["counts"]["images"])
        dims = m["dims"]
        self.grid = int(dims["patch_grid"])
        try:
            ann = {k: dict(v, **({"nprobe": nprobe} if nprobe else {})) for k, v in m.get("ann", {}).items()}
            self.clip = VectorStore(self.path / path_of("clip"), ann.get("clip", {}))
            self.dino = VectorStore(self.path / path_of("dino"), ann.get("dino", {}))
            self.patches = PatchStore(self.path / path_of("patches"), self.n_images, int(dims["patch_cells"]),
                                      int(dims["patch_dims"]))
            self.projection = DinoProjection.load(self.path / path_of("projection"))
            self.slot_rows = np.load(self.path / path_of("slots"), mmap_mode="r")
            self.row_slot = np.load(self.path / path_of("row_slot"), mmap_mode="r")
            self.text = TextStore(self.path / path_of("text"), m.get("text", {}).get("analyzer", "attrib_en"))
            self.captions = CaptionSignals(self.path, m)  # caption embeddings and duplicate counts (optional)
        except IndexFormatError:
            raise
        except Exception as e:  # noqa: BLE001 - faiss/tantivy/numpy raise many types on damaged files
            raise IndexFormatError(
                f"index {self.path} is damaged ({e.__class__.__name__}: {e}); rebuild it with "
                f"`attrib index SOURCE --out {self.path} --overwrite`"
            ) from None
        checks = [
            (self.clip.ntotal, self.n_images, "clip vectors"), (self.dino.ntotal, self.n_images, "dino vectors"),
            (len(self.slot_rows), self.n_images, "slot table"), (len(self.row_slot), self.n_records, "row table"),
            (self.text.num_docs, self.n_records, "caption index"),
        ]
        for got, want, what in checks:
            if got != want:
                raise IndexFormatError(
                    f"index {self.path} is damaged: its {what} holds {got} entries, "
                    f"the manifest says {want}; rebuild it"
                )

    @property
    def fingerprint(self) -> str:
        return self.manifest["models"]["fingerprint"]

    @property
    def untrained(self) -> bool:
        return not self.manifest["models"].get("pretrained", False)

    @cached_property
    def _serving(self) -> tuple[list, np.ndarray]:
        """The Arrow IPC batches of id/image/caption, memory-mapped (zero-copy), and each batch's first row."""
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(self.path / path_of("serving")), "r"))
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except Exception as e:  # noqa: BLE001
            raise IndexFormatError(
                f"index {self.path} is damaged: {path_of('serving')} cannot be read ({e}); rebuild it"
            ) from None
        starts = np.cumsum([0] + [b.num_rows for b in batches])[:-1].astype(np.int64)
        return batches, starts

    def records(self, rows: np.ndarray) -> pl.DataFrame:
        """id, image, caption of the given rows, in that order (only their pages of the file are read)."""
        rows = np.asarray(rows, dtype=np.int64)
        batches, starts = self._serving
        if len(rows) == 0 or not batches:
            return pl.DataFrame(schema={"id": pl.String, "image": pl.String, "caption": pl.String})
        which = np.searchsorted(starts, rows, side="right") - 1
        parts, order = [], []
        for b in np.unique(which):
            sel = np.flatnonzero(which == b)
            parts.append(batches[b].take(pa.array(rows[sel] - starts[b])))
            order.append(sel)
        table = pa.Table.from_batches(parts)
        inverse = np.empty(len(rows), np.int64)
        inverse[np.concatenate(order)] = np.arange(len(rows))
        return pl.from_arrow(table.take(pa.array(inverse)))  # type: ignore[return-value]

    @cached_property
    def ids(self) -> np.ndarray:
        """All record ids as an object array (benchmarks map ids to rows with it)."""
        batches, _ = self._serving
        return np.asarray([x for b in batches for x in b.column(0).to_pylist()], dtype=object)

    def rows_to_slots(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.row_slot[np.asarray(rows, np.int64)], np.int64) if len(rows) else np.zeros(0, np.int64)

    def slots_to_rows(self, slots: np.ndarray) -> np.ndarray:
        return (np.asarray(self.slot_rows[np.asarray(slots, np.int64)], np.int64) if len(slots)
                else np.zeros(0, np.int64))

    def component_sizes(self) -> dict[str, int]:
        return {name: dir_size(self.path / e["path"]) for name, e in self.manifest["components"].items()}
