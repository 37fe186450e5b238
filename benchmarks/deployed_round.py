"""Deployed round vs simulated round: one config on TLS SuperNodes on 127.0.0.1 and on the Simulation Engine.

Flower 1.41 starts a new ClientApp process per message at a deployed site, while simulation
actors stay warm after round 1. On one deployment (TLS SuperLink with node authentication,
one SuperNode per site, each with its own YAML, .npz share and state folder; tests/deploy_harness.py),
three runs of `--rounds` rounds each:

- `floor`: a ClientApp that answers at once, importing nothing but Flower: what Flower's
  polling (SuperNode, SuperExec) and process start cost. Its ServerApp pulls the replies every
  0.05 s, as fedtransfer's does (server/federation/sites.py), not with Flower's `send_and_receive`,
  which sleeps 3 s between pulls over HTTP: stops 33-34 measured that sleep as the floor (3.2 s);
- `recompute`: fedtransfer with `FEDTRANSFER_PREPARED_STATE=off`, every process building the
  backbone and calibrating the noise, as before client/prepared.py;
- `prepared`: fedtransfer with prepared state, each message answered in its own ClientApp process;
- `worker`: fedtransfer as shipped: every site started with `fedtransfer deploy site`, which runs
  the site's worker next to its SuperNode (client/site_worker.py); the ClientApp processes forward
  each message to it and import no torch.

Each fedtransfer run starts from empty state folders (round 1 extracts the features). Then
the same config on the Simulation Engine, and one ClientApp process of each kind timed phase
by phase in a fresh interpreter (benchmarks/clientapp_process.py) on a copy of a site's folder.

`--protocols fedavg fedsgd` measures instead what a protocol's round count costs a whole run: one whole
run of the demo's federation (4 sites) per protocol, with the settings it ships with (PROTOCOLS), in the
order given, each on a new deployment whose sites run as shipped (`fedtransfer deploy site`, with their
workers) from empty state folders, timed from the start of `flwr run` to its final result; then the same
runs on the Simulation Engine, timed the same way (results: deployed_protocols.json). `--floor-rounds N` first
times N exchanges of the answer-at-once `floor` app on each of those deployments: the per-message floor of the
sites as shipped (the `floor` row; its later_round_s is the median after the first).

    .venv/bin/python -m benchmarks.deployed_round [--sites 3] [--rounds 3] [--repeat 1]
    .venv/bin/python -m benchmarks.deployed_round --protocols fedavg fedsgd
    .venv/bin/python -m benchmarks.deployed_round --protocols fedsgd --protocol-rounds 10 --floor-rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedtransfer.client.prepared import SWITCH_ENV
from fedtransfer.common.config.run import RunConfig, config_from_dict
from fedtransfer.common.data.federation import federation_for, simulate_federation
from fedtransfer.server.federation.report import read_metrics
from fedtransfer.server.launch.launcher import submit_run
from fedtransfer.server.launch.simulation import simulate

from benchmarks.harness import print_table, write_results
from tests.deploy_harness import LocalDeployment, local_deployment, write_npz_site

SEED = 42
# The demo's federation (configs/demo.yaml: 5,000 MNIST digits, 4 sites, Dirichlet(0.5), MobileNetV2 at 64 px,
# ε = 3, δ = 1e-5 per site for the whole run), named here so that a change of the config defaults cannot move it.
DEMO: dict[str, Any] = {
    "seed": SEED,
    "device": "cpu",
    "backbone": {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1", "image_size": 64},
    "data": {
        "source": "mnist",
        "split": "dirichlet",
        "alpha": 0.5,
        "num_sites": 4,
        "site_test_fraction": 0.2,
        "server_test_fraction": 0.1,
    },
    "train": {"strategy": "fedavg", "fraction_train": 1.0, "min_sites": 2, "fraction_evaluate": 1.0},
    "privacy": {"target_epsilon": 3.0, "target_delta": 1e-5, "max_grad_norm": 1.0},
}
# Each protocol with the settings it ships with, whichever of them the config defaults pick: fedavg as
# configs/demo-fedavg.yaml (5 rounds × 10 local epochs), fedsgd as configs/demo.yaml (30 rounds after the feature
# statistics' round 0); tests/test_benchmarks.py keeps them equal.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "fedavg": {
        "train": {
            "protocol": "fedavg",
            "rounds": 5,
            "local_epochs": 10,
            "batch_size": 64,
            "learning_rate": 0.5,
            "momentum": 0.0,
        },
        "privacy": {"accountant": "rdp", "feature_stats": False},
    },
    "fedsgd": {
        "train": {"protocol": "fedsgd", "rounds": 30, "sample_rate": 1.0, "learning_rate": 1.0, "server_momentum": 0.9},
        "privacy": {"accountant": "prv", "feature_stats": True, "feature_stats_share": 0.2},
    },
}
# fedsgd with federated evaluation in every 5th round and the last (train.evaluate_every): a deployed round is
# then one Flower exchange, not two
PROTOCOLS["fedsgd-evaluate5"] = {**PROTOCOLS["fedsgd"], "train": PROTOCOLS["fedsgd"]["train"] | {"evaluate_every": 5}}
MODES = {"recompute": "off", "prepared": "on"}  # the value of FEDTRANSFER_PREPARED_STATE at the sites
WORKER_ANSWERED = "site worker answered a train message (message)"  # client/site_worker.py, one line per message

_FLOOR_PYPROJECT = """\
[project]
name = "floor"
version = "1.0.0"
description = "Answers at once: what Flower's polling and process start cost a round"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "fedtransfer"

[tool.flwr.app.components]
serverapp = "floor.apps:server"
clientapp = "floor.apps:client"

[tool.flwr.app.config]
rounds = 3
out-file = ""
"""

_FLOOR_APPS = """\
import json
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    seconds = []
    for _ in range(int(context.run_config["rounds"])):
        t0 = time.monotonic()
        sent = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in grid.get_node_ids()]
        pending, replies = set(grid.push_messages(sent)), []
        while pending and time.monotonic() - t0 < 300:  # polled as fedtransfer's own loop polls (0.05 s first)
            got = list(grid.pull_messages(pending))
            replies += got
            pending -= {r.metadata.reply_to_message_id for r in got}
            time.sleep(0.05 if pending else 0.0)
        assert len(replies) == len(sent) and not any(r.has_error() for r in replies)
        seconds.append(time.monotonic() - t0)
    Path(str(context.run_config["out-file"])).write_text(json.dumps(seconds))


@client.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict(), reply_to=msg)
"""


def run_config(workdir: Path, sites: int, rounds: int, name: str) -> dict[str, Any]:
    """The e2e deployment's run (digits split between `sites`, MobileNetV2 at 32 px, 3 local epochs, ε = 3)."""
    return {
        "run_name": name,
        "output_dir": str(workdir / name),
        "cache_dir": str(workdir / "server-cache"),
        "seed": SEED,
        "device": "cpu",
        "backbone": {"image_size": 32},
        "data": {"source": "digits", "split": "iid", "num_sites": sites},
        "train": {
            "rounds": rounds,
            "local_epochs": 3,
            "min_sites": sites,
            "fraction_evaluate": 0.0,
            "protocol": "fedavg",
            "learning_rate": 0.5,
        },
        "privacy": {"target_epsilon": 3.0, "target_delta": 1e-5, "accountant": "rdp", "feature_stats": False},
    }


def protocol_config(workdir: Path, demo: Mapping[str, Any], settings: Mapping[str, Any], name: str) -> dict[str, Any]:
    """`demo` with a protocol's `settings` over it, section by section; its own output and (empty) cache folders."""
    merged = {k: v | settings[k] if k in settings else v for k, v in demo.items()}
    merged |= {k: v for k, v in settings.items() if k not in demo}
    return merged | {"run_name": name, "output_dir": str(workdir / name), "cache_dir": str(workdir / f"{name}-cache")}


def restart_sites(dep: LocalDeployment, homes: Mapping[str, Path], switch: str) -> None:
    """Every SuperNode again, with empty state folders and `switch` in the environment its ClientApps inherit."""
    os.environ[SWITCH_ENV] = switch
    for site, home in homes.items():
        dep.kill_site(site, graceful=True)  # a clean leave: the SuperLink lets the node in again at once
        shutil.rmtree(home / "state", ignore_errors=True)
        dep.start_site(site)


def floor_rounds(dep: LocalDeployment, workdir: Path, rounds: int) -> list[float]:
    app = workdir / "floor-app"
    (app / "floor").mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(_FLOOR_PYPROJECT)
    (app / "floor" / "__init__.py").write_text("")
    (app / "floor" / "apps.py").write_text(_FLOOR_APPS)
    out = workdir / "floor.json"
    result = dep.run_app(app, {"rounds": rounds, "out-file": str(out)}, timeout=120.0 + 60.0 * rounds)
    if not result.ok:
        raise RuntimeError(f"the floor app failed: {result.status} {result.status_details}\n{result.output[-2000:]}")
    return json.loads(out.read_text())


def fedtransfer_rounds(dep: LocalDeployment, cfg: RunConfig) -> list[float]:
    submit_run(cfg, dep.connection, env=dep.env, stream=False)
    return [m["time_s"] for m in read_metrics(cfg.output_path)]


def check_workers(dep: LocalDeployment, homes: Mapping[str, Path], messages: int) -> None:
    """Each site's worker answered all `messages` training messages of the run (none fell back to its process)."""
    for site in homes:
        if (answered := dep.sites[site].log_text().count(WORKER_ANSWERED)) != messages:
            raise RuntimeError(
                f"{site}'s worker answered {answered} of {messages} training messages:\n"
                f"{dep.sites[site].log_text()[-3000:]}"
            )


def worker_rounds(dep: LocalDeployment, homes: Mapping[str, Path], cfg: RunConfig) -> list[float]:
    """The sites as `fedtransfer deploy site` runs them, each with its worker; every training message must reach it."""
    dep.deploy_site = {site: home / "site.yaml" for site, home in homes.items()}
    restart_sites(dep, homes, "on")
    seconds = fedtransfer_rounds(dep, cfg)
    check_workers(dep, homes, len(seconds))
    return seconds


def process_phases(home: Path, app: Path, cfg: dict[str, Any], workdir: Path, repeat: int) -> list[dict[str, Any]]:
    """One ClientApp process per mode and repeat, in a fresh interpreter, each on its own copy of `home`.

    They run the copy of the app the site installed from the run's FAB (`app`), so the code, and with
    it the prepared records' key, is the one the deployment ran.
    """
    (workdir / "run-config.json").write_text(json.dumps(cfg))
    rows = []
    for mode, switch in MODES.items():
        for i in range(repeat):
            copy = workdir / f"process-{mode}-{i}"
            shutil.copytree(home, copy, ignore=shutil.ignore_patterns("worker"))  # not the worker's socket
            env = os.environ | {SWITCH_ENV: switch}
            argv = [
                sys.executable,
                "-m",
                "benchmarks.clientapp_process",
                str(copy / "site.yaml"),
                str(workdir / "run-config.json"),
            ]
            t0 = time.perf_counter()
            done = subprocess.run(argv, cwd=app, env=env, capture_output=True, text=True, timeout=600, check=True)
            wall = time.perf_counter() - t0
            rows.append({"mode": mode, "process_s": wall} | json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def measure(sites: int, rounds: int, repeat: int, workdir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    federation = simulate_federation("digits", None, "iid", sites, 0.5, 0.2, 0.1, 32, SEED)
    names = [f"site-{k}" for k in range(sites)]
    homes = {name: workdir / "sites" / name for name in names}
    configs = {
        name: write_npz_site(homes[name], name, share) for name, share in zip(names, federation.sites, strict=True)
    }
    seconds: dict[str, list[float]] = {}
    with local_deployment(workdir / "deployment", configs) as dep:
        seconds["floor"] = floor_rounds(dep, workdir, rounds)
        for mode, switch in MODES.items():
            restart_sites(dep, homes, switch)
            seconds[mode] = fedtransfer_rounds(dep, config_from_dict(run_config(workdir, sites, rounds, mode)))
        seconds["worker"] = worker_rounds(dep, homes, config_from_dict(run_config(workdir, sites, rounds, "worker")))
    simulated = config_from_dict(run_config(workdir, sites, rounds, "simulated"))
    simulate(replace(simulated, cache_dir=str(workdir / "simulation-cache")), stream=False)
    seconds["simulated"] = [m["time_s"] for m in read_metrics(simulated.output_path)]
    table = [{"round": r + 1} | {f"{k}_s": v[r] for k, v in seconds.items()} for r in range(rounds)]
    later = table[1:] or table  # round 1 extracts the features: the rounds after it are the steady state
    medians = {k: statistics.median(r[k] for r in later) for k in table[0] if k != "round"}
    table.append({"round": f"median 2-{rounds}" if rounds > 1 else "1"} | medians)
    for row in table:
        for mode in ("prepared", "worker"):
            row[f"{mode}/simulated"] = row[f"{mode}_s"] / row["simulated_s"]
            row[f"{mode}-floor_s"] = row[f"{mode}_s"] - row["floor_s"]
    installed = (workdir / "deployment" / "sites" / names[0] / "flwr-home" / "apps").glob("fedtransfer.*")
    app = max(installed, key=lambda p: p.stat().st_mtime)  # the last run's (the tree may change meanwhile)
    phases = process_phases(homes[names[0]], app, run_config(workdir, sites, rounds, "process"), workdir, repeat)
    return table, phases


def whole_run(setting: str, protocol: str, cfg: RunConfig, seconds: float) -> dict[str, Any]:
    """One whole run's row, from its metrics.jsonl: time, rounds (round 0 included), accuracy, bytes per site."""
    metrics = read_metrics(cfg.output_path)
    rounds = [m["time_s"] for m in metrics]
    sites = sorted(metrics[-1]["sites"])
    sent = [sum(m["sites"][s].get("bytes_sent", 0) for m in metrics) for s in sites]  # a site's uploads
    return {
        "setting": setting,
        "protocol": protocol,
        "rounds": len(metrics),
        "whole_run_s": seconds,
        "per_round_s": seconds / len(metrics),
        "first_round_s": rounds[0],
        "later_round_s": statistics.median(rounds[1:] or rounds),  # after the features' extraction
        "accuracy": metrics[-1]["server"]["accuracy"],
        "epsilon": max(metrics[-1]["sites"][s].get("epsilon", 0.0) for s in sites),
        "sent_per_site_bytes": statistics.mean(sent),
        "received_per_site_bytes": sum(m["bytes_sent_per_site"] for m in metrics),  # the head, each round
        "load_1m": os.getloadavg()[0],
    }


def floor_row(dep: LocalDeployment, workdir: Path, rounds: int) -> dict[str, Any]:
    """The per-message floor on the sites as shipped: `rounds` exchanges of the answer-at-once app (`_FLOOR_APPS`)."""
    seconds = floor_rounds(dep, workdir, rounds)
    return {
        "setting": "deployed",
        "protocol": "floor",
        "rounds": rounds,
        "whole_run_s": sum(seconds),
        "per_round_s": statistics.mean(seconds),
        "first_round_s": seconds[0],
        "later_round_s": statistics.median(seconds[1:] or seconds),
        "load_1m": os.getloadavg()[0],
    }


def measure_protocols(
    workdir: Path, demo: Mapping[str, Any], protocols: Mapping[str, Mapping[str, Any]], floor: int = 0
) -> list[dict[str, Any]]:
    """One whole run per protocol, in order, each on a new deployment of `demo`'s federation whose sites start
    with `fedtransfer deploy site` (and their workers) and empty state folders; then the same runs simulated,
    each with an empty cache. Both are timed around the run: `flwr run` to its final result, `simulate`.
    With `floor`, each deployment first times that many exchanges of the answer-at-once app (`floor_row`)."""
    federation = federation_for(config_from_dict(demo))
    rows = []
    for protocol, settings in protocols.items():
        cfg = config_from_dict(protocol_config(workdir, demo, settings, f"{protocol}-deployed"))
        homes = {share.name: workdir / f"{protocol}-sites" / share.name for share in federation.sites}
        configs = {share.name: write_npz_site(homes[share.name], share.name, share) for share in federation.sites}
        os.environ[SWITCH_ENV] = "on"  # prepared state, as shipped
        sites = {site: home / "site.yaml" for site, home in homes.items()}
        with local_deployment(
            workdir / f"{protocol}-deployment", configs, deploy_site=sites, connect_timeout=300.0
        ) as dep:  # each site's worker imports torch first
            if floor:
                rows.append(floor_row(dep, workdir, floor))
            t0 = time.perf_counter()
            submit_run(cfg, dep.connection, env=dep.env, stream=False)
            rows.append(whole_run("deployed", protocol, cfg, time.perf_counter() - t0))
            check_workers(dep, homes, rows[-1]["rounds"])
    for protocol, settings in protocols.items():
        cfg = config_from_dict(protocol_config(workdir, demo, settings, f"{protocol}-simulated"))
        t0 = time.perf_counter()
        simulate(cfg, stream=False)
        rows.append(whole_run("simulated", protocol, cfg, time.perf_counter() - t0))
    return rows + protocol_ratios(rows)


def protocol_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deployed over simulated for each protocol, and each protocol over the first one in each setting."""
    by = {(r["setting"], r["protocol"]): r for r in rows}
    protocols = list(dict.fromkeys(r["protocol"] for r in rows if r["protocol"] != "floor"))
    keys = ("whole_run_s", "per_round_s", "later_round_s")
    out = [
        {"setting": "deployed/simulated", "protocol": p}
        | {k: by["deployed", p][k] / by["simulated", p][k] for k in keys}
        for p in protocols
    ]
    out += [
        {"setting": setting, "protocol": f"{p}/{protocols[0]}"}
        | {k: by[setting, p][k] / by[setting, protocols[0]][k] for k in (*keys, "rounds")}
        for setting in ("deployed", "simulated")
        for p in protocols[1:]
    ]
    return out


def report_protocols(workdir: Path, protocols: list[str], rounds: int | None, name: str, floor: int = 0) -> None:
    chosen = {
        p: PROTOCOLS[p] | {"train": PROTOCOLS[p]["train"] | ({"rounds": rounds} if rounds else {})} for p in protocols
    }
    rows = measure_protocols(workdir, DEMO, chosen, floor)
    print_table(
        rows,
        [
            "setting",
            "protocol",
            "rounds",
            "whole_run_s",
            "per_round_s",
            "first_round_s",
            "later_round_s",
            "accuracy",
            "epsilon",
            "sent_per_site_bytes",
            "load_1m",
        ],
    )
    write_results(name, rows, {"protocols": protocols, "demo": DEMO, "settings": chosen, "floor_rounds": floor})


def report_rounds(workdir: Path, sites: int, rounds: int, repeat: int) -> None:
    table, phases = measure(sites, rounds, repeat, workdir)
    print_table(
        table,
        [
            "round",
            "floor_s",
            "recompute_s",
            "prepared_s",
            "worker_s",
            "simulated_s",
            "prepared/simulated",
            "worker/simulated",
            "worker-floor_s",
        ],
    )
    print()
    print_table(
        phases,
        ["mode", "process_s", "flower_imports_s", "app_imports_s", "site_s", "train_s", "backbone_built", "error"],
    )
    rows = [{"table": "rounds"} | r for r in table] + [{"table": "process"} | p for p in phases]
    write_results("deployed_round", rows, {"sites": sites, "rounds": rounds, "repeat": repeat})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2, help="ClientApp processes timed phase by phase, per mode")
    parser.add_argument(
        "--protocols",
        nargs="+",
        choices=list(PROTOCOLS),
        help="instead: one whole run of the demo per protocol, deployed and simulated "
        "(--sites, --rounds and --repeat do not apply)",
    )
    parser.add_argument("--protocol-rounds", type=int, help="with --protocols: this many rounds (default: as shipped)")
    parser.add_argument(
        "--floor-rounds", type=int, default=0, help="with --protocols: first time this many answer-at-once exchanges"
    )
    parser.add_argument("--name", default="deployed_protocols", help="with --protocols: the results file's name")
    parser.add_argument("--workdir", help="keep the deployment's files here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deployed-round-") as tmp:
        workdir = Path(args.workdir).expanduser().resolve() if args.workdir else Path(tmp)
        if args.protocols:
            report_protocols(workdir, args.protocols, args.protocol_rounds, args.name, args.floor_rounds)
        else:
            report_rounds(workdir, args.sites, args.rounds, args.repeat)
    print(f"load average while measuring: {os.getloadavg()}")


if __name__ == "__main__":
    main()
