"""Shared fixtures: every test builds its own tiny world with the untrained `tiny` profile."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import world  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The tiny encoders, loaded once per session."""
    import engine

    return engine.load_encoders("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, tiny):
    """A 40-image folder index (with .txt captions) built once per session."""
    import engine

    root = tmp_path_factory.mktemp("tiny-world")
    world.image_folder(root / "src", 40)
    out = root / "index"
    engine.build_index(root / "src", out, encoders=tiny, progress=False, settings=engine.IndexSettings(pca_sample=16))
    return out
