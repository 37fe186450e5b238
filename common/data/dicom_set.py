"""`data.source: dicom`: a folder of DICOM files at any depth and a labels CSV naming each image and its class.

The CSV's header is `image,label` or `image,label,person`; `image` is a path relative to the folder or
a SOPInstanceUID. Without a `person` column each record's person is the file's PatientID. Either way
the person is reduced at once, here, to an HMAC under a salt kept beside the site's other secrets
(`person-salt`, mode 600): the hash groups a person's records for `privacy.unit: user`, and neither
the identifier nor the salt ever leaves the site.

The loader refuses the first problem in one line; the site's data check (`scan_dicom(strict=False)`)
lists every problem instead and reads what it can.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fedtransfer.common.config.windows import Window
from fedtransfer.common.data.dicom import DicomImage, read_dicom, read_header
from fedtransfer.common.data.files import DataError, csv_file, is_tool_litter, numbered

LABEL_HEADERS = (["image", "label"], ["image", "label", "person"])
# what stands beside DICOM files and is never one (DICOM files often have no suffix, so suffixes are not required)
SIDECAR_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".yaml", ".yml", ".md", ".html", ".pdf")
SALT_FILE = "person-salt"


@dataclass(frozen=True)
class DicomOptions:
    """Where a DICOM source is and how its pixels are shown: data.path, labels_file, window, frames."""

    root: Path
    labels: Path
    window: Window
    frames: str  # each | refuse
    salt_dir: Path  # a deployed site's state_dir; a simulation's cache_dir

    @property
    def pixels(self) -> str:
        """The pixel choices, part of the samples' fingerprint (and so of the feature cache key)."""
        return f"dicom|modality-lut|voi={self.window.name}|monochrome1-inverted|frames={self.frames}"


@dataclass(frozen=True)
class LabelRow:
    line: int
    image: str
    label: str
    person: str | None


@dataclass(frozen=True)
class FileFacts:
    """What the data check reports of a file read: never an identifier."""

    image: str  # the path relative to data.path
    rows: int
    columns: int
    bits_stored: int
    frames: int
    syntax: str
    window: str


@dataclass
class DicomScan:
    """What was read: records (inputs, labels, persons), facts per file, and every problem met, one line each."""

    classes: tuple[str, ...] = ()
    inputs: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    persons: list[str | None] = field(default_factory=list)
    files: list[FileFacts] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unlabelled: int = 0


def person_salt(folder: Path) -> bytes:
    """The site's salt for person hashes: 32 random bytes made once (mode 600), shared by every process."""
    path = folder / SALT_FILE
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{SALT_FILE}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs is kept, so all agree
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())


def person_hash(salt: bytes, person: str) -> str:
    """A person's pseudonym at this site: unlinkable to the identifier without the site's salt."""
    return "p-" + hmac.new(salt, person.encode("utf-8"), hashlib.sha256).hexdigest()[:20]


def read_labels(path: Path) -> list[LabelRow]:
    """The labels CSV, strict: a wrong header, an empty cell or an image listed twice is one line naming it."""
    rows, seen = [], set()
    with csv_file(path, "the labels file") as reader:
        header = [h.strip() for h in next(reader, [])]
        if header not in LABEL_HEADERS:
            raise DataError(f"{path}: the header must be image,label or image,label,person (got {','.join(header)})")
        for line, row in numbered(reader):
            if not row:
                continue
            cells = [c.strip() for c in row]
            if len(cells) != len(header) or not all(cells):
                raise DataError(f"{path}: line {line}: needs {','.join(header)} with every cell filled in")
            if cells[0] in seen:
                raise DataError(f"{path}: line {line}: image {cells[0][:80]!r} is listed twice")
            seen.add(cells[0])
            rows.append(LabelRow(line, cells[0], cells[1], cells[2] if len(cells) == 3 else None))
    if not rows:
        raise DataError(f"{path}: no images listed (expected image,label lines below the header)")
    return rows


def dicom_files(root: Path, labels: Path) -> list[Path]:
    """Every file under `root` at any depth (DICOM files often have no suffix), tool litter and sidecars left out."""
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not is_tool_litter(d))
        found += [Path(folder) / n for n in names if not is_tool_litter(n) and not n.lower().endswith(SIDECAR_SUFFIXES)]
    skip = labels.resolve()
    return sorted(f for f in found if f.resolve() != skip)


def resolve_images(options: DicomOptions, rows: list[LabelRow], problems: list[str]) -> tuple[list, int]:
    """Each row's file, by relative path or else by SOPInstanceUID; (pairs of row and file, unlabelled count)."""
    files = dicom_files(options.root, options.labels)
    by_path = {f.relative_to(options.root).as_posix(): f for f in files}
    by_uid: dict[str, Path] | None = None
    pairs, used = [], set()
    for row in rows:
        file = by_path.get(Path(row.image).as_posix())
        if file is None:
            if by_uid is None:
                by_uid = _uid_index(files)
            file = by_uid.get(row.image)
        if file is None:
            problems.append(
                f"{options.labels}: line {row.line}: image {row.image[:80]!r} is neither a file under "
                f"{options.root} nor the SOPInstanceUID of one; fix the line or add the file"
            )
            continue
        pairs.append((row, file))
        used.add(file)
    return pairs, len(set(files) - used)


def _uid_index(files: list[Path]) -> dict[str, Path]:
    """SOPInstanceUID -> file, for labels that name images by UID (unreadable files are the loader's to name)."""
    index = {}
    for file in files:
        try:
            uid = str(read_header(file).get("SOPInstanceUID", "") or "")
        except DataError:
            continue
        if uid:
            index.setdefault(uid, file)
    return index


def scan_dicom(options: DicomOptions, image_size: int, *, strict: bool = True) -> DicomScan:
    """Read every labelled image. `strict`: the first problem is a DataError; else each is listed and skipped."""
    rows = read_labels(options.labels)
    scan = DicomScan(classes=tuple(sorted({r.label for r in rows})))
    pairs, scan.unlabelled = resolve_images(options, rows, scan.problems)
    salt = person_salt(options.salt_dir)
    for row, file in pairs:
        if strict and scan.problems:
            break
        try:
            image = read_dicom(
                file, image_size=image_size, window=options.window, frames=options.frames, person=row.person is None
            )
        except DataError as err:
            scan.problems.append(str(err))
            continue
        _add(scan, options, row, file, image, salt)
    if strict and scan.problems:
        raise DataError(scan.problems[0])
    return scan


def _add(scan: DicomScan, options: DicomOptions, row: LabelRow, file: Path, image: DicomImage, salt: bytes) -> None:
    """One file's frames as records of its row's class and person (hashed here, the identifier dropped)."""
    person = row.person or image.person
    pseudonym = person_hash(salt, person) if person else None
    count = len(image.frames)
    scan.inputs += list(image.frames)
    scan.labels += [scan.classes.index(row.label)] * count
    scan.persons += [pseudonym] * count
    relative = file.relative_to(options.root).as_posix()
    scan.files.append(
        FileFacts(relative, image.rows, image.columns, image.bits_stored, count, image.syntax, image.window)
    )
