"""The audit report: JSON for machines, one self-contained HTML page (CSS and plots inline) for people.

The JSON holds everything the HTML shows. Both are written atomically, so a report on disk
is always a whole one.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedtransfer.common.storage import atomic
from fedtransfer.common.storage.finite_json import finite
from fedtransfer.server.audit.findings import AuditReport, SiteAudit

REPORT_NAME = "audit-report"


def report_data(report: AuditReport) -> dict[str, Any]:
    """The JSON report: everything the HTML shows, machine-readable."""
    data = asdict(report)
    data["verdict"] = "passed" if report.passed else "failed"
    data["checks"] = report.check_summary()
    data["failures"] = [asdict(f) | {"where": str(f)} for f in report.failures]
    return finite(data)


def write_report(report: AuditReport, out_dir: Path) -> tuple[Path, Path]:
    """audit-report.json and a self-contained audit-report.html (plots embedded as base64 PNG)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / f"{REPORT_NAME}.json", out_dir / f"{REPORT_NAME}.html"
    atomic.write_text(json_path, json.dumps(report_data(report), indent=2, sort_keys=True, ensure_ascii=False))
    atomic.write_text(html_path, render_html(report))
    return html_path, json_path


def fmt(value: Any, digits: int = 4) -> str:
    """A value for a table cell or a summary line: None as a dash, floats to `digits` significant digits."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _epsilon_plot(report: AuditReport) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    targets = {s.target_epsilon for s in report.sites if s.target_epsilon is not None}
    for site in report.sites:
        if site.rounds:
            rounds = [r.round for r in site.rounds]
            (line,) = ax.plot(rounds, [r.epsilon_recomputed for r in site.rounds], marker="o", label=site.name)
            claimed = [(r.round, r.epsilon_claimed) for r in site.rounds if isinstance(r.epsilon_claimed, int | float)]
            if claimed:
                ax.scatter(*zip(*claimed, strict=True), marker="x", s=60, color=line.get_color())
    for target in targets:
        ax.axhline(target, color="red", linestyle="--", label=f"target ε = {target:g}")
    ax.set(xlabel="round", ylabel="cumulative ε", title="ε per site: recomputed (line) vs claimed (×)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # a one-round run too
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def _empirical_plots(report: AuditReport) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    audited = [s for s in report.sites if s.empirical is not None and s.control is not None]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = range(len(audited))
    bars = [
        ("claimed ε (accountant)", [s.empirical.claimed_epsilon or 0.0 for s in audited], -0.27),
        ("lower bound, DP run", [s.empirical.eps_lower_bound for s in audited], 0.0),
        ("lower bound, no DP (control)", [s.control.eps_lower_bound for s in audited], 0.27),
    ]
    for label, values, shift in bars:
        ax.bar([i + shift for i in x], values, width=0.27, label=label)
    ax.set_xticks(list(x), [s.name for s in audited])
    top = max(v for _, values, _ in bars for v in values)
    ax.set(ylabel="ε", title="Empirical ε lower bound beside the claimed ε", ylim=(0, 1.6 * top + 0.1))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="upper left")
    parts = [_png(fig)]
    for site in audited:
        fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
        for ax, result, title in ((axes[0], site.empirical, "DP run"), (axes[1], site.control, "no DP (control)")):
            ax.hist([result.scores_in, result.scores_out], bins=30, label=["included", "excluded"])
            ax.set(title=f"{site.name}: canary scores, {title}", xlabel="score")
            ax.legend(fontsize="small")
        parts.append(_png(fig))
    return "".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
font-size:.92em}th{background:#f3f3f3}.pass{background:#e3f5e1;border:2px solid #3a8f35}.fail{background:#fbe4e4;
border:2px solid #b3261e}.verdict{padding:.6em 1em;font-size:1.3em;font-weight:600}
code{font-size:.9em}img{max-width:100%}td:first-child{white-space:nowrap}"""
SITE_COLUMNS = (
    "site",
    "ε claimed",
    "ε recomputed (Opacus)",
    "target ε",
    "ε against its own message (claimed / recomputed)",
    "δ",
    "accountant",
    "rounds joined",
    "rounds declined",
    "updates matched",
    "policy",
)
ROUND_COLUMNS = ("round", "noise multiplier", "sample rate", "steps", "clip norm", "ε claimed", "ε recomputed")
EMPIRICAL_COLUMNS = (
    "site",
    "replayed mechanism: what the attacker sees",
    "ε claimed in the run",
    "ε of the test training (accountant)",
    "ε lower bound, DP",
    "correct guesses",
    "ε lower bound, no DP (control)",
    "correct guesses",
    "largest provable bound",
    "verdict",
)


def _site_row(s: SiteAudit) -> tuple[Any, ...]:
    declined = "; ".join(f"{d['round']}: {d['reason']}" for d in s.rounds_declined) or "none"
    joined = ", ".join(map(str, s.rounds_joined)) or "none"
    own = (
        "– (local trust: the same ε)"
        if s.epsilon_individual_recomputed is None
        else f"{s.epsilon_individual_claimed} / {s.epsilon_individual_recomputed:.4f}"
    )
    return (
        s.name,
        s.epsilon_claimed,
        s.epsilon_recomputed,
        s.target_epsilon,
        own,
        s.delta,
        s.accountant,
        joined,
        declined,
        s.updates_matched,
        s.policy_status,
    )


def _empirical_rows(s: SiteAudit) -> list[tuple[Any, ...]]:
    """The site's canary test against its claim, and under distributed trust the own-message test against that."""
    assert s.empirical is not None and s.control is not None
    c = s.control
    tests = [(s.empirical, s.epsilon_claimed)]
    if s.own_message is not None:
        tests.append((s.own_message, s.epsilon_individual_claimed))
    return [
        (
            s.name,
            e.mechanism,
            in_run,
            e.claimed_epsilon,
            e.eps_lower_bound,
            f"{e.num_correct}/{e.num_guesses}",
            c.eps_lower_bound,
            f"{c.num_correct}/{c.num_guesses}",
            e.eps_ceiling,
            "BROKEN: the bound exceeds the claim" if e.exceeds_claim else "consistent with the claim",
        )
        for e, in_run in tests
    ]


COVERAGE_COLUMNS = ("round", "event", "kind", "name", "value", "covered_by")


def render_html(report: AuditReport) -> str:
    """One self-contained page: verdict, failures, checks, per-site privacy, rounds, empirical test, files."""
    run = html.escape(str(report.run_id))
    verdict = "PASSED" if report.passed else f"FAILED: {len(report.failures)} failure(s)"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Privacy audit {run}</title>"
        f"<style>{_CSS}</style></head><body><h1>Privacy audit of run {run}</h1><p>{html.escape(report.run_dir)}</p>",
        f"<div class='verdict {'pass' if report.passed else 'fail'}'>{html.escape(verdict)}</div>",
    ]
    if report.failures:
        items = "".join(f"<li><code>{html.escape(str(f))}</code> ({f.check})</li>" for f in report.failures)
        parts.append(f"<h2>Failed checks</h2><ol>{items}</ol>")
    checks = [
        (c["check"], c["what"], "passed" if c["passed"] else f"FAILED ({c['failures']})")
        for c in report.check_summary()
    ]
    parts.append("<h2>Checks</h2>" + _table(("check", "what it means", "result"), checks))
    head = html.escape(", ".join(report.head))
    parts.append(
        f"<h2>Sites</h2><p>Aggregation: {html.escape(report.mode)}.</p><p>Head tensors, the only ones "
        f"allowed to leave a site: <code>{head}</code></p>"
    )
    parts.append(_table(SITE_COLUMNS, [_site_row(s) for s in report.sites]))
    if any(s.rounds for s in report.sites):
        parts.append(_epsilon_plot(report))
    for s in report.sites:
        if s.rounds:
            rows = [
                (
                    r.round,
                    r.noise_multiplier,
                    r.sample_rate,
                    r.steps,
                    r.clip_norm,
                    r.epsilon_claimed,
                    r.epsilon_recomputed,
                )
                for r in s.rounds
            ]
            parts.append(f"<h3>{html.escape(s.name)}: DP parameters per round</h3>" + _table(ROUND_COLUMNS, rows))
        if s.coverage:
            rows = [tuple(c[k] for k in COVERAGE_COLUMNS) for c in s.coverage]
            parts.append(f"<h3>{html.escape(s.name)}: every value sent, and what covers it</h3>")
            parts.append(_table(COVERAGE_COLUMNS, rows))
        if s.policy is not None:
            parts.append(f"<p>{html.escape(s.name)} policy: <code>{html.escape(json.dumps(s.policy))}</code></p>")
    if report.empirical_settings is not None:
        parts.append(_empirical_section(report))
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("<h2>Files audited</h2>" + _table(("file", "SHA-256"), sorted(report.files.items())))
    return "\n".join([*parts, "</body></html>"])


def _empirical_section(report: AuditReport) -> str:
    settings = report.empirical_settings or {}
    audited = [s for s in report.sites if s.empirical is not None and s.control is not None]
    intro = (
        f"<h2>Empirical privacy test</h2><p>{settings.get('num_canaries')} canaries per site (random unit feature "
        "directions with random labels), each included with probability 1/2, trained by the run's own mechanism "
        "and DP plan over every round of the run (under distributed trust: integer rounding and Skellam shares, "
        "attacked in the SecAgg+ sum and in the site's own message). The attack guesses the k highest-scoring "
        f"canaries in and the k lowest out, k in {settings.get('guess_counts')} (Bonferroni-corrected); each bound "
        f"holds with confidence {settings.get('confidence')}. A lower bound above the claimed ε proves the "
        "implementation broken; a bound below it does not prove the claim: the true ε lies somewhere between the "
        "two. The control trains the same way without noise or clipping, showing what the attack catches when DP "
        "is absent.</p>"
    )
    if not audited:
        return intro + "<p>No site could be tested (see the notes).</p>"
    rows = [row for s in audited for row in _empirical_rows(s)]
    return intro + _table(EMPIRICAL_COLUMNS, rows) + _empirical_plots(report)
