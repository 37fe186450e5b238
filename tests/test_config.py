"""Run and site configuration: every mistake is a one-line ConfigError naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from fedtransfer.common.config.run import (
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
from flwr.common.config import flatten_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


@pytest.mark.parametrize("text", ["", "  \n\t\n", "# rounds: 3\n\n"])
def test_an_empty_file_is_a_config_error_not_the_demo(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"empty\.yaml: holds no settings .* leave --config out to run the demo"):
        load_config(path)


def test_demo_yaml_is_the_default_config() -> None:
    path = ROOT / "configs" / "demo.yaml"
    if not path.is_file():
        pytest.skip("configs/demo.yaml does not exist yet")
    assert load_config(path) == RunConfig()


SHIPPED = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.endswith(".schema.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads(path: Path) -> None:
    """A config the README tells users to run passes every check (protocol rules included) before anything starts."""
    assert load_config(path).run_name


def test_fedavg_only_settings_under_the_default_protocol_name_the_fix(tmp_path: Path) -> None:
    """fedsgd is the default: a robust strategy left on it is refused with the key to set, in one line."""
    path = tmp_path / "median.yaml"
    path.write_text("train:\n  strategy: fedmedian\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "train.protocol: fedavg" in str(info.value) and "\n" not in str(info.value)
    path.write_text("train:\n  strategy: fedmedian\n  protocol: fedavg\n", encoding="utf-8")
    assert load_config(path).train.strategy == "fedmedian"


def test_federated_evaluation_runs_every_evaluate_every_rounds_and_in_the_last() -> None:
    t = TrainConfig(rounds=12, evaluate_every=5)
    assert [r for r in range(13) if t.evaluates(r)] == [0, 5, 10, 12]
    assert all(TrainConfig(rounds=3).evaluates(r) for r in range(4))  # the default: every round
    assert not any(TrainConfig(rounds=3, fraction_evaluate=0.0).evaluates(r) for r in range(4))
    with pytest.raises(ConfigError, match=r"^train\.evaluate_every: "):
        TrainConfig(evaluate_every=0)


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
        train=TrainConfig(rounds=2, local_epochs=1, batch_size=16, strategy="fedprox", min_sites=3, protocol="fedavg"),
        privacy=PrivacyConfig(
            enabled=False, target_epsilon=1.5, target_delta=1e-6, accountant="rdp", feature_stats=False
        ),
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


def _alias_bomb(levels: int, width: int = 10) -> str:
    """A YAML flow list whose anchors nest `levels` deep: width**levels items once expanded.

    PyYAML shares aliased nodes, so loading it is cheap; printing it expands every alias.
    """
    items = ["&a0 [" + ", ".join(["x"] * width) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def test_error_echoes_a_bounded_value_for_a_yaml_alias_bomb(tmp_path: Path) -> None:
    # 10**6 items under a known key: the message used to repr all of them (and 10**9 exhausts memory)
    path = tmp_path / "bomb.yaml"
    path.write_text(f"train:\n  rounds: {_alias_bomb(6)}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: train.rounds: must be an integer")
    assert len(message) < 300 + len(str(path))


@pytest.mark.parametrize("value", ["x y" * 50_000, 10**200, {"k" * 10_000: 1}, "line\nbreak", list(range(100_000))])
def test_every_echoed_value_is_short_and_one_line(value: object) -> None:
    for raw in ({"run_name": value}, {"privacy": {"target_epsilon": value}}, {"data": {"split": value}}):
        message = _error(raw)
        assert len(message) < 300, message[:100]


def test_unknown_key_that_is_huge_or_multiline_is_echoed_bounded() -> None:
    for key in ("k" * 100_000, "two\nlines"):
        message = _error({key: 1})
        assert len(message) < 400
        assert "unknown key" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"seed: \xff\xfe\n", "not UTF-8"),
        (b"when: 2024-13-45\n", "not valid YAML"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b"seed: " + b"9" * 5000 + b"\n", "not valid YAML"),
    ],
)
def test_unparseable_files_are_config_errors_naming_the_file(tmp_path: Path, text: bytes, expected: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(text)
    for load in (load_config, load_site_config):
        with pytest.raises(ConfigError) as info:
            load(path)
        assert str(path) in str(info.value)
        assert expected in str(info.value)


def test_integer_too_large_for_a_float_is_a_config_error() -> None:
    assert "finite number" in _error({"privacy": {"target_epsilon": 10**400}})


_SECTION_KEYS = {
    "": [
        "run_name",
        "seed",
        "device",
        "output_dir",
        "resume",
        "secure_aggregation",
        "backbone",
        "data",
        "train",
        "privacy",
        "secagg",
        "head",
    ],
    "backbone": ["name", "weights", "weights_file", "weights_sha256", "image_size"],
    "data": ["source", "path", "split", "alpha", "num_sites", "max_samples", "site_test_fraction"],
    "train": ["rounds", "local_epochs", "batch_size", "learning_rate", "strategy", "min_sites", "max_update_norm"],
    "privacy": ["enabled", "target_epsilon", "target_delta", "accountant"],
    "secagg": ["num_shares", "reconstruction_threshold", "quantization_range"],
}
_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
    st.binary(max_size=10),
    st.sampled_from(["", "1e-5", "nan", "inf", "fedavg", "mnist", "folders", "none", "mobilenet_v2", "resnet18"]),
)
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def _configs(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly-known keys with arbitrary values, plus arbitrary keys: reaches every validator."""
    raw: dict[str, Any] = {}
    for section, keys in _SECTION_KEYS.items():
        chosen = draw(st.dictionaries(st.sampled_from(keys), _values, max_size=3))
        if section:
            raw[section] = chosen if draw(st.booleans()) else draw(_values)
        else:
            raw |= chosen
    return raw | draw(st.dictionaries(st.text(max_size=8), _values, max_size=2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_configs())
def test_fuzzed_configs_fail_only_with_a_short_config_error(raw: dict[str, Any]) -> None:
    for build in (config_from_dict, lambda r: config_from_run_config(flatten_dict(r) if _flattenable(r) else r)):
        try:
            build(raw)
        except ConfigError as err:
            assert "\n" not in str(err)
            assert len(str(err)) < 500


def _flattenable(raw: object) -> bool:
    try:
        flatten_dict(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError, AttributeError):
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzzed_yaml_text_fails_only_with_a_config_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    for load in (load_config, load_site_config):
        try:
            load(path)
        except ConfigError as err:
            assert "\n" not in str(err)
