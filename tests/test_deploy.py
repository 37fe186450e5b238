"""Deployment tests with real flwr 1.41 processes on 127.0.0.1.

One deployment (SuperLink with TLS + SuperNode auth, two registered sites) is
shared by the module to stay within the time budget on small machines.
"""

from __future__ import annotations

import json
import shlex
import socket
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from fedtransfer.cli.main import main
from fedtransfer.client import site_worker
from fedtransfer.common.config.site import load_site_config, site_paths
from fedtransfer.common.errors import InputError
from fedtransfer.deploy.credentials import CredentialsError, init_deployment
from fedtransfer.deploy.launch import (
    LOOPBACK,
    format_config,
    site_node_config,
    superlink_argv,
    supernode_argv,
    write_flwr_config,
)
from fedtransfer.server.launch.launcher import PACING_ENV

from tests.deploy_harness import LocalDeployment, free_ports, local_deployment

REPO = Path(__file__).resolve().parent.parent
SITES = ("alpha", "beta")
UNREGISTERED = "intruder"

_PYPROJECT = """\
[project]
name = "deploysmoke"
version = "1.0.0"
description = "Throwaway app for deployment tests"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "fedtransfer"

[tool.flwr.app.components]
serverapp = "deploysmoke.server:app"
clientapp = "deploysmoke.client:app"

[tool.flwr.app.config]
greeting = "hello"
out-file = ""
"""

_SERVER = """\
import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    greeting = str(context.run_config["greeting"])
    messages = [
        Message(
            RecordDict({"q": ConfigRecord({"greeting": greeting})}),
            dst_node_id=node_id,
            message_type="query",
        )
        for node_id in grid.get_node_ids()
    ]
    replies = grid.send_and_receive(messages, timeout=60)
    answers = {
        str(r.metadata.src_node_id): r.content["a"]["answer"]
        for r in replies
        if r.has_content()
    }
    Path(str(context.run_config["out-file"])).write_text(json.dumps(answers))
"""

_CLIENT = """\
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    site = Path(str(context.node_config["site-config"])).read_text().strip()
    answer = f"{msg.content['q']['greeting']} from {site}"
    return Message(RecordDict({"a": ConfigRecord({"answer": answer})}), reply_to=msg)
"""


def _write_app(app_dir: Path) -> Path:
    package = app_dir / "deploysmoke"
    package.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(_PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text(_SERVER)
    (package / "client.py").write_text(_CLIENT)
    return app_dir


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    """A live deployment whose site configs name their site (for reply checks)."""
    root = tmp_path_factory.mktemp("deployment")
    node_configs = {}
    for site in SITES:
        config = root / "site-configs" / f"{site}.yaml"
        config.parent.mkdir(exist_ok=True)
        config.write_text(f"{site}\n")
        node_configs[site] = site_node_config(config)
    with local_deployment(root, node_configs, extra_sites=[UNREGISTERED]) as dep:
        yield dep


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_credentials_private_and_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "creds"
    first = init_deployment(out, ["site-a", "b2"], ["superlink.example.org"])
    private = [first.ca_key, first.server_key]
    private += [kp.private_key for kp in first.sites.values()]
    assert all(_mode(p) == 0o600 for p in private)
    assert all(_mode(d) == 0o700 for d in {p.parent for p in private} | {out})
    assert set(first.created) >= set(private) and not first.kept
    before = {p: p.read_bytes() for p in first.created}
    cert = x509.load_pem_x509_certificate(first.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {LOOPBACK}
    assert san.get_values_for_type(x509.DNSName) == [
        "localhost",
        "superlink.example.org",
    ]

    second = init_deployment(out, ["site-a", "b2", "c"], [])
    assert set(second.kept) == set(before)
    new_pair = second.sites["c"]
    assert set(second.created) == {new_pair.private_key, new_pair.public_key}
    assert all(p.read_bytes() == data for p, data in before.items())

    second.sites["b2"].public_key.unlink()
    with pytest.raises(CredentialsError, match=r"auth\.key exists but"):
        init_deployment(out, ["b2"], [])
    with pytest.raises(CredentialsError, match=r"new\.example\.org"):
        init_deployment(out, [], ["new.example.org"])
    forced = init_deployment(out, ["b2"], ["new.example.org"], force=True)
    assert first.ca_key.read_bytes() != before[first.ca_key]
    assert _mode(forced.ca_key) == 0o600 and not forced.kept

    with pytest.raises(InputError, match="invalid site name 'Bad_Site'"):
        init_deployment(out, ["Bad_Site"], [])


def test_launch_defaults_keep_control_api_on_loopback(tmp_path: Path) -> None:
    creds = init_deployment(tmp_path / "c", ["alpha"], [])
    argv = superlink_argv(creds)
    assert argv[argv.index("--host") + 1] == LOOPBACK
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    with pytest.raises(ValueError, match="Control API"):
        superlink_argv(creds, host="0.0.0.0")
    assert "0.0.0.0" in superlink_argv(creds, host="0.0.0.0", expose_control_api=True)
    assert format_config({"a": "x y", "b": 2, "c": True}) == "a='x y' b=2 c=true"


def _service_env(unit: Path) -> dict[str, str]:
    """The Environment= lines of a systemd unit, as `fedtransfer deploy` will see them."""
    pairs = [
        line.removeprefix("Environment=").split("=", 1)
        for line in unit.read_text().splitlines()
        if line.startswith("Environment=")
    ]
    return dict(pairs)


def test_services_run_fedtransfer_deploy_with_their_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """systemd units and compose services call the one command line; its FEDTRANSFER_* defaults make the argv."""
    units = REPO / "deploy" / "systemd"
    link_unit, site_unit = units / "fedtransfer-superlink.service", units / "fedtransfer-supernode@.service"
    assert "ExecStart=/opt/fedtransfer/.venv/bin/fedtransfer deploy superlink\n" in link_unit.read_text()
    assert "ExecStart=/opt/fedtransfer/.venv/bin/fedtransfer deploy site\n" in site_unit.read_text()
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())["services"]
    assert compose["superlink"]["command"] == ["python", "-m", "cli", "deploy", "superlink"]
    assert compose["supernode"]["command"] == ["python", "-m", "cli", "deploy", "site"]
    assert {"superlink", "fleet-proxy", "supernode"} == set(compose)

    creds = init_deployment(tmp_path / "c", ["alpha"], [])
    env = _service_env(link_unit)
    assert set(env) == {
        "FEDTRANSFER_CREDENTIALS",
        "FEDTRANSFER_DATABASE",
        "FLWR_HOME",
        "FEDTRANSFER_FIREWALL_ALLOW",
        *PACING_ENV,
    }
    # the port is closed to every local account but root and these before the SuperLink starts (as root: "+")
    assert env["FEDTRANSFER_FIREWALL_ALLOW"] == "fedtransfer,www-data"  # the unit's User= and nginx's worker
    firewall = "+/opt/fedtransfer/.venv/bin/fedtransfer deploy firewall"
    assert f"ExecStartPre={firewall} apply\n" in link_unit.read_text()
    assert f"ExecStopPost={firewall} remove\n" in link_unit.read_text()
    # every SuperExec fedtransfer starts polls for tasks as often as `flower_env` sets, in every way it is started
    services = (compose["superlink"]["environment"], compose["supernode"]["environment"])
    for service_env in (env, _service_env(site_unit), *services):
        assert {k: str(service_env[k]) for k in PACING_ENV} == PACING_ENV
    monkeypatch.setenv("FEDTRANSFER_CREDENTIALS", str(creds.root))
    monkeypatch.setenv("FEDTRANSFER_DATABASE", env["FEDTRANSFER_DATABASE"])
    assert main(["deploy", "superlink", "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    expected = superlink_argv(creds, database=Path(env["FEDTRANSFER_DATABASE"]), bounded=True)
    assert argv[:5] + argv[6:] == expected[:5] + expected[6:] and argv[5].endswith("flower-superlink")

    site_yaml = tmp_path / "alpha.yaml"
    site_yaml.write_text(yaml.safe_dump({"name": "alpha", "data_source": "digits"}))
    port = free_ports(1)[0]
    monkeypatch.setenv("FEDTRANSFER_SITE_CONFIG", str(site_yaml))
    monkeypatch.setenv("FEDTRANSFER_SUPERLINK", "superlink.example.org:8443")
    monkeypatch.setenv("FEDTRANSFER_SUPERNODE_PORT", str(port))
    assert main(["deploy", "site", "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    state_dir = site_paths(load_site_config(site_yaml), site_yaml).state_dir  # the service's site runs its worker
    node_config = f"{site_node_config(site_yaml)} site-worker='{site_worker.socket_path(state_dir)}'"
    expected = supernode_argv(
        creds,
        "alpha",
        superlink="superlink.example.org:8443",
        node_config=node_config,
        port=port,
        superexec_secret=state_dir / "superexec.secret",
        paced=True,
    )
    # Flower's SuperNode, run through the pacing module: the same arguments after its own executable
    assert argv[:5] + argv[6:] == expected[:5] + expected[6:] and argv[5].endswith("flower-supernode")


def test_flwr_config_preserves_other_connections(tmp_path: Path) -> None:
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink.other]\naddress = "h:1"\n')
    path = write_flwr_config(home, address="127.0.0.1:8000", root_certificates=tmp_path / "ca.crt")
    config = tomllib.loads(path.read_text())["superlink"]
    assert config["other"] == {"address": "h:1"}
    assert config["default"] == "fedtransfer"
    assert config["fedtransfer"] == {
        "address": "127.0.0.1:8000",
        "root-certificates": str(tmp_path / "ca.crt"),
    }


def test_registered_sites_run_app_end_to_end(deployment: LocalDeployment, tmp_path: Path) -> None:
    app = _write_app(tmp_path / "app")
    out = tmp_path / "answers.json"
    result = deployment.run_app(app, {"greeting": "hi", "out-file": str(out)}, timeout=120)
    assert result.ok, (result.status, result.status_details, result.output)
    answers = json.loads(out.read_text())
    assert answers == {str(deployment.node_ids[site]): f"hi from {site}" for site in SITES}


def test_unregistered_supernode_is_refused(deployment: LocalDeployment) -> None:
    proc = deployment.start_site(
        UNREGISTERED,
        node_config=format_config({"site-config": "/nonexistent"}),
        wait=False,
    )
    assert proc.popen.wait(timeout=60) != 0
    log = proc.log_text()
    assert "Failed to activate SuperNode" in log and "SuperNode ID" not in log
    listed = deployment.flwr("supernode", "ls", deployment.connection, "--format", "json")
    node_ids = {int(n["node-id"]) for n in json.loads(listed.stdout)["nodes"]}
    assert node_ids == set(deployment.node_ids.values())


@pytest.mark.parametrize("trust", ["system-store", "foreign-ca"])
def test_supernode_without_deployment_ca_cannot_connect(
    deployment: LocalDeployment, tmp_path: Path, trust: str
) -> None:
    argv = deployment.site_argv("alpha", port=free_ports(1)[0])
    at = argv.index("--root-certificates")
    if trust == "system-store":
        del argv[at : at + 2]
    else:
        argv[at + 1] = str(init_deployment(tmp_path / "other", [], []).ca_cert)
    proc = deployment.spawn(f"alpha-{trust}", argv)
    assert proc.popen.wait(timeout=60) != 0
    log = proc.log_text()
    assert "CERTIFICATE_VERIFY_FAILED" in log and "SuperNode ID" not in log


def _non_loopback_ipv4() -> str | None:
    """This machine's outbound IPv4 (UDP connect sends nothing), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed for real
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_control_api_not_reachable_on_non_loopback_address(
    deployment: LocalDeployment,
) -> None:
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with socket.create_server(("0.0.0.0", 0)) as probe:  # control experiment
        try:
            socket.create_connection((address, probe.getsockname()[1]), 2).close()
        except OSError:
            pytest.skip(f"{address} is not connectable locally even for 0.0.0.0")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, deployment.superlink_port), 2)
    socket.create_connection((LOOPBACK, deployment.superlink_port), 2).close()


def test_site_can_leave_and_rejoin(deployment: LocalDeployment) -> None:
    deployment.kill_site("beta", graceful=True)
    assert not deployment.sites["beta"].alive()
    proc = deployment.start_site("beta")
    assert f"SuperNode ID: {deployment.node_ids['beta']}" in proc.log_text()
