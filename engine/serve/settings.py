"""The service's settings: one frozen dataclass, one comment per field, checked when made."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

from .._errors import AttribError

MIB = 1024 * 1024
WEIGHTS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BUILTIN_WEIGHTS = ("auto", "rrf")  # what every server knows: the index's shipped weights (else RRF), and plain RRF


@dataclass(frozen=True)
class ServeSettings:
    max_upload_mb: float = 20.0  # largest accepted image upload (MiB); the request body may add 64 KiB of fields
    max_pixels: int | None = None  # uploads with more pixels are refused from their header (None: the index's rule)
    max_k: int = 100  # largest k a request may ask for
    max_prompt_chars: int = 2000  # longest accepted prompt
    queue: int = 32  # attribute requests admitted at once (receiving, waiting or running); more get 503
    max_batch: int = 16  # queries encoded together in one batch
    batch_window_ms: float = 5.0  # how long the worker waits for more queries to join a batch
    timeout_s: float = 60.0  # a request that has no answer after this long gets 504
    read_timeout_s: float = 30.0  # an upload that takes longer than this to arrive gets 408
    retry_after_s: int = 1  # the Retry-After (seconds) sent with a 503
    token: str | None = None  # bearer token every endpoint but /healthz and the page's static files requires
    cors_origins: tuple[str, ...] = ()  # origins allowed by CORS (none: no CORS headers at all)
    weights: tuple[tuple[str, str], ...] = ()  # extra fusion weights files a request may name: (name, path)
    keep_results: int = 64  # recent results kept for their HTML reports (oldest dropped first)
    keep_seconds: float = 900.0  # how long a kept result stays available
    image_side: int = 512  # largest side (px) of the record images served (re-encoded JPEG)
    decode_slots: int = 0  # uploads decoded at once, bounding peak memory (0: one per CPU core)

    def __post_init__(self) -> None:
        positive = ("max_upload_mb", "max_k", "max_prompt_chars", "queue", "max_batch", "timeout_s",
                    "read_timeout_s", "keep_results", "keep_seconds", "image_side")
        for f in positive:
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise AttribError(f"serve setting {f}={v!r} must be a positive number")
        for f in ("batch_window_ms", "retry_after_s", "decode_slots"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise AttribError(f"serve setting {f}={v!r} must be 0 or more")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise AttribError(f"serve setting max_pixels={self.max_pixels!r} must be at least 1")
        if self.token is not None and (len(self.token) < 8 or not self.token.isprintable() or " " in self.token):
            raise AttribError("the bearer token must be at least 8 printable characters without spaces; "
                              "pass another --token (or ATTRIB_TOKEN)")
        for origin in self.cors_origins:
            if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
                raise AttribError(f"CORS origin {origin!r} is not an origin like https://example.org (scheme and "
                                  "host, no path)")
        seen = set(BUILTIN_WEIGHTS)
        for name, _path in self.weights:
            if not WEIGHTS_NAME.match(name):
                raise AttribError(f"weights name {name!r} is not usable; use letters, digits, '.', '_' or '-'")
            if name in seen:
                raise AttribError(f"weights name {name!r} is given twice or is reserved ({', '.join(BUILTIN_WEIGHTS)})")
            seen.add(name)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    def to_dict(self) -> dict:
        """JSON-safe, and without the token."""
        d = asdict(self)
        d["token"] = None
        d["cors_origins"] = list(self.cors_origins)
        d["weights"] = [list(w) for w in self.weights]
        return d

    def to_env(self) -> dict:
        """Everything, the token included, for worker processes (see ``engine.serve.run``)."""
        return {**self.to_dict(), "token": self.token}

    @classmethod
    def from_dict(cls, d: dict) -> "ServeSettings":
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "cors_origins" in d:
            d["cors_origins"] = tuple(d["cors_origins"])
        if "weights" in d:
            d["weights"] = tuple((str(n), str(p)) for n, p in d["weights"])
        return cls(**d)
