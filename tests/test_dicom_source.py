"""data.source: dicom in a simulation and at a deployed site: records, persons, the labels CSV, the cache key."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import yaml
from fedtransfer.common.config.parse import ConfigError
from fedtransfer.common.config.run import config_from_dict
from fedtransfer.common.config.site import load_site_config, site_paths
from fedtransfer.common.data.federation import deployed_site_data, dicom_options, federation_for
from fedtransfer.common.data.files import DataError
from fedtransfer.common.data.sources import load_source

from benchmarks.dicom_hospitals import HOSPITALS, digits, identifiers, write_hospitals, write_pngs

COUNT = 90  # 6 patients a hospital, 5 images each


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three hospitals' DICOM folders and a PNG twin of the same digits (read only by the tests)."""
    root = tmp_path_factory.mktemp("dicom")
    images, labels = digits()
    write_hospitals(root / "dicom", images[:COUNT], labels[:COUNT])
    write_pngs(root / "png", images[:COUNT], labels[:COUNT])
    return root


def _run_config(hospitals: Path, tmp_path: Path, **data: object) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "backbone": {"image_size": 32},
        "data": {
            "source": "dicom",
            "path": str(hospitals / "dicom"),
            "labels_file": str(hospitals / "dicom" / "labels.csv"),
            "split": "iid",
            "num_sites": 2,
            "min_site_records": 2,
        }
        | data,
    }


def test_a_simulation_reads_the_digits_as_their_png_twins(hospitals: Path, tmp_path: Path) -> None:
    """Modality LUT, the stored window and MONOCHROME1 (every fifth file) give back the 8-bit digits exactly."""
    cfg = config_from_dict(_run_config(hospitals, tmp_path))
    fed = federation_for(cfg)
    png = config_from_dict(
        _run_config(hospitals, tmp_path, source="imagefolder", path=str(hospitals / "png"), labels_file=None)
    )
    twin = federation_for(png)
    for ours, theirs in zip(fed.sites, twin.sites, strict=True):
        assert np.array_equal(ours.train.inputs, theirs.train.inputs)
        assert np.array_equal(ours.test.labels, theirs.test.labels)
    assert fed.server_test.users is not None  # PatientID names each record's person (privacy.unit: user)


def test_persons_are_salted_hashes_kept_at_the_site(hospitals: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(_run_config(hospitals, tmp_path))
    fed = federation_for(cfg)
    users = np.concatenate([fed.server_test.users] + [s.train.users for s in fed.sites])
    patient_ids = {identifiers(h, p, 0)["PatientID"] for h in HOSPITALS for p in range(COUNT)}
    assert not set(users.astype(str)) & patient_ids
    assert all(u.startswith("p-") for u in users) and len(set(users)) == COUNT // 5
    salt = tmp_path / "cache" / "person-salt"
    assert stat.S_IMODE(salt.stat().st_mode) == 0o600
    salt.write_text("00" * 32)  # another site's salt: other pseudonyms for the same people
    assert not set(federation_for(cfg).server_test.users) & set(fed.server_test.users)


def test_the_window_is_part_of_the_cache_key(hospitals: Path, tmp_path: Path) -> None:
    """Features cached under one window are never reused under another; the same window finds them again."""
    keys = {}
    for window in ("file", "lung", "file"):
        cfg = config_from_dict(_run_config(hospitals, tmp_path, window=window))
        keys.setdefault(window, set()).add(federation_for(cfg).sites[0].train.fingerprint())
    assert len(keys["file"]) == 1 and keys["file"] != keys["lung"]


def test_a_person_column_names_the_person(hospitals: Path, tmp_path: Path) -> None:
    rows = (hospitals / "dicom" / "labels.csv").read_text().splitlines()
    csv = ["image,label,person"] + [f"{r},ward-{k % 3}" for k, r in enumerate(rows[1:])]
    (tmp_path / "labels.csv").write_text("\n".join(csv) + "\n")
    cfg = config_from_dict(_run_config(hospitals, tmp_path, labels_file=str(tmp_path / "labels.csv")))
    fed = federation_for(cfg)
    assert len(set(np.concatenate([fed.server_test.users] + [s.train.users for s in fed.sites]))) == 3


def test_a_deployed_site_reads_its_folder_by_path_and_uid(hospitals: Path, tmp_path: Path) -> None:
    """A hospital's own labels.csv names some images by SOPInstanceUID; paths are relative to the site file."""
    site_file = tmp_path / "site.yaml"
    folder = hospitals / "dicom" / "hospital-b"
    site = {"name": "hospital-b", "data_source": "dicom", "data_path": str(folder)}
    site |= {"labels_file": str(folder / "labels.csv"), "state_dir": "state"}
    site_file.write_text(yaml.safe_dump(site))
    sc = load_site_config(site_file)
    data = deployed_site_data(sc, site_paths(sc, site_file), 32)
    assert len(data.train) + len(data.test) == COUNT // 3
    assert (tmp_path / "state" / "person-salt").is_file()
    named = [row.split(",")[0] for row in (folder / "labels.csv").read_text().splitlines()[1:]]
    assert sum("/" not in image for image in named) == len(named) // 3  # a third are named by SOPInstanceUID


def test_label_problems_name_the_file_line_and_key(hospitals: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\nhospital-a/nowhere.dcm,3\n")
    cfg = config_from_dict(_run_config(hospitals, tmp_path, labels_file=str(labels)))
    with pytest.raises(DataError, match=r"labels\.csv: line 2: image 'hospital-a/nowhere\.dcm' is neither a file"):
        federation_for(cfg)
    labels.write_text("file,class\n")
    with pytest.raises(DataError, match=r"labels\.csv: the header must be image,label"):
        load_source("dicom", str(hospitals), 32, dicom=dicom_options(cfg))
    site_file = tmp_path / "site.yaml"
    site_file.write_text(yaml.safe_dump({"name": "h", "data_source": "dicom", "data_path": str(hospitals)}))
    with pytest.raises(ConfigError, match=r"site\.yaml: labels_file: a CSV image,label\[,person\] is needed"):
        load_site_config(site_file)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"labels_file": None}, r"data\.labels_file: a CSV image,label\[,person\] is needed with source dicom"),
        ({"window": "soft"}, r"data\.window: file, lung, mediastinum, bone, brain or WIDTH/LEVEL"),
        ({"frames": "some"}, r"data\.frames"),
        ({"source": "imagefolder"}, r"data\.labels_file: .*only there"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_run_config(tmp_path, tmp_path, **data))
