"""Turning step params, metrics and names into values MLflow accepts, whatever their shape."""

from __future__ import annotations

import json
import logging
import numbers
import re
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000

_KEY_OK = re.compile(r"[^\w\-. /]")


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; characters MLflow refuses in keys (e.g. from OOD set names) -> "_"."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        k = _KEY_OK.sub("_", str(k))
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def as_number(v: Any) -> float | None:
    """A metric value as float, or None to skip it (records mix numbers, strings and None)."""
    if v is None or isinstance(v, str | bytes):
        return None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, numbers.Real):
        return float(v)
    item = getattr(v, "item", None)  # numpy / 0-d torch scalars
    if callable(item) and getattr(v, "ndim", 0) == 0:
        try:
            x = item()
        except Exception:
            return None
        return float(x) if isinstance(x, numbers.Real) else None
    return None


def param_value(v: Any) -> str:
    """A param as a string within MLflow's length limit (lists as JSON, so they read back unambiguously)."""
    s = v if isinstance(v, str) else json.dumps(v, default=str) if isinstance(v, list | tuple) else str(v)
    if len(s) > MAX_PARAM_VALUE:
        log.warning("param value truncated to %d characters", MAX_PARAM_VALUE)
        s = s[: MAX_PARAM_VALUE - 3] + "..."
    return s


def safe_name(s: str) -> str:
    """A stage name usable as an artifact path and tag key."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in s) or "model"


def to_numpy(x: Any, max_rows: int = 2) -> Any:
    """A tensor/array input example as numpy, cut to `max_rows` (it is stored as JSON next to the model)."""
    if x is None:
        return None
    detach = getattr(x, "detach", None)
    if callable(detach):
        x = detach().cpu().numpy()
    return x[:max_rows] if getattr(x, "ndim", 0) >= 1 else x
