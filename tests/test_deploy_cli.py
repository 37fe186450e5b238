"""`fedtransfer deploy ...`: the commands run exactly what deploy.launch documents, and refuse early, in one line."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest
import yaml

from common.config import SiteConfig, SitePolicy, config_from_dict, load_site_config, to_nested
from deploy.cli import resume_config
from deploy.credentials import init_deployment
from deploy.launch import site_node_config, superlink_argv, supernode_argv
from server.cli import main

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
    assert argv[1:] == superlink_argv(creds)[1:] and argv[0].endswith("flower-superlink")
    site = _site_yaml(tmp_path)
    argv = _dry_run(capsys, "site", "--config", str(site), "--credentials", str(creds.root), "--superlink", "h:8443")
    expected = supernode_argv(creds, "alpha", superlink="h:8443", node_config=site_node_config(site))
    assert argv[1:] == expected[1:] and argv[0].endswith("flower-supernode")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"policy": {"max_epsilon": -1}}, "site.yaml: policy.max_epsilon: must be > 0"),
        ({"data_path": "missing.npz"}, "site.yaml: data_path: missing.npz does not exist"),
        ({"name": "Alpha_1"}, "site.yaml: name: invalid site name 'Alpha_1'"),
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
