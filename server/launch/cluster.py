"""`fedtransfer simulate --ray-address`: the simulation on an existing Ray cluster, and its shared storage.

Flower's Simulation Engine (flwr 1.41, `RayBackend.init_ray`) calls `ray.init()` with no
address, so Ray joins the cluster named by `RAY_ADDRESS` in the environment of the
simulation process; `fedtransfer.server.launch.simulation` puts it there. Sites then run as Ray actors on
any node of the cluster, and every node must see the same files at the same paths:
the run folder (each site's ledger, audit log and secret seed under `sites/`, and the
Flower app itself, installed under `output_dir/.flwr`) and the feature cache.

`check_cluster` proves that before Flower starts: it writes a fresh token into each folder
here, runs one task pinned to every alive node that reads the tokens back, and names the
first node and folder that does not see them, in one line.
"""

from __future__ import annotations

import secrets
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from fedtransfer.common.config.run import ConfigError

TOKEN_PREFIX = ".fedtransfer-shared-check-"
NODE_TIMEOUT_S = 60.0  # one probe task per node; a node that cannot run it in this time is named
CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str) -> None:
    """A Ray head answers at host:port; one line naming the address otherwise ("auto" is left to Ray)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address: {address!r} is not host:port of a Ray head (e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise ConfigError(
            f"--ray-address: no Ray cluster answers at {address} ({err.strerror or err}); start its "
            "head with `ray start --head --port PORT` and each other node with `ray start --address "
            "HEAD:PORT`"
        ) from None


def _probe(tokens: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Runs ON a cluster node (pickled by value, stdlib only): which token files it cannot read back."""
    import socket as node_socket
    from pathlib import Path as NodePath

    missing = {}
    for key, (path, expected) in tokens.items():
        try:
            seen = NodePath(path).read_text(encoding="utf-8")
        except OSError as err:
            seen = f"<{err.strerror}>"
        if seen != expected:
            missing[key] = seen
    return missing | {"@host": node_socket.gethostname()}


def check_cluster(address: str, folders: Mapping[str, Path]) -> int:
    """Every alive node of the cluster at `address` sees each folder; returns the number of nodes.

    `folders` maps the config key (output_dir, cache_dir) to its absolute path. A folder a
    node does not see is a ConfigError naming the key, the node and what to do.
    """
    check_reachable(address)
    written = {}
    try:
        for key, folder in folders.items():
            token = secrets.token_hex(16)
            path = folder / f"{TOKEN_PREFIX}{token}"
            path.write_text(token, encoding="utf-8")
            written[key] = (str(path), token)
        return _probe_nodes(address, written, folders)
    finally:
        for path, _ in written.values():
            Path(path).unlink(missing_ok=True)


def _probe_nodes(address: str, tokens: dict[str, tuple[str, str]], folders: Mapping[str, Path]) -> int:
    """One probe task pinned to each alive node; raises on the first node that misses a token."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # nodes need not have this repository
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
        pending = {
            n["NodeManagerAddress"] + " " + n["NodeID"][:8]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(tokens)
            for n in nodes
        }
        for node, ref in pending.items():
            try:
                missing = ray.get(ref, timeout=NODE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise ConfigError(
                    f"--ray-address: Ray node {node} did not run a 0-CPU check within "
                    f"{NODE_TIMEOUT_S:.0f}s; is it healthy (`ray status`)?"
                ) from None
            host = missing.pop("@host")
            for key, seen in missing.items():
                raise ConfigError(
                    f"{key}: {folders[key]} is not shared with Ray node {node} (host {host}: "
                    f"read {seen[:40]!r} instead of the token written here); put output_dir and "
                    "cache_dir on storage every node mounts at the same path"
                )
        return len(nodes)
    finally:
        ray.shutdown()
