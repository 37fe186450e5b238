"""What joining gave this site: its collaboration report (collaboration.json and collaboration.html in its folder).

Why: the first question a site's data-protection officer asks is whether joining pays. The answer is on the
site's own test split: going alone, the global model, and the final model the site chose (client/site_model/final.py),
each with the number of records it was measured on and a 95% bootstrap interval, then which candidate was
chosen and why. It is written in the site's own folder and nothing of it is sent: the scores of a site's
own records are the site's business (a server that wants, say, the mean gain may only learn it through a DP
release of evaluation results).
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fedtransfer.client.site_model.final import FinalModel
from fedtransfer.common.model.head import macro_auroc
from fedtransfer.common.model.threshold import POSITIVE, Threshold, decide
from fedtransfer.common.storage import atomic
from torch import nn

REPORT_JSON, REPORT_HTML = "collaboration.json", "collaboration.html"
RESAMPLES = 200  # bootstrap resamples of the test split for each interval


def probabilities(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(x.float().cpu()).softmax(1).double().numpy()


def _metrics(truth: np.ndarray, probs: np.ndarray, threshold: float | None = None) -> dict[str, float | None]:
    predicted = decide(probs, threshold)
    recall = [float((predicted[truth == c] == c).mean()) for c in np.unique(truth)]
    return {
        "accuracy": float((predicted == truth).mean()),
        "balanced_accuracy": float(np.mean(recall)),
        "auroc": macro_auroc(truth, probs),
    }


def scored(truth: np.ndarray, probs: np.ndarray, seed: int = 0, threshold: float | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy and AUROC on `truth`, each with its 95% bootstrap interval and the record count.

    `threshold`: a binary model's decision threshold (None: argmax). A binary score also counts the records
    predicted positive: 8 of 476 says at once that a model never flags anyone.
    """
    point = _metrics(truth, probs, threshold)
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(truth), len(truth)) for _ in range(RESAMPLES)]
    samples = [_metrics(truth[d], probs[d], threshold) for d in draws]
    out: dict[str, Any] = {"records": len(truth)}
    if probs.shape[1] == 2:
        out["predicted_positive"] = int((decide(probs, threshold) == POSITIVE).sum())
        out["threshold"] = 0.5 if threshold is None else threshold
    for key, value in point.items():
        values = [s[key] for s in samples if s[key] is not None]
        interval = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None
        out[key] = {"value": value, "interval95": None if value is None else interval}
    return out


def build_report(
    *,
    site: str,
    run_id: str,
    server_round: int,
    final: FinalModel,
    global_model: nn.Module,
    test: tuple,
    threshold: Threshold | None = None,
) -> dict[str, Any]:
    """The report's content: own-test scores of alone, global and final, and the choice with its reason.

    A binary final model is scored at its own threshold (client/site_model/threshold.py) and, beside it, at argmax
    (`final_argmax`), so the site sees what the threshold changed; alone and global stay at argmax.
    """
    x, y = test
    truth = y.cpu().numpy()
    models = {"alone": final.alone, "global": global_model, "final": final.model}
    probs = {name: None if m is None else probabilities(m, x) for name, m in models.items()}
    scores = {name: None if p is None else scored(truth, p) for name, p in probs.items()}
    if threshold is not None:
        scores["final_argmax"] = scores["final"]
        scores["final"] = scored(truth, probs["final"], threshold=threshold.value)
    return {
        "site": site,
        "run_id": run_id,
        "round": server_round,
        "test_records": len(truth),
        "scores": scores,
        "positives": int((truth == POSITIVE).sum()) if threshold is not None else None,
        "threshold": None if threshold is None else threshold.as_dict(),
        "chosen": final.chosen,
        "reason": final.reason,
        "validation": [asdict(c) for c in final.candidates],
        "sent": "nothing: this report and the final model stay in the site's folder",
    }


def write_report(folder: Path, report: dict[str, Any]) -> Path:
    """collaboration.json and collaboration.html in `folder`, written atomically; returns the JSON's path."""
    atomic.write_text(folder / REPORT_HTML, render_html(report))
    path = folder / REPORT_JSON
    atomic.write_text(path, json.dumps(report, indent=2) + "\n")
    return path


def read_report(folder: Path) -> dict[str, Any] | None:
    """A site folder's collaboration report, or None where it has none (yet)."""
    path = folder / REPORT_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cell(score: dict[str, Any] | None) -> str:
    if score is None or score["value"] is None:
        return "–"
    low, high = score["interval95"] or (score["value"], score["value"])
    return f"{score['value']:.3f} <small>[{low:.3f}, {high:.3f}]</small>"


def render_html(report: dict[str, Any]) -> str:
    """A small self-contained page (no script, no outside resource) a site's staff can open offline."""
    e = html.escape
    rows = "".join(
        f"<tr><th>{e(name)}</th>"
        + "".join(f"<td>{_cell(None if s is None else s[k])}</td>" for k in ("accuracy", "balanced_accuracy", "auroc"))
        + "</tr>"
        for name, s in report["scores"].items()
    )
    val = "".join(
        f"<tr><th>{e(c['name'])}</th><td>{c['loss']:.4f}</td><td>{c['accuracy']:.3f}</td><td>{c['records']}</td>"
        f"<td>{c.get('kept', 1.0):.0%}</td></tr>"
        for c in report["validation"]
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Collaboration report: "
        f"{e(report['site'])}</title><style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}</style>"
        f"</head><body><h1>What joining gave {e(report['site'])}</h1>"
        f"<p>Run {e(report['run_id'])}, round {report['round']}. Scores on this site's own test split "
        f"({report['test_records']} records), with 95% bootstrap intervals.</p>"
        "<table><tr><th>model</th><th>accuracy</th><th>balanced accuracy</th><th>AUROC</th></tr>"
        f"{rows}</table><h2>Chosen: {e(report['chosen'])}</h2><p>{e(report['reason'])}.</p>"
        "<h2>Candidates on the validation split (held out of the training split)</h2>"
        "<table><tr><th>candidate</th><th>loss</th><th>accuracy</th><th>records</th>"
        "<th>keeps global on rare classes</th></tr>"
        f"{val}</table>{_threshold_html(report)}<p>{e(report['sent'])}.</p></body></html>\n"
    )


def _threshold_html(report: dict[str, Any]) -> str:
    """The final model's decision threshold, its rule and what it was chosen on, and what it changed on test."""
    t = report.get("threshold")
    if not t:
        return ""
    s = report["scores"]
    flagged = ", ".join(
        f"{name} {s[name]['predicted_positive']}" for name in ("global", "final_argmax", "final") if s.get(name)
    )
    return (
        f"<h2>Decision threshold: {t['value']:.4f}</h2><p>Rule {html.escape(t['rule'])}, chosen on "
        f"{html.escape(t['chosen_on'])}. On the test split ({report['positives']} positive of "
        f"{report['test_records']}), records predicted positive: {html.escape(flagged)}.</p>"
    )


def summary_lines(sites_dir: Path, run_id: str) -> list[str]:
    """One line per site of a simulated run: its own-test accuracy alone, global and final, from its report,
    each with its 95% bootstrap interval and the test split's record count.

    Simulation only, where every site's folder is on this machine (`output_dir/sites/`); a deployed site's
    report stays in its own folder. A site without a report of this run (it kept no final model) is left out.
    """
    lines = []
    for folder in sorted(p for p in sites_dir.glob("*") if p.is_dir()):
        report = read_report(folder)
        if report is None or report.get("run_id") != run_id:
            continue
        s = report["scores"]
        shown = ", ".join(
            f"{name} {_text(s[name]['accuracy'])}" for name in ("alone", "global", "final") if s.get(name)
        )
        t, final = report.get("threshold"), s.get("final") or {}
        at = ""
        if t and "predicted_positive" in final:
            at = (
                f"; final at threshold {t['value']:.3f}: balanced accuracy {_text(final['balanced_accuracy'])}, "
                f"{final['predicted_positive']} predicted positive ({report.get('positives')} are)"
            )
        lines.append(
            f"{report['site']}: own test split ({report['test_records']} records) accuracy {shown}{at} "
            f"(final: {report['chosen']}; {folder / REPORT_HTML})"
        )
    return lines


def _text(score: dict[str, Any]) -> str:
    """`0.800 [0.700, 0.900]`: a report's score with its bootstrap interval (`-` where it has no value)."""
    if score.get("value") is None:
        return "-"
    interval = score.get("interval95")
    return f"{score['value']:.3f}" + ("" if not interval else f" [{interval[0]:.3f}, {interval[1]:.3f}]")
