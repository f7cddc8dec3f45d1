"""JSON that every parser reads. Python writes a NaN loss as a bare `NaN`, which is not
JSON (jq, JavaScript, Go and pandas' strict readers refuse the whole file); here a
non-finite number becomes null, and the record's "nonfinite" field lists the keys that
held one, so the fact that training diverged is not lost."""

from __future__ import annotations

import json
import math


def strict_record(record: dict) -> dict:
    """`record` with non-finite numbers (also inside lists and dicts) as None, plus
    "nonfinite": [top-level keys that held one] where there were any."""
    clean, nonfinite = {}, []
    for key, value in record.items():
        clean[key], changed = _finite(value)
        if changed:
            nonfinite.append(key)
    if nonfinite:
        clean["nonfinite"] = sorted(set(clean.get("nonfinite") or []) | set(nonfinite))
    return clean


def dumps_strict(record: dict, **kwargs) -> str:
    return json.dumps(strict_record(record), allow_nan=False, **kwargs)


def _finite(value) -> tuple[object, bool]:
    if isinstance(value, float) and not math.isfinite(value):
        return None, True
    if isinstance(value, dict):
        items = {k: _finite(v) for k, v in value.items()}
        return {k: v for k, (v, _) in items.items()}, any(changed for _, changed in items.values())
    if isinstance(value, (list, tuple)):
        items = [_finite(v) for v in value]
        return [v for v, _ in items], any(changed for _, changed in items)
    return value, False
