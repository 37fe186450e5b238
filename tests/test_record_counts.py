"""Issue 23: under DP no exact count leaves a site, fedavg included, with or without the feature statistics.

A fedavg site under DP without the statistics releases its per-class record counts in round 0; every value it
sends later that depends on its size (its weight, its DP record's sample rate, its step count) is what that
released count gives (common/privacy/coverage.py `follows`), never what its exact count gives.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtransfer.client import train_round
from fedtransfer.client.site import Declined, Site
from fedtransfer.common.config.run import ConfigError, config_from_dict
from fedtransfer.common.data.sources import Samples, SiteData
from fedtransfer.common.model.head import make_head
from fedtransfer.common.privacy.calibration import stats_noise_multiplier, steps_per_epoch
from fedtransfer.common.privacy.counts import release_counts, round_zero_release
from fedtransfer.common.privacy.coverage import DP_RATE, Released, cover, follows
from fedtransfer.common.privacy.fedsgd import STATS_COUNTS, Units
from fedtransfer.common.storage.audit_log import read_records
from fedtransfer.common.wire.protocol import FEATURE_STATS, RECORD_COUNTS, DPRecord, Metric
from flwr.app import Message

from tests.messages import train_message

DIM, CLASSES, N = 8, 3, 300
FEDAVG = {
    "train": {"protocol": "fedavg", "rounds": 2, "local_epochs": 1, "batch_size": 1},  # rate 1/ñ: differs iff ñ ≠ n
    "privacy": {"target_delta": 1e-3, "feature_stats": False, "accountant": "rdp"},
}


def _site(tmp_path: Path) -> Site:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, DIM, generator=gen), torch.randint(0, CLASSES, (N,), generator=gen)
    samples = Samples(np.zeros((N, 1, 1, 1), np.uint8), y.numpy(), tuple(str(c) for c in range(CLASSES)))

    class Backbone:
        name, fingerprint, feature_dim, device = "b", "f" * 64, DIM, torch.device("cpu")

    return Site("site-x", SiteData("site-x", samples, samples), Backbone(), tmp_path, 7, None, None, x, y, x, y)


def _message(server_round: int, **extra: str) -> Message:
    return train_message(make_head(DIM, CLASSES), server_round, **extra)


def test_a_fedavg_dp_reply_holds_no_value_that_follows_from_the_exact_count(tmp_path: Path) -> None:
    cfg, site = config_from_dict(FEDAVG), _site(tmp_path)
    with pytest.raises(Declined, match="released no record count in round 0"):
        train_round.train(site, cfg, _message(1))
    counts = train_round.train(site, cfg, _message(0, release=RECORD_COUNTS))
    released = max(float(counts["arrays"][STATS_COUNTS].numpy().astype(np.float64).sum()), 1.0)
    assert round(released) != N
    reply = train_round.train(site, cfg, _message(1))
    dp = DPRecord.from_mapping(reply["dp"])
    t = cfg.train
    rate = 1 / steps_per_epoch(round(released), t.batch_size)
    assert dp.sample_rate == rate != 1 / steps_per_epoch(N, t.batch_size)  # before issue 23: 1/300
    assert dp.steps == reply["metrics"][Metric.STEPS] == t.local_epochs * int(1 / rate)
    assert reply["metrics"][Metric.NUM_EXAMPLES] == pytest.approx(released, rel=1e-9)
    # what the audit reads: every value logged as sent is covered, by the release or as accounting
    logged = [r for r in read_records(site.audit_path) if r["event"] == "update-sent"]
    assert [r.get("released_count") for r in logged] == [pytest.approx(released, rel=1e-9), None]
    mark = Released(RECORD_COUNTS, logged[0]["released_count"])
    for record in logged:
        values = [(k, n, v) for k in ("tensors", "metrics", "configs") for n, v in record["sent"][k].items()]
        values.append(("metrics", DP_RATE, record["dp"]["sample_rate"]))
        kind = record.get("release", "training")
        assert all(cover(*v, release=kind, private=True, released=mark, cfg=cfg) for v in values), values
    exact = {Metric.NUM_EXAMPLES: float(N), DP_RATE: 1 / steps_per_epoch(N, t.batch_size)}
    assert not any(follows(name, value, mark, cfg, release="training") for name, value in exact.items())


def test_the_count_release_is_a_noisy_histogram_of_units() -> None:
    """Sensitivity 1 per unit: a user's records each weigh 1/m, so a user moves the histogram by a total of 1."""
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    users = Units.of_users(torch.tensor([0, 0, 0, 1, 1, 2]))
    exact = release_counts(labels, CLASSES, users, None, torch.Generator())[STATS_COUNTS]
    assert exact.tolist() == pytest.approx([2 / 3, 1 / 3, 2.0]) and float(exact.sum()) == pytest.approx(3.0)
    noisy = [
        release_counts(labels, CLASSES, users, 5.0, torch.Generator().manual_seed(s))[STATS_COUNTS] for s in range(400)
    ]
    spread = torch.stack(noisy) - exact
    assert float(spread.std()) == pytest.approx(5.0, rel=0.1)


def test_which_release_round_zero_asks_for() -> None:
    dp_stats, dp_counts = config_from_dict({}), config_from_dict(FEDAVG)
    no_dp = config_from_dict({"privacy": {"enabled": False, "feature_stats": False}})
    assert round_zero_release(dp_stats.privacy) == FEATURE_STATS
    assert round_zero_release(dp_counts.privacy) == RECORD_COUNTS
    assert round_zero_release(no_dp.privacy) is None  # without DP nothing changes: the exact count is sent
    assert dp_counts.privacy.release_share == dp_counts.privacy.count_share == 0.02
    assert no_dp.privacy.release_share is None
    σ = stats_noise_multiplier(3.0, 1e-5, 0.02, "rdp")
    assert σ == pytest.approx(stats_noise_multiplier(3.0, 1e-5, 1.0, "rdp") / math.sqrt(0.02))


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1])
def test_count_share_outside_its_range_is_one_line_naming_the_key(share: float) -> None:
    with pytest.raises(ConfigError, match=r"^privacy\.count_share: must be in \(0, 1\)"):
        config_from_dict({"privacy": {"count_share": share}})
