"""Image files and MedMNIST .npz archives read into arrays, or refused with one line.

A loader that guesses (reshapes a label array that is too long, clips 16-bit pixels at 255,
lets a decoder's exception through) trains on the wrong data or crashes a site. Here every
malformed file is one DataError naming the file, and the member or pixel range at fault.
"""

from __future__ import annotations

import csv
import os
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from fedtransfer.common.errors import InputError

if TYPE_CHECKING:
    from _csv import _reader as CsvReader

    from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
NPZ_SPLITS = ("train", "val", "test")
# Pillow's high-bit-depth grayscale modes and their bit depth (mode "I" from a 16-bit PGM or PNG holds 0..65535).
_DEEP_GRAY_MODES = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 16}
# What numpy and zipfile raise on a damaged .npz, and decoders on a damaged image: refused as DataError.
# MemoryError: a damaged header can declare an array of terabytes, which numpy allocates before reading.
_NPZ_ERRORS = (
    OSError,
    ValueError,
    TypeError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    MemoryError,
)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError, struct.error, zlib.error)


def is_tool_litter(name: str) -> bool:
    """What tools leave beside a user's images, never a record: dot-files and folders (.DS_Store, macOS's
    ._x.png twins, .ipynb_checkpoints/, .thumbnails/) and an archive tool's __MACOSX/."""
    return name.startswith(".") or name == "__MACOSX"


def folder_images(root: Path) -> list[Path]:
    """Image files under `root`, through symlinked folders as a user who linked them means (each real
    folder once: a link back up is no loop); a broken link with an image suffix is kept, to be named."""
    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not is_tool_litter(d))
        keep = (n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES and not is_tool_litter(n))
        files += [Path(folder) / n for n in keep]
    return sorted(files)


class DataError(InputError):
    """Data cannot be used as configured: names the file or site and what to do."""


def read_image(file: Path, image_size: int) -> np.ndarray:
    """One image file as uint8 RGB (image_size, image_size, 3), the way training sees it.

    Every way a file can fail (corrupt, truncated, a decompression bomb, pixels that fit no
    8-bit scale) is one DataError naming it, never a decoder's traceback.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Between 1x and 2x Image.MAX_IMAGE_PIXELS PIL only warns, and goes on decoding the bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                rgb = _eight_bit_rgb(img, file)
                return np.asarray(rgb.resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.uint8)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(
            f"{file}: more pixels than PIL's decompression-bomb limit ({Image.MAX_IMAGE_PIXELS:,}); "
            "shrink the image or leave it out"
        ) from None
    except _DECODE_ERRORS as err:
        raise DataError(f"{file}: cannot read image ({type(err).__name__}); fix or remove the file") from None


def _eight_bit_rgb(img: Image.Image, file: Path) -> Image.Image:
    """RGB with 8 bits per channel. Deeper grayscale (16-bit PNG/TIFF, Pillow's "I" modes) is
    scaled by its bit depth: convert("RGB") clips at 255, so a 16-bit scan would load almost white."""
    from PIL import Image

    if img.mode == "F":
        raise DataError(f"{file}: floating-point pixels are not supported; export the image as 8- or 16-bit integers")
    if img.mode not in _DEEP_GRAY_MODES:
        return img.convert("RGB")
    declared = getattr(img, "tag_v2", {}).get(258)  # TIFF BitsPerSample: 32 for a 32-bit TIFF in mode "I"
    declared = declared[0] if isinstance(declared, tuple) and declared else declared
    bits = declared if isinstance(declared, int) and 8 < declared <= 32 else _DEEP_GRAY_MODES[img.mode]
    values = np.asarray(img).astype(np.float64)
    low, high = values.min(initial=0.0), values.max(initial=0.0)
    if low < 0 or high > 2**bits - 1:
        raise DataError(
            f"{file}: pixel values {low:.0f}..{high:.0f} do not fit its {bits}-bit depth (0..{2**bits - 1}); "
            "export it as unsigned 8- or 16-bit grayscale"
        )
    return Image.fromarray(np.round(values * (255.0 / (2**bits - 1))).astype(np.uint8)).convert("RGB")


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A MedMNIST-format .npz's pooled splits: uint8 images (N, H, W, C) and their labels (N,)."""
    arrays = _npz_members(path)
    splits = [s for s in NPZ_SPLITS if f"{s}_images" in arrays or f"{s}_labels" in arrays]
    if not splits:
        raise DataError(f"{path}: no train_images/val_images/test_images arrays (MedMNIST format expected)")
    parts = {s: _npz_split(path, arrays, s) for s in splits}
    shapes = {s: images.shape[1:] for s, (images, _) in parts.items()}
    first = splits[0]
    for s in splits[1:]:
        if shapes[s] != shapes[first]:
            raise DataError(
                f"{path}: {first}_images are {shapes[first]} per image but {s}_images are {shapes[s]}; "
                "every split needs the same image size and channels"
            )
    images = np.concatenate([images for images, _ in parts.values()])
    labels = np.concatenate([labels for _, labels in parts.values()])
    return images, labels


def _npz_members(path: Path) -> dict[str, np.ndarray]:
    """The split arrays of a .npz, read in full here so a corrupt member is named, not leaked."""
    if not path.is_file():
        raise DataError(f"{path}: no such .npz file")
    try:
        npz = np.load(path, allow_pickle=False)
    except _NPZ_ERRORS as err:
        raise DataError(f"{path}: not a readable .npz file ({type(err).__name__})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not a readable .npz file (it holds one .npy array; MedMNIST format expected)")
    wanted = {f"{s}_{kind}" for s in NPZ_SPLITS for kind in ("images", "labels")}
    arrays = {}
    with npz:
        for name in sorted(wanted & set(npz.files)):
            try:
                arrays[name] = npz[name]
            except _NPZ_ERRORS as err:
                why = f"is corrupt or too large ({type(err).__name__})"
                raise DataError(f"{path}: member {name} {why}; re-export the file") from None
            if not isinstance(arrays[name], np.ndarray):
                raise DataError(f"{path}: member {name} is not a .npy array; re-export the file")
    return arrays


def _npz_split(path: Path, arrays: dict[str, np.ndarray], split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's (N, H, W, C) uint8 images and (N,) labels, refused unless they pair one to one."""
    images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
    if images is None or labels is None:
        have, lack = ("images", "labels") if labels is None else ("labels", "images")
        raise DataError(f"{path}: has {split}_{have} but no {split}_{lack} array")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or 0 in images.shape[1:3]:
        raise DataError(f"{path}: {split}_images must be (N, H, W) or (N, H, W, 1|3), got {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {split}_images must be uint8 (0..255), got {images.dtype}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            f"{path}: {split}_labels has shape {labels.shape}; one class index per image, (N,) or (N, 1), "
            "is expected (multi-label data is not supported)"
        )
    if len(labels) != len(images):
        raise DataError(
            f"{path}: {split}_labels holds {len(labels)} labels but {split}_images holds {len(images)} images; "
            "they must pair one to one"
        )
    return images, labels


def read_user_map(path: Path, key: str) -> dict[str, str]:
    """A CSV naming each record's person (privacy.unit: user): a header `KEY,user`, then one line per record.

    `key` is `path` (an image's path relative to data.path) or `index` (a record of the .npz, its
    splits pooled in train, val, test order). An empty user, a key listed twice or a wrong header is
    one line naming the file and line: a record whose person is unknown cannot be sampled and
    clipped with that person's other records.
    """
    with csv_file(path, "the users file") as reader:
        if [h.strip() for h in next(reader, [])] != [key, "user"]:
            raise DataError(f"{path}: the header must be {key},user (one line per record below it)")
        mapping: dict[str, str] = {}
        for row in reader:
            if not row:
                continue
            record, user = (cell.strip() for cell in [*row, "", ""][:2])
            if len(row) > 2 or not record or not user:
                raise DataError(f"{path}: line {reader.line_num}: needs {key},user with both filled in")
            if record in mapping:
                raise DataError(f"{path}: line {reader.line_num}: {key} {record[:80]!r} is listed twice")
            mapping[record] = user
    return mapping


@contextmanager
def csv_file(path: Path, what: str, delimiter: str = ",") -> Iterator[CsvReader]:
    """A strict csv.reader over a UTF-8 file (a BOM dropped); what goes wrong reading it is one DataError.

    A file that cannot be read (named as `what`), is not UTF-8, or is not CSV (a quote left open, a
    field past csv's size limit) names the file, inside the `with` block as well as on opening it.
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            yield csv.reader(f, strict=True, delimiter=delimiter)
    except OSError as err:
        raise DataError(f"{path}: cannot read {what} ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except csv.Error as err:
        raise DataError(f"{path}: not a valid CSV file ({err})") from None


def numbered(reader: CsvReader) -> Iterator[tuple[int, list[str]]]:
    """(line, cells) per record, `line` the file line where the record starts (line 1 is the header).

    The one row numbering of the project: errors, warnings and `fedtransfer predict` all cite the line an
    editor shows. csv's own `line_num` is where a record ends, which differs for a quoted cell spanning lines.
    """
    last = reader.line_num
    for row in reader:
        yield last + 1, row
        last = reader.line_num


def users_of(keys: Sequence[str], mapping: Mapping[str, str], path: Path, key: str) -> np.ndarray:
    """Each record's person, from `read_user_map`; a record the file does not list is one line naming it."""
    missing = next((k for k in keys if k not in mapping), None)
    if missing is not None:
        raise DataError(
            f"{path}: no user for {key} {missing!r}; every record needs its person (add the line {missing},USER)"
        )
    out = np.empty(len(keys), dtype=object)
    out[:] = [mapping[k] for k in keys]
    return out
