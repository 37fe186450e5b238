"""What a run leaves behind for people: metrics per round, privacy per site, plots.

`metrics.jsonl` gets one line per round as the round ends; `privacy.json` and the plots
are rewritten after every round, so a run stopped at any point still explains itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedtransfer.common.privacy.calibration import epsilon_of
from fedtransfer.common.privacy.mechanisms import event_of
from fedtransfer.common.storage import atomic
from fedtransfer.common.storage.finite_json import finite
from fedtransfer.common.wire.protocol import DPRecord


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """One durable line per round (append + fsync): a crash loses at most the line in flight."""
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(finite(record), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, last_round: int) -> None:
    """On resume, drop lines of rounds after the checkpoint: they will be run again."""
    kept = [r for r in read_metrics(run_dir) if r["round"] <= last_round]
    atomic.write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def set_federated(
    run_dir: Path, rnd: int, federated: dict[str, Any] | None, timing: list[dict[str, Any]] | None = None
) -> None:
    """Round `rnd`'s federated metrics, which arrive a round later (server/federation/evaluation.py): its line
    rewritten with them (and `timing`, the final evaluation's exchange), the file replaced atomically (a crash
    leaves the line as it was, or as it is now)."""
    lines = read_metrics(run_dir)
    for line in lines:
        if line["round"] == rnd:
            line["federated"] = federated if federated is not None else line.get("federated")
            if timing:
                line["timing"] = [*(line.get("timing") or []), *timing]
    text = "".join(json.dumps(finite(r), sort_keys=True) + "\n" for r in lines)
    atomic.write_text(run_dir / "metrics.jsonl", text)


def privacy_report(sites: dict[str, Any]) -> dict[str, Any]:
    """Per site: the ε the site reported, and the ε recomputed here from its per-round DP parameters.

    The two must agree: the server recomputes with Opacus' accountant over every round the
    site trained in, which is how an auditor checks a site's claim without trusting it.
    """
    out: dict[str, Any] = {}
    for name, rec in sorted(sites.items()):
        trained = [r for r in rec["rounds"] if r["status"] == "trained"]
        accountant, delta = rec.get("accountant", "none"), rec.get("delta")
        history = [
            event_of(DPRecord.from_mapping(r | {"delta": delta, "accountant": accountant}))
            for r in trained
            if "noise_multiplier" in r
        ]
        recomputed = epsilon_of(history, delta, accountant) if history and delta else None
        out[name] = {
            "epsilon": trained[-1].get("epsilon") if trained else 0.0,
            "epsilon_recomputed": recomputed,
            **_individual(trained, history, delta, accountant),
            "delta": delta,
            "accountant": accountant,
            "noise_multiplier": trained[-1].get("noise_multiplier") if trained else None,
            "sample_rate": trained[-1].get("sample_rate") if trained else None,
            "clip_norm": trained[-1].get("clip_norm") if trained else None,
            "steps": sum(r["steps"] for r in trained),
            "rounds_trained": [r["round"] for r in trained],
            "rounds_declined": [
                {"round": r["round"], "reason": r.get("reason", "")} for r in rec["rounds"] if r["status"] != "trained"
            ],
            "per_round": rec["rounds"],
        }
        if rec.get("evaluation"):
            out[name]["evaluation"] = evaluation_report(rec["evaluation"])
    return out


COMPOSITION = (
    "Each site's training ε (epsilon) covers its training records; its evaluation ε (evaluation.epsilon) "
    "covers its test records. The two splits are disjoint (under privacy.unit: user, a site whose persons "
    "are on both sides declines to evaluate), so by parallel composition a record is protected by the one "
    "ε of its split: the two do not add, and the site's ε over the whole run is the larger of them."
)


def evaluation_report(releases: list[dict[str, Any]]) -> dict[str, Any]:
    """A site's evaluation releases: the ε it reported and the ε recomputed here from their DP records."""
    noised = [r for r in releases if "noise_multiplier" in r]
    if not noised:
        return {"releases": len(releases), "epsilon": 0.0, "epsilon_recomputed": None, "rounds": releases}
    delta, accountant = noised[-1]["delta"], noised[-1]["accountant"]
    history = [event_of(DPRecord.from_mapping(r)) for r in noised]
    individual = {}  # distributed trust: the masked releases' ε against the site's own messages too
    if "epsilon_individual" in noised[-1]:
        individual = {
            "epsilon_individual": noised[-1]["epsilon_individual"],
            "epsilon_individual_recomputed": epsilon_of(history, delta, accountant, individual=True),
        }
    return individual | {
        "releases": len(releases),
        "epsilon": noised[-1].get("epsilon"),
        "epsilon_recomputed": epsilon_of(history, delta, accountant),
        "delta": delta,
        "accountant": accountant,
        "noise_multiplier": noised[-1]["noise_multiplier"],
        "composition": noised[-1].get("composition"),
        "rounds": releases,
    }


def _individual(trained: list[dict[str, Any]], history: list[Any], delta: Any, accountant: str) -> dict[str, Any]:
    """Distributed trust's second ε, against one site's own message (claimed and recomputed), and the t colluding
    sites its aggregate ε was planned for; {} under local trust."""
    if not trained or "epsilon_individual" not in trained[-1]:
        return {}
    return {
        "epsilon_individual": trained[-1]["epsilon_individual"],
        "epsilon_individual_recomputed": epsilon_of(history, delta, accountant, individual=True),
        "colluding_sites": int(trained[-1].get("colluding_sites", 0)),  # t the aggregate's ε holds against
    }


def write_privacy(run_dir: Path, run_id: str, sites: dict[str, Any]) -> dict[str, Any]:
    report = {"run_id": run_id, "composition": COMPOSITION, "sites": privacy_report(sites)}
    atomic.write_text(run_dir / "privacy.json", json.dumps(finite(report), indent=2, sort_keys=True))
    return report


def write_plots(run_dir: Path, metrics: list[dict[str, Any]], target_epsilon: float | None) -> list[Path]:
    """accuracy.png and epsilon.png: what people look at first."""
    return [
        _save(accuracy_figure(metrics), run_dir / "accuracy.png"),
        _save(epsilon_figure(metrics, target_epsilon), run_dir / "epsilon.png"),
    ]


def accuracy_figure(metrics: list[dict[str, Any]]) -> Any:
    """Server hold-out and federated accuracy by round."""
    fig, ax = _round_axes()
    ax.plot(
        [m["round"] for m in metrics], [m["server"]["accuracy"] for m in metrics], marker="o", label="server hold-out"
    )
    fed = [(m["round"], m["federated"]["accuracy"]) for m in metrics if m.get("federated")]
    if fed:
        ax.plot(*zip(*fed, strict=True), marker="s", label="sites' test splits (federated)")
    ax.set(ylabel="accuracy", title="Accuracy by round", ylim=(0, 1))
    ax.legend()
    return fig


def epsilon_figure(metrics: list[dict[str, Any]], target_epsilon: float | None) -> Any:
    """Cumulative ε per site by round, against the target."""
    fig, ax = _round_axes()
    names = sorted({n for m in metrics for n in m["sites"]})
    for name in names:
        pts = [
            (m["round"], m["sites"][name]["epsilon"])
            for m in metrics
            if m["sites"].get(name, {}).get("epsilon") is not None
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=name)
    if target_epsilon is not None:
        ax.axhline(target_epsilon, color="red", linestyle="--", label=f"target ε = {target_epsilon:g}")
    ax.set(ylabel="ε spent (cumulative)", title="Privacy spent per site")
    ax.set_ylim(bottom=0)
    if names:
        ax.legend(fontsize="small")
    return fig


def _round_axes() -> tuple[Any, Any]:
    """A figure whose x axis is the round, ticked at whole rounds only (a one-round run too): no round 1.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
