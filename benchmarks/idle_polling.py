"""The SuperLink's load from many idle sites' polling, paced (fedtransfer.deploy.pacing) and as Flower ships it.

A site's SuperNode asks the SuperLink for a message in a loop: Flower 1.41.0 waits 3 s after each
empty pull; `deploy site` waits 0.2 s for 30 s after a message, then backs off to the same 3 s.
This measures what each pace costs the SuperLink with `--sites` idle sites (default 100).

What runs: one real SuperLink (TLS, SuperNode authentication; tests/deploy_harness.py), `--sites`
keys registered through its Control API, and for each key one poller thread holding a real Fleet
connection made by Flower's own SuperNode transport (`flwr.supernode.fleet_http_connection.
http_request_response`: activation, signed requests, Flower's heartbeat thread) that calls its
`receive` (PullMessages) in a loop, pausing as the SuperNode would. These are not whole SuperNodes:
no SuperExec and no ClientApp (they only act when a message comes, and stay on the site's host),
so the SuperLink sees the same requests at a fraction of the CPU 100 SuperNodes would need here.
The threads are spread over `--processes` processes. Each phase holds one pause for `--window` s:

- `none`: no poller connected (the SuperLink's own idle CPU);
- `paced-quick`: 0.2 s, every site just after a message (the first 30 s after one);
- `idle-3s`: 3 s, Flower's pause, which paced sites reach after ~38 s without a message.

Per phase: pulls per second achieved (and the rate the pause asks for), the pulls' median and 95th
percentile latency, and the SuperLink process's CPU (user + system seconds over the window, in % of
one core). Results: benchmarks/results/idle_polling.json.

    .venv/bin/python -m benchmarks.idle_polling [--sites 100] [--window 30] [--processes 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import print_table, write_results
from tests.deploy_harness import local_deployment

PHASES = (("paced-quick", 0.2), ("idle-3s", 3.0))
SETUP_S = float(os.environ.get("IDLE_SETUP_S", "90"))  # for every poller to activate its node before the first window


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _register(env: dict[str, str], connection: str, count: int) -> list[bytes]:
    """`count` fresh node keys registered through the Control API, as `flwr supernode register` does it."""
    from cryptography.hazmat.primitives import serialization
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    os.environ["FLWR_HOME"] = env["FLWR_HOME"]
    client = init_http_client_from_connection(read_superlink_connection(connection))
    keys = []
    try:
        for k in range(count):
            private, public = generate_key_pairs()
            client.RegisterNode(request=RegisterNodeRequest(public_key=public_key_to_bytes(public), name=f"idle-{k}"))
            keys.append(
                private.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
    finally:
        client.close()
    return keys


def _poll(address: str, ca: str, pem: bytes, schedule: list[tuple[float, float, float]], out: dict[str, Any]) -> None:
    """One idle site: activate, then pull with each window's pause until its end; latencies per window."""
    from cryptography.hazmat.primitives import serialization
    from flwr.supernode.fleet_http_connection import http_request_response

    private = serialization.load_pem_private_key(pem, password=None)
    with http_request_response(address, False, ca, (private, private.public_key())) as conn:
        receive = conn[1]
        out["connected_at"] = time.time()
        for name, (start, end, pause) in zip((p for p, _ in PHASES), schedule, strict=True):
            time.sleep(max(0.0, start - time.time()))
            latencies = out.setdefault(name, [])
            while time.time() < end:
                t0 = time.perf_counter()
                receive()
                latencies.append(time.perf_counter() - t0)
                time.sleep(pause)


def poller_main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    outs: list[dict[str, Any]] = [{} for _ in spec["keys"]]
    threads = [
        threading.Thread(
            target=_poll, args=(spec["address"], spec["ca"], key.encode(), spec["schedule"], out), daemon=True
        )
        for key, out in zip(spec["keys"], outs, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=spec["schedule"][-1][1] - time.time() + 60)
    Path(out_path).write_text(json.dumps(outs))


def measure(sites: int, window: float, processes: int, workdir: Path) -> list[dict[str, Any]]:
    with local_deployment(workdir / "deployment", {}) as dep:
        assert dep.superlink is not None
        pid = dep.superlink.popen.pid
        keys = _register(dep.env, dep.connection, sites)
        t0 = time.time() + SETUP_S
        schedule = [(t0 + i * window, t0 + (i + 1) * window, pause) for i, (_, pause) in enumerate(PHASES)]
        procs, outs = [], []
        for p in range(processes):
            spec = workdir / f"poller-{p}.json"
            spec.write_text(
                json.dumps(
                    {
                        "address": dep.superlink_address,
                        "ca": str(dep.creds.ca_cert),
                        "keys": [k.decode() for k in keys[p::processes]],
                        "schedule": schedule,
                    }
                )
            )
            outs.append(workdir / f"poller-{p}.out.json")
            argv = [sys.executable, "-m", "benchmarks.idle_polling", "--poller", str(spec), str(outs[-1])]
            procs.append(subprocess.Popen(argv, env=os.environ.copy()))
        idle_s = min(window, SETUP_S / 3)  # before any poller activated
        cpu0 = _cpu_seconds(pid)
        time.sleep(idle_s)
        rows = [{"phase": "none", "sites": 0, "superlink_cpu_pct": 100 * (_cpu_seconds(pid) - cpu0) / idle_s}]
        for (name, pause), (start, end, _) in zip(PHASES, schedule, strict=True):
            time.sleep(max(0.0, start - time.time()))
            cpu0 = _cpu_seconds(pid)
            time.sleep(max(0.0, end - time.time()))
            rows.append(
                {"phase": name, "pause_s": pause, "superlink_cpu_pct": 100 * (_cpu_seconds(pid) - cpu0) / window}
            )
        for proc in procs:
            proc.wait(timeout=120)
    results = [r for out in outs for r in json.loads(out.read_text())]
    for row in rows[1:]:
        lat = [x for r in results for x in r.get(row["phase"], [])]
        row |= {
            "sites": sites,
            "connected": sum(1 for r in results if r.get("connected_at", float("inf")) <= schedule[0][0]),
            "asked_rps": sites / row["pause_s"],
            "pulls_per_s": len(lat) / window,
            "pull_median_ms": 1000 * statistics.median(lat) if lat else None,
            "pull_p95_ms": 1000 * statistics.quantiles(lat, n=20)[-1] if len(lat) > 1 else None,
            "load_1m": os.getloadavg()[0],
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--window", type=float, default=30.0, help="seconds each pace is held and measured")
    parser.add_argument("--processes", type=int, default=4, help="poller processes the sites' threads share")
    parser.add_argument("--poller", nargs=2, help=argparse.SUPPRESS)  # internal: one poller process
    args = parser.parse_args()
    if args.poller:
        poller_main(*args.poller)
        return
    with tempfile.TemporaryDirectory(prefix="idle-polling-") as tmp:
        rows = measure(args.sites, args.window, args.processes, Path(tmp))
    columns = ["phase", "pause_s", "sites", "connected", "asked_rps", "pulls_per_s", "pull_median_ms", "pull_p95_ms"]
    print_table(rows, [*columns, "superlink_cpu_pct", "load_1m"])
    write_results("idle_polling", rows, {"sites": args.sites, "window_s": args.window, "processes": args.processes})


if __name__ == "__main__":
    main()
