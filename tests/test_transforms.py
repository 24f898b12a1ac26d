"""engine.transforms: the image and caption transforms self-calibration makes its queries with."""
from __future__ import annotations

import numpy as np
import pytest
import world

from engine.transforms import IMAGE_TRANSFORMS, PROMPT_KINDS, partial, prepare, prompt_for, reword, tone


@pytest.mark.parametrize("name", list(IMAGE_TRANSFORMS))
def test_every_image_transform_is_deterministic_for_a_seed(name):
    a = prepare(world.scene(3, 120)[0])
    b = prepare(world.scene(11, 120)[0])
    t = IMAGE_TRANSFORMS[name]

    def run(seed: int):
        rng = np.random.default_rng(seed)
        return t.fn(a, b, rng) if t.two else t.fn(a, rng)

    x, y = run(5), run(5)
    assert x.mode == "RGB" and min(x.size) >= 8
    assert x.size == y.size and np.array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(np.asarray(run(s)), np.asarray(a)) for s in range(3))  # it changes something


def test_prepare_bounds_the_side_and_tone_keeps_the_size():
    big = world.noise_photo(1, 900, 600)
    p = prepare(big)
    assert max(p.size) == 384 and p.size[0] / p.size[1] == pytest.approx(1.5, abs=0.01)
    t = tone(p, np.random.default_rng(0))
    assert t.size == p.size and t.mode == "RGB"


def test_caption_transforms():
    cap = "a large red striped circle at the top, a small blue star on the left, stock photo"
    rng = np.random.default_rng(0)
    r = reword(cap, rng)
    assert r != cap and set(r.replace(",", "").split()) <= set(cap.replace(",", "").split())
    p = partial(cap, np.random.default_rng(1))
    assert p and p in cap and len(p.split()) < len(cap.split())
    assert prompt_for("verbatim", cap, rng) == cap and prompt_for("empty", cap, rng) == ""
    assert prompt_for("misleading", cap, rng, "another record's caption") == "another record's caption"
    assert reword(cap, np.random.default_rng(3)) == reword(cap, np.random.default_rng(3))
    assert set(PROMPT_KINDS) == {"verbatim", "reworded", "partial", "empty", "misleading"}
    with pytest.raises(ValueError, match="unknown prompt kind"):
        prompt_for("paraphrase", cap, rng)
