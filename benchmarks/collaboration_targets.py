"""Issue 29's "done when", checked against benchmarks/collaboration.py's results: which targets are met, site by site.

The targets (ε = 3, mean ± standard error over the seeds; `final` is a site's final model, `alone` its own model):
- label skew (`demo`, `dirichlet`): every site's final model at least as good as alone on its own test split
  (within one standard error) and at least 10 points better than alone on the other sites' data;
- 4 IID sites (`iid4`): at least as good as alone on its own test split and on the others' (within one SE);
- small sites (`small`): every site with at most 200 training records gains at least 5 points on its own test split;
- the bank table and the text demo (`bank`, `text`, AUROC): the median site's final model at least as good as
  alone.

    .venv/bin/python -m benchmarks.collaboration_targets [benchmarks/results/collaboration*.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.harness import DEFAULT_RESULTS


def _site_checks(fed: str, r: dict) -> list[tuple[str, bool]]:
    own_ok = r["gain_own"] + r["gain_own_se"] >= 0
    if fed in ("demo", "dirichlet"):
        return [("own >= alone - SE", own_ok), ("others >= alone + 10 pts", r["gain_others"] >= 0.10)]
    if fed in ("iid4", "iid16"):
        return [("own >= alone - SE", own_ok), ("others >= alone - SE", r["gain_others"] + r["gain_others_se"] >= 0)]
    if fed == "small" and r["train"] <= 200:
        return [("own >= alone + 5 pts", r["gain_own"] >= 0.05)]
    return []


def verdicts(rows: list[dict], epsilon: float = 3.0) -> list[str]:
    """One line per site and target, then one per federation and trust: met or not, with the figures behind it.

    Each (federation, trust) is judged on its own: a results file may hold both trusts of one federation.
    """
    lines = []
    groups = sorted({(r["federation"], r.get("trust", "local")) for r in rows if r["epsilon"] == epsilon})
    for fed, trust in groups:
        rs = [r for r in rows if (r["federation"], r.get("trust", "local"), r["epsilon"]) == (fed, trust, epsilon)]
        name = f"{fed} ({trust})"
        if fed in ("bank", "text"):
            median = float(np.median([r["gain_own"] for r in rs]))
            lines.append(
                f"{name}: median site final - alone AUROC {median:+.4f}: {'met' if median >= 0 else 'NOT met'}"
            )
            continue
        results = []
        for r in rs:
            for target, ok in _site_checks(fed, r):
                results.append(ok)
                lines.append(
                    f"{name} site {r['site']} ({r['train']} records) {target}: {'met' if ok else 'NOT met'} "
                    f"(own {r['gain_own']:+.3f} ± {r['gain_own_se']:.3f}, "
                    f"others {r['gain_others']:+.3f} ± {r['gain_others_se']:.3f}, chosen {r['chosen']})"
                )
        lines.append(f"{name}: {sum(results)} of {len(results)} site targets met")
    return lines


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or sorted(DEFAULT_RESULTS.glob("collaboration*.json"))
    rows = [row for p in paths for row in json.loads(p.read_text())["rows"]]
    print("\n".join(verdicts(rows)))


if __name__ == "__main__":
    main()
