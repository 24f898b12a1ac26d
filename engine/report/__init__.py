"""What people read: terminal tables (``report.text``) and self-contained HTML pages (``report.html``)."""
from __future__ import annotations

import math


def fmt_number(v, fmt: str | None = None, missing: str = "-") -> str:
    """A number for display: ``fmt`` (e.g. ``"{:.4f}"``) or, by default, 3 decimals below 10 and one above;
    ``missing`` for None and non-finite values."""
    if v is None or not math.isfinite(float(v)):
        return missing
    v = float(v)
    if fmt is not None:
        return fmt.format(v)
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
