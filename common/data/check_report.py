"""The data check's report: JSON for machines and one self-contained HTML page, as the audit writes its own.

Both are written atomically beside each other and hold the same facts; neither holds an identifier
(persons are counts and the site's salted pseudonyms, files are paths under the site's own folder).
The report stays at the site: nothing here sends anything.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedtransfer.common.data.check import DataCheck
from fedtransfer.common.storage import atomic

REPORT_NAME = "data-check"
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
font-size:.92em}th{background:#f3f3f3}.pass{background:#e3f5e1;border:2px solid #3a8f35}.fail{background:#fbe4e4;
border:2px solid #b3261e}.verdict{padding:.6em 1em;font-size:1.3em;font-weight:600}code{font-size:.9em}"""


def report_data(report: DataCheck) -> dict[str, Any]:
    """Everything the HTML shows, plus the verdict."""
    return asdict(report) | {"verdict": "clean" if report.clean else "errors"}


def write_check(report: DataCheck, out_dir: Path) -> tuple[Path, Path]:
    """data-check.json and data-check.html in `out_dir`; (html, json)."""
    json_path, html_path = out_dir / f"{REPORT_NAME}.json", out_dir / f"{REPORT_NAME}.html"
    atomic.write_text(json_path, json.dumps(report_data(report), indent=2, sort_keys=True, ensure_ascii=False))
    atomic.write_text(html_path, render_html(report))
    return html_path, json_path


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('–' if c is None else str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _list(title: str, items: list[str]) -> str:
    return f"<h2>{html.escape(title)}</h2><ol>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ol>"


def render_html(report: DataCheck) -> str:
    """One page: verdict, errors, warnings, records per split and class, then what the files are."""
    verdict = "CLEAN" if report.clean else f"ERRORS: {len(report.errors)}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Data check</title><style>{_CSS}</style></head>"
        f"<body><h1>Data check: {html.escape(report.source)} data of {html.escape(report.config)}</h1>",
        f"<div class='verdict {'pass' if report.clean else 'fail'}'>{html.escape(verdict)}</div>",
        "<p>Computed at this site; nothing was sent.</p>",
    ]
    if report.errors:
        parts.append(_list("Errors (fix these before joining)", report.errors))
    if report.warnings:
        parts.append(_list("Warnings", report.warnings))
    classes = report.classes
    rows = [
        (name, s["records"], s["persons"], *(s["per_class"].get(c, 0) for c in classes))
        for name, s in report.splits.items()
    ]
    parts.append("<h2>Records per split and class</h2>" + _table(("split", "records", "persons", *classes), rows))
    if report.window is not None:
        parts.append(f"<p>Window asked for (data.window): <code>{html.escape(report.window)}</code></p>")
    for title, counts in (
        ("Image sizes (rows x columns)", report.image_sizes),
        ("Bits stored", report.bit_depths),
        ("Window each file was shown through", report.windows_used),
        ("Transfer syntaxes", report.syntaxes),
    ):
        if counts:
            parts.append(f"<h2>{html.escape(title)}</h2>" + _table(("value", "files"), sorted(counts.items())))
    return "\n".join([*parts, "</body></html>"])
