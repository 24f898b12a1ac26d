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


@pytest.fixture(scope="session")
def idx(tiny_index, tiny):
    """The shared tiny index, opened once with the tiny encoders."""
    return world.opened(tiny_index, tiny)


# --------------------------------------------------------------------------------------------- benchmarks
@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A private ATTRIB_CACHE for the session (benchmark indexes and query encodings are cached there)."""
    d = tmp_path_factory.mktemp("attrib-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTRIB_CACHE", str(d))
    yield d
    mp.undo()


@pytest.fixture(scope="session")
def bench(tmp_path_factory, cache):
    """A small synthetic benchmark folder (80 training images, 60 queries)."""
    from eval.synth import generate

    out = tmp_path_factory.mktemp("bench") / "synth"
    generate(out, train=80, queries=60, seed=3, image_size=96, progress=False)
    return out


@pytest.fixture(scope="session")
def bidx(bench, tiny):
    """(Benchmark, Index) of the small synthetic benchmark, indexed with the tiny models."""
    from eval.bench import load_benchmark
    from eval.run import ensure_index

    b = load_benchmark(bench)
    i = ensure_index(b, None, "tiny", progress=False)
    i.use_encoders(tiny)
    return b, i


@pytest.fixture(scope="module")
def chromium():
    """Headless browser tests: skip (or fail, with ATTRIB_REQUIRE_BROWSER=1) before any world is built or server
    started when Debian's chromium and chromium-driver are missing."""
    missing = [str(p) for p in (world.CHROMIUM, world.CHROMEDRIVER) if not p.exists()]
    if missing:
        msg = f"headless browser test needs {' and '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("ATTRIB_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + "; ATTRIB_REQUIRE_BROWSER=1 is set")
        pytest.skip(msg)
    return world.CHROMIUM, world.CHROMEDRIVER
