"""A binary model's decision threshold: the rule's config, choosing it, where it lives, and predict applying it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fedtransfer.cli.main import main
from fedtransfer.client.site_model.threshold import site_threshold
from fedtransfer.common.config.finetune import ThresholdRule, threshold_rule
from fedtransfer.common.config.run import ConfigError, config_from_dict
from fedtransfer.common.encoders.registry import load_encoder
from fedtransfer.common.model.head import make_head
from fedtransfer.common.model.threshold import Threshold, best_threshold, decide, global_threshold
from fedtransfer.server.export.model_file import ModelFileError, export_model, load_model

SCHEMA = {
    "columns": {"amount": {"type": "numeric", "range": [0, 100], "missing": "error"}},
    "label": {"column": "outcome", "classes": ["ok", "default"]},
}


@pytest.mark.parametrize(
    ("text", "rule"),
    [("balanced_accuracy", ThresholdRule("balanced_accuracy")), ("cost:5", ThresholdRule("cost", 5.0))],
)
def test_the_rule_is_read_from_personal_threshold(text: str, rule: ThresholdRule) -> None:
    cfg = config_from_dict({"personal": {"threshold": text}})
    assert threshold_rule(cfg.personal.threshold) == rule
    assert str(rule) == text


@pytest.mark.parametrize("bad", ["accuracy", "cost:", "cost:-1", "cost:nan", "cost:inf", 3])
def test_a_bad_rule_is_one_line_naming_the_key(bad: object) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"personal": {"threshold": bad}})
    assert str(err.value).startswith("personal.threshold: ")
    assert "\n" not in str(err.value)


def test_balanced_accuracy_moves_the_threshold_below_the_few_positives_scores() -> None:
    """88 negatives around 0.05, 12 positives around 0.3: argmax flags none, the chosen threshold flags them."""
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0.0, 0.2, 88), rng.uniform(0.22, 0.4, 12)])
    y = np.array([0] * 88 + [1] * 12)
    t = best_threshold(p, y, ThresholdRule("balanced_accuracy"))
    assert t is not None and 0.2 < t < 0.22
    probs = np.stack([1 - p, p], 1)
    assert (decide(probs, None) == 1).sum() == 0
    assert (decide(probs, t) == y).all()


def test_a_higher_cost_of_a_miss_never_raises_the_threshold() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.15, 400), 0, 1)  # overlapping classes
    values = [best_threshold(p, y, ThresholdRule("cost", r)) for r in (0.2, 1.0, 5.0, 50.0)]
    assert values == sorted(values, reverse=True) and values[0] > values[-1]
    assert best_threshold(p, np.zeros(400, dtype=int), ThresholdRule("balanced_accuracy")) is None


def test_the_global_threshold_uses_only_the_rule_or_the_dp_class_counts() -> None:
    rule = ThresholdRule("balanced_accuracy")
    assert global_threshold(ThresholdRule("cost", 4.0), None).value == pytest.approx(0.2)
    assert global_threshold(rule, [880.0, 120.0]).value == pytest.approx(0.12)
    assert global_threshold(rule, [900.0, -3.0]).value == pytest.approx(1 / 901)  # noisy counts clamp at 1
    kept = global_threshold(rule, None)
    assert kept.value == 0.5 and "no DP class counts" in kept.chosen_on


def test_a_site_chooses_on_its_validation_split_and_flags_the_rare_class() -> None:
    """A head biased towards the majority, as DP leaves it on 12% positives: the site's threshold recovers recall."""
    gen = torch.Generator().manual_seed(0)
    y = (torch.rand(500, generator=gen) < 0.12).long()
    x = torch.randn(500, 4, generator=gen) + y[:, None].float() * 1.5
    head = torch.nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0] * 4, [0.6] * 4]))
        head.bias.copy_(torch.tensor([0.0, -5.5]))
    t = site_threshold(head, x, y, rule_text="balanced_accuracy", seed=3, num_classes=2)
    assert t is not None and t.records == 100 and "validation split" in t.chosen_on
    probs = head(x).softmax(1).detach().numpy()
    truth = y.numpy()

    def balanced(pred: np.ndarray) -> float:
        return float(np.mean([(pred[truth == c] == c).mean() for c in (0, 1)]))

    assert (decide(probs, None) == 1).sum() < 10 < (decide(probs, t.value) == 1).sum()
    assert balanced(decide(probs, t.value)) > balanced(decide(probs, None)) + 0.2
    assert site_threshold(head, x, y, rule_text="balanced_accuracy", seed=3, num_classes=3) is None


def _tabular_model(tmp_path: Path, threshold: Threshold | None) -> Path:
    schema = tmp_path / "schema.yaml"
    schema.write_text(yaml.safe_dump(SCHEMA))
    cfg = config_from_dict(
        {"backbone": {"name": "tabular", "schema": str(schema)}, "data": {"source": "table", "path": "unused.csv"}}
    )
    encoder = load_encoder(cfg.backbone, "cpu")
    head = make_head(encoder.feature_dim, 2)
    with torch.no_grad():  # p(default) rises with amount, but stays below 0.5: argmax never says default
        head[1].weight.zero_()
        head[1].bias.copy_(torch.tensor([0.0, -4.0]))
        head[1].weight[1, 0] = 0.5  # amount / 100 is feature 0 (then unit length, times FEATURE_SCALE)
    return export_model(tmp_path / "model.pt", encoder, head, hidden=0, classes=["ok", "default"], threshold=threshold)


def test_predict_applies_the_stored_threshold_and_prints_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "applicants.csv"
    rows.write_text("amount\n5\n95\n", encoding="utf-8")
    plain = _tabular_model(tmp_path, None)
    assert main(["predict", str(plain), str(rows)]) == 0
    assert capsys.readouterr().out.splitlines() == ["2\tok", "3\tok"]

    chosen = Threshold(0.1, "balanced_accuracy", "the validation split (100 records, 12 positive)", 100)
    model_path = _tabular_model(tmp_path, chosen)
    assert load_model(model_path).threshold == chosen
    assert main(["predict", str(model_path), str(rows)]) == 0
    assert capsys.readouterr().out.splitlines() == ["2\tok", "3\tdefault"]

    assert main(["predict", str(model_path), str(rows), "--scores"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header == "input,p_ok,p_default,predicted"
    cells = [line.split(",") for line in lines]
    assert [c[0] for c in cells] == ["2", "3"] and [c[3] for c in cells] == ["ok", "default"]
    assert all(float(c[1]) + float(c[2]) == pytest.approx(1.0, abs=1e-5) for c in cells)
    assert float(cells[0][2]) < 0.1 <= float(cells[1][2]) < 0.5  # p(default): the positive class, the second

    out = tmp_path / "out" / "scores.json"
    out.parent.mkdir()
    assert main(["predict", str(model_path), str(rows), "--format", "json", "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    document = json.loads(out.read_text())
    assert document["threshold"] == {"positive_class": "default", **chosen.as_dict()}
    assert [p["predicted"] for p in document["predictions"]] == ["ok", "default"]
    assert document["predictions"][1]["scores"]["default"] == pytest.approx(float(cells[1][2]), abs=1e-5)


def test_a_model_file_with_a_broken_threshold_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_path = _tabular_model(tmp_path, Threshold(0.1, "balanced_accuracy", "validation", 100))
    raw = torch.load(model_path, weights_only=True)
    raw["threshold"]["value"] = 7.0
    torch.save(raw, model_path)
    with pytest.raises(ModelFileError, match="its threshold must be a value in"):
        load_model(model_path)
    rows = tmp_path / "applicants.csv"
    rows.write_text("amount\n5\n", encoding="utf-8")
    assert main(["predict", str(model_path), str(rows), "--scores"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"fedtransfer: error: {model_path}: its threshold")


def test_predict_bad_rows_and_unwritable_out_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_path = _tabular_model(tmp_path, None)
    bad = tmp_path / "bad.csv"
    bad.write_text("amount\n5\nlots\n", encoding="utf-8")
    assert main(["predict", str(model_path), str(bad), "--scores"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{bad}: line 3 column amount" in line
    good = tmp_path / "good.csv"
    good.write_text("amount\n5\n", encoding="utf-8")
    out = good / "scores.csv"  # under a file: no folder can be made there
    assert main(["predict", str(model_path), str(good), "--format", "csv", "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "scores.csv: cannot write the predictions" in line and not out.exists()
    assert main(["predict", str(model_path), str(good), "--scores", "--format", "json"]) == 2
    assert "--scores prints CSV" in capsys.readouterr().err
