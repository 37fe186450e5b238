"""The only record count a site sends under DP: the one it released in round 0 (issue 23, item 2).

An exact record count breaks add/remove-one differential privacy on its own, so under DP a site never
sends one, nor anything computed from one. Round 0 releases the site's per-class noisy counts: inside the
feature statistics (privacy.feature_stats: true), or alone (the record-counts release at privacy.count_share,
common/privacy/counts.py). Their sum, kept here, is then the site's count everywhere a reply needs one:
its weight in the server's mean (`num-examples`), fedsgd's expected batch q·n, and fedavg's Poisson rate
1/⌈ñ/batch⌉ with its steps, which every DP record carries (plan_dp); the site still trains on all its
records. All of it is post-processing of an accounted release, free. Under distributed trust the count
carries only the site's own Skellam share, so it is covered at the release's individual ε (privacy.json
`epsilon_individual`), the one that also covers the masked message.

A site that released no count in round 0 of a DP run (it joined late, or failed then) sits the run out: it
could send no weight or rate without revealing its exact count. The audit fails any size-dependent value
that is not what the released count gives (server/audit/coverage.py). Without DP nothing is promised, and
the exact count is sent as before. The site's own log keeps its exact count and timings; none leaves.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedtransfer.client.site import Site
from fedtransfer.common.privacy.fedsgd import STATS_COUNTS
from fedtransfer.common.storage import atomic


def remember_release(site: Site, run_id: str, released: dict) -> float:
    """Keep this site's released (noisy) record count of round 0 for the run's later replies; returns it."""
    # in real units under distributed trust too (integers times each tensor's quantum); a weight and a
    # divisor, so positive (clamping is post-processing)
    count = max(float(released[STATS_COUNTS].double().sum().item()), 1.0)
    atomic.write_text(_path(site, run_id), json.dumps({"run_id": run_id, "count": count}))
    return count


def released_count(site: Site, run_id: str) -> float | None:
    """The count this site released in round 0 of the run, or None where it released none (or it is unreadable)."""
    path = _path(site, run_id)
    try:
        return float(json.loads(path.read_text())["count"]) if path.is_file() else None
    except (ValueError, KeyError, TypeError):
        return None


def _path(site: Site, run_id: str) -> Path:
    return site.state_dir / "released-count" / f"{run_id}.json"
