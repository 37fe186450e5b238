"""Only the listed local accounts reach the coordinator's Control API (issue 24, item 1 of what remained).

Tried as the issue tried it: as `nobody`, POST /v1/control/list-runs to the SuperLink's loopback
port. With `fedtransfer deploy firewall apply` in place the connection is reset before TLS (the
kernel answers the SYN with a RST, so connect() says ECONNREFUSED), while root, the SuperLink's
own account here, still registers a site, lists runs and runs an app through Fleet and Runtime.
"""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fedtransfer.cli.main import main
from fedtransfer.deploy import firewall
from fedtransfer.deploy.credentials import init_deployment
from fedtransfer.deploy.firewall import FirewallError, removal, resolve_accounts, ruleset, run_nft
from fedtransfer.deploy.launch import LOOPBACK, site_node_config, write_flwr_config

from tests.deploy_harness import LocalDeployment
from tests.test_deploy import _write_app
from tests.test_local_users import _as_nobody


def _nft_unusable() -> str | None:
    """Why this machine cannot load an nft rule set here, or None when it can."""
    if os.geteuid() != 0:
        return "loading nft rules and acting as `nobody` need root"
    if shutil.which("nft") is None and not any(Path(d, "nft").exists() for d in ("/usr/sbin", "/sbin")):
        return "nft is not installed (`make test` installs Debian's nftables)"
    done = subprocess.run([firewall.nft_binary(), "list", "tables"], capture_output=True, text=True, check=False)
    return None if done.returncode == 0 else f"nft cannot read the rule set here: {done.stderr.strip()}"


needs_nft = pytest.mark.skipif(_nft_unusable() is not None, reason=str(_nft_unusable()))


def _tables() -> str:
    return subprocess.run([firewall.nft_binary(), "list", "tables"], capture_output=True, text=True, check=True).stdout


def test_the_rule_set_replaces_its_own_table_and_names_both_loopbacks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "firewall", "print", "--allow", "nobody,0", "--port", "8123", "--table", "ftx"]) == 0
    script = capsys.readouterr().out
    lines = [line.strip() for line in script.splitlines() if not line.startswith("#")]
    assert lines[:2] == ["table inet ftx {}", "delete table inet ftx"]  # one transaction: no moment without it
    assert script.count("table inet ") == 3 and "flush ruleset" not in script  # no other table is touched
    rule = "tcp dport 8123 meta skuid != { 0, 65534 } reject with tcp reset"
    assert f'oifname "lo" ip daddr 127.0.0.0/8 {rule}' in lines
    assert f'oifname "lo" ip6 daddr ::1 {rule}' in lines
    assert "type filter hook output priority filter; policy accept;" in lines


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["apply"], "--allow (or $FEDTRANSFER_FIREWALL_ALLOW) is missing"),
        (["apply", "--allow", "no-such-account"], "--allow no-such-account: no such account on this host"),
        (["print", "--allow", "root", "--port", "70000"], "--port 70000: not a TCP port"),
        (["remove", "--table", "Bad-Name"], "--table 'Bad-Name': use 1-32 lowercase letters"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDTRANSFER_FIREWALL_ALLOW", raising=False)
    assert main(["deploy", "firewall", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err and "Traceback" not in err, err


def test_a_missing_nft_says_how_to_install_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(firewall, "_NFT_DIRS", (str(tmp_path),))
    assert main(["deploy", "firewall", "apply", "--allow", "root", "--table", "ftmissing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nft not found: install nftables" in err and "as root" in err, err


@needs_nft
def test_another_account_is_told_to_run_it_as_root() -> None:
    """nft as `nobody` fails with EPERM: the one line says root is needed, and nothing was changed."""
    before = _tables()

    def attempt() -> str:
        try:
            run_nft(removal("ftnotroot"))
        except FirewallError as err:
            return str(err)
        return "loaded"

    said = _as_nobody(attempt)
    assert "Operation not permitted" in said and "needs root" in said and "\n" not in said, said
    assert _tables() == before


def _list_runs(port: int) -> Callable[[], str]:
    """The issue's `curl -sk -X POST https://127.0.0.1:PORT/v1/control/list-runs`: its status, or the error."""

    def action() -> str:
        conn = http.client.HTTPSConnection(LOOPBACK, port, timeout=10, context=ssl._create_unverified_context())
        try:
            conn.request("POST", "/v1/control/list-runs", b"", {"content-type": "application/protobuf"})
            return str(conn.getresponse().status)
        except OSError as err:
            return f"error {type(err).__name__}"
        finally:
            conn.close()

    return action


@pytest.fixture
def firewalled(tmp_path: Path) -> Iterator[tuple[LocalDeployment, Callable[[str], None]]]:
    """A TLS deployment (one site) whose SuperLink port only root may reach from the start; the table always goes."""
    reason = _nft_unusable()
    if reason is not None:
        pytest.skip(reason)
    config = tmp_path / "alpha.yaml"
    config.write_text("alpha\n")
    creds = init_deployment(tmp_path / "credentials", ["alpha"], hosts=[])
    dep = LocalDeployment(tmp_path, creds, {"alpha": site_node_config(config)})
    write_flwr_config(
        dep.flwr_home, address=dep.superlink_address, root_certificates=creds.ca_cert, name=dep.connection
    )
    table = f"fttest{os.getpid()}"
    port = str(dep.superlink_port)

    def allow(accounts: str) -> None:
        assert main(["deploy", "firewall", "apply", "--allow", accounts, "--port", port, "--table", table]) == 0

    try:
        allow("root")  # the test's own account: the SuperLink, its SuperExec, the SuperNode and the operator
        dep.start_superlink()
        dep.register("alpha")  # Control, as root, through the rule
        dep.start_site("alpha")  # Fleet, as root, through the rule
        yield dep, allow
    finally:
        dep.stop_all()
        run_nft(removal(table))
        assert f"table inet {table}\n" not in _tables()


def test_only_the_listed_accounts_reach_the_control_api(
    firewalled: tuple[LocalDeployment, Callable[[str], None]], tmp_path: Path
) -> None:
    dep, allow = firewalled
    refused = _as_nobody(_list_runs(dep.superlink_port))
    assert refused == "error ConnectionRefusedError", refused  # the SYN answered with a RST: no TLS, no request
    assert _list_runs(dep.superlink_port)() == "200"  # root: the same request answers
    listed = dep.flwr("ls", dep.connection, "--format", "json")
    assert listed.returncode == 0 and '"success": true' in listed.stdout, listed.stdout + listed.stderr

    out = tmp_path / "answers.json"  # ServerApp and SuperExec (Runtime API) and the SuperNode (Fleet) still work
    result = dep.run_app(_write_app(tmp_path / "app"), {"greeting": "hi", "out-file": str(out)}, timeout=120)
    assert result.ok, (result.status, result.status_details, result.output)
    assert out.read_text() == f'{{"{dep.node_ids["alpha"]}": "hi from alpha"}}'

    allow("root,nobody")  # replaced whole: a listed account passes
    assert _as_nobody(_list_runs(dep.superlink_port)) == "200"
    allow("root")
    assert _as_nobody(_list_runs(dep.superlink_port)) == "error ConnectionRefusedError"


def test_accounts_resolve_by_name_or_uid_root_always_first() -> None:
    accounts = resolve_accounts(["nobody", "0", " ", "65534"])
    assert [(a.name, a.uid) for a in accounts] == [("root", 0), ("nobody", 65534)]
    assert "{ 0, 65534 }" in ruleset(port=8000, accounts=accounts)
