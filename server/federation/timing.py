"""Where a round's time goes, as the server sees it (issue 25, item 3): push, pickup, work, reply.

A deployed round was 7.2 s against 0.59 s simulated, and an operator had no way to tell whether
the SuperLink, the polling, or one slow site was to blame. Every exchange of a round (training,
federated evaluation, each SecAgg+ stage) passes through `sites.send_and_receive`, which notes
here what the server observes anyway:

* `push_s`: the server's push of the round's messages to the SuperLink (server clock);
* per site, `roundtrip_s`: from the end of that push to the pull that brought the site's reply
  (server clock; the server pulls every 0.05-0.25 s, so this is late by at most one pause);
* the reply's `created_at`, which Flower stamps at the site when its ClientApp builds the reply,
  splits the round trip into `at_site_s` (push to reply built: pickup, ClientApp start, work)
  and `reply_s` (reply built to reply pulled: upload, SuperLink, the server's pull). It is the
  site's clock: with clocks more than a few ms apart (no NTP) the split shifts by the skew,
  `roundtrip_s` does not.
* `work_s`: the training time the site itself released (`train_s`, rounded to 0.1 ms by the
  site); `pickup_s` is then `at_site_s - work_s`. Nothing finer leaves the site: its own log
  keeps the detail (Flower's SuperNode logs each message it receives and sends).

The recorder takes the round's notes once per round (`take`) into metrics.jsonl's `timing`, and
`summary` gives status.json the per-site medians, naming the slowest site.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedtransfer.common.wire.protocol import site_of
from flwr.app import Message

_PARTS = ("roundtrip_s", "at_site_s", "reply_s", "pickup_s", "work_s")


@dataclass
class Exchange:
    """One push and its replies: the server's clock at the push's end, and what came back when."""

    kind: str
    push_s: float
    pushed_at: float = field(default_factory=time.time)
    sites: dict[str, dict[str, float]] = field(default_factory=dict)

    def arrived(self, replies: Iterable[Message], sent_to: Mapping[str, int]) -> None:
        now = time.time()
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            name = (None if reply.has_error() else site_of(reply.content)) or f"node-{node}"
            created = float(reply.metadata.created_at)
            self.sites[name] = {
                "roundtrip_s": now - self.pushed_at,
                "at_site_s": created - self.pushed_at,
                "reply_s": now - created,
            }

    def record(self, work: Mapping[str, float]) -> dict[str, Any]:
        """This exchange for metrics.jsonl, with each site's released training time where it gave one."""
        sites = {}
        for name, part in sorted(self.sites.items()):
            if self.kind == "train" and name in work:
                part = part | {"work_s": work[name], "pickup_s": part["at_site_s"] - work[name]}
            sites[name] = {k: round(v, 3) for k, v in part.items()}
        return {"kind": self.kind, "push_s": round(self.push_s, 3), "sites": sites}


_ROUND: list[Exchange] = []  # this ServerApp process's exchanges since the last `take`


def pushed(grid_push: Any, messages: list[Message], kind: str) -> tuple[list[str], Exchange]:
    """Push `messages` with `grid_push`, timing it; the exchange is noted for this round."""
    t0 = time.perf_counter()
    ids = list(grid_push(messages))
    exchange = Exchange(kind, time.perf_counter() - t0)
    _ROUND.append(exchange)
    return ids, exchange


def take(work: Mapping[str, float]) -> list[dict[str, Any]]:
    """The exchanges noted since the last call, as metrics.jsonl records them; the notes start afresh."""
    out = [e.record(work) for e in _ROUND]
    _ROUND.clear()
    return out


def summary(metrics: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """status.json's view: the median of each part per site over the run's rounds, and the slowest site."""
    pushes: list[float] = []
    parts: dict[str, dict[str, list[float]]] = {}
    for line in metrics:
        for exchange in line.get("timing") or []:
            pushes.append(exchange["push_s"])
            for name, part in exchange["sites"].items():
                for key, value in part.items():
                    parts.setdefault(name, {}).setdefault(key, []).append(value)
    if not pushes:
        return None
    sites = {
        name: {key: round(statistics.median(got[key]), 3) for key in _PARTS if key in got}
        for name, got in sorted(parts.items())
    }
    slowest = max(sites, key=lambda n: sites[n].get("roundtrip_s", 0.0)) if sites else None
    return {"push_s": round(statistics.median(pushes), 3), "sites": sites, "slowest_site": slowest}
