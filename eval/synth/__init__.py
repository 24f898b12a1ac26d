"""Deterministic synthetic memorization benchmark.

Procedural scenes (``engine.scenes``: a textured background plus 1-3 textured shapes) make a training corpus
with near-duplicate groups, and queries that copy the corpus the way generated images are known to: verbatim
copies, templates (same layout, new colours), crops pasted into new scenes, composites of two sources, re-used
textures, and novel scenes with no source. Every file is a pure function of ``(train, queries, seed, image_size)``.

Folder layout written by :func:`generate`::

    OUT/corpus.parquet   id, image, caption, group
    OUT/queries.parquet  query_id, image, prompt, relevant, kind, split, prompt_kind, seed
    OUT/synth.json       generator parameters and counts
    OUT/train/*.png      corpus images
    OUT/queries/*        query images (verbatim copies are JPEG, the rest PNG)

Modules: ``plan`` (every record and query decided from the parameters), ``transforms`` (how a query image
is made from its sources), ``write`` (writing the folder, replaying one query).
"""
from .plan import KINDS, PROMPT_KINDS, SPLITS, VERSION
from .transforms import crop_and_paste, object_crop_box, template_spec, texture_spec
from .write import SynthOptionError, check_options, explain_query, generate

__all__ = ["generate", "explain_query", "check_options", "SynthOptionError", "KINDS", "PROMPT_KINDS", "SPLITS",
           "VERSION", "crop_and_paste", "object_crop_box", "template_spec", "texture_spec"]
