"""What the audit reads, finds and reports: the records every step of `fedtransfer audit` shares.

Evidence is what was read from disk; Findings collects the failures and notes of every
check in turn; SiteAudit and AuditReport are what the report shows. Every failure names
the file, and the line when there is one, so a reader can go straight to the evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtransfer.common.config.run import RunConfig

SERVER_LOG = "audit.jsonl"
CHECKS = {
    "chains": "audit logs are intact hash chains",
    "updates": "every update the server used was sent by that site, with the same hash",
    "head-only": "only head tensors left a site (under secure aggregation: masked, plus the masked weight)",
    "secure-aggregation": "the run's mode held throughout: masked vectors only when secure_aggregation is on",
    "completion": "the run completed, every round aggregated at least train.min_sites sites; model.pt is the "
    "exported head",
    "privacy": "ε recomputed from the DP parameters equals each site's claim and is within target",
    "trust": "under privacy.trust: distributed, every site logged adding its noise share, planned for the fewest "
    "sites SecAgg+ unmasks, and its ε against its own message is recomputed",
    "policy": "each site's own policy was respected",
    "empirical": "empirical ε lower bound, from a replay of the run's own mechanism and plan, does not exceed the "
    "claimed ε (under distributed trust: against the aggregate and against a site's own message)",
    "coverage": "every value a site sent is covered by a named DP release, its DP record, or public configuration",
}


@dataclass(frozen=True)
class Failure:
    """One failed check, pointing at the evidence."""

    check: str
    file: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" if self.line is not None else f"{self.file}: {self.reason}"


@dataclass(frozen=True)
class Entry:
    """An audit-log record and where it is, so that every finding can name file and line."""

    path: Path
    line: int
    record: dict[str, Any]

    @property
    def event(self) -> str:
        return self.record["event"]


class Malformed(ValueError):
    """A record that verifies as a chain link but lacks a field the audit needs."""

    def __init__(self, entry: Entry, reason: str) -> None:
        super().__init__(reason)
        self.entry = entry


@dataclass(frozen=True)
class Update:
    """An update record of either log (sent, trained or received), checked for shape."""

    entry: Entry
    site: str
    round: int
    sha256: str
    tensors: tuple[str, ...]
    dp: dict[str, Any] | None  # site side: the round's DP parameters; None when trained without DP

    @property
    def masked(self) -> bool:
        return self.entry.record.get("masked") is True


@dataclass
class RoundDP:
    """One training of a site: its DP parameters, the ε it claimed after it and the ε recomputed."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    epsilon_claimed: float | None
    epsilon_recomputed: float


@dataclass(frozen=True)
class EmpiricalResult:
    """One training of the empirical test (empirical.py): the bound, the claim it is compared to, the evidence."""

    private: bool  # False: the positive control, trained without noise or clipping
    claimed_epsilon: float | None  # what the bound must not exceed; None: no claim
    delta: float
    eps_lower_bound: float
    eps_ceiling: float  # what a perfect attack would prove with these canaries: no bound can exceed it
    confidence: float
    num_canaries: int
    num_included: int
    best_k: int
    num_guesses: int
    num_correct: int
    noise_multiplier: float | None
    steps: int
    scores_in: list[float]
    scores_out: list[float]
    mechanism: str = ""  # what the replay ran (protocol, trust, noise) and what the coordinator saw

    @property
    def exceeds_claim(self) -> bool:
        return self.claimed_epsilon is not None and self.eps_lower_bound > self.claimed_epsilon


@dataclass
class SiteAudit:
    """Everything the report says about one site."""

    name: str
    log: str | None
    updates_matched: int = 0
    epsilon_claimed: float | None = None
    epsilon_recomputed: float | None = None
    target_epsilon: float | None = None
    epsilon_individual_claimed: float | None = None  # distributed trust: ε against the site's own message
    epsilon_individual_recomputed: float | None = None
    delta: float | None = None
    accountant: str | None = None
    rounds: list[RoundDP] = field(default_factory=list)
    rounds_joined: list[int] = field(default_factory=list)
    rounds_declined: list[dict[str, Any]] = field(default_factory=list)
    policy: dict[str, Any] | None = None
    policy_status: str = ""
    empirical: EmpiricalResult | None = None
    control: EmpiricalResult | None = None  # the positive control: the same training without DP
    own_message: EmpiricalResult | None = None  # distributed trust: the site's message alone, against that ε
    coverage: list[dict[str, Any]] = field(default_factory=list)  # each value sent and what covers it
    evaluation_epsilon_claimed: float | None = None  # privacy.json's (server/audit/evaluation.py)
    evaluation_epsilon_recomputed: float | None = None  # from the site's evaluation-sent records
    evaluation_epsilon_individual_recomputed: float | None = None  # distributed trust: against its own messages


@dataclass
class Findings:
    """Failures and notes, collected by every check in turn."""

    failures: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, check: str, file: Path | str, line: int | None, reason: str) -> None:
        self.failures.append(Failure(check, str(file), line, reason))

    def fail_at(self, check: str, entry: Entry, reason: str) -> None:
        self.fail(check, entry.path, entry.line, reason)


@dataclass
class AuditReport:
    """The audit's result: the verdict is `passed`, the rest is what a reader needs to trust it."""

    run_dir: str
    run_id: str | None
    head: list[str]
    files: dict[str, str]  # every file audited -> its SHA-256, binding the report to the evidence
    sites: list[SiteAudit]
    failures: list[Failure]
    notes: list[str]
    empirical_settings: dict[str, Any] | None = None
    mode: str = "plain"  # or "secure aggregation (SecAgg+)"

    @property
    def passed(self) -> bool:
        return not self.failures

    def check_summary(self) -> list[dict[str, Any]]:
        out = []
        for name, what in CHECKS.items():
            if name == "empirical" and self.empirical_settings is None:
                continue
            failed = sum(f.check == name for f in self.failures)
            out.append({"check": name, "what": what, "passed": failed == 0, "failures": failed})
        return out


@dataclass
class Evidence:
    """What was read from disk; what could not be read is already a failure."""

    run_dir: Path
    server_log: Path
    site_logs: list[Path]
    simulation: bool
    run_id: str | None = None
    cfg: RunConfig | None = None
    privacy: dict[str, Any] = field(default_factory=dict)  # privacy.json "sites"
    status: dict[str, Any] | None = None
    server: list[Entry] = field(default_factory=list)  # the audited run's records only
    sites: dict[str, list[Entry]] = field(default_factory=dict)  # site name -> its log's records of the run
    site_log_of: dict[str, Path] = field(default_factory=dict)

    @property
    def privacy_path(self) -> Path:
        return self.run_dir / "privacy.json"

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.json"

    @property
    def status_path(self) -> Path:
        return self.run_dir / "status.json"
