"""Secure aggregation (SecAgg+) on the real Simulation Engine, watched from inside the ServerApp.

The app is submitted with `tests/secure_spy.py` as its ServerApp: it records every reply
before our ServerApp sees it, and loses one site's masked vector in round 2, as a network
would, so the round must recover that site's masks and go on without it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fedtransfer.client import client_app
from fedtransfer.common.config.run import ConfigError, config_from_dict, to_run_config
from fedtransfer.common.encoders.image import load_backbone
from fedtransfer.common.model.head import make_head
from fedtransfer.common.wire.exchange import head_to_arrays
from fedtransfer.common.wire.protocol import Refusal
from fedtransfer.server.audit import audit_run
from fedtransfer.server.federation import checkpoint
from fedtransfer.server.launch.simulation import simulate
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from tests.app_variants import app_variant
from tests.messages import to_site

SITES = 4


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("secagg")
    cfg = config_from_dict(
        {
            "run_name": "secagg",
            "output_dir": str(tmp / "run"),
            "cache_dir": str(tmp / "cache"),
            "backbone": {"image_size": 32},
            "data": {"source": "digits", "split": "iid", "num_sites": SITES},
            "train": {
                "rounds": 2,
                "local_epochs": 2,
                "fraction_evaluate": 0.0,
                "protocol": "fedavg",
                "learning_rate": 0.5,
            },  # heads under SecAgg+ (fedsgd's sums: test_distributed_trust.py)
            "privacy": {"feature_stats": False, "accountant": "rdp"},
            "secure_aggregation": True,
        }
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDTRANSFER_SPY_DROP_ROUND", "2")  # inherited by the SuperLink and the ServerApp it starts
    try:
        spied = app_variant(tmp / "app", Path(__file__).with_name("secure_spy.py"), serverapp="secure_spy:app")
        status = simulate(cfg, stream=False, app_dir=spied)
    finally:
        mp.undo()
    assert status["status"] == "completed"
    return cfg.output_path


def _received(run: Path) -> list[dict]:
    return pickle.loads((run / "received.pkl").read_bytes())


def _plain_heads(run: Path) -> dict[str, tuple[dict[str, np.ndarray], int]]:
    """Each site's last trained head and example count, from its own reply cache (never sent in plain)."""
    out = {}
    for cache in sorted((run / "sites").glob("site-*/replies/*.pt")):
        raw = torch.load(cache, weights_only=True)
        head = {k: v.numpy() for k, v in raw["arrays"]["arrays"].items()}
        out[cache.parent.parent.name] = (head, int(raw["metrics"]["metrics"]["num-examples"]))
    return out


def test_the_server_never_receives_a_plain_head(secure_run: Path) -> None:
    received, heads = _received(secure_run), _plain_heads(secure_run)
    assert len(heads) == SITES
    masked = [r for r in received if Key.MASKED_PARAMETERS in r.get("configs", {}).get(RECORD_KEY_CONFIGS, {})]
    assert len([r for r in masked if r["round"] == "1"]) == SITES  # every site, round 1
    blobs = []
    for reply in received:
        if reply["error"]:
            continue
        # whatever arrays a reply holds are empty: secaggplus_mod cleared them before the reply left the site
        assert all(len(rec) == 0 for rec in reply["arrays"].values()), reply["arrays"].keys()
        for record in reply["configs"].values():
            for value in record.values():
                blobs += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, bytes)]
    assert blobs
    for head, _ in heads.values():
        for tensor in head.values():
            raw = tensor.tobytes()
            assert not any(raw in blob for blob in blobs), "a plain head tensor reached the ServerApp"


def test_aggregate_is_fedavg_of_the_surviving_sites_within_quantisation_error(secure_run: Path) -> None:
    cfg = json.loads((secure_run / "config.json").read_text())["secagg"]
    rounds = [json.loads(line) for line in (secure_run / "metrics.jsonl").read_text().splitlines()]
    (second,) = [r for r in rounds if r["round"] == 2]  # after round 0's record counts and round 1
    lost = [name for name, rec in second["sites"].items() if rec["status"] == "no-reply"]
    assert len(lost) == 1 and second["sites_trained"] == SITES - 1  # the dropout did not stop the round
    heads = _plain_heads(secure_run)
    survivors = [heads[n] for n in sorted(heads) if n not in lost]
    total = sum(n for _, n in survivors)
    mean = {k: sum(h[k].astype(np.float64) * n for h, n in survivors) / total for k in survivors[0][0]}
    everyone = {
        k: sum(h[k].astype(np.float64) * n for h, n in heads.values()) / sum(n for _, n in heads.values()) for k in mean
    }
    aggregate = checkpoint.latest(secure_run).head
    error = max(float(np.max(np.abs(aggregate[k] - mean[k]))) for k in mean)
    # stochastic rounding: each site's weighted value is off by at most one level of 2c/T, over Σ weights
    levels = 2 * cfg["clipping_range"] / cfg["quantization_range"]
    bound = len(survivors) * levels * cfg["max_weight"] / total + 1e-6
    assert error <= bound, (error, bound)
    off = max(float(np.max(np.abs(everyone[k] - mean[k]))) for k in mean)
    assert off > 10 * bound  # the lost site's head is really not in the mean
    print(f"SecAgg+ quantisation error: max |aggregate - FedAvg| = {error:.3g} (bound {bound:.3g})")


def test_audit_passes_and_names_the_mode(secure_run: Path) -> None:
    report = audit_run(secure_run)
    assert report.passed, [str(f) for f in report.failures]
    assert report.mode.startswith("secure aggregation")
    server = [json.loads(line) for line in (secure_run / "audit.jsonl").read_text().splitlines()]
    received = [r for r in server if r["event"] == "update-received"]
    assert received and all(r["masked"] is True for r in received)
    assert all("secagg.weight" in {t["name"] for t in r["update"]["tensors"]} for r in received)
    site = [json.loads(line) for line in (secure_run / "sites" / "site-0" / "audit.jsonl").read_text().splitlines()]
    assert {"update-trained", "update-sent"} <= {r["event"] for r in site}  # plain kept locally, masked sent


def test_secure_aggregation_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ConfigError, match=r"train\.strategy: secure_aggregation needs"):
        config_from_dict({"secure_aggregation": True, "train": {"strategy": "fedmedian", "protocol": "fedavg"}})
    with pytest.raises(ConfigError, match=r"train\.max_update_norm: cannot be checked"):
        config_from_dict({"secure_aggregation": True, "train": {"max_update_norm": 5.0, "protocol": "fedavg"}})
    with pytest.raises(ConfigError, match=r"secagg\.reconstruction_threshold: must be below"):
        config_from_dict({"secagg": {"num_shares": 5, "reconstruction_threshold": 5}})
    with pytest.raises(ConfigError, match=r"secagg\.num_shares: an odd count .* use 11"):
        config_from_dict({"secagg": {"num_shares": 10, "reconstruction_threshold": 6}})


@pytest.mark.usefixtures("app_process_umask")  # it calls the ClientApp in this process
def test_a_site_that_requires_secure_aggregation_declines_a_plain_run(tmp_path: Path) -> None:
    site_yaml = tmp_path / "site.yaml"
    site = {
        "name": "hospital-z",
        "data_source": "digits",
        "device": "cpu",
        "state_dir": "state",
        "policy": {"require_secure_aggregation": True},
    }
    site_yaml.write_text(yaml.safe_dump(site))
    cfg = config_from_dict(
        {"output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "backbone": {"image_size": 32}}
    )
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"site-config": str(site_yaml)},
        state=RecordDict(),
        run_config=to_run_config(cfg),
    )
    backbone = load_backbone(cfg.backbone)
    head = make_head(backbone.feature_dim, 10, centred=True)  # the default protocol's head (feature statistics on)
    config = {"server-round": 1, "run-id": "r1", "backbone-fingerprint": backbone.fingerprint}
    plain = to_site(RecordDict({"arrays": head_to_arrays(head), "config": ConfigRecord(config)}), ttl=600.0)
    answer = client_app.train(plain, context)
    assert answer.has_error()
    refusal = Refusal.from_error(answer.error)
    assert refusal is not None and refusal.site == "hospital-z"
    assert refusal.reason.startswith("site policy (site.yaml): policy.require_secure_aggregation: the site requires")
