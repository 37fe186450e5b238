"""pydicom's bundled test files, and real files edited one attribute at a time for the paths none covers.

Only files inside the installed pydicom wheel are used: `pydicom.data.get_testdata_file` would download
the others, and nothing may download in a test. A file missing from the wheel fails its test by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

BUNDLED = Path(pydicom.__file__).parent / "data" / "test_files"


def bundled(name: str) -> Path:
    """A test file that ships inside pydicom's wheel (never fetched): its path, or the test fails naming it."""
    path = BUNDLED / name
    if not path.is_file():
        pytest.fail(f"{name} is not bundled with pydicom {pydicom.__version__} (would need a download)")
    return path


def edited(name: str, out: Path, **attributes: object) -> Path:
    """A bundled file with some attributes set (pixel data untouched), written to `out`."""
    ds = pydicom.dcmread(bundled(name))
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.save_as(out)
    return out


def with_voi_lut(name: str, out: Path) -> Path:
    """A bundled MR with a 16-bit VOI LUT Sequence (a square-root curve over its stored range) added."""
    ds = pydicom.dcmread(bundled(name))
    first, last = int(ds.pixel_array.min()), int(ds.pixel_array.max())
    entries = last - first + 1
    curve = np.sqrt(np.linspace(0.0, 1.0, entries)) * 65535
    item = Dataset()
    item.add_new(0x00283002, "US", [entries, first, 16])  # LUT Descriptor: entries, first value mapped, bits
    item.add_new(0x00283006, "US", [int(v) for v in np.rint(curve)])  # LUT Data
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(out)
    return out


def with_syntax(name: str, out: Path, old: bytes, new: bytes) -> Path:
    """A bundled file whose transfer syntax UID is replaced by another of the same length (a real DICOM UID)."""
    data = bundled(name).read_bytes()
    assert len(old) == len(new) and data.count(old) == 1, "the UID must occur once and keep its length"
    out.write_bytes(data.replace(old, new))
    return out
