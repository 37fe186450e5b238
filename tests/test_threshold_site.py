"""A binary site's final round keeps its threshold with its model and reports what it changed; the global
model's threshold comes from the rule or the DP class counts only (server/federation/class_counts.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from fedtransfer.client.evaluate_round import evaluate
from fedtransfer.client.site import Site
from fedtransfer.client.site_model.report import read_report, summary_lines
from fedtransfer.common.config.run import config_from_dict
from fedtransfer.common.model.head import make_head
from fedtransfer.common.wire.exchange import head_to_arrays
from fedtransfer.server.federation.class_counts import save_counts, threshold_for

from tests.test_personal import _cfg, _message

DIM = 8


def _rare_positive_site(tmp_path: Path) -> Site:
    """12% positives that sit a little apart from the negatives: a model biased to the majority misses them."""
    g = torch.Generator().manual_seed(1)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.rand(n, generator=g) < 0.12).long()
        return torch.randn(n, DIM, generator=g) + 1.2 * y[:, None].float(), y

    (train_x, train_y), (test_x, test_y) = split(600), split(476)
    encoder = SimpleNamespace(device=torch.device("cpu"), feature_dim=DIM, name="test-encoder", fingerprint="fp")
    data = SimpleNamespace(test=SimpleNamespace(classes=["no", "yes"]))
    return Site("site-0", data, encoder, tmp_path, 7, None, None, train_x, train_y, test_x, test_y, True)  # type: ignore[arg-type]


def _majority_head() -> torch.nn.Module:
    """A global head as DP leaves it on a rare class: the positive logit far below the negative one."""
    head = make_head(DIM, 2, centred=True)  # as the default config trains it (feature statistics)
    with torch.no_grad():
        head[2].weight.copy_(torch.stack([torch.zeros(DIM), torch.full((DIM,), 0.2)]))
        head[2].bias.copy_(torch.tensor([0.0, -6.0]))
    return head


def test_a_binary_sites_final_model_keeps_its_threshold_and_flags_the_rare_class(tmp_path: Path) -> None:
    folder = tmp_path / "site-0"  # the simulation's sites/<site>/ layout, which summary_lines reads
    folder.mkdir()
    site = _rare_positive_site(folder)
    cfg = _cfg()
    arrays = head_to_arrays(_majority_head())
    evaluate(site, cfg, _message(cfg.train.rounds, arrays))  # the final model is chosen after the last round
    report = read_report(folder)
    assert report is not None
    kept = torch.load(folder / "personal" / "r1.pt", weights_only=True)
    assert kept["threshold"] == report["threshold"] and report["threshold"]["rule"] == "balanced_accuracy"
    assert "validation split" in report["threshold"]["chosen_on"] and report["threshold"]["records"] == 120
    s, positives = report["scores"], report["positives"]
    assert positives == int(site.test_y.sum()) and s["final"]["records"] == 476
    assert s["global"]["predicted_positive"] < positives / 4  # argmax on the majority-biased model: almost none
    assert s["final"]["threshold"] == report["threshold"]["value"]
    assert s["final"]["predicted_positive"] >= positives / 2
    assert s["final"]["balanced_accuracy"]["value"] > s["global"]["balanced_accuracy"]["value"] + 0.1
    low, high = s["final"]["balanced_accuracy"]["interval95"]
    assert low < s["final"]["balanced_accuracy"]["value"] < high
    page = (folder / "collaboration.html").read_text()
    assert "Decision threshold" in page and f"{positives} positive of 476" in page
    (line,) = summary_lines(tmp_path, "r1")
    assert f"{s['final']['predicted_positive']} predicted positive ({positives} are)" in line


def test_the_global_threshold_follows_the_dp_class_counts_kept_in_the_run_folder(tmp_path: Path) -> None:
    cfg = config_from_dict({"output_dir": str(tmp_path)})
    assert threshold_for(cfg, 2).value == 0.5  # no statistics release: argmax, and it says so
    save_counts(tmp_path, [880.4, 119.6])
    chosen = threshold_for(cfg, 2)
    assert abs(chosen.value - 0.1196) < 1e-6 and "DP class counts" in chosen.chosen_on
    assert threshold_for(cfg, 3) is None  # more than two classes: argmax, nothing stored
    cost = replace(cfg, personal=replace(cfg.personal, threshold="cost:9"))
    assert abs(threshold_for(cost, 2).value - 0.1) < 1e-12  # the Bayes threshold, whatever the counts
