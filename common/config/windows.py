"""DICOM display windows (`data.window`, a site's `window`): the file's own VOI, a named window, or W/L.

Kept in config so that a config naming an impossible window is refused as it loads, before any file is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Windows (width, level) in Hounsfield units as radiology departments set them for CT.
NAMED_WINDOWS = {"lung": (1500.0, -600.0), "mediastinum": (350.0, 50.0), "bone": (2000.0, 300.0), "brain": (80.0, 40.0)}
WINDOW_RULE = f"file, {', '.join(NAMED_WINDOWS)} or WIDTH/LEVEL with WIDTH > 0 (e.g. 400/40)"


@dataclass(frozen=True)
class Window:
    """How monochrome values become brightness: the file's own VOI (`file`) or a (width, level)."""

    name: str  # "file", a NAMED_WINDOWS key, or "W/L" as written
    width: float | None = None
    level: float | None = None


def parse_window(text: str) -> Window:
    """`file | lung | mediastinum | bone | brain | W/L`; anything else is a ValueError saying what is allowed."""
    text = str(text).strip()
    if text == "file":
        return Window("file")
    if text in NAMED_WINDOWS:
        return Window(text, *NAMED_WINDOWS[text])
    width, sep, level = text.partition("/")
    try:
        w, lv = float(width), float(level)
    except ValueError:
        w, lv = 0.0, 0.0
    if not sep or not (math.isfinite(w) and math.isfinite(lv)) or w <= 0:
        raise ValueError(WINDOW_RULE)
    return Window(text, w, lv)


def is_window(text: str) -> bool:
    try:
        parse_window(text)
    except ValueError:
        return False
    return True
