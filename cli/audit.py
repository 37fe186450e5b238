"""`fedtransfer audit RUN_DIR`: the subcommand's arguments, its summary on stdout and its exit status.

Exit status: 0 the audit passed, 1 it failed (a release gate stops), 2 the run could not
be audited at all (no readable run folder, a report folder that cannot be written, a bad
argument or site config), with one line on stderr saying what to fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtransfer.server.audit.findings import AuditReport

PASSED, FAILED, CANNOT_AUDIT = 0, 1, 2


def add_audit_parser(subparsers: Any) -> None:
    """Register `fedtransfer audit` on the top-level parser's subparsers."""
    p = subparsers.add_parser(
        "audit",
        help="verify a run's audit logs and privacy claims; write HTML + JSON report",
        description="Exit status: 0 passed, 1 failed, 2 the run could not be audited.",
    )
    p.add_argument("run_dir", type=Path, help="the run's output_dir (audit.jsonl, privacy.json, config.json, ...)")
    p.add_argument(
        "--site-log",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a site's audit.jsonl, once per site (default: RUN_DIR/sites/*/audit.jsonl, simulation)",
    )
    p.add_argument(
        "--site-config",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a site's YAML config, once per site: its policy is checked, and --empirical uses its data",
    )
    p.add_argument(
        "--empirical",
        action="store_true",
        help="also run the canary membership-inference test per site: an empirical lower bound on ε",
    )
    p.add_argument("--canaries", type=int, default=1000, help="canaries per site for --empirical (default 1000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="randomness of canaries and the test training (default 0)")
    p.add_argument("--report-dir", type=Path, help="where audit-report.html and .json go (default: RUN_DIR)")
    p.set_defaults(func=audit_command)


def audit_command(args: argparse.Namespace) -> int:
    """Audit, write the report, print a summary, every failure with file and line, and the verdict."""
    from fedtransfer.common.errors import InputError
    from fedtransfer.server.audit.render import write_report
    from fedtransfer.server.audit.run import audit_run

    try:
        settings = None
        if args.empirical:
            from fedtransfer.server.audit.empirical import CanarySettings

            settings = CanarySettings(args.canaries, args.confidence, args.seed)
        report = audit_run(args.run_dir, args.site_log, args.site_config, settings)
    except InputError as err:  # ConfigError included: a site config that is not valid; any other error is a bug
        return _cannot_audit(str(err))
    out_dir = args.report_dir or args.run_dir
    try:
        html_path, json_path = write_report(report, out_dir)
    except OSError as err:
        flag = "--report-dir" if args.report_dir else "RUN_DIR (no --report-dir)"
        reason = err.strerror or type(err).__name__
        return _cannot_audit(f"{flag} {out_dir}: cannot write the audit report ({reason}); give a writable folder")
    _print_summary(args.run_dir, report)
    verdict = "PASSED" if report.passed else f"FAILED ({len(report.failures)} failure(s))"
    print(f"fedtransfer audit: {verdict}; report {html_path} and {json_path}")
    return PASSED if report.passed else FAILED


def _cannot_audit(reason: str) -> int:
    print(f"fedtransfer: error: {reason}", file=sys.stderr)
    return CANNOT_AUDIT


def _print_summary(run_dir: Path, report: AuditReport) -> None:
    """One line for the run, one per site, then every note and every failure as `FAIL [check] file:line: why`."""
    from fedtransfer.server.audit.render import fmt

    matched = sum(s.updates_matched for s in report.sites)
    print(
        f"fedtransfer audit: run {report.run_id} in {run_dir}: {len(report.sites)} site(s), {matched} "
        f"update(s) matched to site logs; aggregation {report.mode}"
    )
    for s in report.sites:
        declined = [d["round"] for d in s.rounds_declined] or "none"
        line = (
            f"  {s.name}: ε {fmt(s.epsilon_claimed)} (recomputed {fmt(s.epsilon_recomputed)}, target "
            f"{fmt(s.target_epsilon)}), δ {fmt(s.delta)}, {s.accountant}; rounds joined "
            f"{s.rounds_joined or 'none'}, declined {declined}; policy: {s.policy_status}"
        )
        if s.empirical is not None and s.control is not None:
            bound, control = s.empirical.eps_lower_bound, s.control.eps_lower_bound
            claimed = fmt(s.empirical.claimed_epsilon)
            line += f"; empirical ε ≥ {bound:.3f} vs claimed {claimed} (no DP: ≥ {control:.3f})"
        if s.own_message is not None:
            own = s.own_message
            line += f"; own message: empirical ε ≥ {own.eps_lower_bound:.3f} vs claimed {fmt(own.claimed_epsilon)}"
        print(line)
    for note in report.notes:
        print(f"  note: {note}")
    for failure in report.failures:
        print(f"FAIL [{failure.check}] {failure}")
