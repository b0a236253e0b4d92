"""JSON that strict parsers read: what the run folder and ``pml-dsb analyze`` write, and read back."""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dump(..., allow_nan=False)`` takes: numpy
    scalars and arrays as Python values, NaN and infinities as None (JSON's
    null; Python reads a bare ``NaN`` token, jq and JavaScript refuse the file),
    mapping keys as strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_json(path: str) -> Any:
    """The JSON file at ``path``; a file that is not JSON raises ``ValueError``
    naming it (json's own error names a line and column only)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({err})") from None
