"""JSON has no inf or nan: one cleaner for every report file the project writes.

`json.dumps` would write `Infinity`/`NaN`, which no strict JSON reader accepts; a report
that cannot be parsed is worse than one that says "unknown", so such floats become null.
"""

from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every non-finite float (at any depth of dicts, lists, tuples) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
