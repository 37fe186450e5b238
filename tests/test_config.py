"""Run and site configuration: every mistake is a one-line ConfigError naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from flwr.common.config import flatten_dict

from common.config import (
    BackboneConfig,
    ConfigError,
    DataConfig,
    HeadConfig,
    PrivacyConfig,
    RunConfig,
    SitePolicy,
    TrainConfig,
    config_from_dict,
    config_from_run_config,
    load_config,
    load_site_config,
    to_run_config,
)

ROOT = Path(__file__).resolve().parents[1]


def _error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    message = str(info.value)
    assert "\n" not in message, "config errors must be one line"
    return message


def test_unknown_top_level_key_is_named_with_allowed_keys() -> None:
    message = _error({"run_name": "x", "roundz": 3})
    assert message.startswith("roundz: unknown key")
    for allowed in ("run_name", "seed", "train", "privacy", "backbone"):
        assert allowed in message


def test_unknown_nested_key_is_named_with_its_section_keys() -> None:
    message = _error({"train": {"rounds": 3, "epochs": 2}})
    assert message.startswith("train.epochs: unknown key")
    for allowed in ("local_epochs", "rounds", "batch_size"):
        assert allowed in message
    assert "run_name" not in message  # the keys of *this* section, not the top level


@pytest.mark.parametrize(
    ("raw", "key", "expected"),
    [
        ({"train": {"rounds": "3"}}, "train.rounds", "integer"),
        ({"train": {"rounds": True}}, "train.rounds", "integer"),
        ({"train": {"rounds": 3.0}}, "train.rounds", "integer"),
        ({"privacy": {"enabled": 1.0}}, "privacy.enabled", "true or false"),
        ({"privacy": {"target_epsilon": True}}, "privacy.target_epsilon", "number"),
        ({"privacy": {"target_epsilon": float("nan")}}, "privacy.target_epsilon", "finite"),
        ({"seed": "42"}, "seed", "integer"),
        ({"run_name": 5}, "run_name", "string"),
        ({"train": 3}, "train", "mapping"),
    ],
)
def test_wrong_type_names_the_key(raw: dict[str, Any], key: str, expected: str) -> None:
    message = _error(raw)
    assert message.startswith(f"{key}:")
    assert expected in message


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"privacy": {"target_epsilon": 0}}, "privacy.target_epsilon"),
        ({"privacy": {"target_epsilon": -1.0}}, "privacy.target_epsilon"),
        ({"privacy": {"target_delta": 1}}, "privacy.target_delta"),
        ({"privacy": {"target_delta": 1.5}}, "privacy.target_delta"),
        ({"privacy": {"max_grad_norm": 0}}, "privacy.max_grad_norm"),
        ({"train": {"rounds": 0}}, "train.rounds"),
        ({"train": {"min_sites": 5}, "data": {"num_sites": 4}}, "train.min_sites"),
        ({"backbone": {"image_size": 16}}, "backbone.image_size"),
        ({"backbone": {"name": "alexnet"}}, "backbone.name"),
        ({"backbone": {"weights_file": "/w.pth"}}, "backbone.weights_sha256"),
        ({"data": {"source": "npz"}}, "data.path"),
        ({"data": {"split": "folders"}}, "data.split"),
        ({"data": {"alpha": 0}}, "data.alpha"),
        ({"run_name": "a b"}, "run_name"),
    ],
)
def test_impossible_value_names_the_key(raw: dict[str, Any], key: str) -> None:
    assert _error(raw).startswith(f"{key}:")


def test_image_size_error_names_backbone_minimum() -> None:
    assert "32..1024" in _error({"backbone": {"image_size": 16}})


def test_unknown_backbone_lists_registry() -> None:
    message = _error({"backbone": {"name": "alexnet"}})
    assert "'alexnet'" in message
    assert "mobilenet_v2" in message
    assert "resnet18" in message


def test_unknown_literal_lists_allowed_values() -> None:
    message = _error({"data": {"split": "foo"}})
    assert message.startswith("data.split:")
    assert "iid, dirichlet, folders" in message
    assert "'foo'" in message


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("run_name: demo\nseed: 42\ntrain:\n  rounds: 3\n local_epochs: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 5" in message
    assert "\n" not in message


def test_file_error_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  rounds: 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run\.yaml: train\.rounds:"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


def test_empty_file_is_the_default_config(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path) == RunConfig()


def test_demo_yaml_is_the_default_config() -> None:
    path = ROOT / "configs" / "demo.yaml"
    if not path.is_file():
        pytest.skip("configs/demo.yaml does not exist yet")
    assert load_config(path) == RunConfig()


def test_pyproject_run_config_is_the_default_config() -> None:
    """`flwr run .` (pyproject's [tool.flwr.app.config]) and the embedded default cannot drift."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    flat = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    assert config_from_run_config(flat) == RunConfig()
    assert flat == to_run_config(RunConfig())  # same keys and the same spelling of every value


def test_run_config_round_trip_keeps_none_and_non_defaults() -> None:
    cfg = RunConfig(
        run_name="trial-7",
        seed=7,
        device="cpu",
        output_dir="/tmp/out",
        resume=True,
        backbone=BackboneConfig(name="resnet18", weights="none", image_size=48),
        data=DataConfig(source="digits", path=None, split="iid", alpha=0.3, num_sites=3, max_samples=None),
        head=HeadConfig(hidden=32),
        train=TrainConfig(rounds=2, local_epochs=1, batch_size=16, strategy="fedprox", min_sites=3),
        privacy=PrivacyConfig(enabled=False, target_epsilon=1.5, target_delta=1e-6, accountant="prv"),
    )
    flat = to_run_config(cfg)
    assert None not in flat.values()  # TOML and Flower's run config have no null
    assert flat["data.max_samples"] == ""
    assert flat["backbone.weights_file"] == ""
    back = config_from_run_config(flat)
    assert back == cfg
    assert back.data.path is None
    assert back.backbone.weights_sha256 is None


def test_run_config_round_trip_with_values_where_defaults_are_none() -> None:
    cfg = RunConfig(
        backbone=BackboneConfig(weights_file="/w/m.pth", weights_sha256="ab" * 32),
        data=DataConfig(source="npz", path="/data/x.npz", max_samples=100),
    )
    assert config_from_run_config(to_run_config(cfg)) == cfg


def test_site_config_missing_name_is_named(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("data_source: digits\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_site_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "name: required key is missing" in message
    assert "\n" not in message


def test_site_config_unknown_policy_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("name: a\ndata_source: digits\npolicy:\n  max_eps: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"policy\.max_eps: unknown key.*max_epsilon"):
        load_site_config(path)


def test_site_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(
        "name: hospital-a\ndata_source: npz\ndata_path: /data/a.npz\nstate_dir: /var/site\n"
        "policy:\n  max_epsilon: 4\n  max_rounds: 20\n",
        encoding="utf-8",
    )
    site = load_site_config(path)
    assert site.name == "hospital-a"
    assert site.data_path == "/data/a.npz"
    assert site.policy == SitePolicy(max_epsilon=4.0, max_rounds=20)
    assert site.accept_app_version is None


def test_yaml_scientific_notation_without_a_dot_is_a_number(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("privacy:\n  target_delta: 1e-5\n")  # PyYAML alone reads this as the string '1e-5'
    assert load_config(path).privacy.target_delta == 1e-5
