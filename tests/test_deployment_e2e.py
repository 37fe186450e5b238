"""The real app on a real deployment: a TLS + node-auth SuperLink and three SuperNodes on 127.0.0.1.

Each site has its own YAML, its own data folder (scikit-learn digits as MedMNIST-format .npz)
and its own state folder (ledger, audit log, reply cache). bank-c's policy caps ε at 2, so it
declines any run whose target is 3. In the dropout run hospital-b leaves mid-round (SIGTERM) and
comes back, and bank-c crashes (SIGKILL); the rounds go on with the others. Every site runs as an
operator runs it, `fedtransfer deploy site`: its SuperNode and its worker, which answers the
messages its ClientApp processes forward (client/site_worker.py).

The deployment is started once for the module (it takes a minute), but every test gets it in the
same state (`fresh`): every site running and connected, every site's state folder empty. So each
test passes alone, and in any order.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from fedtransfer.common.data.federation import Federation, simulate_federation
from fedtransfer.common.privacy.calibration import epsilon_of
from fedtransfer.common.privacy.events import gaussian_steps
from fedtransfer.deploy.launch import format_config
from fedtransfer.server.audit import audit_run
from fedtransfer.server.export.model_file import load_model
from fedtransfer.server.federation import checkpoint

from tests.deploy_harness import BIN_DIR, LocalDeployment, local_deployment, write_npz_site

APP_DIR = Path(__file__).resolve().parent.parent
SITES = ("hospital-a", "hospital-b", "bank-c")
STRICT = "bank-c"
INTRUDER = "intruder"
SEED = 42
RUN = {  # both runs; flwr checks every key against [tool.flwr.app.config]
    "seed": SEED,
    "device": "cpu",
    "backbone.image_size": 32,
    "data.source": "digits",
    "data.split": "iid",
    "data.num_sites": 3,  # the server's own hold-out
    "train.local_epochs": 3,
    "train.min_sites": 2,
    "train.fraction_evaluate": 0.0,
    "privacy.target_delta": 1e-5,
}
# the drop-out and SecAgg+ runs time their kills by local training: fedavg, as it was measured (the first run
# takes the default protocol, fedsgd with the DP feature statistics)
FEDAVG = {
    "train.protocol": "fedavg",
    "train.learning_rate": 0.5,
    "privacy.feature_stats": False,
    "privacy.accountant": "rdp",
}
RECEIVED = "Receiving: train message"
WORKER_ANSWERED = "site worker answered a train message (message)"  # client/site_worker.py, one per message
KEPT = ("worker", ".lock", "superexec.secret")  # what a running `deploy site` keeps there: socket, lock, secret


@dataclass
class Federation3:
    dep: LocalDeployment
    root: Path
    data: Federation


def _digits() -> Federation:
    """The same split the server makes: its hold-out, and three disjoint site shares."""
    return simulate_federation("digits", None, "iid", 3, 0.5, 0.2, 0.1, 32, SEED)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation3]:
    root = tmp_path_factory.mktemp("deployment-e2e")
    data = _digits()
    node_configs, site_yamls = {}, {}
    for name, share in zip(SITES, data.sites, strict=True):
        # the hospitals accept distributed trust; bank-c caps ε at 2 and keeps the default (local trust only)
        strict = {"policy": {"max_epsilon": 2.0}} if name == STRICT else {"policy": {"allow_distributed_trust": True}}
        # everything this site owns, and nobody else reads
        node_configs[name] = write_npz_site(root / "sites-home" / name, name, share, **strict)
        site_yamls[name] = root / "sites-home" / name / "site.yaml"
    with local_deployment(root / "deployment", node_configs, extra_sites=[INTRUDER], deploy_site=site_yamls) as dep:
        yield Federation3(dep, root, data)


@pytest.fixture
def fresh(federation: Federation3) -> Federation3:
    """The shared deployment with every site up and connected, and no site remembering an earlier test's runs."""
    for site in SITES:
        if not federation.dep.sites[site].alive():
            federation.dep.start_site(site)  # retries while the SuperLink still counts a crashed node online
        state = _state(federation, site)
        for entry in state.iterdir() if state.exists() else ():  # ledger, audit log, reply cache, records
            if entry.name not in KEPT:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    federation.dep.wait_connected()
    return federation


def _state(fed: Federation3, site: str) -> Path:
    return fed.root / "sites-home" / site / "state"


def _ledger_rounds(fed: Federation3, site: str, run_id: str) -> list[dict[str, Any]]:
    path = _state(fed, site) / "privacy-ledger.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    return runs.get(run_id, {}).get("rounds", [])


def _received(fed: Federation3, site: str) -> int:
    return fed.dep.sites[site].log_text().count(RECEIVED)


def _worker_answered(fed: Federation3, site: str) -> int:
    return fed.dep.sites[site].log_text().count(WORKER_ANSWERED)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}")
        time.sleep(0.2)


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_ledgers_match_server(fed: Federation3, run_dir: Path) -> dict[str, Any]:
    """What the server reports for each site is what the site's own ledger, on its own disk, says."""
    privacy = json.loads((run_dir / "privacy.json").read_text())
    for site, report in privacy["sites"].items():
        rounds = _ledger_rounds(fed, site, privacy["run_id"])
        assert [r["round"] for r in rounds] == report["rounds_trained"], site
        if rounds:
            assert report["epsilon"] == pytest.approx(rounds[-1]["epsilon"], rel=1e-12), site
            assert report["epsilon_recomputed"] == pytest.approx(report["epsilon"], rel=1e-9), site
    return privacy


def test_run_with_a_declining_site_and_a_refused_intruder(fresh: Federation3) -> None:
    """The default protocol deployed: round 0's statistics release, then fedsgd rounds, a site declining each."""
    federation = fresh
    dep, run_dir = federation.dep, federation.root / "run-1"
    intruder = dep.start_site(INTRUDER, node_config=format_config({"site-config": "/nonexistent"}), wait=False)
    config = federation.root / "run-1.yaml"  # the operator's path: a YAML file and `fedtransfer deploy run`
    nested: dict[str, Any] = {"output_dir": str(run_dir), "cache_dir": str(federation.root / "server-cache")}
    for key, value in (RUN | {"train.rounds": 2, "privacy.target_epsilon": 3.0}).items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    config.write_text(yaml.safe_dump(nested))
    done = subprocess.run(
        [str(BIN_DIR / "fedtransfer"), "deploy", "run", "--config", str(config), "--connection", dep.connection],
        env=dep.env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    privacy = json.loads((run_dir / "privacy.json").read_text())
    flower_id = re.search(r"Flower's id of this submission is (\d+): `flwr log \1 ", done.stdout)
    assert flower_id and f"run {privacy['run_id']} completed" in done.stdout, done.stdout
    listed = dep.flwr("ls", dep.connection, "--run-id", flower_id.group(1), "--format", "json")
    assert json.loads(listed.stdout)["runs"][0]["status"] == "finished:completed"  # the id `flwr` takes
    rounds = [line for line in done.stdout.splitlines() if line.startswith("round ")]
    assert [line.split(" | ")[0] for line in rounds] == ["round 0/2", "round 1/2", "round 2/2"]  # 0: the statistics

    # an unregistered key is refused at activation and never becomes a node
    assert intruder.popen.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in intruder.log_text()
    listed = dep.flwr("supernode", "ls", dep.connection, "--format", "json")
    assert {int(n["node-id"]) for n in json.loads(listed.stdout)["nodes"]} == set(dep.node_ids.values())

    # the strict site declined every round, naming its limit; the two others carried the run
    declined = (
        "site policy (site.yaml): ε 3 (privacy.target_epsilon of this run plus ε 0 already spent in earlier runs) > "
        "policy.max_epsilon 2"
    )
    for record in _metrics(run_dir):
        assert record["sites_trained"] == 2
        assert record["sites"][STRICT] == {"status": "declined", "reason": declined}
        for site in SITES[:2]:
            assert record["sites"][site]["status"] == "trained"
            if record["round"] > 0:  # round 0 asks for the statistics release; later rounds carry the centred head
                assert record["sites"][site]["bytes_sent"] == record["bytes_sent_per_site"]
    privacy = _check_ledgers_match_server(federation, run_dir)
    assert privacy["sites"][STRICT]["rounds_declined"] == [{"round": r, "reason": declined} for r in (0, 1, 2)]
    assert _ledger_rounds(federation, STRICT, privacy["run_id"]) == []
    for site in SITES[:2]:
        assert 2.5 < privacy["sites"][site]["epsilon"] <= 3.0 + 1e-9

    # the exported model classifies raw pixels of the server's hold-out, which no site ever held
    model = load_model(run_dir / "model.pt")
    held_out = federation.data.server_test
    predicted = np.array(model.predict(held_out.inputs))
    assert (predicted == np.array([held_out.classes[i] for i in held_out.labels])).mean() > 0.3  # chance: 0.1


def test_sites_drop_out_and_one_comes_back_with_its_ledger(fresh: Federation3) -> None:
    federation = fresh
    dep, run_dir = federation.dep, federation.root / "run-2"
    overrides = (
        RUN
        | FEDAVG
        | {
            "train.rounds": 3,
            "privacy.target_epsilon": 1.5,
            "train.round_timeout_s": 90.0,
            "output_dir": str(run_dir),
            "cache_dir": str(federation.root / "server-cache"),
        }
    )
    # these two run a bare SuperNode (no worker: each message imports torch in its own ClientApp process, seconds),
    # so the kills below land while they train and hospital-b is back before round 3; a worker answers in a blink
    bare = {site: dep.node_configs[site] for site in ("hospital-b", STRICT)}
    for site, node_config in bare.items():
        dep.kill_site(site, graceful=True)
        dep.start_site(site, node_config=node_config)
    before = {site: _received(federation, site) for site in SITES}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(dep.run_app, APP_DIR, overrides, timeout=400)
        # round 0 is the record-count release (privacy.feature_stats: false under DP), so round r is the (r + 1)-th
        # message: hospital-b leaves while it trains round 2 (a clean stop: Flower marks it offline at once) ...
        _wait_for(lambda: _received(federation, "hospital-b") == before["hospital-b"] + 3, "round 2 at hospital-b")
        dep.kill_site("hospital-b", graceful=True)
        dep.start_site("hospital-b", node_config=bare["hospital-b"])  # ... and is back before round 3
        # bank-c crashes while it trains round 3: no goodbye, the server waits round_timeout_s for it
        _wait_for(lambda: _received(federation, STRICT) == before[STRICT] + 4, "round 3 at bank-c")
        dep.kill_site(STRICT)
        result = running.result()
    assert result.ok, (result.status, result.status_details, result.output[-4000:])

    metrics = _metrics(run_dir)
    status = [{site: record["sites"][site]["status"] for site in SITES} for record in metrics]
    assert status == [
        {"hospital-a": "trained", "hospital-b": "trained", "bank-c": "trained"},  # round 0: the record counts
        {"hospital-a": "trained", "hospital-b": "trained", "bank-c": "trained"},
        {"hospital-a": "trained", "hospital-b": "no-reply", "bank-c": "trained"},
        {"hospital-a": "trained", "hospital-b": "trained", "bank-c": "no-reply"},
    ]
    assert [record["sites_trained"] for record in metrics] == [3, 3, 2, 2]
    assert "Node Unavailable" in metrics[2]["sites"]["hospital-b"]["reason"]  # the SuperLink answered for it
    assert metrics[3]["sites"][STRICT]["reason"].startswith("dropped out: ")
    assert re.search(r"round 2: site hospital-b did not reply: dropped out: ", result.output)
    assert re.search(r"round 3: site bank-c did not reply: dropped out: ", result.output)

    privacy = _check_ledgers_match_server(federation, run_dir)
    # hospital-b's round 3 is composed with its round 0 release and round 1 from the ledger it kept on disk while it
    # was away
    rounds = _ledger_rounds(federation, "hospital-b", privacy["run_id"])
    assert [r["round"] for r in rounds] == [0, 1, 3]
    spent = [
        gaussian_steps(r["noise_multiplier"], r["sample_rate"], r["steps"])
        for r in privacy["sites"]["hospital-b"]["per_round"]
        if r.get("status", "trained") == "trained"
    ]
    assert len(spent) == 3
    for k, done in enumerate(rounds, start=1):
        assert done["epsilon"] == pytest.approx(epsilon_of(spent[:k], 1e-5, "rdp"), rel=1e-9)
    assert rounds[2]["epsilon"] > rounds[1]["epsilon"] > rounds[0]["epsilon"]
    assert (run_dir / "model.pt").is_file()
    dep.kill_site("hospital-b", graceful=True)  # back to `deploy site` with its worker, as the other tests expect
    dep.start_site("hospital-b")


def test_secure_aggregation_over_tls_survives_a_site_leaving_mid_protocol(fresh: Federation3) -> None:
    """SecAgg+ on the TLS deployment. The run's target ε 3 is above bank-c's cap of 2, so after the key
    exchange it refuses to train: a dropout after sharing keys, which the unmask stage must recover from."""
    federation = fresh
    dep, run_dir = federation.dep, federation.root / "run-3"
    overrides = (
        RUN
        | FEDAVG
        | {
            "train.rounds": 1,
            "privacy.target_epsilon": 3.0,
            "secure_aggregation": True,
            "output_dir": str(run_dir),
            "cache_dir": str(federation.root / "server-cache"),
        }
    )
    before = {site: _worker_answered(federation, site) for site in SITES}
    result = dep.run_app(APP_DIR, overrides, timeout=400)
    assert result.ok, (result.status, result.status_details, result.output[-4000:])
    for site in SITES:  # each site's worker released (or declined) round 0 and trained (or declined) round 1
        assert _worker_answered(federation, site) == before[site] + 2, dep.sites[site].log_text()[-3000:]
        assert "gave no answer" not in dep.sites[site].log_text()

    (record,) = [r for r in _metrics(run_dir) if r["round"] == 1]  # after round 0's record counts
    assert record["sites_trained"] == 2
    assert record["sites"][STRICT]["status"] == "declined"
    assert "policy.max_epsilon 2" in record["sites"][STRICT]["reason"]
    run_id = json.loads((run_dir / "privacy.json").read_text())["run_id"]
    heads = []
    for site in SITES[:2]:
        assert record["sites"][site]["status"] == "trained"
        assert record["sites"][site]["bytes_sent"] > record["bytes_sent_per_site"]  # masked int64 + key exchange
        raw = torch.load(_state(federation, site) / "replies" / f"{run_id}.pt", weights_only=True)
        heads.append(
            ({k: v.numpy() for k, v in raw["arrays"]["arrays"].items()}, int(raw["metrics"]["metrics"]["num-examples"]))
        )
    total = sum(n for _, n in heads)
    final = checkpoint.latest(run_dir).head
    for name in final:
        mean = sum(h[name].astype(np.float64) * n for h, n in heads) / total
        assert np.max(np.abs(final[name] - mean)) < 1e-3  # FedAvg of the two, up to quantisation

    logs = [_state(federation, site) / "audit.jsonl" for site in SITES]
    report = audit_run(run_dir, logs)
    assert report.passed, [str(f) for f in report.failures]
    assert report.mode.startswith("secure aggregation")


def test_distributed_trust_over_tls_sums_the_shares_of_the_sites_it_planned_for(fresh: Federation3) -> None:
    """privacy.trust: distributed on the TLS deployment. The hospitals opted in; bank-c did not (and caps ε at 2),
    so it declines after the key exchange and the round's sum holds 2 shares: the K_min the run planned for
    (SecAgg+ threshold 0.67 of train.min_sites 2). The server steps on exactly the two sites' integer sums."""
    federation = fresh
    dep, run_dir = federation.dep, federation.root / "run-distributed"
    overrides = RUN | {
        "train.rounds": 1,
        "privacy.feature_stats": False,
        "privacy.accountant": "rdp",
        "privacy.trust": "distributed",
        "secure_aggregation": True,
        "secagg.quantization_range": 2**27,
        "secagg.max_weight": 2048,
        "output_dir": str(run_dir),
        "cache_dir": str(federation.root / "server-cache"),
    }
    result = dep.run_app(APP_DIR, overrides, timeout=400)
    assert result.ok, (result.status, result.status_details, result.output[-4000:])
    (record,) = [r for r in _metrics(run_dir) if r["round"] == 1]  # round 0: the record counts' Skellam release
    assert record["sites_trained"] == 2, record["sites"]
    assert record["sites"][STRICT]["status"] == "declined" and "policy." in record["sites"][STRICT]["reason"]
    privacy = json.loads((run_dir / "privacy.json").read_text())
    total: dict[str, np.ndarray] = {}
    batch = 0.0
    for site in SITES[:2]:
        report = privacy["sites"][site]
        assert report["epsilon"] <= 3.0 < report["epsilon_individual"]  # against the sum; against its own message
        (trained,) = [r for r in report["per_round"] if r["round"] == 1]
        assert trained["mechanism"] == "skellam" and trained["min_survivors"] == 2
        assert trained["noise_share"] == pytest.approx(trained["noise_variance"] / 2, rel=1e-12)
        assert trained["quantum"] == 2.0**-14  # 2**27 / (4 × 2048) levels per record
        raw = torch.load(_state(federation, site) / "replies" / f"{privacy['run_id']}.pt", weights_only=True)
        for name, value in raw["arrays"]["arrays"].items():  # the site's own message, before masking
            total[name] = total.get(name, 0.0) + value.numpy()
        batch += raw["metrics"]["metrics"]["expected-batch"]
    first = torch.load(run_dir / "checkpoints" / "round-0001.pt", weights_only=False)
    velocity = first["strategy_state"]["m_t"]
    assert set(velocity) <= set(total)
    for name, summed in total.items():  # the first heavy-ball step is the gradient: Σ of the two messages / Σ q·n
        if name not in velocity:  # a buffer (the centring mean): no gradient, sent as zeros
            assert not summed.any()
            continue
        assert np.allclose(np.asarray(velocity[name]), summed / batch, rtol=1e-6, atol=1e-12)
    logs = [_state(federation, site) / "audit.jsonl" for site in SITES]
    audit = audit_run(run_dir, logs)
    # privacy.feature_stats: false: round 0 released the record counts (Skellam shares), and every weight and
    # q·n the sites sent follows from them (issue 23): nothing fails, the coverage check included
    failures = [str(f) for f in audit.failures]
    assert not failures, failures
    assert audit.mode.startswith("secure aggregation")
