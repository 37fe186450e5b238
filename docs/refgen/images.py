"""The demo's pictures in the manual and the README, refreshed from a real run of it: `make docs-images`.

Pictures drawn once by hand go stale the day the demo changes (the old audit screenshot showed a
5-round fedavg run long after the demo became 30 rounds of fedsgd). This script takes a finished
run of configs/demo.yaml, by default one it starts itself into a temporary folder, and publishes
what that run drew: its own accuracy and ε plots (drawn by the run with matplotlib, the same files
`make demo` leaves), and a headless-Chromium screenshot of `fedtransfer audit --empirical`'s report
of it. docs/demo-run.json records what the pictures show (the config, rounds, accountant, the
hold-out accuracy, every site's ε, the audit's verdict) and each picture's SHA-256, so that
tests/test_docs_images.py fails when configs/demo.yaml or the pages' quoted figures drift from them.

    PYTHONPATH=. .venv/bin/python docs/refgen/images.py [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedtransfer.common.config.run import load_config, to_run_config
from fedtransfer.common.errors import InputError
from fedtransfer.common.storage import atomic
from flwr.common.config import flatten_dict

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = ROOT / "docs"
DEMO = ROOT / "configs" / "demo.yaml"
RECORD = DOCS / "demo-run.json"
PLOTS = {"accuracy.png": "demo-accuracy.png", "epsilon.png": "demo-epsilon.png"}
SCREENSHOT = "demo-audit-report.png"
WINDOW = (1150, 1450)  # the report's verdict, site table and ε plot: the top of the page
# where a run wrote its files, not what it ran: a run into a temporary folder is still the demo
PLACES = ("output_dir", "cache_dir")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def demo_config() -> dict[str, Any]:
    """configs/demo.yaml as the run config Flower gets (flat keys, null as ""), without its paths."""
    flat = to_run_config(load_config(DEMO))
    return {key: value for key, value in flat.items() if key not in PLACES}


def run_config(run: Path) -> dict[str, Any]:
    """The config a finished run recorded in config.json, in the same flat form."""
    flat = flatten_dict(json.loads((run / "config.json").read_text(encoding="utf-8")))
    return {key: value for key, value in flat.items() if key not in PLACES}


def _bin(name: str) -> str:
    """A command of this environment (.venv/bin/fedtransfer), whether or not the virtualenv is activated."""
    return str(Path(sys.executable).parent / name)


def simulate(run: Path) -> Path:
    """`make demo` into `run`: the shipped demo config, only the output folder elsewhere."""
    print(f"docs-images: running the demo into {run} (minutes: 4 on an idle 2-core machine)", file=sys.stderr)
    command = [_bin("fedtransfer"), "simulate", "--config", str(DEMO), "--output", str(run), "--quiet"]
    if subprocess.run(command, check=False).returncode != 0:
        raise InputError(f"the demo run failed: see {run / 'run.log'}")
    return run


def summary(run: Path) -> dict[str, Any]:
    """What the pictures will show, read from the run's own files; a run that is not the demo is refused."""
    for name in ("status.json", "privacy.json", "config.json", *PLOTS):
        if not (run / name).is_file():
            raise InputError(f"{run}: no {name}: give the folder of a finished run of configs/demo.yaml")
    status = json.loads((run / "status.json").read_text(encoding="utf-8"))
    if status.get("status") != "completed":
        raise InputError(f"{run}/status.json: the run is {status.get('status')!r}, not completed: run it again")
    config = run_config(run)
    changed = sorted(key for key, value in demo_config().items() if config.get(key) != value)
    if changed:
        differ = ", ".join(changed[:5])
        raise InputError(f"{run}/config.json: not configs/demo.yaml's run ({differ} differ): omit --run")
    sites = json.loads((run / "privacy.json").read_text(encoding="utf-8"))["sites"]
    return {
        "config": config,
        "run_id": status["run_id"],
        "rounds": config["train.rounds"],
        "rounds_aggregated": len(status["rounds_aggregated"]),
        "protocol": config["train.protocol"],
        "accountant": config["privacy.accountant"],
        "target_epsilon": config["privacy.target_epsilon"],
        "delta": config["privacy.target_delta"],
        "server_accuracy": status["final_metrics"]["accuracy"],
        "epsilon": {site: entry["epsilon"] for site, entry in sorted(sites.items())},
    }


def audit(run: Path, report: Path) -> str:
    """`fedtransfer audit RUN --empirical` into `report`; its verdict (a failed audit is not published)."""
    command = [_bin("fedtransfer"), "audit", str(run), "--empirical", "--report-dir", str(report)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise InputError(f"fedtransfer audit {run} exited {done.returncode}: {done.stdout[-500:]}{done.stderr[-500:]}")
    return json.loads((report / "audit-report.json").read_text(encoding="utf-8")).get("verdict", "passed")


def screenshot(page: Path, png: Path, profile: Path) -> None:
    """The report's top in headless Chromium (Debian's `chromium`, which `make browser` installs)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise InputError("no chromium on PATH: run `make browser` (Debian's chromium package) first")
    size = f"--window-size={WINDOW[0]},{WINDOW[1]}"
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", size, page.as_uri()]
    subprocess.run(command, capture_output=True, timeout=180, check=True)
    if not png.is_file():
        raise InputError(f"chromium wrote no screenshot of {page}")


def publish(run: Path, shot: Path, record: dict[str, Any], docs: Path = DOCS) -> None:
    """Copy the pictures into docs/ and write demo-run.json with their hashes, each file atomically."""
    images = {target: (run / source).read_bytes() for source, target in PLOTS.items()}
    images[SCREENSHOT] = shot.read_bytes()
    for name, data in images.items():
        atomic.write_bytes(docs / name, data, mode=0o644)
    record["images"] = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(images.items())}
    record["generated"] = time.strftime("%Y-%m-%d", time.gmtime())
    atomic.write_bytes(docs / RECORD.name, (json.dumps(record, indent=2) + "\n").encode("utf-8"), mode=0o644)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make docs-images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished run of configs/demo.yaml (default: run it now)")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="fedtransfer-docs-images-") as tmp:
            run = args.run.resolve() if args.run else simulate(Path(tmp) / "run")
            record = summary(run)
            record["audit"] = audit(run, Path(tmp) / "report")
            screenshot(Path(tmp) / "report" / "audit-report.html", Path(tmp) / SCREENSHOT, Path(tmp) / "profile")
            publish(run, Path(tmp) / SCREENSHOT, record)
    except InputError as err:
        print(f"docs-images: error: {err}", file=sys.stderr)
        return 2
    eps = max(record["epsilon"].values())
    print(f"docs-images: run {record['run_id']}: accuracy {record['server_accuracy']:.4f}, ε max {eps:.3f}")
    print(f"docs-images: wrote {', '.join(record['images'])} and {RECORD.name} into {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
