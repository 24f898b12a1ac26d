"""Model profiles: named, frozen configs of the CLIP and DINOv2 encoders (no torch import here)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ._registry import Registry


@dataclass(frozen=True)
class ClipConfig:
    arch: str  # open_clip model name, or a JSON config shipped in engine/model_configs
    pretrained: str | None  # open_clip pretrained tag; None = seeded random initialisation
    image_size: int = 224  # input resolution of the image tower
    hf_hub: str | None = None  # "org/repo" on the Hugging Face hub holding the pretrained weights


@dataclass(frozen=True)
class DinoConfig:
    arch: str  # timm model name
    tag: str | None  # timm pretrained tag; None = seeded random initialisation
    img_size: int = 224  # 224 px -> 16x16 = 256 patch tokens (timm's own default for DINOv2 is 518)
    hf_hub: str | None = None  # "org/repo" on the Hugging Face hub holding the pretrained weights
    kwargs: tuple[tuple[str, object], ...] = ()  # extra timm constructor arguments (small configs)


@dataclass(frozen=True)
class ModelProfile:
    name: str  # registry name (--models NAME)
    clip: ClipConfig  # global image/text encoder
    dino: DinoConfig  # patch-level image encoder
    pretrained: bool  # True when the weights are trained; False = results are meaningless for real use
    seed: int = 0  # torch seed used for random initialisation
    description: str = ""  # one line for `attrib models` / error messages

    @property
    def dino_patch_grid(self) -> int | None:
        """Side of the DINOv2 patch grid (input size / patch size) read from the config without loading the
        model; None when the architecture name does not give the patch size."""
        patch = dict(self.dino.kwargs).get("patch_size")
        if patch is None:
            m = re.search(r"patch(\d+)", self.dino.arch)
            patch = int(m.group(1)) if m else None
        return self.dino.img_size // int(patch) if patch else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dino"]["kwargs"] = dict(self.dino.kwargs)
        return d


PROFILES: Registry[ModelProfile] = Registry("model profile")

_CLIP_B32 = "ViT-B-32"
_DINO_S14 = "vit_small_patch14_dinov2"

PROFILES.register(
    "default",
    ModelProfile(
        name="default",
        clip=ClipConfig(_CLIP_B32, "laion2b_s34b_b79k", 224, hf_hub="laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
        dino=DinoConfig(_DINO_S14, "lvd142m", 224, hf_hub="timm/vit_small_patch14_dinov2.lvd142m"),
        pretrained=True,
        description="pretrained open_clip ViT-B-32 (laion2b_s34b_b79k) + timm DINOv2 ViT-S/14 (lvd142m) at 224 px",
    ),
)
PROFILES.register(
    "offline",
    ModelProfile(
        name="offline",
        clip=ClipConfig(_CLIP_B32, None, 224),
        dino=DinoConfig(_DINO_S14, None, 224),
        pretrained=False,
        seed=0,
        description="same architectures as 'default' with seeded random weights (UNTRAINED: for tests and demos)",
    ),
)
PROFILES.register(
    "tiny",
    ModelProfile(
        name="tiny",
        clip=ClipConfig("attrib-tiny-clip", None, 112),
        dino=DinoConfig(_DINO_S14, None, 112, kwargs=(("embed_dim", 64), ("depth", 2), ("num_heads", 2))),
        pretrained=False,
        seed=0,
        description="small configs of the same model families with seeded random weights (UNTRAINED: for fast tests)",
    ),
)


def get_profile(name: str) -> ModelProfile:
    """The profile registered as ``name``; unknown names fail with the list of valid ones."""
    return PROFILES.get(name)
