"""CLIP (open_clip) and DINOv2 (timm) encoders. The only module that imports torch, open_clip or timm.

Weights come from, in order: an explicit path (``--clip-weights`` / ``--dino-weights`` or the environment
variables ``ATTRIB_CLIP_WEIGHTS`` / ``ATTRIB_DINO_WEIGHTS``), the Hugging Face cache (``HF_HOME``), then the hub
itself. When the hub cannot be reached the loader fails within seconds instead of retrying for a minute.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._errors import AttribError, WeightsUnavailableError
from ._manifest import model_fingerprint
from ._profiles import ModelProfile, get_profile

CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
DINO_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CLIP_WEIGHTS_ENV = "ATTRIB_CLIP_WEIGHTS"
DINO_WEIGHTS_ENV = "ATTRIB_DINO_WEIGHTS"
_CONFIG_DIR = Path(__file__).with_name("model_configs")
_HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class InputSpec:
    size: int  # square input side in pixels
    mean: tuple[float, float, float]  # per-channel normalisation mean (0..1 scale)
    std: tuple[float, float, float]  # per-channel normalisation std
    resize: str  # "center_crop" (shortest side then centre crop) or "squash" (whole image, aspect not kept)


@dataclass
class ImageFeatures:
    clip: np.ndarray  # (B, Dc) float32, L2-normalised CLIP image embeddings
    dino_cls: np.ndarray  # (B, D) float32 DINOv2 CLS tokens (after the final norm)
    dino_mean: np.ndarray  # (B, D) float32 mean of all patch tokens
    dino_cells: np.ndarray  # (B, G*G, D) float32 patch tokens average-pooled to a G x G grid (row-major)


def resolve_device(device: str | None) -> torch.device:
    """``None``/"auto" picks CUDA when available, else CPU. Anything else must be cpu or cuda[:N]."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise AttribError(f"unknown device {device!r}; valid choices: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AttribError(f"device {device!r} was asked for but torch sees no CUDA GPU here; use --device cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------- weights
def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_reachable() -> tuple[bool, str]:
    """A quick TCP connect to the hub: seconds, not the minute of retries a plain download would take."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlparse(_hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True, ""
    except OSError as e:
        return False, f"{host}:{port} is unreachable ({e.__class__.__name__}: {e})"


def _weights_help(what: str, repo: str, files: Sequence[str], option: str, env: str) -> str:
    return (
        f"To get the pretrained {what} weights: connect to the internet once and run the same command (they are "
        f"cached under HF_HOME, default ~/.cache/huggingface), or download `{files[0]}` from "
        f"https://huggingface.co/{repo} and pass its file or folder with {option} PATH (or set {env}=PATH), "
        f"or set HF_HOME to a cache that already holds them. "
        f"To run without pretrained weights use --models offline (untrained: results are not meaningful)."
    )


def resolve_weights(
    what: str, repo: str, files: Sequence[str], explicit: str | os.PathLike | None, option: str, env: str
) -> Path:
    """Find a weights file: explicit path -> HF cache -> hub download (after a fast reachability probe)."""
    explicit = explicit or os.environ.get(env) or None
    help_text = _weights_help(what, repo, files, option, env)
    if explicit:
        p = Path(explicit).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            for name in files:
                hits = sorted(p.rglob(name))
                if hits:
                    return hits[0]
            raise WeightsUnavailableError(
                f"{what} weights folder {p} holds none of {', '.join(files)}. {help_text}"
            )
        raise WeightsUnavailableError(f"{what} weights path {p} does not exist. {help_text}")

    from huggingface_hub import try_to_load_from_cache

    for name in files:
        cached = try_to_load_from_cache(repo_id=repo, filename=name)
        if isinstance(cached, str) and os.path.isfile(cached):
            return Path(cached)

    ok, why = _hub_reachable()
    if not ok:
        raise WeightsUnavailableError(
            f"pretrained {what} weights ({repo}) are not in the local cache and the hub cannot be reached: "
            f"{why}. {help_text}"
        )
    from huggingface_hub import hf_hub_download

    last: Exception | None = None
    for name in files:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=name))
        except Exception as e:  # noqa: BLE001 - any hub failure means "try the next file, then explain"
            last = e
    raise WeightsUnavailableError(f"could not download {what} weights from {repo}: {last}. {help_text}")


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Hash of the actual parameter values (names, dtypes, shapes and bytes), independent of file format."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- models
@contextlib.contextmanager
def _quiet_root_logger():
    """open_clip logs "No pretrained weights loaded" on purpose-random models; keep stderr for real news."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(old)


def _load_clip(profile: ModelProfile, path: Path | None):
    import open_clip

    cfg = profile.clip
    if (_CONFIG_DIR / f"{cfg.arch}.json").exists():
        open_clip.add_model_config(_CONFIG_DIR / f"{cfg.arch}.json")
    with warnings.catch_warnings(), _quiet_root_logger():
        warnings.simplefilter("ignore")
        if path is None:
            torch.manual_seed(profile.seed)
            model = open_clip.create_model(cfg.arch, pretrained=None)
        else:
            model = open_clip.create_model(cfg.arch, pretrained=str(path), require_pretrained=True)
    pp = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    mean = tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)))
    std = tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
    tokenizer = open_clip.get_tokenizer(cfg.arch)
    return model, tokenizer, InputSpec(cfg.image_size, mean, std, "center_crop")


def _load_dino(profile: ModelProfile, path: Path | None):
    import timm

    cfg = profile.dino
    kwargs = dict(cfg.kwargs, img_size=cfg.img_size, num_classes=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path is None:
            torch.manual_seed(profile.seed + 1)
            model = timm.create_model(cfg.arch, pretrained=False, **kwargs)
        else:
            name = f"{cfg.arch}.{cfg.tag}" if cfg.tag else cfg.arch
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    pc = model.pretrained_cfg or {}
    mean = tuple(pc.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(pc.get("std", (0.229, 0.224, 0.225)))
    return model, InputSpec(cfg.img_size, mean, std, "squash")


class Encoders:
    """Both encoders of one profile, ready for batched inference."""

    def __init__(
        self,
        profile: str | ModelProfile = "default",
        device: str | None = None,
        clip_weights: str | os.PathLike | None = None,
        dino_weights: str | os.PathLike | None = None,
    ) -> None:
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.device = resolve_device(device)
        p = self.profile
        clip_path = dino_path = None
        if p.pretrained:
            # Resolve both before loading either, so a missing file fails in seconds.
            clip_path = resolve_weights(
                f"CLIP {p.clip.arch} ({p.clip.pretrained})", p.clip.hf_hub or "", CLIP_WEIGHT_FILES,
                clip_weights, "--clip-weights", CLIP_WEIGHTS_ENV,
            )
            dino_path = resolve_weights(
                f"DINOv2 {p.dino.arch} ({p.dino.tag})", p.dino.hf_hub or "", DINO_WEIGHT_FILES,
                dino_weights, "--dino-weights", DINO_WEIGHTS_ENV,
            )
        try:
            clip, self.tokenizer, self.clip_input = _load_clip(p, clip_path)
            dino, self.dino_input = _load_dino(p, dino_path)
        except (RuntimeError, OSError, ValueError) as e:
            raise WeightsUnavailableError(f"could not load the {p.name!r} models: {e}") from e
        self.clip_sha256 = state_dict_sha256(clip)
        self.dino_sha256 = state_dict_sha256(dino)
        self.clip = clip.to(self.device).eval()
        self.dino = dino.to(self.device).eval()
        self.clip_dim = int(clip.visual.output_dim)
        self.dino_dim = int(dino.num_features)
        self.dino_prefix = int(getattr(dino, "num_prefix_tokens", 1))
        gh, gw = dino.patch_embed.grid_size
        self.dino_patch_grid = (int(gh), int(gw))
        self._clip_mean = torch.tensor(self.clip_input.mean, device=self.device).view(1, 3, 1, 1)
        self._clip_std = torch.tensor(self.clip_input.std, device=self.device).view(1, 3, 1, 1)
        self._dino_mean = torch.tensor(self.dino_input.mean, device=self.device).view(1, 3, 1, 1)
        self._dino_std = torch.tensor(self.dino_input.std, device=self.device).view(1, 3, 1, 1)

    # ------------------------------------------------------------------------------------------ identity
    @property
    def identity(self) -> dict:
        """What the index manifest records; two encoders are compatible iff their fingerprints match."""
        p = self.profile
        ident = {
            "profile": p.name,
            "pretrained": p.pretrained,
            "clip": {
                "arch": p.clip.arch,
                "weights_tag": p.clip.pretrained,
                "weights_sha256": self.clip_sha256,
                "dim": self.clip_dim,
                "input": self.clip_input.__dict__,
            },
            "dino": {
                "arch": p.dino.arch,
                "weights_tag": p.dino.tag,
                "weights_sha256": self.dino_sha256,
                "dim": self.dino_dim,
                "patch_grid": list(self.dino_patch_grid),
                "input": self.dino_input.__dict__,
                "kwargs": dict(p.dino.kwargs),
            },
        }
        ident["fingerprint"] = model_fingerprint(ident)
        return ident

    # ------------------------------------------------------------------------------------------ encoding
    def _to_tensor(self, batch: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(batch)
        if not batch.flags.writeable:  # e.g. np.asarray(PIL image): torch wants writable memory
            batch = batch.copy()
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - mean) / std

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", enabled=False)

    @torch.inference_mode()
    def encode_clip_images(self, clip_u8: np.ndarray) -> np.ndarray:
        """(B, Dc) L2-normalised CLIP image embeddings of uint8 (B, S, S, 3) images."""
        with self._autocast():
            c = self.clip.encode_image(self._to_tensor(clip_u8, self._clip_mean, self._clip_std))
        return F.normalize(c.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_dino_images(self, dino_u8: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(CLS tokens, patch-token means, patch tokens pooled to grid x grid cells) of uint8 images."""
        with self._autocast():
            tokens = self.dino.forward_features(self._to_tensor(dino_u8, self._dino_mean, self._dino_std))
        tokens = tokens.float()
        cls = tokens[:, 0]
        patches = tokens[:, self.dino_prefix:]
        b, _, d = patches.shape
        gh, gw = self.dino_patch_grid
        grid_map = patches.transpose(1, 2).reshape(b, d, gh, gw)
        cells = F.adaptive_avg_pool2d(grid_map, (grid, grid)).flatten(2).transpose(1, 2)
        return cls.cpu().numpy(), patches.mean(dim=1).cpu().numpy(), cells.contiguous().cpu().numpy()

    def encode_images(self, clip_u8: np.ndarray, dino_u8: np.ndarray, grid: int) -> ImageFeatures:
        """Encode a batch of uint8 HxWx3 images (already resized to each encoder's input size)."""
        clip = self.encode_clip_images(clip_u8)
        cls, pmean, cells = self.encode_dino_images(dino_u8, grid)
        return ImageFeatures(clip=clip, dino_cls=cls, dino_mean=pmean, dino_cells=cells)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised CLIP text embeddings (the tokenizer keeps the first 77 tokens)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self._autocast():
            t = self.clip.encode_text(tokens)
        return F.normalize(t.float(), dim=-1).cpu().numpy()
