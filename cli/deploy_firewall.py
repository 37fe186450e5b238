"""`fedtransfer deploy firewall apply|remove|print`: the SuperLink's loopback port for the listed accounts only.

The coordinator's Control API has no accounts in flwr 1.41 (fedtransfer.deploy.firewall says why a
host rule is the fix); this command writes that rule. The systemd unit runs `apply` before the
SuperLink starts and `remove` after it stops, with the accounts from $FEDTRANSFER_FIREWALL_ALLOW.
`print` shows the exact nft script without nft or root, for review or for an operator who keeps
the host's rules in /etc/nftables.conf.
"""

from __future__ import annotations

import argparse
import os

from fedtransfer.deploy.firewall import (
    DEFAULT_TABLE,
    IPV4_LOOPBACK,
    IPV6_LOOPBACK,
    FirewallError,
    removal,
    resolve_accounts,
    ruleset,
    run_nft,
)
from fedtransfer.deploy.launch import DEFAULT_SUPERLINK_PORT

PORT_ENV = "FEDTRANSFER_SUPERLINK_PORT"
ALLOW_ENV = "FEDTRANSFER_FIREWALL_ALLOW"


def _firewall(args: argparse.Namespace) -> int:
    if args.action == "remove":
        run_nft(removal(args.table))
        print(f"fedtransfer: nft table inet {args.table} removed: the port it closed is open to every local account")
        return 0
    if not args.allow:
        raise FirewallError(
            f"--allow (or ${ALLOW_ENV}) is missing: name the SuperLink's account, the Fleet proxy's (nginx: "
            "www-data) and the operator's, comma-separated (root is always allowed)"
        )
    accounts = resolve_accounts(args.allow.split(","))
    script = ruleset(port=args.port, accounts=accounts, table=args.table)
    if args.action == "print":
        print(script, end="")
        return 0
    run_nft(script)
    who = ", ".join(f"{a.name} (uid {a.uid})" for a in accounts)
    print(
        f"fedtransfer: nft table inet {args.table}: only {who} may connect to port {args.port} on "
        f"{IPV4_LOOPBACK} and {IPV6_LOOPBACK}; other local accounts get a connection reset"
    )
    return 0


def add_firewall_parser(dep_sub: argparse._SubParsersAction) -> None:
    """Register `deploy firewall` beside the other `deploy` commands (cli/deploy.py)."""
    fw = dep_sub.add_parser(
        "firewall",
        help="let only the listed local accounts (and root) reach the SuperLink's loopback port (nftables)",
    )
    fw.add_argument(
        "action",
        choices=("apply", "remove", "print"),
        help="apply: load the rule (root); remove: drop it (root); print: show the nft script",
    )
    fw.add_argument(
        "--allow",
        default=os.environ.get(ALLOW_ENV),
        metavar="ACCOUNTS",
        help="comma-separated accounts (names or uids) besides root: the SuperLink's (its SuperExec and "
        f"ServerApps run as it), the Fleet proxy's (nginx: www-data), the operator's; ${ALLOW_ENV}",
    )
    fw.add_argument(
        "--port",
        type=int,
        default=os.environ.get(PORT_ENV, DEFAULT_SUPERLINK_PORT),
        help=f"the SuperLink's loopback port (default {DEFAULT_SUPERLINK_PORT}); ${PORT_ENV}",
    )
    fw.add_argument(
        "--table",
        default=DEFAULT_TABLE,
        help=f"the nft table (family inet) this command owns and replaces whole (default {DEFAULT_TABLE})",
    )
    fw.set_defaults(func=_firewall)
