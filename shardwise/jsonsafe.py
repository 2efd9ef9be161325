"""JSON without NaN: every file shardwise writes is standard JSON (torch-free)."""

from __future__ import annotations

import json
import math


def json_safe(obj):
    """`obj` with every NaN or infinity as null: JSON has no such numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)
