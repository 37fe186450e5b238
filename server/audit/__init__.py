"""`fedtransfer audit RUN_DIR`: check the evidence a run left behind and write a report to sign.

The evidence: the server's hash-chained log (RUN_DIR/audit.jsonl), every site's own log,
privacy.json, config.json, status.json and model.pt. Each check lists every failure with
the file, the line when there is one, and the reason; any failure fails the audit (exit
status 1), so the command can gate a release. A run that cannot be audited at all exits 2.

- evidence.py: reading the logs and files, parsing update records;
- checks.py: chains, updates, head-only, secure-aggregation, completion;
- privacy.py: per-site ε recomputed from the logged DP parameters, and the site's policy;
- empirical.py (with --empirical): the canary test's ε lower bound against the claimed ε,
  with its statistics in empirical_stats.py;
- render.py: the JSON and HTML report; run.py: the audit in order; cli.py: the subcommand.

The public names below load on first use, so that registering the subcommand
(`fedtransfer.cli.audit`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "audit_run": "fedtransfer.server.audit.run",
    "AuditReport": "fedtransfer.server.audit.findings",
    "Failure": "fedtransfer.server.audit.findings",
    "SiteAudit": "fedtransfer.server.audit.findings",
    "CHECKS": "fedtransfer.server.audit.findings",
    "report_data": "fedtransfer.server.audit.render",
    "write_report": "fedtransfer.server.audit.render",
    "add_audit_parser": "fedtransfer.cli.audit",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fedtransfer.server.audit' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
