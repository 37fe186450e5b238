"""The audit of one run: read the evidence, run every check in turn, collect the report.

A failed check is a finding in the report (the audit failed); only what stops the audit
from starting (no such run folder, one that cannot be read, a --site-log that does not
exist, a site config that is not valid) is raised, as InputError (ConfigError for a site
config), and means the run could not be audited at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedtransfer.common.config.run import SiteConfig, load_site_config
from fedtransfer.common.errors import InputError
from fedtransfer.common.privacy.counts import COUNT_NAMES
from fedtransfer.common.privacy.fedsgd import STATS_NAMES
from fedtransfer.common.wire.protocol import Event
from fedtransfer.server.audit.checks import (
    check_aggregation,
    check_completion,
    check_head_only,
    check_mode,
    check_updates,
    head_names,
)
from fedtransfer.server.audit.coverage import check_coverage
from fedtransfer.server.audit.evaluation import audit_evaluation
from fedtransfer.server.audit.evidence import check_chain, collect_updates, file_hashes, gather
from fedtransfer.server.audit.findings import AuditReport, Evidence, Findings, SiteAudit, Update
from fedtransfer.server.audit.privacy import audit_site_privacy, check_policy
from fedtransfer.server.audit.trust import audit_announced_trust, audit_trust

if TYPE_CHECKING:
    from fedtransfer.server.audit.empirical import CanarySettings

SiteConfigs = dict[str, tuple[SiteConfig, Path]]  # site name -> its config and where it was read


def audit_run(
    run_dir: Path,
    site_logs: Sequence[Path] = (),
    site_configs: Sequence[Path] = (),
    empirical: CanarySettings | None = None,
) -> AuditReport:
    """Run every check on RUN_DIR; the report lists every failure (none: the audit passes)."""
    configs = _inputs(run_dir, site_logs, site_configs)
    found = Findings()
    ev = gather(run_dir, site_logs, found)
    for path in [ev.server_log, *ev.site_logs]:
        check_chain(path, found)
    head = head_names(ev, found)
    site_entries = [e for entries in ev.sites.values() for e in entries]
    received = collect_updates(ev.server, Event.UPDATE_RECEIVED, found)
    sent = collect_updates(site_entries, Event.UPDATE_SENT, found)
    trained = collect_updates(site_entries, Event.UPDATE_TRAINED, found)
    if head:
        names = COUNT_NAMES if ev.cfg is not None and not ev.cfg.privacy.feature_stats else STATS_NAMES
        check_head_only([*received, *sent], head, found, names)
    mode = check_mode([*received, *sent], ev, found)
    matched = check_updates(received, sent, ev, found)
    check_aggregation(received, ev, found)
    check_completion(ev, received, found)
    trainings = sorted([*sent, *trained], key=lambda u: (str(u.entry.path), u.entry.line))  # each log's order
    audit_announced_trust(ev, trainings, found)
    sites = _audit_sites(ev, received, trainings, matched, configs, found)
    files = file_hashes([ev.server_log, *ev.site_logs, *site_configs], run_dir)
    report = AuditReport(str(run_dir), ev.run_id, head, files, sites, found.failures, found.notes, mode=mode)
    if empirical is not None:
        from fedtransfer.server.audit.empirical import run_empirical  # late import: torch, the data sources, Opacus

        run_empirical(report, ev, configs, empirical)
    return report


def _inputs(run_dir: Path, site_logs: Sequence[Path], site_configs: Sequence[Path]) -> SiteConfigs:
    """What the audit needs before it can start; InputError (ConfigError) naming the path otherwise."""
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder (give a run's output_dir)")
    if not os.access(run_dir, os.R_OK | os.X_OK):
        raise InputError(f"{run_dir}: cannot be read (permission denied); run the audit as a user who can read it")
    for path in site_logs:
        if not path.is_file():
            raise InputError(f"--site-log {path}: no such file")
    configs: SiteConfigs = {}
    for path in site_configs:
        config = load_site_config(path)  # a user error (ConfigError naming the file), not an audit failure
        configs[config.name] = (config, path)
    return configs


def _audit_sites(
    ev: Evidence,
    received: list[Update],
    trainings: list[Update],
    matched: dict[tuple[str, int, str], Update],
    configs: SiteConfigs,
    found: Findings,
) -> list[SiteAudit]:
    """Privacy and policy per site: every site privacy.json names or the server received an update from."""
    names = sorted(set(ev.privacy) | {u.site for u in received})
    sites = [SiteAudit(n, str(ev.site_log_of[n]) if n in ev.site_log_of else None) for n in names]
    for site in sites:
        site.updates_matched = sum(key[0] == site.name for key in matched)
        audit_site_privacy(site, ev, received, trainings, found)
        audit_trust(site, ev, trainings, found)
        check_coverage(site, ev, found)
        audit_evaluation(site, ev, found)
        if site.name in configs:
            check_policy(site, *configs[site.name], ev, found)
        else:
            site.policy_status = "no site policy (simulation)" if ev.simulation else "not checked: no --site-config"
    for name, (_, path) in configs.items():
        if name not in names:
            found.notes.append(f"{path}: site {name} did not take part in run {ev.run_id}")
    return sites
