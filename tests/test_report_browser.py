"""The audit report as people see it: opened in a real headless Chromium, its DOM read and a screenshot looked at.

The report is written by the real `fedtransfer audit` on a run folder written record by record
(tests/synthetic_run.py, no Flower). Chromium is Debian's `chromium` package (`make test`
installs it when missing).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fedtransfer.cli.main import main
from PIL import Image

from tests.synthetic_run import RunSpec, write_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here: `make test` installs Debian's package")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
SITES = ("hospital-a", "hospital-b", "bank-c")


def _browse(page: Path, profile: Path, *action: str) -> subprocess.CompletedProcess[str]:
    """One headless Chromium with a new empty profile, doing `action` on the page."""
    profile.mkdir()
    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *action, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


def _report(tmp_path: Path, capsys: pytest.CaptureFixture[str], **spec: object) -> Path:
    run = write_run(tmp_path / "run", RunSpec(sites=SITES, rounds=4, **spec))
    main(["audit", str(run), "--report-dir", str(tmp_path / "report")])
    capsys.readouterr()
    return tmp_path / "report" / "audit-report.html"


def test_a_passed_report_renders_verdict_site_table_and_plot(tmp_path: Path, capsys) -> None:
    page = _report(tmp_path, capsys)
    dom = _browse(page, tmp_path / "dom-profile", "--dump-dom").stdout
    assert re.search(r'<div class="verdict pass">PASSED</div>', dom), dom[:2000]
    sites_table = dom[dom.index("<h2>Sites</h2>") :]
    for site in SITES:
        row = re.search(rf"<tr><td>{site}</td><td>([\d.]+)</td><td>([\d.]+)</td><td>3</td>", sites_table)
        assert row is not None, site
        assert row.group(1) == row.group(2)  # ε claimed equals ε recomputed, as the page shows it
    assert re.search(r'<img alt="plot" src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}">', dom)

    shot = tmp_path / "report.png"
    _browse(page, tmp_path / "shot-profile", f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (1600, 1200, 3)
    not_white = (pixels.min(axis=2) < 235).mean()
    assert not_white > 0.03, "the page is (almost) blank"
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    target_line = ((red > 200) & (green < 80) & (blue < 80)).sum()  # the plot's dashed red "target ε" line
    assert target_line > 200, "the embedded ε plot did not render"
    verdict_green = ((abs(red - 0xE3) < 6) & (abs(green - 0xF5) < 6) & (abs(blue - 0xE1) < 6)).sum()
    assert verdict_green > 10_000, "the PASSED box is not shown in green"


def test_a_failed_report_shows_the_failure(tmp_path: Path, capsys) -> None:
    page = _report(tmp_path, capsys, trained={1: list(SITES), 2: ["hospital-a"], 3: list(SITES), 4: list(SITES)})
    dom = _browse(page, tmp_path / "profile", "--dump-dom").stdout
    assert re.search(r'<div class="verdict fail">FAILED: \d+ failure\(s\)</div>', dom)
    failed = dom[dom.index("<h2>Failed checks</h2>") :]
    assert re.search(
        r"<li><code>[^<]*audit\.jsonl:\d+: round 2 aggregated 1 site\(s\)[^<]*</code> \(completion\)</li>", failed
    ), failed[:1500]
