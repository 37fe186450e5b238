"""`fedtransfer deploy ...`: the commands run exactly what deploy.launch documents, and refuse early, in one line."""

from __future__ import annotations

import dataclasses
import json
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import fedtransfer.deploy.supernode
import pytest
import yaml
from fedtransfer.cli import deploy as deploy_cli
from fedtransfer.cli.deploy import resume_config
from fedtransfer.cli.main import main
from fedtransfer.common.config.run import (
    SiteConfig,
    SitePolicy,
    config_from_dict,
    load_config,
    load_site_config,
    to_nested,
)
from fedtransfer.deploy.credentials import init_deployment
from fedtransfer.deploy.launch import (
    DEFAULT_SUPERNODE_PORT,
    LOOPBACK,
    port_is_free,
    site_node_config,
    superlink_argv,
    supernode_argv,
)

from tests.deploy_harness import free_ports

REPO = Path(__file__).resolve().parent.parent


def test_site_example_documents_every_key() -> None:
    path = REPO / "deploy" / "site.example.yaml"
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == {f.name for f in dataclasses.fields(SiteConfig)}
    assert set(raw["policy"]) == {f.name for f in dataclasses.fields(SitePolicy)}
    example = load_site_config(path)
    assert example.policy == SitePolicy()  # the policy shown is the default one
    defaults = {f.name: f.default for f in dataclasses.fields(SiteConfig) if f.default is not dataclasses.MISSING}
    del defaults["data_path"]  # required for npz, so the example names one
    assert {k: getattr(example, k) for k in defaults} == defaults


def _keys(raw: dict, prefix: str = "") -> set[str]:
    return {
        k
        for key, value in raw.items()
        for k in (_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"})
    }


def test_coordinator_example_is_a_complete_run_config() -> None:
    """deploy/run.example.yaml lists every key demo.yaml does, and loads."""
    example = yaml.safe_load((REPO / "deploy" / "run.example.yaml").read_text())
    assert _keys(example) == _keys(yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()))
    cfg = load_config(REPO / "deploy" / "run.example.yaml")
    assert cfg.output_path.is_absolute() and cfg.data.source == "npz"


def _site_yaml(tmp_path: Path, **keys: object) -> Path:
    (tmp_path / "data.npz").write_bytes(b"")
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"name": "alpha", "data_source": "npz", "data_path": "data.npz"} | keys))
    return path


def _dry_run(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    assert main(["deploy", *argv, "--dry-run"]) == 0
    return shlex.split(capsys.readouterr().out)


def test_superlink_and_site_commands_match_launch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    creds = init_deployment(tmp_path / "creds", ["alpha"], [])
    argv = _dry_run(capsys, "superlink", "--credentials", str(creds.root))
    expected = superlink_argv(creds, bounded=True)  # Flower's SuperLink through link_sessions, same arguments
    assert argv[:5] + argv[6:] == expected[:5] + expected[6:] and argv[5].endswith("flower-superlink")
    site = _site_yaml(tmp_path, state_dir="state")
    (port,) = free_ports(1)
    argv = _dry_run(
        capsys,
        "site",
        "--config",
        str(site),
        "--credentials",
        str(creds.root),
        "--superlink",
        "h:8443",
        "--port",
        str(port),
    )
    worker = f"site-worker='{tmp_path / 'state' / 'worker' / 'site.sock'}'"  # the default state_dir: state
    secret = tmp_path / "state" / "superexec.secret"  # only the SuperExec `deploy site` starts may take tasks
    expected = supernode_argv(
        creds,
        "alpha",
        superlink="h:8443",
        node_config=f"{site_node_config(site)} {worker}",
        port=port,
        superexec_secret=secret,
        paced=True,
    )
    assert argv[:5] + argv[6:] == expected[:5] + expected[6:] and argv[5].endswith("flower-supernode")
    plain = _dry_run(
        capsys,
        "site",
        "--config",
        str(site),
        "--credentials",
        str(creds.root),
        "--superlink",
        "h:8443",
        "--port",
        str(port),
        "--no-worker",
    )
    expected = supernode_argv(
        creds,
        "alpha",
        superlink="h:8443",
        node_config=site_node_config(site),
        port=port,
        superexec_secret=secret,
        paced=True,
    )
    assert plain[:5] + plain[6:] == expected[:5] + expected[6:]


def test_a_state_folder_too_deep_for_a_socket_runs_the_site_without_its_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    creds = init_deployment(tmp_path / "creds", ["alpha"], [])
    site = _site_yaml(tmp_path, state_dir="s" * 120)
    assert (
        main(
            [
                "deploy",
                "site",
                "--config",
                str(site),
                "--credentials",
                str(creds.root),
                "--superlink",
                "h:1",
                "--dry-run",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "site-worker" not in out and err.count("\n") == 1, err
    assert "site alpha: no site worker:" in err and "longer than a Unix socket path may be (107)" in err


def test_a_second_site_on_one_host_gets_its_own_port_or_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    creds = init_deployment(tmp_path / "creds", ["alpha"], [])
    site = ["site", "--config", str(_site_yaml(tmp_path)), "--credentials", str(creds.root), "--superlink", "h:1"]
    with socket.socket() as first_site:  # what the first SuperNode on this host holds
        if port_is_free(DEFAULT_SUPERNODE_PORT):
            first_site.bind((LOOPBACK, DEFAULT_SUPERNODE_PORT))
        first_site.listen()
        argv = _dry_run(capsys, *site)
        chosen = int(argv[argv.index("--port") + 1])
        assert chosen != DEFAULT_SUPERNODE_PORT and port_is_free(chosen)
        code = main(["deploy", *site, "--port", str(DEFAULT_SUPERNODE_PORT)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"--port {DEFAULT_SUPERNODE_PORT}: {LOOPBACK}:{DEFAULT_SUPERNODE_PORT} is in use" in err


def test_a_port_a_site_just_left_is_free_again() -> None:
    """A restarted site's port, its last connection in TIME_WAIT, is not "in use": only a listener holds a port."""
    with socket.socket() as listener:  # the site's gRPC server, which binds with SO_REUSEADDR
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_is_free(port)
        client = socket.create_connection((LOOPBACK, port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end of the connection enters TIME_WAIT
        client.recv(1)
        client.close()
    with socket.socket() as plain, pytest.raises(OSError):  # what a probe without SO_REUSEADDR would see
        plain.bind((LOOPBACK, port))
    assert port_is_free(port)


_FAKE_SUPERNODE = """\
import sys
from pathlib import Path

tries = Path(sys.argv[1])
tries.write_text(tries.read_text() + "x")
print("INFO :      Starting Flower SuperNode", flush=True)
if len(tries.read_text()) <= int(sys.argv[2]):
    print("ERROR :     Exit Code: 305\\nFailed to initialize the connection to the SuperLink.", flush=True)
    print("[code: 2004] Failed to activate SuperNode.", flush=True)
    sys.exit(1)
print("INFO :      SuperNode ID: 7", flush=True)
"""


@pytest.mark.parametrize(("refusals", "retry_for", "code"), [(2, 30.0, 0), (9, 0.5, 2)])
def test_site_retries_a_refused_activation_within_its_bound(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    refusals: int,
    retry_for: float,
    code: int,
) -> None:
    """After a crash the SuperLink refuses the site like an unregistered key: say so, wait, try again, give up."""
    fake = tmp_path / "fake_supernode.py"
    fake.write_text(_FAKE_SUPERNODE)
    (tmp_path / "tries").write_text("")
    argv = [sys.executable, str(fake), str(tmp_path / "tries"), str(refusals)]
    monkeypatch.setattr(deploy_cli, "supernode_argv", lambda *_args, **_kwargs: argv)
    monkeypatch.setattr(fedtransfer.deploy.supernode.time, "sleep", lambda _s: None)
    creds = init_deployment(tmp_path / "creds", ["alpha"], [])
    site = [
        "deploy",
        "site",
        "--config",
        str(_site_yaml(tmp_path)),
        "--credentials",
        str(creds.root),
        "--superlink",
        "h:1",
        "--retry-for",
        str(retry_for),
        "--no-worker",
    ]
    assert main(site) == code
    out, err = capsys.readouterr()
    assert "Exit Code: 305" not in out and "Failed to activate" not in out  # Flower's report is replaced by ours
    if code == 0:
        assert (tmp_path / "tries").read_text() == "xxx" and "SuperNode ID: 7" in out
        assert err.count("still counts this site's crashed SuperNode as online") == 2
    else:
        assert err.count("\n") == 1 and "refused to activate site alpha for 0 s (Flower exit code 305)" in err


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"policy": {"max_epsilon": -1}}, "site.yaml: policy.max_epsilon: must be > 0"),
        ({"data_path": "missing.npz"}, "site.yaml: data_path: missing.npz does not exist"),
        ({"name": "Alpha_1"}, "site.yaml: name: not a site name: use 1-63 lowercase letters"),
        ({"name": "beta"}, "sites/beta/auth.key is missing"),
        ({"budget": 3}, "site.yaml: budget: unknown key"),
    ],
)
def test_site_command_refuses_a_bad_site_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keys: dict, message: str
) -> None:
    creds = init_deployment(tmp_path / "creds", ["alpha"], [])
    site = _site_yaml(tmp_path, **keys)
    code = main(["deploy", "site", "--config", str(site), "--credentials", str(creds.root), "--superlink", "h:1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_resume_takes_the_runs_own_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_from_dict({"train": {"rounds": 3}, "data": {"max_samples": 100}, "output_dir": "elsewhere"})
    (tmp_path / "config.json").write_text(json.dumps(to_nested(cfg)))  # what run_federation saves
    resumed = resume_config(tmp_path)
    assert resumed == dataclasses.replace(cfg, resume=True, output_dir=str(tmp_path))
    assert main(["deploy", "run", "--resume", str(tmp_path / "nothing-here")]) == 2
    assert "config.json: missing; --resume takes the output_dir of an earlier run" in capsys.readouterr().err


def test_a_second_supernode_on_one_state_folder_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two SuperNodes on one state folder would interleave one privacy ledger: the second is refused."""
    creds = init_deployment(tmp_path / "creds", ["alpha"], [])
    site = _site_yaml(tmp_path, state_dir="state")
    holder = subprocess.Popen(  # the first SuperNode's `fedtransfer deploy site`, holding the folder
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from fedtransfer.common.storage import locking\n"
            "with locking.hold(Path(sys.argv[1]), 'the SuperNode of site alpha'):\n"
            "    print('held', flush=True); time.sleep(60)",
            str(tmp_path / "state"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code = main(["deploy", "site", "--config", str(site), "--credentials", str(creds.root), "--superlink", "h:1"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{tmp_path / 'state'} is in use by pid {holder.pid}" in err and "the SuperNode of site alpha" in err
