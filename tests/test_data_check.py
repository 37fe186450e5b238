"""`fedtransfer data check`: every planted problem of a bad DICOM folder reported, exit 1; a clean site exit 0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from fedtransfer.cli.main import main

from benchmarks.dicom_hospitals import dicom_file, digits, identifiers
from tests.dicom_files import with_syntax

GOOD = 30  # three images a patient, three of each class 0..9
COPIES = 6  # one image copied under other names: some copies land in train, some in test


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site's DICOM folder with every problem planted, and two labels files: all of it, and its good files."""
    root = tmp_path_factory.mktemp("bad-site")
    images, labels = digits()
    pick = np.arange(GOOD) * 500 // 3  # the digits are sorted by class: three of each
    good = []
    for n, k in enumerate(pick):
        ds = dicom_file(images[k], index=n, patient=n // 3, hospital="hospital-a")
        (root / "scans").mkdir(exist_ok=True)
        ds.save_as(root / "scans" / f"img-{n:02d}.dcm", enforce_file_format=True)
        good.append((f"scans/img-{n:02d}.dcm", str(labels[k])))
    copies = [(f"copies/dup-{c}.dcm", good[0][1]) for c in range(COPIES)]
    (root / "copies").mkdir()
    for name, _ in copies:
        shutil.copy(root / good[0][0], root / name)
    (root / "broken.dcm").write_bytes(b"DICM" + bytes(range(256)) * 3)
    with_syntax("MR_small_jp2klossless.dcm", root / "mpeg.dcm", b"1.2.840.10008.1.2.4.90", b"1.2.840.10008.1.2.4.92")
    planted = [("broken.dcm", "1"), ("mpeg.dcm", "2"), ("missing/nowhere.dcm", "3")]
    _labels(root / "labels.csv", good + copies + planted)
    _labels(root / "good.csv", good)
    return root


def _labels(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("image,label\n" + "".join(f"{image},{label}\n" for image, label in rows), encoding="utf-8")


def _site(folder: Path, tmp_path: Path, labels: str) -> Path:
    site = {"name": "hospital-a", "data_source": "dicom", "data_path": str(folder), "state_dir": "state"}
    site |= {"labels_file": str(folder / labels), "test_fraction": 0.3}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(site), encoding="utf-8")
    return path


def test_every_planted_problem_is_reported_and_the_check_fails(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "check", "--site", str(_site(folder, tmp_path, "labels.csv")), "--image-size", "32"]) == 1
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "state" / "data-check.json").read_text(encoding="utf-8"))
    assert report["verdict"] == "errors"
    errors = "\n".join(report["errors"])
    assert "broken.dcm: cannot read DICOM" in errors or "broken.dcm: not a DICOM file" in errors
    assert "mpeg.dcm: transfer syntax 1.2.840.10008.1.2.4.92" in errors
    assert "line 40: image 'missing/nowhere.dcm' is neither a file" in errors
    assert "duplicate pixel data:" in errors and "records of test are identical to records of train" in errors
    assert any(w.startswith("person on both sides:") for w in report["warnings"])
    assert len(report["errors"]) == 4  # nothing else: the good files and the copies are read
    assert sum(s["records"] for s in report["splits"].values()) == GOOD + COPIES
    assert report["image_sizes"] == {"32x32": GOOD + COPIES}
    assert report["windows_used"] == {"W/L 1401/-299.5 from file": GOOD + COPIES}
    assert report["bit_depths"] == {"12": GOOD + COPIES}
    html = (tmp_path / "state" / "data-check.html").read_text(encoding="utf-8")
    assert "ERRORS: 4" in html and "mpeg.dcm" in html and "nothing was sent" in html
    assert all(f"ERROR {e}" in printed for e in report["errors"])


def test_a_clean_site_passes_and_names_no_patient(folder: Path, tmp_path: Path) -> None:
    """Good files only: exit 0, records per class, and no identifier of the files in the report."""
    assert main(["data", "check", "--site", str(_site(folder, tmp_path, "good.csv")), "--image-size", "32"]) == 0
    text = (tmp_path / "state" / "data-check.json").read_text(encoding="utf-8")
    report = json.loads(text)
    assert report["verdict"] == "clean" and report["errors"] == []
    assert report["classes"] == [str(c) for c in range(10)]
    per_class = [sum(s["per_class"].get(str(c), 0) for s in report["splits"].values()) for c in range(10)]
    assert per_class == [3] * 10
    assert sum(s["persons"] for s in report["splits"].values()) >= GOOD // 3
    for patient in range(GOOD // 3):
        for value in identifiers("hospital-a", patient, 0).values():
            if len(value) > 8:  # names, IDs, institutions; a date alone may occur by chance
                assert value not in text
    assert any("named by no line" in w for w in report["warnings"])  # the copies and the planted files


def test_a_simulation_config_is_checked_as_it_splits(folder: Path, tmp_path: Path) -> None:
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "backbone": {"image_size": 32},
        "data": {"source": "dicom", "path": str(folder), "labels_file": str(folder / "good.csv")}
        | {"split": "iid", "num_sites": 2, "min_site_records": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["data", "check", "--config", str(path), "--report-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "data-check.json").read_text(encoding="utf-8"))
    assert set(report["splits"]) == {"server-test", "site-0/train", "site-0/test", "site-1/train", "site-1/test"}
    assert sum(s["records"] for s in report["splits"].values()) == GOOD


def test_a_site_file_that_is_not_valid_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"name": "h", "data_source": "dicom", "data_path": str(tmp_path)}))
    assert main(["data", "check", "--site", str(path)]) == 2
    assert "labels_file" in capsys.readouterr().err
