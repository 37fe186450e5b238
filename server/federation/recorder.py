"""Everything a run writes, in one place: audit log, metrics.jsonl, privacy.json, checkpoints, plots, status.

The round loop decides; the recorder writes. Order matters for a crash at any point: the
checkpoint is written before the round's metrics line (a resume truncates lines past the
checkpoint), and `status.json` is written last, so a folder without it is a run that did
not finish.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.model.intervals import described_accuracy
from fedtransfer.common.model.threshold import Threshold
from fedtransfer.common.privacy.counts import round_zero_release
from fedtransfer.common.privacy.mechanisms import mechanism_for
from fedtransfer.common.storage import atomic
from fedtransfer.common.storage.audit_log import AuditLog, update_digest
from fedtransfer.common.storage.finite_json import finite
from fedtransfer.common.wire.protocol import Event, SiteStatus
from fedtransfer.server.federation import checkpoint, report, timing, tracking
from fedtransfer.server.federation.rounds import TrainRound
from fedtransfer.server.federation.sites import SiteRound
from flwr.common.logger import log

STATUS = "status.json"
_NOT_TRAINED = (SiteStatus.DECLINED, SiteStatus.REFUSED, SiteStatus.FAILED)  # logged as update-refused


@dataclass(frozen=True)
class RoundReport:
    """What the loop knows at the end of a round."""

    rnd: int
    train: TrainRound
    absent: dict[str, SiteRound]  # known sites that were not asked
    head: dict[str, np.ndarray]  # the global head after the round
    strategy_state: dict
    server: dict[str, float]  # accuracy and loss on the server's hold-out
    federated: dict[str, float] | None
    seconds: float
    bytes_sent_per_site: int  # the global head as it travels to each site next round (wire_bytes)
    evaluated: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> its evaluation release's DP record
    # the model round `federated` and `evaluated` are of: None, this round's; the round before, when this
    # round's training replies carried its evaluation (server/federation/evaluation.py)
    scored_round: int | None = None


class RunRecorder:
    """The run folder's writer for one run id; `sites` is the per-site privacy record a checkpoint carries."""

    def __init__(self, cfg: RunConfig, run_id: str, sites: dict[str, Any]) -> None:
        self.cfg, self.run_dir, self.run_id, self.sites = cfg, cfg.output_path, run_id, sites
        self.audit = AuditLog(self.run_dir / "audit.jsonl")

    def started(self, start: int, resumed: bool, encoder: dict[str, Any], head: list[str]) -> None:
        if not resumed:
            # another run's; this folder is ours now (locked)
            for stale in ("metrics.jsonl", "model.pt", "class-counts.json"):
                (self.run_dir / stale).unlink(missing_ok=True)
        mechanism = mechanism_for(self.cfg)
        trust: dict[str, Any] = {"trust": mechanism.trust}
        if mechanism.distributed:  # each site adds μ/(K_min − t): the plan for the fewest survivors, t colluding
            trust["min_survivors"] = self.cfg.secagg.fewest_survivors(self.cfg.train.min_sites)
            trust["colluding_sites"] = self.cfg.privacy.colluding_sites
        self.audit.append(
            Event.RUN_RESUMED if resumed else Event.RUN_STARTED,
            run_id=self.run_id,
            round=start,
            **encoder,
            head=head,
            **trust,
        )

    def round_done(self, r: RoundReport) -> dict[str, Any]:
        """Audit records, checkpoint, metrics line and privacy.json for one round; returns the metrics line."""
        masked = {"masked": True} if self.cfg.secure_aggregation else {}
        for site, digest in r.train.received:
            self.audit.append(
                Event.UPDATE_RECEIVED, run_id=self.run_id, round=r.rnd, site=site, update=digest, **masked
            )
        everyone = r.train.sites | r.absent
        self._refusals(r)
        secure = {"secure_aggregation": {"halted": r.train.halted} | asdict(self.cfg.secagg)}
        self.audit.append(
            Event.ROUND_AGGREGATED,
            run_id=self.run_id,
            round=r.rnd,
            sites=r.train.trained,
            aggregated=r.train.arrays is not None,
            aggregate=update_digest(r.head),
            **(secure if self.cfg.secure_aggregation else {}),
        )
        for site, part in everyone.items():
            rec = self.sites.setdefault(site, {"rounds": []})
            release = round_zero_release(self.cfg.privacy) if r.rnd == 0 else "training"  # round 0: its release
            rec["rounds"].append(part.as_record(r.rnd) | {"release": release})
            if part.status == SiteStatus.TRAINED:
                rec["accountant"] = part.fields.get("accountant", "none")
                rec["delta"] = part.fields.get("delta")
        scored = r.rnd if r.scored_round is None else r.scored_round
        self._evaluated(scored, r.evaluated)
        if scored != r.rnd:  # the line of the model scored is amended before the checkpoint moves past it
            self._federated(scored, r.federated)
        checkpoint.save(self.run_dir, checkpoint.Checkpoint(self.run_id, r.rnd, r.head, r.strategy_state, self.sites))
        line = {
            "round": r.rnd,
            "time_s": round(r.seconds, 3),
            "server": r.server,
            "federated": r.federated if scored == r.rnd else None,  # else: with the next round's replies
            "sites": {n: p.as_record() for n, p in sorted(everyone.items())},
            "sites_trained": len(r.train.trained),
            "aggregated": r.train.arrays is not None,
            "bytes_received": r.train.bytes_received,
            "bytes_sent_per_site": r.bytes_sent_per_site,
        }
        work = {n: p.fields["train_s"] for n, p in r.train.sites.items() if "train_s" in p.fields}
        if exchanges := timing.take(work):  # push, pickup, work and reply of each exchange (timing.py)
            line["timing"] = exchanges
        report.append_metrics(self.run_dir, line)
        report.write_privacy(self.run_dir, self.run_id, self.sites)
        tracking.round_done(self.cfg, self.run_id, line)
        return line

    def _refusals(self, r: RoundReport) -> None:
        """A site that refused or failed: in the audit log with its reason; one that did not reply: a warning."""
        for site, part in sorted(r.train.sites.items()):
            if part.status in _NOT_TRAINED:
                self.audit.append(
                    Event.UPDATE_REFUSED,
                    run_id=self.run_id,
                    round=r.rnd,
                    site=site,
                    status=str(part.status),
                    reason=part.reason,
                )
                log(WARNING, "round %d: site %s %s: %s", r.rnd, site, part.status, part.reason)
            elif part.status == SiteStatus.NO_REPLY:
                log(WARNING, "round %d: site %s did not reply: %s", r.rnd, site, part.reason)

    def scored(self, rnd: int, federated: dict[str, Any] | None, evaluated: dict[str, dict[str, Any]]) -> None:
        """The final model's evaluation (its exchange of its own, after round `rnd`): its metrics line amended,
        privacy.json's evaluation releases. No checkpoint: a resumed run asks again, and the sites answer from
        their reply cache, so the releases are recorded once from round `rnd`'s checkpoint."""
        self._evaluated(rnd, evaluated)
        self._federated(rnd, federated, timing.take({}))  # the exchange's timing joins round `rnd`'s
        report.write_privacy(self.run_dir, self.run_id, self.sites)

    def _evaluated(self, rnd: int, evaluated: dict[str, dict[str, Any]]) -> None:
        for site, fields in sorted(evaluated.items()):  # the evaluation releases, accounted apart (report.py)
            self.sites.setdefault(site, {"rounds": []}).setdefault("evaluation", []).append({"round": rnd, **fields})

    def _federated(
        self, rnd: int, federated: dict[str, Any] | None, exchanges: list[dict[str, Any]] | None = None
    ) -> None:
        """The federated metrics of model `rnd`, into its metrics.jsonl line (and the tracking store)."""
        if federated is None and not exchanges:
            return
        report.set_federated(self.run_dir, rnd, federated, exchanges)
        if federated is not None:
            tracking.round_done(self.cfg, self.run_id, {"round": rnd, "server": {}, "federated": federated})

    def failed_rounds(self) -> list[int]:
        """Rounds of this run that left the global head unchanged (too few sites, or SecAgg+ halted)."""
        return [m["round"] for m in report.read_metrics(self.run_dir) if not m.get("aggregated", False)]

    def finish(
        self,
        head: dict[str, np.ndarray],
        accuracy: float,
        model_path: Path | None,
        failure: str | None,
        *,
        threshold: Threshold | None = None,
    ) -> dict[str, Any]:
        """Plots, the model-exported or run-failed record, and status.json, last.

        `threshold`: a binary global model's decision threshold, which status.json names with its reason.
        """
        metrics = report.read_metrics(self.run_dir)
        report.write_plots(self.run_dir, metrics, self.cfg.privacy.target_epsilon if self.cfg.privacy.enabled else None)
        rounds = self.cfg.train.rounds
        aggregated = [m["round"] for m in metrics if m.get("aggregated")]
        summary: dict[str, Any] = {
            "run_id": self.run_id,
            "final_accuracy": accuracy,
            "rounds_aggregated": aggregated,
            "final_metrics": metrics[-1]["server"] if metrics else None,
        }  # the hold-out's
        if (where := timing.summary(metrics)) is not None:  # per site, the median push/pickup/work/reply
            summary["timing"] = where
        if threshold is not None:
            summary["threshold"] = threshold.as_dict()
        if failure is None and model_path is not None:
            self.audit.append(
                Event.MODEL_EXPORTED, run_id=self.run_id, round=rounds, path=str(model_path), head=update_digest(head)
            )
            summary = {"status": "completed", **summary, "model": str(model_path)}
            log(
                INFO,
                "Run %s finished: server hold-out accuracy %s; model exported to %s",
                self.run_id,
                described_accuracy(accuracy, summary["final_metrics"]),
                model_path,
            )
        else:
            self.audit.append(Event.RUN_FAILED, run_id=self.run_id, round=rounds, reason=failure)
            summary = {"status": "failed", **summary, "reason": failure}
            log(WARNING, "Run %s FAILED: %s; no model exported", self.run_id, failure)
        atomic.write_text(self.run_dir / STATUS, json.dumps(finite(summary), indent=2))
        tracking.finished(self.cfg, self.run_id, self.run_dir, summary)
        return summary
