"""engine._encoders: model profiles, fast failure without pretrained weights, local weight files."""
from __future__ import annotations

import dataclasses
import time

import pytest

import engine


def test_profiles_share_architectures_and_tiny_is_deterministic(tiny):
    d, o = engine.get_profile("default"), engine.get_profile("offline")
    assert ((d.clip.arch, d.dino.arch, d.dino.img_size) == (o.clip.arch, o.dino.arch, o.dino.img_size)
            == ("ViT-B-32", "vit_small_patch14_dinov2", 224))
    assert d.pretrained and not o.pretrained
    again = engine.load_encoders("tiny", device="cpu")
    assert again.identity == tiny.identity


def test_missing_pretrained_weights_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t = time.time()
    with pytest.raises(engine.WeightsUnavailableError) as e:
        engine.load_encoders("default", device="cpu")
    assert time.time() - t < 15
    msg = str(e.value)
    assert "--models offline" in msg and "--clip-weights" in msg and "HF_HOME" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(engine.WeightsUnavailableError, match="HF_HUB_OFFLINE"):
        engine.load_encoders("default", device="cpu")
    with pytest.raises(engine.WeightsUnavailableError, match="does not exist"):
        engine.load_encoders("default", device="cpu", clip_weights=str(tmp_path / "nope.bin"))


def test_local_weight_files_are_loaded_and_hashed(tmp_path, tiny):
    """The pretrained code path (explicit weight files) with the tiny architectures."""

    import torch

    from engine._encoders import Encoders

    torch.save(tiny.clip.state_dict(), tmp_path / "clip.bin")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny.dino.state_dict().items()}, str(tmp_path / "model.safetensors"))
    prof = dataclasses.replace(engine.get_profile("tiny"), name="tiny-local", pretrained=True)
    enc = Encoders(prof, device="cpu", clip_weights=str(tmp_path / "clip.bin"), dino_weights=str(tmp_path))
    assert enc.clip_sha256 == tiny.clip_sha256 and enc.dino_sha256 == tiny.dino_sha256
    assert enc.identity["fingerprint"] == tiny.identity["fingerprint"]
