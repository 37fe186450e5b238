"""No patient identifier leaves the loader: a whole DICOM simulation's files searched for every one of them.

The DICOM files carry synthetic names, PatientIDs, birth dates, accession numbers, institutions and
referring physicians. After a simulation with per-person privacy (PatientID names the person), MLflow
tracking, the data check and a TorchScript export, no file the run, the cache, the sites or the reports
hold contains any of them; the persons' salted pseudonyms stay in the sites' own folders.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from fedtransfer.cli.main import main
from fedtransfer.common.data.dicom_set import person_hash
from fedtransfer.deploy.launch import site_node_config

from benchmarks.dicom_hospitals import HOSPITALS, PER_PERSON, digits, identifiers, write_hospitals
from tests.deploy_harness import BIN_DIR, local_deployment

COUNT = 300  # 30 of each class, 20 synthetic patients


def _identifier_strings(count: int) -> set[bytes]:
    """Every identifier the files carry, as the bytes any output would hold (and names with ^ as spaces)."""
    found = set()
    for k in range(count):
        patient = k // (PER_PERSON * len(HOSPITALS))
        for value in identifiers(HOSPITALS[k % len(HOSPITALS)], patient, k).values():
            found |= {value.encode(), value.replace("^", " ").encode()}
    return found


def _files(*folders: Path) -> list[Path]:
    """Every file under the folders but Flower's installed copies of the app (its source code, docs included,
    in .flwr/apps/ or flwr-home/apps/), which hold this test's own literals and no data."""
    return [p for folder in folders for p in sorted(folder.rglob("*")) if p.is_file() and not _app_copy(p)]


def _app_copy(path: Path) -> bool:
    parts = path.parts
    return any(parts[k] == "apps" and parts[k - 1] in (".flwr", "flwr-home") for k in range(1, len(parts)))


def _holding(files: list[Path], needles: set[bytes]) -> list[str]:
    hits = []
    for path in files:
        data = path.read_bytes()
        hits += [f"{path}: {needle.decode()}" for needle in needles if needle in data]
    return hits


def _hospitals(data: Path) -> None:
    images, labels = digits()
    pick = np.arange(COUNT) * (len(labels) // COUNT)  # the digits are sorted by class: every class
    write_hospitals(data, images[pick], labels[pick])


def test_no_identifier_in_anything_a_dicom_simulation_writes(tmp_path: Path) -> None:
    data = tmp_path / "hospitals"
    _hospitals(data)
    run, cache = tmp_path / "run", tmp_path / "cache"
    raw = {
        "run_name": "dicom-identifiers",
        "output_dir": str(run),
        "cache_dir": str(cache),
        "backbone": {"image_size": 32},
        "data": {"source": "dicom", "path": str(data), "labels_file": str(data / "labels.csv")}
        | {"split": "iid", "num_sites": 2, "min_site_records": 2},
        "train": {"rounds": 2},
        "privacy": {"target_epsilon": 3.0, "target_delta": 1.0e-4, "unit": "user", "accountant": "rdp"},
        "tracking": {"enabled": True},
    }
    config = tmp_path / "dicom.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["data", "check", "--config", str(config), "--report-dir", str(tmp_path / "check")]) == 0
    assert main(["simulate", "--config", str(config), "--quiet"]) == 0
    assert main(["export", str(run), "--format", "torchscript", "--samples", "8"]) == 0
    assert main(["audit", str(run)]) == 0
    status = json.loads((run / "status.json").read_text(encoding="utf-8"))
    assert status["status"] == "completed"  # per person, 20 persons a hospital: DP noise, not accuracy, is the point
    written = _files(run, cache, tmp_path / "check")
    assert any(p.name == "model.pt" for p in written) and any(p.name == "mlflow.db" for p in written)
    assert (run / "model.torchscript.pt").is_file() and (run / "audit-report.json").is_file()
    assert _holding(written, _identifier_strings(COUNT)) == []

    # the pseudonyms themselves never reach the server's side: only the sites' own folders may hold them
    salt = bytes.fromhex((cache / "person-salt").read_text().strip())
    pseudonyms = {
        person_hash(salt, identifiers(h, p, 0)["PatientID"]).encode()
        for p in range(COUNT // (PER_PERSON * len(HOSPITALS)))
        for h in HOSPITALS
    }
    server_side = [p for p in _files(run) if "sites" not in p.relative_to(run).parts]
    assert server_side and _holding(server_side, pseudonyms) == []


def test_no_identifier_in_anything_deployed_dicom_sites_and_their_server_write(tmp_path: Path) -> None:
    """Two hospitals deployed over TLS (`fedtransfer deploy site`, workers), each on its own DICOM folder."""
    data = tmp_path / "hospitals"
    _hospitals(data)
    homes, node_configs = {}, {}
    for hospital in HOSPITALS[:2]:
        home = homes[hospital] = tmp_path / "homes" / hospital
        home.mkdir(parents=True)
        site = {"name": hospital, "data_source": "dicom", "data_path": str(data / hospital), "device": "cpu"}
        site |= {"labels_file": str(data / hospital / "labels.csv"), "state_dir": "state"}  # a third by UID
        (home / "site.yaml").write_text(yaml.safe_dump(site), encoding="utf-8")
        node_configs[hospital] = site_node_config(home / "site.yaml")
        assert main(["data", "check", "--site", str(home / "site.yaml"), "--image-size", "32"]) == 0
    run_dir, config = tmp_path / "run", tmp_path / "run.yaml"
    raw = {
        "output_dir": str(run_dir),
        "cache_dir": str(tmp_path / "server-cache"),
        "device": "cpu",
        "backbone": {"image_size": 32},
        "data": {"source": "mnist", "split": "iid", "num_sites": 2, "max_samples": 600},  # the server's hold-out
        "train": {"rounds": 2, "min_sites": 2, "fraction_evaluate": 0.0},
        "privacy": {"target_epsilon": 3.0, "target_delta": 1.0e-5},  # the sites' default policy.max_delta
    }
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    yamls = {h: homes[h] / "site.yaml" for h in homes}
    with local_deployment(tmp_path / "deployment", node_configs, deploy_site=yamls, connect_timeout=300) as dep:
        done = subprocess.run(
            [str(BIN_DIR / "fedtransfer"), "deploy", "run", "--config", str(config), "--connection", dep.connection],
            env=dep.env,
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    privacy = json.loads((run_dir / "privacy.json").read_text(encoding="utf-8"))
    assert all(2.0 < privacy["sites"][h]["epsilon"] <= 3.0 + 1e-9 for h in homes)  # DP on the DICOM records
    # everything but the hospitals' own DICOM exports: run, server cache, logs, sites' state, caches, reports
    written = [p for p in _files(tmp_path) if data not in p.parents]
    assert any(p.name == "privacy-ledger.json" for p in written) and any(p.suffix == ".log" for p in written)
    assert _holding(written, _identifier_strings(COUNT)) == []
    assert _holding(_files(run_dir, tmp_path / "server-cache"), _pseudonyms(homes)) == []


def _pseudonyms(homes: dict[str, Path]) -> set[bytes]:
    """Each hospital's persons as its own salt hashes them."""
    found = set()
    for hospital, home in homes.items():
        salt = bytes.fromhex((home / "state" / "person-salt").read_text().strip())
        patients = range(COUNT // (PER_PERSON * len(HOSPITALS)))
        found |= {person_hash(salt, identifiers(hospital, p, 0)["PatientID"]).encode() for p in patients}
    return found


@pytest.fixture(autouse=True)
def _no_tracking_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's local store only: nothing is sent anywhere by the test's tracking."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
