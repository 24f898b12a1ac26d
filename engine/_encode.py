"""Query encoding: images and prompts to the named encodings rankers use, prepared exactly as the index
prepared its own images (one shared image preparation, see ``engine.images.encoder_inputs``)."""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from ._errors import QueryInputError
from ._threads import single_threaded_blas
from .images import DEFAULT_MAX_PIXELS, ImageLimits, ImageRejected, encoder_inputs, read_bytes
from .rankers import QueryInput

#: The encodings a query can carry (name -> what it is). Rankers name the ones they use.
ENCODINGS: dict[str, str] = {
    "clip_image": "(Dc,) L2-normalised CLIP image embedding",
    "clip_text": "(Dc,) L2-normalised CLIP text embedding of the prompt",
    "dino_global": "(2D,) L2-normalised DINOv2 global descriptor (centred CLS + patch mean)",
    "dino_cells": "(C, Dp) projected, L2-normalised DINOv2 patch cells",
    "terms": "list of analysed prompt terms (BM25); empty when the prompt is only stop words",
    "prompt_text": "the prompt folded and tokenized (engine.text.TextBatch) for the phrase and trigram signals",
}
#: Encodings that are arrays (cached by benchmarks); the others are recomputed from the prompt.
ARRAY_ENCODINGS = ("clip_image", "clip_text", "dino_global", "dino_cells")


def check_prompt(prompt: Any) -> str:
    """The prompt as text ("" for None). Refused with a QueryInputError: a non-string, and text that is not valid
    Unicode (on a command line, bytes that are not UTF-8 arrive as lone surrogates), which no tokenizer or text
    index can take."""
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        raise QueryInputError(f"a prompt must be text, not {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = prompt[e.start]
        what = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise QueryInputError(f"the prompt is not valid UTF-8 text ({what} at character {e.start}); "
                              f"pass the prompt encoded as UTF-8") from None
    return prompt


def _add(timings: dict, key: str, since: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + (now - since) * 1e3
    return now


class QueryEncoder:
    """Encodes queries for one index. ``encoders`` is called to get the loaded models (they load lazily)."""

    def __init__(self, reader, encoders: Callable[[], Any]) -> None:
        self.reader = reader
        self._encoders = encoders
        settings = reader.manifest["settings"]
        self.limits = ImageLimits(int(settings.get("max_pixels", DEFAULT_MAX_PIXELS)))
        self.batch_size = int(settings.get("batch_size", 32))

    def _image_inputs(self, image, enc) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
        """(reference, encoder inputs) of one query image (a path or a PIL image)."""
        from PIL import Image

        if isinstance(image, Image.Image):
            ref, source = "<PIL image>", image
        else:
            ref = os.fspath(image)
            if not os.path.exists(ref):
                raise QueryInputError(f"query image {ref} does not exist")
            source = None
        try:
            if source is None:
                source = read_bytes(ref, self.limits)
            return ref, encoder_inputs(source, self.limits, enc.clip_input, enc.dino_input)
        except ImageRejected as e:
            raise QueryInputError(f"query image {ref} cannot be used: {e.reason} ({e.detail})") from None

    def encode(self, images: Sequence[Any | None], prompts: Sequence[str | None],
               query_ids: Sequence[str] | None = None, timings: dict | None = None) -> list[QueryInput]:
        """Encode several queries in batches (images and prompts may be None)."""
        n = len(images)
        qids = list(query_ids) if query_ids is not None else [f"q{i}" for i in range(n)]
        out = [QueryInput(query_id=qids[i], prompt=check_prompt(prompts[i])) for i in range(n)]
        timings = timings if timings is not None else {}
        img_idx = [i for i in range(n) if images[i] is not None]
        txt_idx = [i for i in range(n) if out[i].prompt.strip()]
        enc = None
        if img_idx or txt_idx:
            t = time.perf_counter()
            enc, loaded = self._encoders()
            if loaded:
                _add(timings, "load_models", t)
        proj, grid, bs = self.reader.projection, self.reader.grid, self.batch_size
        for s in range(0, len(img_idx), bs):
            chunk = img_idx[s:s + bs]
            clip_u8, dino_u8 = [], []
            for i in chunk:
                ref, (cu8, du8) = self._image_inputs(images[i], enc)
                out[i].image = ref
                clip_u8.append(cu8)
                dino_u8.append(du8)
            t = time.perf_counter()
            clip = enc.encode_clip_images(np.stack(clip_u8))
            t = _add(timings, "encode_clip_image", t)
            cls, pmean, cells = enc.encode_dino_images(np.stack(dino_u8), grid)
            _add(timings, "encode_dino", t)
            with single_threaded_blas():
                g = proj.global_desc(cls, pmean)
                c = proj.project_cells(cells)
            for j, i in enumerate(chunk):
                out[i].encodings.update(clip_image=clip[j], dino_global=g[j], dino_cells=c[j])
        for s in range(0, len(txt_idx), bs):
            chunk = txt_idx[s:s + bs]
            t = time.perf_counter()
            emb = enc.encode_texts([out[i].prompt for i in chunk])
            _add(timings, "encode_clip_text", t)
            for j, i in enumerate(chunk):
                out[i].encodings["clip_text"] = emb[j]
        for q in out:
            self.add_terms(q)
        return out

    def add_terms(self, q: QueryInput) -> QueryInput:
        """The prompt's analysed terms (cheap; never cached)."""
        q.encodings["terms"] = self.reader.text.terms(q.prompt)
        return q
