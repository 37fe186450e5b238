"""privacy.trust: distributed: the config's rules, a site's integer sum and Skellam share, its two ε, its policy,
and a whole run on the Simulation Engine whose audit passes, and fails when a site's log lacks its share."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtransfer.client import train_round
from fedtransfer.client.dp_count import released_count
from fedtransfer.client.site import Declined, Site, enforce_policy
from fedtransfer.common.config.run import ConfigError, SecAggConfig, SitePolicy, config_from_dict
from fedtransfer.common.data.sources import Samples, SiteData
from fedtransfer.common.model.head import make_head
from fedtransfer.common.privacy.calibration import epsilon_of
from fedtransfer.common.privacy.events import SkellamDpEvent
from fedtransfer.common.privacy.ledger import PrivacyLedger
from fedtransfer.common.privacy.mechanisms import event_of, mechanism_for
from fedtransfer.common.privacy.skellam import sensitivities
from fedtransfer.common.storage.audit_log import RESERVED_FIELDS, AuditLog, read_records
from fedtransfer.common.wire.protocol import DPRecord, Metric

from tests.messages import train_message

DIM, CLASSES = 32, 4
GRID = {"quantization_range": 2**27, "max_weight": 2048}  # 16,384 levels per unit: configs/distributed.yaml's
DISTRIBUTED = {
    "train": {"protocol": "fedsgd", "rounds": 3, "min_sites": 3, "fraction_evaluate": 0.0},
    "data": {"num_sites": 3},
    "secure_aggregation": True,
    "secagg": GRID,
    "privacy": {"trust": "distributed", "target_delta": 1e-3, "accountant": "rdp", "feature_stats": False},
}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"secure_aggregation": False}, "secure_aggregation"),
        ({"train": {"protocol": "fedavg"}}, "train.protocol"),
        ({"privacy": {"accountant": "prv"}}, "privacy.accountant"),
        ({"secagg": {"clipping_range": 6.0}}, "secagg.clipping_range"),
        ({"secagg": {"quantization_range": 3_000_000}}, "secagg.quantization_range"),
        ({"secagg": {"quantization_range": 2**22}}, "secagg.quantization_range"),  # 512 levels per unit
        ({"secagg": {"quantization_range": 2**31}}, "secagg.quantization_range"),  # past Flower's int32
        ({"secagg": {"max_weight": 100.5}}, "secagg.max_weight"),
    ],
)
def test_what_distributed_trust_needs_is_a_one_line_config_error(change: dict, key: str) -> None:
    raw = {k: (DISTRIBUTED.get(k, {}) | v) if isinstance(v, dict) else v for k, v in change.items()}
    with pytest.raises(ConfigError, match=f"^{key}: "):
        config_from_dict(DISTRIBUTED | raw)


@pytest.mark.parametrize(
    ("shares", "threshold", "sites", "fewest"),
    [(1.0, 0.67, 3, 2), (1.0, 0.67, 4, 3), (1.0, 0.67, 10, 7), (1.0, 0.5, 2, 2), (11, 6, 50, 6)],
)
def test_fewest_survivors_follows_flowers_threshold(shares: float, threshold: float, sites: int, fewest: int) -> None:
    assert SecAggConfig(num_shares=shares, reconstruction_threshold=threshold).fewest_survivors(sites) == fewest


def _site(tmp_path: Path, n: int = 80) -> Site:
    torch.manual_seed(0)
    x, y = torch.randn(n, DIM), torch.randint(0, CLASSES, (n,))
    samples = Samples(np.zeros((n, 1, 1, 1), np.uint8), y.numpy(), tuple(str(c) for c in range(CLASSES)))

    class Backbone:
        name, fingerprint, feature_dim, device = "b", "f" * 64, DIM, torch.device("cpu")

    return Site("site-x", SiteData("site-x", samples, samples), Backbone(), tmp_path, 7, None, None, x, y, x, y)


def test_a_site_sends_an_integer_sum_with_its_share_and_claims_two_epsilons(tmp_path: Path) -> None:
    cfg, site = config_from_dict(DISTRIBUTED), _site(tmp_path)
    head = make_head(DIM, CLASSES)
    dim = sum(p.numel() for p in head.parameters())
    ledger = PrivacyLedger(site.ledger_path, "r")
    plan = train_round.privacy_plan(site, cfg, ledger, dim)
    assert plan is not None and plan.min_survivors == 2 and plan.quantum == 2.0**-14  # 2**27 / (4 × 2048) levels
    assert (plan.l1_sensitivity, plan.l2_sensitivity) == sensitivities(1.0, plan.quantum, dim)
    work = mechanism_for(cfg).train_round(
        head, train_round.site_tensors(site, cfg), plan, ledger.history, seed=3, proximal_mu=0.0
    )
    sent = np.concatenate([v.numpy().ravel() for v in work.arrays.values()])
    assert sent.dtype == np.float64 and np.array_equal(sent / plan.quantum, np.rint(sent / plan.quantum))
    quiet = mechanism_for(cfg).train_round(
        head, train_round.site_tensors(site, cfg), plan, ledger.history, seed=3, proximal_mu=0.0
    )  # the same draw: the same message
    assert np.array_equal(sent, np.concatenate([v.numpy().ravel() for v in quiet.arrays.values()]))
    answer, dp = train_round._answer(
        site,
        mechanism_for(cfg),
        train_round.Work(work),
        plan=plan,
        ledger=ledger,
        server_round=1,
        count=79.3,  # what the site released in round 0 (client/dp_count.py)
    )
    assert dp is not None and dp.mechanism == "skellam"
    assert dp.noise_share == pytest.approx(plan.noise_variance / 2) and dp.min_survivors == 2
    assert ledger.history == [event_of(dp)] and isinstance(event_of(dp).mechanism, SkellamDpEvent)
    eps, own = answer["metrics"][Metric.EPSILON], answer["metrics"][Metric.EPSILON_INDIVIDUAL]
    assert eps == pytest.approx(epsilon_of([event_of(dp)], 1e-3, "rdp")) and own > eps
    assert DPRecord.from_mapping(answer["dp"]) == dp  # the reply's record parses back whole


def test_the_share_has_the_planned_variance(tmp_path: Path) -> None:
    """Far from any data: a site with no units sampled sends its noise alone, of variance μ/K_min per coordinate."""
    cfg = config_from_dict(DISTRIBUTED | {"train": DISTRIBUTED["train"] | {"sample_rate": 1e-9}})
    site, head = _site(tmp_path), make_head(DIM, CLASSES)
    ledger = PrivacyLedger(site.ledger_path, "r")
    plan = train_round.privacy_plan(site, cfg, ledger, sum(p.numel() for p in head.parameters()))
    assert plan is not None
    work = mechanism_for(cfg).train_round(
        head, train_round.site_tensors(site, cfg), plan, ledger.history, seed=5, proximal_mu=0.0
    )
    noise = work.arrays["head.1.weight"].numpy().ravel() / plan.quantum
    assert float(noise.var()) == pytest.approx(plan.noise_share, rel=0.15)


def test_a_plain_message_is_declined_under_distributed_trust(tmp_path: Path) -> None:
    msg = train_message(make_head(DIM, CLASSES), 1)
    with pytest.raises(Declined, match="only masked under secure aggregation"):
        train_round.train(_site(tmp_path), config_from_dict(DISTRIBUTED), msg)


def test_more_levels_per_unit_mean_less_noise_for_the_same_epsilon() -> None:
    """γ spends SecAgg+'s levels: 16,384 per unit (configs/distributed.yaml's grid) instead of 1,024 shrinks what
    rounding adds to Δ2, so the noise each round carries, in gradient units, drops at the same ε."""
    from fedtransfer.common.privacy.calibration import plan_distributed

    def noise_std(grid: SecAggConfig) -> float:
        plan = plan_distributed(
            num_units=1000,
            sample_rate=1.0,
            rounds=30,
            target_epsilon=3.0,
            target_delta=1e-5,
            max_grad_norm=1.0,
            dim=12810,
            min_survivors=3,
            gamma=grid.quantum(1.0),
            stats_gamma=0.0,
        )
        assert epsilon_of([plan.round_event] * 30, 1e-5, "rdp") <= 3.0
        return math.sqrt(plan.noise_variance) * plan.quantum

    coarse, fine = SecAggConfig(quantization_range=2**24, max_weight=4096), SecAggConfig(**GRID)
    assert 1 / coarse.quantum(1.0) == 1024 and 1 / fine.quantum(1.0) == 16384
    assert noise_std(fine) < 0.96 * noise_std(coarse)


LOCAL_SECAGG = {
    "secure_aggregation": True,
    "train": {"protocol": "fedsgd", "min_sites": 2},
    "data": {"num_sites": 2},
    "privacy": {"target_delta": 1e-3},
}


@pytest.mark.parametrize("raw", [DISTRIBUTED, LOCAL_SECAGG], ids=["distributed", "local"])
def test_a_site_larger_than_max_weight_is_declined_before_it_spends(tmp_path: Path, raw: dict) -> None:
    """fedsgd under SecAgg+, either trust: γ is set for sites of up to secagg.max_weight units; a larger site
    would risk its sum wrapping around."""
    cfg = config_from_dict(raw | {"secagg": GRID | {"max_weight": 64}})
    ledger = PrivacyLedger(tmp_path / "l.json", "r")
    with pytest.raises(Declined, match=r"this site has more units than secagg.max_weight = 64"):
        train_round.privacy_plan(_site(tmp_path, n=80), cfg, ledger, 132)
    assert ledger.history == []


def test_site_policy_must_allow_distributed_trust(tmp_path: Path) -> None:
    cfg = config_from_dict(DISTRIBUTED)
    plan = train_round.privacy_plan(_site(tmp_path), cfg, PrivacyLedger(tmp_path / "l.json", "r"), 132)
    with pytest.raises(Declined, match=r"policy\.allow_distributed_trust"):
        enforce_policy(SitePolicy(max_delta=1e-2), cfg, plan, 0.0, distributed=True)
    enforce_policy(SitePolicy(max_delta=1e-2, allow_distributed_trust=True), cfg, plan, 0.0, distributed=True)


def _assert_round_2_stepped_on_the_exact_sum(run_dir: Path) -> None:
    """The server's gradient in round 2 is the sum of the sites' plain messages (their reply caches) over Σ q·n."""
    first, second = (torch.load(run_dir / "checkpoints" / f"round-000{r}.pt", weights_only=False) for r in (1, 2))
    total: dict[str, np.ndarray] = {}
    batch = 0.0
    for cache in sorted(run_dir.glob("sites/site-*/replies/*.pt")):  # each site's last (round 2) message, in plain
        raw = torch.load(cache, weights_only=True)
        for name, value in raw["arrays"]["arrays"].items():
            total[name] = total.get(name, 0.0) + value.numpy()
        batch += raw["metrics"]["metrics"][Metric.EXPECTED_BATCH]
    for name, summed in total.items():
        if name not in first["strategy_state"]["m_t"]:  # a buffer (the centring mean): no gradient, sent as zeros
            assert not summed.any()
            continue
        velocity = [np.asarray(c["strategy_state"]["m_t"][name]) for c in (first, second)]
        step = velocity[1] - 0.9 * velocity[0]  # heavy ball: v2 = 0.9·v1 + g2
        assert np.allclose(step, summed / batch, rtol=1e-6, atol=1e-12)  # float32 on the wire to the strategy


def _drop_share(log: Path) -> None:
    """Rewrite a site's log as a consistent chain in which its trainings record no noise share."""
    records = read_records(log)
    log.unlink()
    rewritten = AuditLog(log)
    for r in records:
        fields = {k: v for k, v in r.items() if k not in RESERVED_FIELDS}
        if isinstance(fields.get("dp"), dict) and "noise_share" in fields["dp"]:
            fields["dp"] = fields["dp"] | {"noise_share": 0.0}
        rewritten.append(r["event"], **fields)


def test_distributed_run_reports_two_epsilons_and_its_audit_checks_every_share(tmp_path: Path, capsys) -> None:
    import yaml
    from fedtransfer.cli.main import main

    run_dir = tmp_path / "run"
    raw = {
        "run_name": "distributed",
        "output_dir": str(run_dir),
        "cache_dir": str(tmp_path / "cache"),
        "backbone": {"image_size": 32},
        "data": {"source": "digits", "num_sites": 3, "split": "iid"},
        "train": {
            "protocol": "fedsgd",
            "rounds": 2,
            "min_sites": 3,
            "sample_rate": 1.0,
            "learning_rate": 1.0,
            "fraction_evaluate": 0.0,
        },
        "secure_aggregation": True,
        "secagg": GRID,
        "privacy": {"trust": "distributed", "target_delta": 1e-4, "feature_stats": True, "accountant": "rdp"},
    }
    config = tmp_path / "distributed.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["simulate", "--config", str(config)]) == 0, capsys.readouterr()
    privacy = json.loads((run_dir / "privacy.json").read_text())["sites"]
    assert len(privacy) == 3
    for site in privacy.values():  # round 0: the statistics' Skellam release, in both ε
        assert site["rounds_trained"] == [0, 1, 2]
        assert site["epsilon"] == pytest.approx(site["epsilon_recomputed"], rel=1e-9) and site["epsilon"] <= 3.0
        assert site["epsilon_individual"] == pytest.approx(site["epsilon_individual_recomputed"], rel=1e-9)
        assert site["epsilon_individual"] > site["epsilon"]
        assert {r["mechanism"] for r in site["per_round"]} == {"skellam"}
        assert site["per_round"][0]["clip_norm"] != site["per_round"][1]["clip_norm"]  # the release's own bound
    masked = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert any(r["event"] == "update-received" and r.get("round") == 0 and r.get("masked") for r in masked)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["final_accuracy"] > 0.25  # two noisy steps from the initial head: well above chance (0.1)
    _assert_round_2_stepped_on_the_exact_sum(run_dir)
    assert main(["audit", str(run_dir), "--report-dir", str(tmp_path / "a")]) == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "audit-report.json").read_text())
    assert all(s["epsilon_individual_recomputed"] is not None for s in report["sites"])
    _drop_share(run_dir / "sites" / "site-1" / "audit.jsonl")
    assert main(["audit", str(run_dir), "--report-dir", str(tmp_path / "b")]) == 1
    out = capsys.readouterr().out
    assert "FAIL [trust]" in out and "site-1 round 1: the log does not record adding a Skellam noise share" in out


def test_local_trust_fedsgd_under_secagg_sends_its_noisy_sum_on_flowers_grid() -> None:
    """Local trust: the Gaussian-noised float sum is rounded to γ (post-processing) and sent with weight max_weight,
    so that Flower's SecAgg+ arithmetic gives the server back Σ round(sum/γ)·γ."""
    from fedtransfer.client.secure import secure_reply
    from fedtransfer.common.wire.secure_sum import sum_of_mean
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.common import parameters_to_ndarrays
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.compat.common import recorddict_compat as compat

    settings = SecAggConfig()
    gamma = settings.quantum(1.0)
    rng = np.random.default_rng(1)
    sums = [rng.normal(0, 40, size=(4, 6)).astype(np.float32) for _ in range(3)]
    masked = np.zeros((4, 6), np.int64)
    for s in sums:
        arrays, metrics = ArrayRecord({"head.1.weight": Array(s)}), MetricRecord({"num-examples": 7})
        answer = RecordDict({"arrays": arrays, "metrics": metrics})
        reply = secure_reply(answer, ["head.1.weight"], settings, False, {"head.1.weight": gamma})
        fitres = compat.recorddict_to_fitres(reply, keep_input=False)
        assert fitres.num_examples == int(settings.max_weight)  # Flower's ratio is exactly 1
        (grid,) = parameters_to_ndarrays(fitres.parameters)
        masked = masked + quantize([grid], settings.clipping_range, settings.quantization_range)[0]
    levels, clip = settings.quantization_range, settings.clipping_range
    mean = (dequantize([masked], clip, levels)[0] - 2 * clip) / 3
    expected = sum(np.rint(s.astype(np.float64) / gamma) for s in sums) * gamma
    assert np.array_equal(sum_of_mean(mean, 3, gamma, clip, levels), expected)


STATS = DISTRIBUTED | {"privacy": DISTRIBUTED["privacy"] | {"feature_stats": True}}


def test_feature_statistics_under_secure_aggregation_load_under_either_trust() -> None:
    """Refused before the statistics travelled under SecAgg+; now both trusts accept them."""
    assert config_from_dict(STATS).privacy.feature_stats
    local = STATS | {"privacy": {"target_delta": 1e-3, "feature_stats": True}}
    assert config_from_dict(local).privacy.trust == "local"


def test_the_statistics_release_is_accounted_with_the_rounds(tmp_path: Path) -> None:
    """Round 0's Skellam release is in the plan, the ledger and the DP record; with it the run meets ε, without its
    share the rounds alone spend less."""
    from fedtransfer.common.privacy.fedsgd import STATS_NORM, stats_sensitivities

    cfg, site = config_from_dict(STATS), _site(tmp_path)
    head = make_head(DIM, CLASSES, centred=True)
    ledger = PrivacyLedger(site.ledger_path, "r")
    plan = train_round.privacy_plan(site, cfg, ledger, sum(p.numel() for p in head.parameters()))
    assert plan is not None and plan.stats_variance > 0
    assert plan.stats_quantum == cfg.secagg.quantum(STATS_NORM)
    assert (plan.stats_l1, plan.stats_l2) == stats_sensitivities(DIM, CLASSES, False, plan.stats_quantum)
    conf = {"server-round": 0, "run-id": "r", "release": "feature-stats"}
    from flwr.app import ConfigRecord

    mechanism = mechanism_for(cfg)
    work = train_round._work(
        site, cfg, mechanism, conf=ConfigRecord(conf), server_round=0, plan=plan, ledger=ledger, head=head
    )
    count = released_count(site, "r")  # the site's weight from now on: its released count, in records
    answer, dp = train_round._answer(site, mechanism, work, plan=plan, ledger=ledger, server_round=0, count=count)
    assert count is not None and count != len(site.train_y) and abs(count - len(site.train_y)) < len(site.train_y) / 2
    assert answer["metrics"][Metric.NUM_EXAMPLES] == count
    assert dp is not None and dp.mechanism == "skellam" and dp.clip_norm == STATS_NORM and dp.sample_rate == 1.0
    assert ledger.history == [plan.stats_event] == [event_of(dp)]
    whole = [plan.stats_event] + [plan.round_event] * cfg.train.rounds
    assert epsilon_of(whole, 1e-3, "rdp") <= cfg.privacy.target_epsilon + 1e-9
    assert epsilon_of(whole[1:], 1e-3, "rdp") < epsilon_of(whole, 1e-3, "rdp")
    assert answer["metrics"][Metric.EPSILON_INDIVIDUAL] > answer["metrics"][Metric.EPSILON] > 0


def test_statistics_summed_under_secagg_are_the_sum_of_the_sites_integer_messages() -> None:
    """Each site's Skellam release (integers × quantum) on Flower's grid, Flower's masked-sum arithmetic, the
    server's read-back: exactly the sum of the sites' messages, sums and counts."""
    from fedtransfer.client.secure import secure_reply
    from fedtransfer.common.privacy.fedsgd import STATS_NAMES, STATS_NORM, Units, skellam_statistics, stats_quanta
    from fedtransfer.server.federation.rounds import secure_sum
    from fedtransfer.server.federation.secure import SecureRound
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.common import parameters_to_ndarrays
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.compat.common import recorddict_compat as compat

    settings, sites = SecAggConfig(**GRID), 3
    gamma = settings.quantum(STATS_NORM)
    quanta = stats_quanta(gamma)
    masked = {n: 0 for n in STATS_NAMES}
    messages = []
    for i in range(sites):
        torch.manual_seed(i)
        x, y = torch.randn(50, DIM), torch.randint(0, CLASSES, (50,))
        released = skellam_statistics(x, y, CLASSES, Units.records(50), 400.0, torch.Generator().manual_seed(i), gamma)
        messages.append(released)
        for name, value in released.items():
            assert np.array_equal(value.numpy() / quanta[name], np.rint(value.numpy() / quanta[name]))
        answer = RecordDict(
            {
                "arrays": ArrayRecord({n: Array(v.numpy()) for n, v in released.items()}),
                "metrics": MetricRecord({"num-examples": 50}),
            }
        )
        reply = secure_reply(answer, list(STATS_NAMES), settings, False, quanta)
        grids = parameters_to_ndarrays(compat.recorddict_to_fitres(reply, keep_input=False).parameters)
        for name, grid in zip(STATS_NAMES, grids, strict=True):
            q = quantize([grid], settings.clipping_range, settings.quantization_range)[0]
            masked[name] = (masked[name] + q.astype(np.int64)) % 2**32
    clip, levels = settings.clipping_range, settings.quantization_range
    means = [(dequantize([masked[n]], clip, levels)[0] - (sites - 1) * clip) / sites for n in STATS_NAMES]
    sec = SecureRound(mean64=means, trained=dict.fromkeys(range(sites)))
    template = ArrayRecord(
        {n: Array(np.zeros_like(m, dtype=np.float32)) for n, m in zip(STATS_NAMES, means, strict=True)}
    )
    got = secure_sum(sec, template, quanta, settings)
    for name in STATS_NAMES:
        exact = sum(m[name].numpy() for m in messages)
        assert np.array_equal(got[name].numpy(), exact.astype(np.float32))


def test_the_audit_checks_the_announced_trust_against_the_config_and_the_sites_logs(tmp_path: Path) -> None:
    """run-started names trust and min_survivors: a wrong trust, or a site log planned for another K_min, fails."""
    from fedtransfer.server.audit.findings import Entry, Evidence, Findings, Update
    from fedtransfer.server.audit.trust import audit_announced_trust

    cfg = config_from_dict(DISTRIBUTED)  # 3 sites, threshold 0.67: K_min = 2
    log = tmp_path / "audit.jsonl"

    def audit(started: dict, site_k: int) -> list[str]:
        ev = Evidence(tmp_path, log, [], True, "r", cfg, server=[Entry(log, 1, {"event": "run-started", **started})])
        trained = Update(Entry(log, 2, {"event": "update-trained"}), "site-1", 1, "", (), {"min_survivors": site_k})
        found = Findings()
        audit_announced_trust(ev, [trained], found)
        return [f.reason for f in found.failures]

    assert audit({"trust": "distributed", "min_survivors": 2}, 2) == []
    (wrong,) = audit({"trust": "local"}, 2)
    assert "announces trust 'local' with min_survivors None" in wrong and "'distributed' with 2" in wrong
    (own,) = audit({"trust": "distributed", "min_survivors": 2}, 3)
    assert own == "site-1 round 1: planned its share for 3 surviving sites, the server announced 2 at run-started"
    local = Evidence(
        tmp_path,
        log,
        [],
        True,
        "r",
        config_from_dict({"privacy": {"target_delta": 1e-3}}),
        server=[Entry(log, 1, {"event": "run-started"})],
    )
    found = Findings()
    audit_announced_trust(local, [], found)  # a local run recorded before run-started named its trust
    assert found.failures == []


def test_local_trust_statistics_under_secagg_go_as_the_gaussian_release_rounded_to_the_grid(tmp_path: Path) -> None:
    """Local trust: round 0's Gaussian release, rounded to each tensor's quantum (post-processing), full weight."""
    from fedtransfer.common.privacy.fedsgd import STATS_NAMES, STATS_NORM, stats_quanta
    from fedtransfer.common.wire.secure_sum import sum_of_mean
    from flwr.app import ConfigRecord
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    cfg = config_from_dict(LOCAL_SECAGG | {"privacy": LOCAL_SECAGG["privacy"] | {"feature_stats": True}})
    site, ledger = _site(tmp_path), PrivacyLedger(tmp_path / "l.json", "r")
    head = make_head(DIM, CLASSES, centred=True)
    plan = train_round.privacy_plan(site, cfg, ledger, sum(p.numel() for p in head.parameters()))
    conf = ConfigRecord(
        {"server-round": 0, "run-id": "r", "release": "feature-stats", "head-names": ",".join(STATS_NAMES)}
    )
    mechanism = mechanism_for(cfg)
    work = train_round._work(site, cfg, mechanism, conf=conf, server_round=0, plan=plan, ledger=ledger, head=head)
    count = released_count(site, "r")
    answer, dp = train_round._answer(site, mechanism, work, plan=plan, ledger=ledger, server_round=0, count=count)
    assert dp is not None and dp.mechanism == "gaussian"
    fitres = compat.recorddict_to_fitres(
        train_round._secure(answer, conf, cfg, mechanism, replayed=False), keep_input=False
    )
    assert fitres.num_examples == int(cfg.secagg.max_weight)
    s = cfg.secagg
    quanta = stats_quanta(s.quantum(STATS_NORM))
    for name, grid in zip(STATS_NAMES, parameters_to_ndarrays(fitres.parameters), strict=True):
        back = sum_of_mean(grid.astype(np.float64), 1, quanta[name], s.clipping_range, s.quantization_range)
        released = answer["arrays"][name].numpy().astype(np.float64)
        assert np.array_equal(back, np.rint(released / quanta[name]) * quanta[name])
