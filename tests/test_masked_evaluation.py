"""privacy.trust: distributed: the evaluation's statistics leave a site only as Skellam shares masked by SecAgg+.

The statistics rounded per unit are the exact ones up to the rounding; the plan meets the evaluation budget with
the final model's Gaussian release; in a whole in-process run no reply carries statistics outside the masked
vector, the server's sum is exactly the sum of what the sites put in the slots, privacy.json's evaluation ε (both)
is the recomputation, and the audit passes, and fails when a site's logged claim is changed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fedtransfer.cli.main import main
from fedtransfer.client import client_app, evaluate_masked, evaluate_round
from fedtransfer.client.evaluate_round import carried_evaluation
from fedtransfer.common.config.run import config_from_dict
from fedtransfer.common.model.head import make_head
from fedtransfer.common.privacy.calibration import epsilon_of
from fedtransfer.common.privacy.evaluation import NAMES, evaluation_statistics, metrics_from_statistics
from fedtransfer.common.privacy.evaluation_skellam import (
    block_weights,
    integer_statistics,
    plan_skellam_evaluation,
    statistics_of_sum,
)
from fedtransfer.common.privacy.fedsgd import Units
from fedtransfer.common.privacy.ledger import PrivacyLedger
from fedtransfer.common.privacy.skellam import sensitivities
from fedtransfer.common.storage.audit_log import read_records
from fedtransfer.common.wire.protocol import Cfg, DPRecord, Rec
from flwr.app import ConfigRecord, Message
from flwr.app.message_type import MessageType

from tests.inprocess_grid import InProcessGrid, run_in_process
from tests.test_one_message import _at_site, _site

GRID = {"quantization_range": 2**27, "max_weight": 2048}  # configs/distributed.yaml's
RUN = {
    "run_name": "masked-evaluation",
    "seed": 5,
    "device": "cpu",
    "backbone": {"image_size": 32},
    "data": {"source": "digits", "num_sites": 3, "split": "iid"},
    "train": {"protocol": "fedsgd", "rounds": 2, "min_sites": 3, "sample_rate": 1.0, "learning_rate": 1.0},
    "secure_aggregation": True,
    "secagg": GRID,
    "privacy": {"trust": "distributed", "target_delta": 1e-4, "feature_stats": True, "accountant": "rdp"},
    "personal": {"enabled": False},
}


@pytest.mark.parametrize("by_user", [False, True])
def test_integer_statistics_are_the_weighted_statistics_up_to_each_units_rounding(by_user: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(90, 16, generator=gen), torch.randint(0, 4, (90,), generator=gen)
    units = Units.of_users(torch.arange(90) // 3) if by_user else Units.records(90)
    head, gamma = make_head(16, 4, centred=False), 2.0**-6
    exact = evaluation_statistics(head, x, y, 4, units)
    integers = integer_statistics(head, x, y, 4, units, gamma)
    weights = block_weights(4)
    for name in NAMES:
        assert integers[name].dtype == torch.int64 and integers[name].shape == exact[name].shape
        scaled = exact[name].numpy() * weights[name] / gamma
        assert np.all(np.abs(integers[name].numpy() - scaled) <= units.count / 2 + 1e-9), name  # ≤ ½ per unit
    back = statistics_of_sum({k: v.double().numpy() * gamma for k, v in integers.items()}, 4)
    assert back[NAMES[0]][1] == pytest.approx(units.count, abs=units.count * gamma)  # the records' total weight


def test_the_plan_meets_the_evaluation_budget_with_the_final_gaussian_release() -> None:
    args = {"target_epsilon": 1.0, "target_delta": 1e-5, "accountant": "rdp", "num_classes": 10}
    plan = plan_skellam_evaluation(releases=6, quantum=2.0**-14, min_survivors=3, colluding_sites=1, **args)
    assert plan.share == pytest.approx(plan.variance / 2)  # K_min − t honest shares carry μ
    assert (plan.l1_sensitivity, plan.l2_sensitivity) == sensitivities(1.0, 2.0**-14, plan.dim)
    history = [plan.event] * 5 + [plan.final.event]
    spent = epsilon_of(history, 1e-5, "rdp")
    assert 0.97 <= spent <= 1.0  # met, and not by much more noise than needed (1% in √μ)
    assert epsilon_of(history, 1e-5, "rdp", individual=True) > spent  # one share alone: less noise
    fewer = plan_skellam_evaluation(releases=3, quantum=2.0**-14, min_survivors=3, colluding_sites=1, **args)
    assert fewer.variance < plan.variance and fewer.final.noise_multiplier < plan.final.noise_multiplier


def test_distributed_trust_without_slots_declines_the_evaluation_and_sends_nothing_plain(tmp_path: Path) -> None:
    """A SecAgg+ round holding no slots: a Skellam share alone must not travel beside the mask; nothing is charged."""
    site = _site(tmp_path)
    cfg = config_from_dict(RUN | {"output_dir": str(tmp_path / "o"), "cache_dir": str(tmp_path / "c")})
    msg = _at_site(2, **{Cfg.EVALUATE_ROUND: 1})
    ledger = PrivacyLedger(site.ledger_path, run_key="r")
    conf = ConfigRecord({**msg.content[Rec.CONFIG], Cfg.HEAD_NAMES: "w,b"})
    assert evaluate_masked.masked_evaluation(cfg, conf, secure=True) is False
    head = make_head(32, 4, centred=False)
    common = {"head": head, "conf": conf, "server_round": 2, "ledger": ledger}
    assert carried_evaluation(site, cfg, msg, masked=False, **common) is None
    (declined,) = [r for r in read_records(site.audit_path) if r["event"] == "evaluation-declined"]
    assert "only masked" in declined["reason"] and ledger.evaluation["rounds"] == []
    slotted = ConfigRecord({**conf, Cfg.HEAD_NAMES: "w,b," + ",".join(NAMES)})
    assert evaluate_masked.masked_evaluation(cfg, slotted, secure=True) is True
    assert evaluate_masked.masked_evaluation(cfg, slotted, secure=False) is None  # plain: never under this trust


def _recording(grid: InProcessGrid, replies: list[Message]) -> None:
    """Keep every reply the sites send, as it leaves them."""
    for node in grid.get_node_ids():

        def answer(msg: Message, context: Any, _app: Any = client_app.app) -> Message:
            reply = _app(msg, context)
            replies.append(reply)
            return reply

        grid.answers[node] = answer


@pytest.mark.usefixtures("app_process_umask")
def test_a_distributed_run_sums_the_evaluation_only_masked_and_its_audit_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    raw = RUN | {"output_dir": str(run_dir), "cache_dir": str(tmp_path / "cache")}
    raw |= {"data": RUN["data"] | {"num_sites": 4}, "train": RUN["train"] | {"fraction_evaluate": 0.5}}
    cfg = config_from_dict(raw)  # 3 of 4 sites score (min_sites), the fourth adds its share alone
    shares: list[tuple[bool, dict[str, np.ndarray]]] = []  # (with statistics, what went into the slots)
    exact: list[dict[str, np.ndarray]] = []  # each scoring site's integers before its share (units of γ_e)
    planned: list[Any] = []

    def spy(integers: Any, plan: Any, num_classes: int, generator: torch.Generator) -> dict[str, np.ndarray]:
        values = real(integers, plan, num_classes, generator)
        shares.append((integers is not None, values))
        exact.append({k: v.numpy() for k, v in (integers or {}).items()})
        planned.append(plan)
        return values

    real = evaluate_masked.share_values
    monkeypatch.setattr(evaluate_masked, "share_values", spy)
    monkeypatch.setattr(evaluate_round, "share_values", spy)
    grid, replies = InProcessGrid.for_simulation(cfg), []
    _recording(grid, replies)
    assert run_in_process(cfg, grid)["status"] == "completed"

    # no reply carries statistics beside the masked vector: only the final model's evaluation message does
    for reply in replies:
        plain = Rec.EVALUATION in reply.content.array_records or Rec.EVALUATION_BYTES in reply.content.config_records
        assert not plain or reply.metadata.message_type == MessageType.EVALUATE
    assert sum(Rec.EVALUATION in r.content.array_records for r in replies) == 3  # the final model's, 3 sampled

    # rounds 1 and 2 carry the evaluations of models 0 and 1: every site fills the slots, 3 with statistics
    assert len(shares) == 8 and [sum(s[0] for s in shares[i : i + 4]) for i in (0, 4)] == [3, 3]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for model, chunk in ((0, shares[:4]), (1, shares[4:])):
        summed = {name: np.sum([values[name] for _, values in chunk], axis=0) for name in NAMES}
        expected = metrics_from_statistics(statistics_of_sum(summed, 10))  # the exact sum of the slots' values
        federated = metrics[model]["federated"]
        assert federated["sites"] == 3
        for key, value in expected.items():
            assert federated[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (model, key)
        # and the sites' statistics before noise, within 6 σ of the 4 shares' sum (σ² = 4 · μ_e/(K_min − t))
        first, plan = model * 4, planned[model * 4]
        for name in NAMES:
            before = np.sum([e[name] for e in exact[first : first + 4] if e], axis=0) * plan.quantum
            assert np.all(np.abs(summed[name] - before) <= 6 * math.sqrt(4 * plan.share) * plan.quantum), name
            assert not np.array_equal(summed[name], before)  # the noise is there

    privacy = json.loads((run_dir / "privacy.json").read_text())["sites"]
    scored = {name: site for name, site in privacy.items() if "evaluation" in site}  # sampled at least once
    assert len(scored) >= 3
    for name, site in scored.items():
        evaluation = site["evaluation"]
        assert evaluation["epsilon"] == pytest.approx(evaluation["epsilon_recomputed"], rel=1e-9)
        assert evaluation["epsilon_individual"] == pytest.approx(evaluation["epsilon_individual_recomputed"], rel=1e-9)
        assert evaluation["epsilon"] <= cfg.privacy.evaluation_budget  # the shares are planned for the aggregate
        masked = any(r.get("mechanism") == "skellam" for r in evaluation["rounds"])
        assert evaluation["epsilon_individual"] > evaluation["epsilon"] or not masked  # one share: less noise
        log = read_records(run_dir / "sites" / name / "audit.jsonl")
        sent = [r for r in log if r["event"] == "evaluation-sent"]
        kinds = [(r.get("carried_by") == "training", r["dp"].get("mechanism", "gaussian")) for r in sent]
        assert set(kinds) <= {(True, "skellam"), (False, "gaussian")}
        masked = [r for r in sent if r.get("carried_by") == "training"]
        honest = cfg.secagg.fewest_survivors(3) - cfg.privacy.colluding_sites  # K_min − t
        assert masked and all(math.isclose(r["dp"]["noise_share"], r["dp"]["noise_variance"] / honest) for r in masked)
        assert site["epsilon"] == pytest.approx(site["epsilon_recomputed"], rel=1e-9)  # training's, untouched

    report = tmp_path / "report"
    assert main(["audit", str(run_dir), "--report-dir", str(report)]) == 0
    audit = json.loads((report / "audit-report.json").read_text())
    rows = [c for s in audit["sites"] for c in s["coverage"] if c["name"] == "masked evaluation slots"]
    assert rows and {c["covered_by"] for c in rows} == {"evaluation"}
    for s in audit["sites"]:
        claimed = scored[s["name"]]["evaluation"]["epsilon"] if s["name"] in scored else 0.0
        assert s["evaluation_epsilon_recomputed"] == pytest.approx(claimed)

    capsys.readouterr()
    whole = json.loads((run_dir / "privacy.json").read_text())  # privacy.json understating the second ε
    whole["sites"][min(scored)]["evaluation"]["epsilon_individual"] /= 2
    (run_dir / "privacy.json").write_text(json.dumps(whole))
    assert main(["audit", str(run_dir), "--report-dir", str(tmp_path / "understated")]) == 1
    assert "FAIL [evaluation]" in capsys.readouterr().out


def test_the_server_adds_a_plain_gaussian_release_to_the_masked_sum_and_refuses_an_unmasked_share() -> None:
    """A sampled site the round did not train answers alone (Gaussian); a Skellam share sent plain is refused."""
    from fedtransfer.server.federation.evaluation import read
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    shapes = {NAMES[0]: (3,), NAMES[1]: (2, 3), NAMES[2]: (3, 2, 16)}
    summed = {name: np.full(shape, 10.0) for name, shape in shapes.items()}
    plain = {name: np.full(shape, 5.0) for name, shape in shapes.items()}

    args = {"target_epsilon": 1.0, "target_delta": 1e-4, "accountant": "rdp", "num_classes": 3}
    masked = plan_skellam_evaluation(releases=3, quantum=2.0**-14, min_survivors=2, colluding_sites=0, **args)
    records = {"skellam": masked.record(), "gaussian": DPRecord(1.0, 1.0, 1, 1.0, 1e-4, "rdp")}

    def release(mechanism: str, values: dict[str, np.ndarray] | None) -> RecordDict:
        content = RecordDict({Rec.EVALUATION_DP: ConfigRecord(records[mechanism].as_dict())})
        content[Rec.METRICS] = MetricRecord({"eval-epsilon": 0.5})
        if values is not None:
            content[Rec.EVALUATION] = ArrayRecord({k: Array(v) for k, v in values.items()})
        return content

    got = read(1, [("a", release("skellam", None)), ("b", release("gaussian", plain))], 3, summed=summed)
    assert set(got.sites) == {"a", "b"} and got.metrics is not None and got.metrics["sites"] == 2
    assert got.metrics["records"] == 15  # 10 from the masked sum, 5 from the plain release
    leaked = read(1, [("a", release("skellam", plain))], 3, summed=summed)
    assert leaked.sites == {} and leaked.metrics is None
