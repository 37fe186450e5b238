"""The only record count a site sends: a DP one (issue 23, item 2).

An exact record count breaks add/remove-one differential privacy on its own, so under DP a site never
sends one. Its weight in the server's mean (`num-examples`) and fedsgd's expected batch q·n are computed
from the count it already released in round 0's feature statistics (per-class noisy counts, summed):
post-processing of an accounted release, free. Under distributed trust that count carries only the
site's own Skellam share, so it is covered at the release's individual ε (privacy.json
`epsilon_individual`), the one that also covers the masked message. A run without the statistics
release weighs every site alike (weight 1, under SecAgg+ `secagg.max_weight`: common/privacy/coverage.py
`unweighted`): no count is sent, so nothing is released. One exception is
left: fedsgd under DP without the statistics release (no shipped config) still sends its exact expected
batch q·n, which its server step divides by; releasing an accounted count there would change the
training plans. Without DP nothing is promised, and the exact count is sent as before.
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
