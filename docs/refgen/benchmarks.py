"""The benchmarks page's index of result files, read from benchmarks/results/*.json as the site builds.

Each committed result file records what its script measured, on what machine and when; listing
them from the files themselves means a re-run benchmark, or a new one, shows up on the page with
the machine it really ran on, not the one a hand-written table once named.
"""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def script_of(stem: str) -> Path | None:
    """The benchmark script that writes results/<stem>.json.

    A script's results name holds every word of its own name (scale.py: scale_cluster.json,
    finetune_sites.py: finetune_text_sites16.json); a run named otherwise (`--name`) is found by the
    script that mentions the name, else by the first word they share (deployed_evaluate_every.json:
    deployed_round.py). The result files do not record their command line, hence the search.
    """
    scripts = [p for p in sorted((ROOT / "benchmarks").glob("*.py")) if p.stem not in ("__init__", "harness")]
    for found in (
        [p for p in scripts if all(word in stem for word in p.stem.split("_"))],
        [p for p in scripts if stem in p.read_text(encoding="utf-8")],
        [p for p in scripts if p.stem.split("_")[0] == stem.split("_")[0]],
    ):
        if found:
            return max(found, key=lambda p: len(p.stem))
    return None


def _summary(script: Path | None) -> str:
    if script is None:
        return ""
    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _machine(machine: dict) -> str:
    parts = [f"{machine['cpus']} CPUs" if machine.get("cpus") else f"{machine.get('threads', '?')} threads"]
    parts.append(machine.get("cuda") or "no GPU")
    parts.append(f"torch {machine.get('torch', '?')}")
    return ", ".join(parts)


def results_table(results: Path = RESULTS) -> str:
    """A Markdown table: each result file, its script and what it measures, the machine, the date, its rows."""
    rows = [
        "| result file | measured by | what | machine | when (UTC) | rows |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        script = script_of(path.stem)
        when = datetime.fromtimestamp(data["time"], UTC).strftime("%Y-%m-%d") if "time" in data else "not recorded"
        command = f"`python -m benchmarks.{script.stem}`" if script else "?"
        what = _summary(script).replace("|", "\\|")
        rows.append(
            f"| `{path.name}` | {command} | {what} | {_machine(data.get('machine', {}))} | {when} "
            f"| {len(data.get('rows', []))} |"
        )
    return "\n".join(rows)
