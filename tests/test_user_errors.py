"""Only what the user gave is reported as the user's mistake: InputError (and the deployment's typed
refusals) is one line and exit 2; a bare ValueError from inside a command is a bug, and propagates
(a traceback, exit 1) instead of passing for bad input."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from fedtransfer.cli.main import main
from fedtransfer.common.errors import InputError
from fedtransfer.deploy.credentials import init_deployment

# (argv, module, function): a command, and a function it calls once its arguments are read
COMMANDS = [
    (["simulate", "--quiet"], "fedtransfer.server.launch.simulation", "simulate"),
    (["predict", "{tmp}/model.pt", "{tmp}"], "fedtransfer.server.export.model_file", "load_model"),
    (["export", "{tmp}", "--format", "onnx"], "fedtransfer.server.export.serving", "export_run"),
    (["audit", "{tmp}"], "fedtransfer.server.audit.run", "audit_run"),
    (
        ["deploy", "init", "--sites", "alpha", "--host", "h.example.org", "--out", "{tmp}/c"],
        "fedtransfer.cli.deploy",
        "init_deployment",
    ),
]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("fedtransfer: error: "), err
    assert expected in err, err
    return err


def _patched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str], module: str, name: str, error: Exception
) -> list[str]:
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(importlib.import_module(module), name, fail)
    (tmp_path / "model.pt").write_bytes(b"")  # predict checks that the file exists before it reads it
    return [a.format(tmp=tmp_path) for a in argv]


@pytest.mark.parametrize(("argv", "module", "name"), COMMANDS)
@pytest.mark.parametrize("user_error", [False, True])
def test_only_an_input_error_inside_a_command_is_the_users_one_line_error(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    module: str,
    name: str,
    user_error: bool,
) -> None:
    """An InputError is one line and exit 2; a bare ValueError from the same place is a bug: it propagates."""
    if user_error:
        argv = _patched(monkeypatch, tmp_path, argv, module, name, InputError("--flag: cannot be used; give another"))
        _one_line_error(capsys, argv, "fedtransfer: error: --flag: cannot be used; give another")
        return
    argv = _patched(monkeypatch, tmp_path, argv, module, name, ValueError("an internal check failed"))
    with pytest.raises(ValueError, match="an internal check failed"):
        main(argv)
    assert "fedtransfer: error" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--site-log", "{tmp}/missing.jsonl"], "--site-log {tmp}/missing.jsonl: no such file"),
        (["--empirical", "--canaries", "1"], "--canaries must be at least 2 (got 1)"),
        (["--empirical", "--confidence", "1.5"], "--confidence must be in (0, 1) (got 1.5)"),
    ],
)
def test_audit_refuses_bad_flags_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    argv = ["audit", str(tmp_path), *(f.format(tmp=tmp_path) for f in flags)]
    _one_line_error(capsys, argv, message.format(tmp=tmp_path))
    assert not (tmp_path / "audit-report.json").exists()


@pytest.mark.parametrize(
    ("sites", "hosts", "message"),
    [
        ("alpha,Bad_Site", "h.example.org", "invalid site name 'Bad_Site': use 1-63 lowercase letters"),
        ("alpha,beta,alpha", "h.example.org", "--sites: alpha named more than once; name each site once"),
        ("alpha", "h.example.org,not a host", "--host: 'not a host' is not an IP address or DNS name"),
    ],
)
def test_deploy_init_refuses_bad_arguments_in_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sites: str, hosts: str, message: str
) -> None:
    out = tmp_path / "creds"
    _one_line_error(capsys, ["deploy", "init", "--sites", sites, "--host", hosts, "--out", str(out)], message)
    assert not out.exists()


def test_deploy_init_names_a_damaged_key_it_would_keep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    creds = init_deployment(tmp_path / "creds", ["alpha"], [])
    creds.ca_key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    argv = ["deploy", "init", "--sites", "alpha", "--host", "localhost", "--out", str(creds.root)]
    _one_line_error(capsys, argv, f"{creds.ca_key}: not a readable key or certificate")
    creds.sites["alpha"].public_key.write_text("ssh-ed25519 garbage\n")
    creds.ca_key.unlink()
    creds.ca_cert.unlink()
    creds.server_cert.unlink()
    creds.server_key.unlink()
    _one_line_error(capsys, argv, f"{creds.sites['alpha'].public_key}: not a readable key or certificate")


def test_deploy_register_refuses_a_bad_site_name_and_a_damaged_flwr_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    creds = init_deployment(tmp_path / "creds", ["alpha"], [])
    register = ["deploy", "register", "--credentials", str(creds.root)]
    _one_line_error(capsys, [*register, "Alpha"], "invalid site name 'Alpha'")
    flwr_config = tmp_path / "flwr" / "config.toml"
    flwr_config.parent.mkdir()
    flwr_config.write_text("[superlink\naddress = ")
    monkeypatch.setenv("FLWR_HOME", str(flwr_config.parent))
    _one_line_error(capsys, [*register, "alpha"], f"{flwr_config}: not valid TOML")
    assert flwr_config.read_text() == "[superlink\naddress = "  # never overwritten


def test_deploy_site_refuses_a_config_path_flower_cannot_be_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    creds = init_deployment(tmp_path / "creds", ["alpha"], [])
    folder = tmp_path / 'it\'s "here"'
    folder.mkdir()
    (folder / "data.npz").write_bytes(b"")
    site = folder / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "alpha", "data_source": "npz", "data_path": "data.npz"}))
    argv = [
        "deploy",
        "site",
        "--config",
        str(site),
        "--credentials",
        str(creds.root),
        "--superlink",
        "h:1",
        "--no-worker",
        "--dry-run",
    ]
    _one_line_error(capsys, argv, "Flower reads site-config as a quoted string")


def test_deploy_resume_refuses_a_config_json_that_is_not_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_bytes(b'{"train": "\xff"}')
    _one_line_error(capsys, ["deploy", "run", "--resume", str(tmp_path)], f"{tmp_path / 'config.json'}: not valid JSON")
