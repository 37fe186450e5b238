"""A host firewall rule that closes the SuperLink's loopback port to every local account but the listed ones.

flwr 1.41's SuperLink serves Fleet, Control and Runtime on one HTTPS listener on 127.0.0.1 and
authenticates no account on Control, so every local account of the coordinator could list, start
and stop runs (`curl -k -X POST https://127.0.0.1:8000/v1/control/list-runs`). The listener cannot
become owner-only without rewriting three of Flower's clients (docs/explanation/deployment.md), but
the kernel knows which account opened each socket: an nftables rule on the output hook resets a
connection to that port from any other uid (`meta skuid`), before the TLS handshake.

Who must stay allowed: the SuperLink's own account (the SuperExec and the ServerApp processes it
starts run under it and reach the Runtime API on the same port), the Fleet proxy's account (nginx's
worker, `www-data` on Debian), the operator's account if it is not the service's, and root (which
can remove any rule anyway). Everything lives in one table of its own (`inet fedtransfer`), replaced
in a single `nft -f` transaction (create it empty, delete it, define it anew), so no other table is
touched and there is no moment with half a rule set.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass

from fedtransfer.common.errors import InputError

DEFAULT_TABLE = "fedtransfer"
IPV4_LOOPBACK = "127.0.0.0/8"
IPV6_LOOPBACK = "::1"
_TABLE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_NFT_DIRS = ("/usr/sbin", "/sbin")  # where Debian's nftables puts nft; not on a non-root PATH
NFT_TIMEOUT_S = 30.0


class FirewallError(InputError):
    """nft is missing, not permitted, or refused the rule set: said in one line, exit status 2."""


@dataclass(frozen=True)
class Account:
    """A local account the rule lets through, by name (as the operator gave it) and uid."""

    name: str
    uid: int


def resolve_accounts(names: list[str]) -> list[Account]:
    """The accounts named (a login name or a numeric uid each), root first; an unknown name is refused."""
    accounts = {0: Account("root", 0)}
    for name in (n.strip() for n in names):
        if not name:
            continue
        if name.isdigit():
            accounts.setdefault(int(name), Account(name, int(name)))
            continue
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise FirewallError(
                f"--allow {name}: no such account on this host; name the SuperLink's account, the Fleet "
                "proxy's (nginx: www-data) and the operator's, comma-separated"
            ) from None
        accounts.setdefault(entry.pw_uid, Account(name, entry.pw_uid))
    return sorted(accounts.values(), key=lambda a: a.uid)


def check_table(table: str) -> str:
    if not _TABLE_NAME.fullmatch(table):
        raise FirewallError(f"--table {table!r}: use 1-32 lowercase letters, digits or '_', starting with a letter")
    return table


def _replace(table: str) -> str:
    """The first lines of a transaction that leaves no trace of `table` (it need not exist before)."""
    return f"table inet {table} {{}}\ndelete table inet {table}\n"


def ruleset(*, port: int, accounts: list[Account], table: str = DEFAULT_TABLE) -> str:
    """The `nft -f` script: the table `inet <table>`, replaced as a whole, resetting other accounts' connections."""
    if not 0 < port < 65536:
        raise FirewallError(f"--port {port}: not a TCP port (1-65535)")
    uids = ", ".join(str(a.uid) for a in accounts)
    who = ", ".join(f"{a.name} (uid {a.uid})" for a in accounts)
    match = f"tcp dport {port} meta skuid != {{ {uids} }} reject with tcp reset"
    return (
        f"# fedtransfer: only {who} may connect to the SuperLink on loopback port {port}\n"
        + _replace(check_table(table))
        + f"table inet {table} {{\n"
        + "  chain superlink_port {\n"
        + "    type filter hook output priority filter; policy accept;\n"
        + f'    oifname "lo" ip daddr {IPV4_LOOPBACK} {match}\n'
        + f'    oifname "lo" ip6 daddr {IPV6_LOOPBACK} {match}\n'
        + "  }\n"
        + "}\n"
    )


def removal(table: str = DEFAULT_TABLE) -> str:
    """The `nft -f` script removing `inet <table>`; nothing to remove is no error."""
    return _replace(check_table(table))


def nft_binary() -> str:
    """Where nft is: on PATH or in /usr/sbin, /sbin (a non-root PATH leaves those out)."""
    found = shutil.which("nft") or shutil.which("nft", path=os.pathsep.join(_NFT_DIRS))
    if found is None:
        raise FirewallError(
            "nft not found: install nftables (Debian/Ubuntu: apt-get install nftables) and run "
            "`fedtransfer deploy firewall` as root"
        )
    return found


def run_nft(script: str, *, nft: str | None = None) -> None:
    """Load `script` in one nft transaction (all of it or nothing); any refusal is one FirewallError line."""
    binary = nft or nft_binary()
    try:
        done = subprocess.run(
            [binary, "-f", "-"], input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT_S, check=False
        )
    except OSError as err:
        raise FirewallError(f"{binary}: cannot run it ({err.strerror}); reinstall nftables") from None
    if done.returncode == 0:
        return
    said = " ".join((done.stderr or done.stdout).split())
    if "Operation not permitted" in said or "must be root" in said:
        raise FirewallError(
            f"{binary}: Operation not permitted: changing the host firewall needs root (CAP_NET_ADMIN); "
            "run `sudo fedtransfer deploy firewall ...`"
        )
    raise FirewallError(f"{binary} refused the rule set (exit code {done.returncode}): {said[:300]}")
