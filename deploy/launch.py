"""Exact command lines for running fedtransfer on a real flwr 1.41 deployment.

Facts about flwr 1.41 this module encodes (checked against the installed source):

* ``flower-superlink`` serves the Runtime, Control *and* Fleet APIs over ONE HTTPS
  port (``--host``/``--port``, default 127.0.0.1:8000); the old gRPC ports
  9091-9093 and ``--fleet-api-address``/``--control-api-address`` are deprecated.
  Binding that port beyond loopback therefore exposes the Control API (submit
  runs = run code on the SuperLink) and the Runtime API, which have no account
  authentication in open-source flwr. We keep it on loopback and publish only
  ``/v1/fleet/`` through a TLS reverse proxy (see ``deploy/proxy``).
* SuperNode authentication is ``--enable-supernode-auth`` (requires TLS) plus a
  registration of every site's OpenSSH public key through the Control API with
  ``flwr supernode register <key.pub> <connection>``; unregistered keys are refused
  at activation. Registrations live in the SuperLink database, so use
  ``--database`` for anything that must survive a restart.
* ``flwr`` reads SuperLink connections from ``$FLWR_HOME/config.toml``
  (``[superlink.<name>]`` with ``address`` and an absolute ``root-certificates``).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path

import tomli_w
from fedtransfer.common.config.names import validate_site_name
from fedtransfer.common.errors import InputError
from fedtransfer.deploy.credentials import DeploymentCredentials
from fedtransfer.deploy.link_sessions import bounded_argv
from fedtransfer.deploy.pacing import paced_argv

LOOPBACK = "127.0.0.1"
DEFAULT_SUPERLINK_PORT = 8000  # flwr 1.41 default; Runtime + Control + Fleet
DEFAULT_SUPERNODE_PORT = 9094  # flwr 1.41 default SuperNode Runtime API port
SUPERNODE_PORT_SPAN = 100  # a site started without --port claims the first free port from 9094 on (deploy/ports.py)
DEFAULT_CONNECTION = "fedtransfer"

ConfigValue = str | bool | int | float


class RegistrationError(RuntimeError):
    """``flwr supernode register`` did not register the key."""


class PortError(RuntimeError):
    """The loopback port a SuperNode needs is taken (most often by another site on this host)."""


def is_loopback(host: str) -> bool:
    """True for addresses that are unreachable from other machines."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def format_config(values: Mapping[str, ConfigValue]) -> str:
    """Render ``--node-config``/``--run-config`` text that flwr parses back exactly.

    flwr splits ``key=value`` pairs with a regex and reads values as TOML, so
    strings must be quoted without the quote char inside them. The keys are ours; a string
    value is often a user's path, so one with no safe quoting is an InputError naming it.
    """
    parts = []
    for key, value in values.items():
        if not key or any(c.isspace() or c in "='\"" for c in key):
            raise ValueError(f"invalid config key {key!r}")
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, (int, float)):
            rendered = repr(value)
        elif isinstance(value, str) and "\n" not in value and "'" not in value:
            rendered = f"'{value}'"
        elif isinstance(value, str) and "\n" not in value and not {'"', "\\"} & set(value):
            rendered = f'"{value}"'
        elif isinstance(value, str):
            raise InputError(
                f"{value!r:.200}: Flower reads {key} as a quoted string, and this one holds a newline "
                "or a ' together with a \" or \\; use a path without them"
            )
        else:
            raise ValueError(f"unsupported config value for {key!r}: {value!r}")
        parts.append(f"{key}={rendered}")
    return " ".join(parts)


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when nothing listens on ``host:port`` and we may bind it.

    SO_REUSEADDR, as gRPC's servers set it: a port whose last connections linger in TIME_WAIT
    (a site restarted within a minute) is free for the SuperNode, and only a listener holds it.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def site_node_config(site_config: Path) -> str:
    """The node config telling a site's ClientApp where its site YAML lives."""
    path = Path(site_config).expanduser()
    if not path.is_absolute():
        raise ValueError(f"site config path must be absolute, got {site_config!s}")
    return format_config({"site-config": str(path)})


def superlink_argv(
    creds: DeploymentCredentials,
    *,
    host: str = LOOPBACK,
    port: int = DEFAULT_SUPERLINK_PORT,
    database: Path | None = None,
    expose_control_api: bool = False,
    executable: str = "flower-superlink",
    bounded: bool = False,
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode auth, on loopback by default.

    A non-loopback ``host`` also publishes the Control and Runtime APIs (same
    port in 1.41), so it must be asked for with ``expose_control_api=True``.
    Runtime dependency installation is disabled: the SuperLink's environment is
    provisioned up front and must not ``uv sync`` from the internet per run. With ``bounded`` it
    runs through ``fedtransfer.deploy.link_sessions``: a half-pushed reply is dropped after 60 s,
    not Flower's 180 s.
    """
    if not is_loopback(host) and not expose_control_api:
        raise ValueError(
            f"--host {host} would expose the Control API (it shares the Fleet port "
            "in flwr 1.41); keep 127.0.0.1 and publish /v1/fleet/ via the proxy, "
            "or pass expose_control_api=True"
        )
    argv = [
        executable,
        "--ssl-ca-certfile",
        str(creds.ca_cert),
        "--ssl-certfile",
        str(creds.server_cert),
        "--ssl-keyfile",
        str(creds.server_key),
        "--enable-supernode-auth",
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if database is not None:
        argv += ["--database", str(database)]
    return bounded_argv(argv) if bounded else argv


def supernode_argv(
    creds: DeploymentCredentials,
    site: str,
    *,
    superlink: str,
    node_config: str,
    port: int = DEFAULT_SUPERNODE_PORT,
    superexec_secret: Path | None = None,
    executable: str = "flower-supernode",
    paced: bool = False,
) -> list[str]:
    """``flower-supernode`` for ``site``: verifies the SuperLink via our CA only.

    ``superlink`` is the Fleet endpoint as HOST:PORT (the proxy for remote sites);
    the site's own Runtime API stays on loopback at ``port``. With ``superexec_secret`` it
    runs in process isolation and serves its Runtime API only to a SuperExec holding that
    secret (``fedtransfer.deploy.superexec``, which starts that SuperExec). With ``paced`` it runs
    through ``fedtransfer.deploy.pacing``, without Flower's fixed 3 s and 0.5 s waits.
    """
    validate_site_name(site)
    keys = creds.sites[site]
    isolation = [] if superexec_secret is None else ["--isolation", "process"]
    isolation += [] if superexec_secret is None else ["--superexec-auth-secret-file", str(superexec_secret)]
    argv = [
        executable,
        "--root-certificates",
        str(creds.ca_cert),
        "--superlink",
        superlink,
        "--auth-supernode-private-key",
        str(keys.private_key),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--node-config",
        node_config,
        *isolation,
    ]
    return paced_argv(argv) if paced else argv


def register_argv(public_key: Path, connection: str, *, name: str, executable: str = "flwr") -> list[str]:
    """``flwr supernode register`` call that whitelists one site's public key."""
    return [
        executable,
        "supernode",
        "register",
        str(public_key),
        connection,
        "--name",
        name,
        "--format",
        "json",
    ]


def register_site(
    creds: DeploymentCredentials,
    site: str,
    connection: str,
    *,
    env: Mapping[str, str],
    executable: str = "flwr",
    timeout: float = 60.0,
) -> int:
    """Register ``site``'s public key with the SuperLink; return its node id.

    ``--format json`` exits 0 even on failure in flwr 1.41, so success is read
    from the JSON body, not the exit code.
    """
    argv = register_argv(creds.sites[site].public_key, connection, name=site, executable=executable)
    proc = subprocess.run(
        argv,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    try:
        payload = json.loads(proc.stdout)
    except json.JSONDecodeError:
        payload = {}
    if proc.returncode != 0 or not payload.get("success"):
        detail = payload.get("error-message") or proc.stderr or proc.stdout
        raise RegistrationError(f"registering site {site!r} failed: {detail.strip()}")
    return int(payload["node-id"])


def write_flwr_config(
    flwr_home: Path,
    *,
    address: str,
    root_certificates: Path,
    name: str = DEFAULT_CONNECTION,
    make_default: bool = True,
) -> Path:
    """Add/replace the TLS connection ``name`` in ``$FLWR_HOME/config.toml``.

    Other connections in an existing file are preserved. ``flwr run . <name>``
    then talks to the Control API at ``address`` trusting only our CA. An existing file that
    is not TOML is an InputError naming it: it is never overwritten.
    """
    root = Path(root_certificates).expanduser().resolve()
    path = Path(flwr_home) / "config.toml"
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid TOML ({err}); fix it or move it away, then register again") from None
    superlink = config.setdefault("superlink", {})
    superlink[name] = {"address": address, "root-certificates": str(root)}
    if make_default:
        superlink["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path
