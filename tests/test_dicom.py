"""DICOM pixels as a viewer shows them: each path against pydicom's own LUT functions on real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from fedtransfer.common.config.windows import NAMED_WINDOWS, parse_window
from fedtransfer.common.data.dicom import SUPPORTED_SYNTAXES, read_dicom
from fedtransfer.common.data.files import DataError
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from tests.dicom_files import bundled, edited, with_syntax, with_voi_lut

FILE = parse_window("file")


def _read(path: Path, size: int, window: str = "file", frames: str = "refuse") -> np.ndarray:
    return read_dicom(path, image_size=size, window=parse_window(window), frames=frames).frames


def _output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The range pydicom's windowing maps into (DICOM PS3.3 C.11.2.1.2): the stored range through the rescale."""
    bits = int(ds.BitsStored)
    low, high = (0, 2**bits - 1) if ds.PixelRepresentation == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    return low * slope + intercept, high * slope + intercept


def _windowed(ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's modality LUT then its VOI (windowing), scaled to 0..255 over the range it maps into."""
    low, high = _output_range(ds)
    shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    return np.rint((shown - low) / (high - low) * 255)


def _close(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Equal to pydicom's result up to one 8-bit step (rounding at the step's edge)."""
    assert np.abs(ours.astype(np.int64) - theirs.astype(np.int64)).max() <= 1


def test_ct_modality_lut_then_a_named_window_as_pydicom(tmp_path: Path) -> None:
    """CT: stored values + RescaleIntercept = Hounsfield units, then the lung window of data.window."""
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    assert float(ds.RescaleIntercept) == -1024  # the file's modality LUT is in play
    width, level = NAMED_WINDOWS["lung"]
    ds.WindowWidth, ds.WindowCenter = width, level
    ours = _read(bundled("CT_small.dcm"), int(ds.Rows), "lung")[0]
    assert np.array_equal(ours[..., 0], ours[..., 2])  # grey, as three equal channels
    _close(ours[..., 0], _windowed(ds))
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert (ours[..., 0][hu < level - width / 2] == 0).all()  # air below the lung window is black


def test_a_width_level_window_differs_from_another(tmp_path: Path) -> None:
    """data.window W/L: what pydicom shows for that window, and a different picture from another window."""
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.WindowWidth, ds.WindowCenter = 400, 40
    ours = _read(bundled("CT_small.dcm"), int(ds.Rows), "400/40")[0]
    _close(ours[..., 0], _windowed(ds))
    assert not np.array_equal(ours, _read(bundled("CT_small.dcm"), int(ds.Rows), "bone")[0])


def test_the_files_own_window_as_pydicom() -> None:
    """MR_small's stored WindowCenter/Width (600/1600) apply when data.window is file."""
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    image = read_dicom(bundled("MR_small.dcm"), image_size=int(ds.Rows), window=FILE, frames="refuse")
    _close(image.frames[0][..., 0], _windowed(ds))
    assert image.window == "W/L 1600/600 from file"


def test_the_files_voi_lut_sequence_as_pydicom(tmp_path: Path) -> None:
    """A VOI LUT Sequence wins over the file's window, as pydicom's apply_voi_lut prefers it."""
    path = with_voi_lut("MR_small.dcm", tmp_path / "voi.dcm")
    ds = pydicom.dcmread(path)
    expected = np.rint(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) / 65535 * 255)
    image = read_dicom(path, image_size=int(ds.Rows), window=FILE, frames="refuse")
    _close(image.frames[0][..., 0], expected)
    assert image.window == "VOI LUT from file"
    assert not np.array_equal(image.frames, _read(bundled("MR_small.dcm"), int(ds.Rows)))


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    """MONOCHROME1 shows low values white: the same pixels read as MONOCHROME2, inverted."""
    path = edited("MR_small.dcm", tmp_path / "m1.dcm", PhotometricInterpretation="MONOCHROME1")
    ds = pydicom.dcmread(path)
    ours = _read(path, int(ds.Rows))[0][..., 0]
    _close(ours, 255 - _windowed(ds))
    assert np.array_equal(ours, 255 - _read(bundled("MR_small.dcm"), int(ds.Rows))[0][..., 0])


def test_no_window_in_the_file_spans_its_values() -> None:
    """Without a VOI in the file (and window: file) the modality values' min..max span black..white."""
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds)
    ours = _read(bundled("CT_small.dcm"), int(ds.Rows))[0][..., 0]
    _close(ours, np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255))


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm", "ExplVR_BigEnd.dcm"])
def test_colour_and_planar_configuration_as_pydicom(name: str) -> None:
    """YBR converted to RGB, planar configuration 1 (ExplVR_BigEnd) de-interleaved: pydicom's RGB array."""
    ds = pydicom.dcmread(bundled(name))
    size = 48
    expected = np.asarray(Image.fromarray(ds.pixel_array).resize((size, size), Image.Resampling.BILINEAR))
    assert np.array_equal(_read(bundled(name), size)[0], expected)


def test_palette_colour_as_pydicom() -> None:
    ds = pydicom.dcmread(bundled("examples_palette.dcm"))
    rgb = apply_color_lut(ds.pixel_array, ds)
    expected = np.rint(rgb / (2 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1) * 255).astype(np.uint8)
    size = 40
    expected = np.asarray(Image.fromarray(expected).resize((size, size), Image.Resampling.BILINEAR))
    _close(_read(bundled("examples_palette.dcm"), size)[0], expected)


def test_multi_frame_one_record_per_frame_or_refused() -> None:
    """frames: each gives each frame (pydicom's frames, in order); frames: refuse names the file and the key."""
    path = bundled("SC_rgb_rle_2frame.dcm")
    ds = pydicom.dcmread(path)
    frames = _read(path, int(ds.Rows), frames="each")
    assert frames.shape == (2, ds.Rows, ds.Columns, 3)
    assert np.array_equal(frames, ds.pixel_array)
    with pytest.raises(DataError, match=r"SC_rgb_rle_2frame\.dcm: 2 frames; set data\.frames: each"):
        _read(path, 32)


def test_a_3d_volume_is_refused() -> None:
    """rtdose.dcm's 15 frames are slices at grid offsets: a volume, out of scope whatever data.frames says."""
    with pytest.raises(DataError, match=r"rtdose\.dcm: a 3-D volume of 15 slices"):
        _read(bundled("rtdose.dcm"), 32, frames="each")


# One bundled file per claimed transfer syntax; the lossless encodings of MR_small must give its very pixels.
SYNTAX_FILES = {
    "1.2.840.10008.1.2": "MR_small_implicit.dcm",
    "1.2.840.10008.1.2.1": "MR_small.dcm",
    "1.2.840.10008.1.2.1.99": "image_dfl.dcm",
    "1.2.840.10008.1.2.2": "MR_small_bigendian.dcm",
    "1.2.840.10008.1.2.5": "MR_small_RLE.dcm",
    "1.2.840.10008.1.2.4.50": "SC_rgb_jpeg_dcmtk.dcm",
    "1.2.840.10008.1.2.4.51": "JPGExtended.dcm",
    "1.2.840.10008.1.2.4.70": "SC_rgb_jpeg_gdcm.dcm",
    "1.2.840.10008.1.2.4.80": "MR_small_jpeg_ls_lossless.dcm",
    "1.2.840.10008.1.2.4.81": "JPEGLSNearLossless_16.dcm",
    "1.2.840.10008.1.2.4.90": "MR_small_jp2klossless.dcm",
    "1.2.840.10008.1.2.4.91": "JPEG2000.dcm",
}


def test_every_claimed_syntax_has_a_real_file() -> None:
    assert set(SYNTAX_FILES) == set(SUPPORTED_SYNTAXES)


@pytest.mark.parametrize("uid", sorted(SYNTAX_FILES))
def test_each_claimed_syntax_decodes_as_pydicom(uid: str) -> None:
    path = bundled(SYNTAX_FILES[uid])
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == uid
    image = read_dicom(path, image_size=32, window=FILE, frames="refuse")
    assert image.syntax == SUPPORTED_SYNTAXES[uid] and image.frames.shape == (1, 32, 32, 3)
    assert image.frames.std() > 5  # an image, not a blank: the decoder ran
    if SYNTAX_FILES[uid].startswith("MR_small"):
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(bundled("MR_small.dcm")).pixel_array)
        assert np.array_equal(image.frames, _read(bundled("MR_small.dcm"), 32))


@pytest.mark.parametrize(
    ("new", "name"),
    [(b"1.2.840.10008.1.2.4.92", "JPEG 2000 Part 2"), (b"1.2.840.10008.1.2.4.57", "JPEG Lossless")],
)
def test_an_unclaimed_syntax_is_refused_in_one_line(tmp_path: Path, new: bytes, name: str) -> None:
    path = with_syntax("MR_small_jp2klossless.dcm", tmp_path / "x.dcm", b"1.2.840.10008.1.2.4.90", new)
    with pytest.raises(DataError, match=rf"x\.dcm: transfer syntax {new.decode()} \({name}.*not one fedtransfer"):
        _read(path, 32)


def test_files_that_are_no_image_are_refused_naming_them(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt: not a DICOM file"):
        _read(tmp_path / "notes.txt", 32)
    with pytest.raises(DataError, match=r"rtplan\.dcm: holds no image"):
        _read(bundled("rtplan.dcm"), 32)


def test_window_option_is_checked() -> None:
    assert parse_window("400/40").width == 400 and parse_window("400/40").level == 40
    for bad in ("wide", "0/40", "400", "-5/3", "nan/1"):
        with pytest.raises(ValueError, match="lung"):
            parse_window(bad)
