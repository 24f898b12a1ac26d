"""engine.scenes: the procedural scenes and captions shared by the demo, the synthetic benchmark and tests."""
from __future__ import annotations

import numpy as np

from engine import scenes


def _pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def test_scene_api_is_deterministic_and_compositional():
    spec = scenes.random_scene(np.random.default_rng([7, 1]))
    again = scenes.random_scene(np.random.default_rng([7, 1]))
    assert spec == again and 1 <= len(spec.objects) <= 3
    img = scenes.render(spec, 96)
    assert img.size == (96, 96) and img.mode == "RGB"
    assert np.array_equal(_pixels(img), _pixels(scenes.render(again, 96)))
    caption = scenes.caption_of(spec, np.random.default_rng(0))
    assert caption.count(" background") == 1
    for obj in spec.objects:
        assert obj.shape in caption and obj.texture.colour1 in caption and obj.position in caption
    assert spec.background.colour1 in caption
    assert len(scenes.SHAPES) >= 8 and len(scenes.TEXTURE_KINDS) == 8 and len(scenes.PALETTE) == 12
    # every shape and texture kind renders something visible
    for shape in scenes.SHAPES:
        obj = scenes.SceneObject(shape, "large", 4, 0.0, 0.0, 10.0, spec.background)
        assert 0.02 < (np.asarray(scenes.shape_mask(obj, 64)) > 0).mean() < 0.3, shape
    for kind in scenes.TEXTURE_KINDS:
        tex = scenes.random_texture(np.random.default_rng(3), kind=kind)
        arr = scenes.render_texture(tex, 64)
        spatial_std = arr.reshape(-1, 3).astype(np.float64).std(axis=0).max()
        assert arr.shape == (64, 64, 3) and (spatial_std > 5) == (kind != "solid"), kind




def test_seeded_rng_accepts_tags_and_is_reproducible():
    a = scenes.seeded_rng(3, "split/x").integers(0, 1 << 30, 5)
    b = scenes.seeded_rng(3, "split/x").integers(0, 1 << 30, 5)
    c = scenes.seeded_rng(3, "split/y").integers(0, 1 << 30, 5)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    import zlib
    assert a.tolist() == np.random.default_rng([3, zlib.crc32(b"split/x")]).integers(0, 1 << 30, 5).tolist()
