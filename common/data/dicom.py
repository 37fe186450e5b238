"""One DICOM file's pixels as a radiologist would see them, or one line saying why not.

A 12-bit CT stored as raw numbers loads almost black as 8-bit; what a reader sees is the stored
value through the modality LUT (RescaleSlope/Intercept: Hounsfield units), then a VOI LUT or a
window (the file's, or one the config names), MONOCHROME1 inverted. Pydicom's own
`apply_modality_lut`, `apply_voi` and `apply_windowing` do each step, so a file shows here as in
any DICOM viewer built on them.

Only the attributes that describe pixels are read from a file (`PIXEL_TAGS`), plus
SOPInstanceUID to find a labelled image and PatientID when it names the person: names, birth
dates, accession numbers and institutions are never parsed, so nothing downstream (logs, caches,
reports, messages) can hold them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedtransfer.common.config.windows import Window
from fedtransfer.common.data.files import DataError

# Transfer syntaxes whose pixel data the installed decoders read, each tested on a bundled pydicom file
# (tests/test_dicom.py): pydicom's own (uncompressed, deflate, RLE) and pylibjpeg-libjpeg (JPEG, JPEG-LS),
# pylibjpeg-openjpeg (JPEG 2000) and pylibjpeg-rle. Any other (MPEG, HTJ2K, JPEG process 14 without SV1,
# private) is refused naming the file and the syntax.
SUPPORTED_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 and 4)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless, First-Order Prediction (Process 14, SV1)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}
PIXEL_TAGS = (
    "SOPInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "GridFrameOffsetVector",
    "NumberOfSlices",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PixelData",
)
_READ_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, EOFError, NotImplementedError)


@dataclass(frozen=True)
class DicomImage:
    """A file's frames ready for the encoder, and what the data check reports about it (no identifier)."""

    frames: np.ndarray  # uint8 (F, image_size, image_size, 3)
    rows: int
    columns: int
    bits_stored: int
    photometric: str
    syntax: str
    window: str  # the VOI actually used: "VOI LUT", "W/L from file", a named window, "min-max" ...
    person: str | None  # PatientID, read only when asked for; the caller hashes it at once


def read_header(file: Path, *, person: bool = False) -> object:
    """The pixel-describing attributes of `file` (and PatientID when `person`), never any other.

    Returns pydicom's Dataset; anything that is not a readable DICOM file is one DataError naming it.
    """
    import pydicom

    tags = [*PIXEL_TAGS, "PatientID"] if person else list(PIXEL_TAGS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd values; what matters is refused below
            return pydicom.dcmread(file, specific_tags=tags)
    except pydicom.errors.InvalidDicomError:
        raise DataError(f"{file}: not a DICOM file (no DICM preamble); export it from the PACS as DICOM") from None
    except _READ_ERRORS as err:
        raise DataError(f"{file}: cannot read DICOM ({type(err).__name__}); fix or remove the file") from None


def syntax_of(file: Path, ds: object) -> str:
    """The file's transfer syntax UID, refused unless an installed decoder reads it (SUPPORTED_SYNTAXES)."""
    meta = getattr(ds, "file_meta", None)
    uid = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if uid not in SUPPORTED_SYNTAXES:
        name = getattr(getattr(meta, "TransferSyntaxUID", None), "name", "") or "unknown"
        raise DataError(
            f"{file}: transfer syntax {uid or 'missing'} ({name}) is not one fedtransfer decodes; "
            "export the image uncompressed or as JPEG, JPEG-LS, JPEG 2000 or RLE"
        )
    return uid


def read_dicom(file: Path, *, image_size: int, window: Window, frames: str, person: bool = False) -> DicomImage:
    """One file's frames as uint8 RGB image_size², through the modality LUT, VOI and MONOCHROME1 inversion.

    `frames`: "each" keeps every frame of a multi-frame file (one record per frame, one person),
    "refuse" refuses such a file; a 3-D volume (frames at spatial positions) is always refused.
    """
    ds = read_header(file, person=person)
    syntax = syntax_of(file, ds)
    if "PixelData" not in ds:
        why = "floating-point pixel data" if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds else "no image"
        raise DataError(f"{file}: holds {why} (PixelData missing); only integer images are read")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if count > 1 and ("GridFrameOffsetVector" in ds or int(ds.get("NumberOfSlices", 1) or 1) > 1):
        raise DataError(f"{file}: a 3-D volume of {count} slices; only 2-D images are read (one slice a file)")
    if count > 1 and frames != "each":
        raise DataError(
            f"{file}: {count} frames; set data.frames: each to read each frame as a record of the same person"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = ds.pixel_array
            shown, used = display(stored, ds, window, count)
    except DataError:
        raise
    except (*_READ_ERRORS, RuntimeError, MemoryError) as err:
        raise DataError(
            f"{file}: cannot decode its pixel data ({type(err).__name__}: {str(err)[:120]}); re-export the file"
        ) from None
    return DicomImage(
        frames=resized(shown, image_size),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        bits_stored=int(ds.get("BitsStored", ds.get("BitsAllocated", 8))),
        photometric=photometric,
        syntax=SUPPORTED_SYNTAXES[syntax],
        window=used,
        person=(str(ds.get("PatientID", "") or "").strip() or None) if person else None,
    )


def display(stored: np.ndarray, ds: object, window: Window, count: int) -> tuple[np.ndarray, str]:
    """Stored values to display brightness in [0, 1], (F, H, W, 3), and the name of the VOI used."""
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.PhotometricInterpretation).strip()
    frames = stored if count > 1 else stored[None]
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frames, ds).astype(np.float64)
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return rgb / (2**depth - 1), "palette"
    if int(ds.get("SamplesPerPixel", 1)) == 3:  # pydicom gives RGB (YBR converted), planes interleaved
        return frames.astype(np.float64) / (2 ** int(ds.BitsStored) - 1), "colour"
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"photometric interpretation {photometric!r} is not read; export MONOCHROME or RGB")
    shown, used = monochrome(frames, ds, window)
    if photometric == "MONOCHROME1":  # low values are white in MONOCHROME1
        shown = 1.0 - shown
    return np.repeat(shown[..., None], 3, axis=-1), used


def monochrome(frames: np.ndarray, ds: object, window: Window) -> tuple[np.ndarray, str]:
    """Modality LUT, then the VOI: a window the config names, else the file's VOI LUT or window, else min-max."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    values = apply_modality_lut(frames, ds)
    if window.name == "file" and ds.get("VOILUTSequence"):
        lut = apply_voi(np.rint(values).astype(np.int64), ds)
        depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return lut.astype(np.float64) / (2**depth - 1), "VOI LUT from file"
    if window.name == "file" and ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        used = f"W/L {width:g}/{centre:g} from file"
    elif window.name == "file":
        low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros(values.shape), "min-max (flat image)"
        return (values - low) / (high - low), f"min-max {low:g}..{high:g}"
    else:
        centre, width, function, used = window.level, window.width, "LINEAR", f"{window.name} (W/L config)"
    # pydicom's windowing on a view whose output range is exactly 0..1 (1 bit, unsigned, no rescale)
    view = Dataset()
    view.PhotometricInterpretation, view.BitsStored, view.PixelRepresentation = "MONOCHROME2", 1, 0
    view.WindowCenter, view.WindowWidth, view.VOILUTFunction = centre, width, function
    return apply_windowing(np.asarray(values, dtype=np.float64), view), used


def _first(value: object) -> float:
    """A Window Center/Width may hold several alternative views: the first is the file's default."""
    from pydicom.multival import MultiValue

    return float(value[0]) if isinstance(value, MultiValue | list | tuple) else float(value)


def resized(shown: np.ndarray, image_size: int) -> np.ndarray:
    """[0, 1] frames as uint8 RGB image_size², resized as `read_image` resizes a PNG (PIL bilinear)."""
    from PIL import Image

    eight = np.rint(np.clip(shown, 0.0, 1.0) * 255.0).astype(np.uint8)
    out = [
        np.asarray(Image.fromarray(f).resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.uint8)
        for f in eight
    ]
    return np.stack(out)
