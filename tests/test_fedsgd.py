"""DP-FedSGD, the DP feature-statistics release and per-user privacy: each mechanism's bound, its accounting,
the server's step, the site's reply and the canary audit on the fedsgd protocol."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtransfer.client import train_round
from fedtransfer.client.site import Declined, Site
from fedtransfer.common.config.run import ConfigError, config_from_dict
from fedtransfer.common.data.sources import Samples, SiteData
from fedtransfer.common.model.head import make_head
from fedtransfer.common.privacy.calibration import epsilon_of, plan_fedsgd, stats_noise_multiplier
from fedtransfer.common.privacy.events import gaussian_steps
from fedtransfer.common.privacy.fedsgd import (
    STATS_COUNTS,
    STATS_SUMS,
    Units,
    class_statistics,
    clipped_gradient_sum,
    release_statistics,
    start_from_statistics,
    synthetic_users,
    whitened_sensitivity,
)
from fedtransfer.common.privacy.ledger import PrivacyLedger
from fedtransfer.common.privacy.mechanisms import event_of, fedsgd_local
from fedtransfer.common.storage.audit_log import read_records
from fedtransfer.common.wire.exchange import head_spec, head_to_arrays
from fedtransfer.common.wire.protocol import FEATURE_STATS, RECORD_COUNTS, DPRecord, Metric
from fedtransfer.server.audit.empirical import CanarySettings, audit_training
from fedtransfer.server.federation.strategy import FedSGD, ScreenedStrategy, server_step
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from tests.messages import train_message

DIM, CLASSES = 32, 4


def _data(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def _flat(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten() for v in sums.values()])


def test_unclipped_full_batch_sum_is_the_gradient_of_the_summed_loss() -> None:
    x, y = _data()
    head = make_head(DIM, CLASSES)
    out = clipped_gradient_sum(head, x, y, Units.records(len(y)), 1.0, None, torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(head(x), y, reduction="sum").backward()
    for name, p in head.named_parameters():
        torch.testing.assert_close(out.sums[name], p.grad, atol=1e-5, rtol=1e-5)
    assert out.sampled == len(y)


@pytest.mark.parametrize("per_user", [1, 5])
def test_one_unit_moves_the_clipped_sum_by_at_most_the_clip_norm(per_user: int) -> None:
    """Add/remove one record (or one user, all their records): the sum moves by <= C, however many records."""
    x, y = _data(60)
    users = synthetic_users(60, per_user, seed=3)
    head = make_head(DIM, CLASSES)
    with torch.no_grad():  # uniform predictions: every record's gradient is ~7 in norm, so clipping binds for all
        head[-1].weight.zero_()
        head[-1].bias.zero_()
    clip = 0.5

    def total(keep: torch.Tensor) -> torch.Tensor:
        units = Units.of_users(users[keep])
        return _flat(clipped_gradient_sum(head, x[keep], y[keep], units, 1.0, clip, torch.Generator()).sums)

    everyone = torch.ones(60, dtype=torch.bool)
    without = users != users[0]
    assert int((~without).sum()) == per_user
    assert (total(everyone) - total(without)).norm() <= clip + 1e-5
    assert (total(everyone) - total(without)).norm() > 0.9 * clip  # the bound is reached, not merely respected


@pytest.mark.parametrize("clip", [None, 0.3])
def test_closed_form_for_the_linear_probe_equals_per_sample_autograd(clip: float | None) -> None:
    """Records as units take the closed form (softmax regression): it equals clipping autograd's gradients one
    record at a time, and torch.func's per-sample path (users with one record each)."""
    x, y = _data()
    head = make_head(DIM, CLASSES, centred=True)
    with torch.no_grad():
        head[-1].weight.normal_()
    fast = clipped_gradient_sum(head, x, y, Units.records(60), 1.0, clip, torch.Generator())
    expected = {k: torch.zeros_like(v) for k, v in head.named_parameters()}
    for i in range(60):
        head.zero_grad()
        torch.nn.functional.cross_entropy(head(x[i : i + 1]), y[i : i + 1]).backward()
        norm = torch.cat([p.grad.flatten() for p in head.parameters()]).norm()
        factor = 1.0 if clip is None else min(1.0, clip / float(norm))
        for k, p in head.named_parameters():
            expected[k] += factor * p.grad
    for name, value in expected.items():
        torch.testing.assert_close(fast.sums[name], value, atol=1e-5, rtol=1e-4)
    if clip is None:  # unclipped, any grouping sums to the same: torch.func's per-sample path agrees
        pairs = clipped_gradient_sum(head, x, y, Units.of_users(torch.arange(60) // 2), 1.0, None, torch.Generator())
        for name in expected:
            torch.testing.assert_close(pairs.sums[name], fast.sums[name], atol=1e-5, rtol=1e-4)


def test_a_user_is_sampled_with_all_records_or_none() -> None:
    x, y = _data(60)
    units = Units.of_users(synthetic_users(60, 6, seed=0))
    sampled = {
        clipped_gradient_sum(make_head(DIM, CLASSES), x, y, units, 0.5, 1.0, torch.Generator().manual_seed(s)).sampled
        for s in range(20)
    }
    assert sampled <= set(range(0, 61, 6)) and len(sampled) > 2


def test_statistics_move_by_at_most_one_per_record_and_per_user() -> None:
    x, y = _data(40)
    for units in (Units.records(40), Units.of_users(synthetic_users(40, 4, seed=1))):
        sums, counts = class_statistics(x, y, CLASSES, units)
        gone = units.of_record != units.of_record[0]
        rest = Units.of_users(units.of_record[gone])
        s2, c2 = class_statistics(x[gone], y[gone], CLASSES, rest)
        assert (sums - s2).norm() <= 1 + 1e-5 and (counts - c2).norm() <= 1 + 1e-5
        assert counts.sum() == pytest.approx(units.count)


def test_statistics_noise_matches_one_gaussian_step_at_the_noise_multiplier() -> None:
    """Sums and counts with their two noise scales are one Gaussian mechanism of whitened sensitivity 1/σ."""
    sigma = 3.0
    assert whitened_sensitivity(sigma) == pytest.approx(1 / sigma)
    x, y = _data(40)
    draws = [
        release_statistics(x, y, CLASSES, Units.records(40), sigma, torch.Generator().manual_seed(s))
        for s in range(200)
    ]
    sums, counts = class_statistics(x, y, CLASSES, Units.records(40))
    sum_sd = torch.stack([d[STATS_SUMS] - sums for d in draws]).std().item()
    count_sd = torch.stack([d[STATS_COUNTS] - counts for d in draws]).std().item()
    assert sum_sd == pytest.approx(sigma * math.sqrt(10 / 9), rel=0.05)
    assert count_sd == pytest.approx(3 * sigma * math.sqrt(10 / 9), rel=0.1)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_whole_run_with_the_statistics_release_meets_the_target(accountant: str) -> None:
    plan = plan_fedsgd(
        num_units=600,
        sample_rate=0.3,
        rounds=40,
        target_epsilon=3.0,
        target_delta=1e-5,
        max_grad_norm=1.0,
        accountant=accountant,
        stats_share=0.2,
        unit="record",
    )
    history = [plan.stats_event, *[plan.round_event] * plan.rounds]
    eps = epsilon_of(history, 1e-5, accountant)
    assert 0.97 * 3.0 <= eps <= 3.0
    whole = stats_noise_multiplier(3.0, 1e-5, 1.0, accountant)  # one Gaussian release spending everything
    assert (1 / plan.stats_noise_multiplier) ** 2 == pytest.approx(0.2 / whole**2)
    assert plan.stats_event == gaussian_steps(plan.stats_noise_multiplier, 1.0, 1)
    alone = plan_fedsgd(
        num_units=600,
        sample_rate=0.3,
        rounds=40,
        target_epsilon=3.0,
        target_delta=1e-5,
        max_grad_norm=1.0,
        accountant=accountant,
        stats_share=None,
        unit="record",
    )
    assert alone.noise_multiplier < plan.noise_multiplier  # the release's share is paid for by the rounds


def test_server_step_is_the_heavy_ball_formula_on_the_expected_batch() -> None:
    w = {"a": np.array([1.0, 2.0], np.float32), "m": np.array([5.0], np.float32)}
    g1, g2 = {"a": np.array([3.0, -6.0]), "m": np.zeros(1)}, {"a": np.array([0.0, 3.0]), "m": np.zeros(1)}
    w1, v1 = server_step(w, g1, {}, 3.0, 0.5, 0.9, frozenset({"m"}))
    np.testing.assert_allclose(w1["a"], [1.0 - 0.5 * 1.0, 2.0 + 0.5 * 2.0])
    w2, v2 = server_step(w1, g2, v1, 3.0, 0.5, 0.9, frozenset({"m"}))
    np.testing.assert_allclose(v2["a"], [0.9 * 1.0, 0.9 * -2.0 + 1.0])
    np.testing.assert_allclose(w2["a"], w1["a"] - 0.5 * v2["a"], rtol=1e-6)
    assert w2["m"] is w["m"]  # the centring mean has no gradient: never stepped


def _reply(arrays: dict[str, np.ndarray], expected: float | None, node: int) -> Message:
    meta = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    metrics = {Metric.NUM_EXAMPLES: 10} | ({Metric.EXPECTED_BATCH: expected} if expected is not None else {})
    record = ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()})
    return Message(content=RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), metadata=meta)


def test_screened_fedsgd_sums_the_sites_and_refuses_unfit_gradients() -> None:
    head = make_head(DIM, CLASSES)
    start = {k: v.numpy() for k, v in head_to_arrays(head).items()}
    strategy = ScreenedStrategy(FedSGD(0.5, 0.0, frozenset(), min_train_nodes=1), head_spec(head), min_sites=2)
    strategy.strategy.current = start
    good = {k: np.ones_like(v) for k, v in start.items()}
    nan = {k: np.full_like(v, np.nan) for k, v in start.items()}
    wrong = {k: np.ones((2, 2), np.float32) for k in start}
    replies = [
        _reply(good, 3.0, 1),
        _reply(good, 1.0, 2),
        _reply(nan, 1.0, 3),
        _reply(wrong, 1.0, 4),
        _reply(good, None, 5),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert sorted(strategy.refused) == [3, 4, 5]
    assert "NaN" in strategy.refused[3] and "expected-batch" in strategy.refused[5]
    for name, value in arrays.items():  # two sites' sums of ones over 3 + 1 expected records
        np.testing.assert_allclose(value.numpy(), start[name] - 0.5 * 2.0 / 4.0, rtol=1e-6)


FEDSGD = {
    "train": {"protocol": "fedsgd", "rounds": 3, "sample_rate": 0.5},
    "privacy": {"target_delta": 1e-3, "feature_stats": True, "accountant": "rdp"},
}


def _site(tmp_path: Path, n: int = 80) -> Site:
    x, y = _data(n)
    samples = Samples(np.zeros((n, 1, 1, 1), np.uint8), y.numpy(), tuple(str(c) for c in range(CLASSES)))

    class Backbone:
        name, fingerprint, feature_dim, device = "b", "f" * 64, DIM, torch.device("cpu")

    return Site("site-x", SiteData("site-x", samples, samples), Backbone(), tmp_path, 7, None, None, x, y, x, y)


def _message(server_round: int, centred: bool = True, **extra: str) -> Message:
    return train_message(make_head(DIM, CLASSES, centred=centred), server_round, **extra)


def test_site_releases_statistics_once_then_sends_noisy_gradient_sums(tmp_path: Path) -> None:
    cfg, site = config_from_dict(FEDSGD), _site(tmp_path)
    stats = train_round.train(site, cfg, _message(0, release=FEATURE_STATS))
    assert sorted(stats["arrays"].keys()) == [STATS_COUNTS, STATS_SUMS]
    dp0 = DPRecord.from_mapping(stats["dp"])
    assert (dp0.sample_rate, dp0.steps, dp0.clip_norm) == (1.0, 1, 1.0)
    with pytest.raises(Declined, match="already released"):
        train_round.train(site, cfg, _message(0, release=FEATURE_STATS, **{"app-version": "again"}))
    reply = train_round.train(site, cfg, _message(1))
    assert list(reply["arrays"].keys()) == list(head_spec(make_head(DIM, CLASSES, centred=True)))
    assert not reply["arrays"]["head.0.mean"].numpy().any()  # a buffer has no gradient: zeros, nothing private
    # no exact count or timing leaves: the weight and q·n come from the count released in round 0
    released = float(stats["arrays"][STATS_COUNTS].numpy().sum())
    for sent in (stats, reply):
        assert sent["metrics"][Metric.NUM_EXAMPLES] == pytest.approx(released) != 80
        assert Metric.TRAIN_SECONDS not in sent["metrics"]
    assert reply["metrics"][Metric.EXPECTED_BATCH] == pytest.approx(0.5 * released)
    assert Metric.TRAIN_LOSS not in reply["metrics"]
    [logged] = [r for r in read_records(site.audit_path) if r["event"] == "update-sent" and r["round"] == 1]
    assert logged["examples"] == 80 and logged["train_s"] >= 0  # the exact figures stay in the site's own log
    dp1 = DPRecord.from_mapping(reply["dp"])
    assert (dp1.sample_rate, dp1.steps) == (0.5, 1)
    ledger = PrivacyLedger(site.ledger_path, "r")
    assert ledger.history == [event_of(dp0), event_of(dp1)]
    assert reply["metrics"][Metric.EPSILON] == pytest.approx(epsilon_of(ledger.history, 1e-3, "rdp"))


def test_user_level_site_samples_users(tmp_path: Path) -> None:
    privacy = {"target_delta": 1e-2, "unit": "user", "synthetic_users": 4, "feature_stats": False, "accountant": "rdp"}
    raw = FEDSGD | {"privacy": privacy}  # rdp as in FEDSGD: this test counts units, PRV's calibration took most of it
    cfg, site = config_from_dict(raw), _site(tmp_path)
    with pytest.raises(Declined, match="released no record count in round 0"):  # nothing sent about its size
        train_round.train(site, cfg, _message(1, centred=False))
    counts = train_round.train(site, cfg, _message(0, centred=False, release=RECORD_COUNTS))
    assert list(counts["arrays"].keys()) == [STATS_COUNTS]  # per-class counts of users (each record 1/m), noised
    dp0 = DPRecord.from_mapping(counts["dp"])
    want = stats_noise_multiplier(cfg.privacy.target_epsilon, 1e-2, cfg.privacy.count_share, "rdp")
    assert (dp0.noise_multiplier, dp0.sample_rate, dp0.steps, dp0.clip_norm) == (want, 1.0, 1, 1.0)
    released = max(float(counts["arrays"][STATS_COUNTS].numpy().astype(np.float64).sum()), 1.0)
    reply = train_round.train(site, cfg, _message(1, centred=False))
    assert reply["metrics"][Metric.NUM_EXAMPLES] == pytest.approx(released, rel=1e-6) != 20  # 80 records, 4 per user
    assert reply["metrics"][Metric.EXPECTED_BATCH] == pytest.approx(0.5 * released, rel=1e-6)  # q·ñ, never q·20
    ledger = PrivacyLedger(site.ledger_path, "r")
    assert ledger.entry["rounds"][0]["release"] == RECORD_COUNTS and ledger.history[0] == event_of(dp0)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"train": {"protocol": "fedavg"}, "privacy": {"unit": "user", "synthetic_users": 4}}, "privacy.unit"),
        ({"train": {"protocol": "fedsgd"}, "privacy": {"unit": "user"}}, "privacy.synthetic_users"),
        ({"train": {"protocol": "fedsgd"}, "privacy": {"trust": "distributed"}}, "secure_aggregation"),
        ({"train": {"protocol": "fedsgd", "strategy": "fedmedian"}}, "train.strategy"),
        ({"train": {"sample_rate": 0.0}}, "train.sample_rate"),
    ],
)
def test_unsupported_combinations_are_one_line_config_errors(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: "):
        config_from_dict(raw)


def test_class_mean_start_centres_and_points_at_the_class_means() -> None:
    x, y = _data(200)
    x = x + 3 * torch.nn.functional.one_hot(y, DIM).float()  # separable classes
    head = make_head(DIM, CLASSES, centred=True)
    sums, counts = class_statistics(x, y, CLASSES, Units.records(200))
    start_from_statistics(head, sums, counts)
    assert (head(x).argmax(1) == y).float().mean() > 0.9


CANARY = {
    "train": {"protocol": "fedsgd", "rounds": 10, "sample_rate": 1.0, "learning_rate": 2.0},
    "privacy": {"target_epsilon": 1.0, "target_delta": 1e-4, "feature_stats": True},
}


def _features(n: int = 200, dim: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    means, labels = rng.random((10, dim)), rng.integers(0, 10, n)
    return torch.tensor(
        np.maximum(means[labels] + 0.5 * rng.standard_normal((n, dim)), 0), dtype=torch.float32
    ), torch.tensor(labels)


def test_canary_audit_on_fedsgd_passes_the_honest_site_and_catches_one_without_noise(monkeypatch) -> None:
    x, y = _features()
    cfg = config_from_dict(CANARY)
    honest = audit_training(x, y, 10, cfg, CanarySettings(num_canaries=400))
    assert honest.claimed_epsilon == pytest.approx(1.0, abs=0.03)
    assert not honest.exceeds_claim
    monkeypatch.setattr(fedsgd_local, "add_noise", lambda sums, std, gen, secure=False, skip=(): dict(sums))
    broken = audit_training(x, y, 10, cfg, CanarySettings(num_canaries=400))
    assert broken.claimed_epsilon == pytest.approx(honest.claimed_epsilon)  # it still claims the DP it lacks
    assert broken.exceeds_claim, broken.eps_lower_bound


def test_fedsgd_run_with_statistics_on_the_simulation_engine_passes_its_audit(tmp_path: Path, capsys) -> None:
    """A small fedsgd run with the statistics release, in simulation: ε per site counts round 0, the audit
    recomputes it from the sites' logs and passes, and the exported model carries the centring mean."""
    import json

    import yaml
    from fedtransfer.cli.main import main
    from fedtransfer.server.export.model_file import load_model

    run_dir = tmp_path / "run"
    raw = {
        "run_name": "fedsgd",
        "output_dir": str(run_dir),
        "cache_dir": str(tmp_path / "cache"),
        "backbone": {"image_size": 32},
        "data": {"num_sites": 2, "max_samples": 600, "split": "iid"},
        "train": {"protocol": "fedsgd", "rounds": 3, "sample_rate": 0.5, "evaluate_every": 2},
        "privacy": {"target_epsilon": 3.0, "target_delta": 1e-4, "feature_stats": True},
    }
    config = tmp_path / "fedsgd.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["simulate", "--config", str(config)]) == 0, capsys.readouterr()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics if m["federated"]] == [0, 2, 3]  # evaluate_every 2, and the last round
    privacy = json.loads((run_dir / "privacy.json").read_text())["sites"]
    assert len(privacy) == 2
    for site in privacy.values():
        assert site["rounds_trained"] == [0, 1, 2, 3]
        release = site["per_round"][0]
        assert (release["sample_rate"], release["steps"]) == (1.0, 1)
        assert [r["release"] for r in site["per_round"]] == [FEATURE_STATS, "training", "training", "training"]
        assert site["sample_rate"] == 0.5 and site["steps"] == 4
        assert site["epsilon"] == pytest.approx(site["epsilon_recomputed"], rel=1e-9)
        assert 0.9 * 3.0 < site["epsilon"] <= 3.0 + 1e-9
    assert main(["audit", str(run_dir), "--report-dir", str(tmp_path / "audit")]) == 0, capsys.readouterr().out
    model = load_model(run_dir / "model.pt")
    assert model.head[0].mean.abs().sum() > 0  # centred on the released mean


def test_fedavg_trains_a_centred_head_and_keeps_its_mean(tmp_path: Path) -> None:
    raw = {
        "train": {"protocol": "fedavg", "rounds": 2, "local_epochs": 1, "batch_size": 20},
        "privacy": {"target_delta": 1e-3, "feature_stats": True, "accountant": "rdp"},  # the mean, not the accountant
    }
    cfg, site = config_from_dict(raw), _site(tmp_path)
    stats = train_round.train(site, cfg, _message(0, release=FEATURE_STATS))
    head = make_head(DIM, CLASSES, centred=True)
    sums, counts = (torch.from_numpy(stats["arrays"][name].numpy()) for name in (STATS_SUMS, STATS_COUNTS))
    start_from_statistics(head, sums, counts)
    msg = _message(1)
    msg.content["arrays"] = head_to_arrays(head)
    reply = train_round.train(site, cfg, msg)
    np.testing.assert_array_equal(reply["arrays"]["head.0.mean"].numpy(), head[0].mean.numpy())
    history = PrivacyLedger(site.ledger_path, "r").history
    assert (history[0].sample_rate, history[0].count) == (1.0, 1) and len(history) == 2
    assert reply["metrics"][Metric.EPSILON] <= 3.0
