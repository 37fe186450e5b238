"""`fedtransfer deploy ...`: the few commands an operator and each site need, built on fedtransfer.deploy.launch.

    init       the CA, the SuperLink's certificate and one key pair per site
    superlink  start the SuperLink: TLS, SuperNode authentication, Control API on loopback
    firewall   let only the listed local accounts reach that loopback port (cli/deploy_firewall.py)
    register   write the operator's flwr connection and register sites' public keys
    site       check a site's own YAML, credentials and port, then run its SuperNode
    run        submit a run (a YAML config, or --resume RUN_DIR) and wait for its outcome

`superlink` replaces itself with the Flower process (exec), so a service manager supervises
Flower directly; `site` stays the SuperNode's parent so it can retry a refused activation, and
passes signals on; next to the SuperNode it runs the site's worker (client/site_worker.py), which
answers the messages the SuperNode's ClientApp processes forward to it, and the SuperExec, which
alone holds the secret the SuperNode's Runtime API asks for (fedtransfer.deploy.superexec) and forks
each ClientApp from a warm zygote (fedtransfer.deploy.superexec_zygote). Options a service sets
per host also come from FEDTRANSFER_* variables (named in each option's help), so systemd units
and containers call these commands as they are.
`--dry-run` prints the Flower command line instead of running it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from fedtransfer.cli.deploy_firewall import PORT_ENV, add_firewall_parser
from fedtransfer.client import site_worker, worker_link
from fedtransfer.common.config.run import ConfigError, RunConfig, config_from_dict, load_config, load_site_config
from fedtransfer.common.config.site import check_site_files, site_paths
from fedtransfer.common.model.intervals import described_accuracy
from fedtransfer.common.storage import locking
from fedtransfer.common.storage.private import make_private
from fedtransfer.deploy import link_sessions, pacing, superexec_zygote
from fedtransfer.deploy.credentials import CredentialsError, credential_paths, init_deployment
from fedtransfer.deploy.launch import (
    DEFAULT_CONNECTION,
    DEFAULT_SUPERLINK_PORT,
    LOOPBACK,
    RegistrationError,
    format_config,
    register_site,
    site_node_config,
    superlink_argv,
    supernode_argv,
    write_flwr_config,
)
from fedtransfer.deploy.link_sessions import check_flower as check_sessions_pin
from fedtransfer.deploy.pacing import check_flower
from fedtransfer.deploy.ports import claimed_supernode_port
from fedtransfer.deploy.superexec import (
    SECRET_NAME,
    start_superexec,
    stop_superexec,
    superexec_argv,
    superexec_secret,
)
from fedtransfer.deploy.supernode import run_supernode
from fedtransfer.server.federation.console import recorded_warnings
from fedtransfer.server.launch.launcher import flower_bin, flower_env, submit_run
from fedtransfer.server.launch.preflight import check_run

WORKER_START_S = 120.0  # importing torch and Opacus on a loaded machine


def _flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")).expanduser()


def _exec(argv: list[str], dry_run: bool) -> int:
    if dry_run:
        print(shlex.join(argv))
        return 0
    os.execvpe(argv[0], argv, flower_env())


def _require_files(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise CredentialsError(f"{path} is missing; create credentials with `fedtransfer deploy init`")


def _init(args: argparse.Namespace) -> int:
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    creds = init_deployment(Path(args.out), sites, [h.strip() for h in args.host.split(",") if h.strip()], args.force)
    print(f"fedtransfer: credentials in {creds.root}: CA {creds.ca_cert}, SuperLink cert {creds.server_cert}")
    for name, pair in creds.sites.items():
        print(f"  site {name}: private key {pair.private_key} (owner-only), public key {pair.public_key}")
    if creds.kept:
        print(f"fedtransfer: kept existing files (never overwritten): {', '.join(map(str, creds.kept))}")
    return 0


def _superlink(args: argparse.Namespace) -> int:
    creds = credential_paths(Path(args.credentials), [])
    _require_files(creds.ca_cert, creds.server_cert, creds.server_key)
    database = Path(args.database).expanduser().resolve() if args.database else None
    # bounded: a site killed while sending its reply stalls a round ~60 s, not 199 s (deploy/link_sessions.py)
    argv = superlink_argv(
        creds, port=args.port, database=database, executable=flower_bin("flower-superlink"), bounded=True
    )
    if not args.dry_run:
        check_sessions_pin()  # any Flower but 1.41.0 is refused here, in one line
    return _exec(argv, args.dry_run)


def _register(args: argparse.Namespace) -> int:
    creds = credential_paths(Path(args.credentials), args.sites)
    _require_files(creds.ca_cert, *(pair.public_key for pair in creds.sites.values()))
    path = write_flwr_config(_flwr_home(), address=args.address, root_certificates=creds.ca_cert, name=args.connection)
    print(f"fedtransfer: connection {args.connection!r} ({args.address}) written to {path}")
    failed = 0
    for site in args.sites:
        try:
            node_id = register_site(creds, site, args.connection, env=flower_env(), executable=flower_bin("flwr"))
        except RegistrationError as err:
            print(f"fedtransfer: error: {err}", file=sys.stderr)
            failed += 1
        else:
            print(f"fedtransfer: registered site {site}: node id {node_id}")
    return 1 if failed else 0


def _site(args: argparse.Namespace) -> int:
    """Refuse to start a SuperNode whose site config, credentials or port would only fail later."""
    config = Path(args.config).expanduser().resolve()
    sc = load_site_config(config)  # the name obeys the one site-name rule, so it names sites/<name>/
    creds = credential_paths(Path(args.credentials), [sc.name])
    _require_files(creds.ca_cert, creds.sites[sc.name].private_key)
    paths = site_paths(sc, config)
    check_site_files(sc, paths)
    # held while the site runs: a site started beside this one (systemd starts them in parallel) takes another
    with claimed_supernode_port(args.port) as port:
        return _run_site(args, sc.name, config, paths.state_dir, port)


def _run_site(args: argparse.Namespace, name: str, config: Path, state_dir: Path, port: int) -> int:
    """The site's SuperNode (and its worker) on `port`, until it ends; `--dry-run` prints its command line."""
    creds = credential_paths(Path(args.credentials), [name])
    sock = None if args.no_worker else _worker_socket(name, state_dir)

    secret_path = state_dir / SECRET_NAME

    def argv(with_worker: bool) -> list[str]:
        node_config = site_node_config(config)
        if with_worker:  # format_config renders space-separated pairs, so two renderings join with a space
            node_config += " " + format_config({worker_link.NODE_CONFIG_KEY: str(sock)})
        return supernode_argv(
            creds,
            name,
            superlink=args.superlink,
            node_config=node_config,
            port=port,
            superexec_secret=secret_path,  # only this site's SuperExec may take its tasks
            executable=flower_bin("flower-supernode"),
            paced=True,  # without Flower's fixed 3 s idle and 0.5 s reply waits (fedtransfer.deploy.pacing)
        )

    if args.dry_run:
        print(shlex.join(argv(sock is not None)))
        return 0
    check_flower()  # the pacing rewrites flwr 1.41.0's SuperNode only: any other is refused here, in one line
    print(f"fedtransfer: site {name}: SuperNode to {args.superlink}, its Runtime API on {LOOPBACK}:{port}", flush=True)
    # one SuperNode per state folder: two would interleave one ledger, audit log and reply cache
    with locking.hold(state_dir, f"the SuperNode of site {name}"), superexec_secret(state_dir) as secret:
        make_private(state_dir)  # ledger, audit log, seed: one an earlier version left open is closed
        flower_superexec = superexec_argv(
            port=port, secret=secret, parent_pid=os.getpid(), executable=flower_bin("flower-superexec")
        )
        # its ClientApps forked from a warm zygote, not each started afresh (fedtransfer.deploy.superexec_zygote)
        zygote = not (args.no_zygote or os.environ.get(superexec_zygote.OFF_ENV) == "1")
        superexec = start_superexec(
            superexec_zygote.zygote_argv(flower_superexec) if zygote else flower_superexec, flower_env()
        )
        worker = None if sock is None else _start_worker(name, sock)
        try:
            return run_supernode(argv(worker is not None), flower_env(), name, args.retry_for)
        finally:
            if worker is not None:
                _stop_worker(worker)
            stop_superexec(superexec)


def _worker_socket(site: str, state_dir: Path) -> Path | None:
    """Where the site's worker will listen, or None (said in one line) when a Unix socket cannot be there."""
    try:
        return site_worker.socket_path(state_dir)
    except site_worker.WorkerError as err:
        print(f"fedtransfer: site {site}: no site worker: {err}", file=sys.stderr)
        return None


def _start_worker(site: str, sock: Path) -> subprocess.Popen | None:
    """The site's worker (client/site_worker.py), once it listens; None, said in one line, if it never does.

    It stays in this process's group, so a signal to the group (a terminal's Ctrl-C, a service
    manager) stops it with the SuperNode, and it ends on its own if this process is killed.
    """
    sock.unlink(missing_ok=True)  # a dead worker's socket must not pass for the new one's
    proc = subprocess.Popen([sys.executable, "-m", "fedtransfer.cli", "deploy", "worker", str(sock)], env=flower_env())
    deadline = time.monotonic() + WORKER_START_S
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_worker(proc)
            print(
                f"fedtransfer: site {site}: the site worker did not start (exit code {proc.returncode}); "
                "every message is answered in its own ClientApp process (slower, same result)",
                file=sys.stderr,
            )
            return None
        time.sleep(0.1)
    return proc


def _stop_worker(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def resume_config(run_dir: Path) -> RunConfig:
    """The config a run saved in its output_dir, set to resume there: a resumed run is the same run."""
    saved = run_dir / "config.json"
    try:
        raw = json.loads(saved.read_text(encoding="utf-8"))
    except OSError:
        raise ConfigError(f"{saved}: missing; --resume takes the output_dir of an earlier run") from None
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError)
        raise ConfigError(f"{saved}: not valid JSON") from None
    try:
        cfg = config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{saved}: {err}") from None
    return replace(cfg, resume=True, output_dir=str(run_dir))


def _run(args: argparse.Namespace) -> int:
    if args.resume:
        cfg = resume_config(Path(args.resume).expanduser().resolve())
    else:
        cfg = load_config(args.config) if args.config else RunConfig()
    with recorded_warnings() as said:  # shown once here; the ServerApp's copies are left out
        check_run(cfg)  # the ServerApp's folders, its own hold-out (data.*) and backbone, on this host
    outcome = submit_run(
        cfg,
        args.connection,
        env=flower_env(),
        stream=not args.quiet,
        verbose=args.verbose,
        shown=said,
        resume_with=shlex.join(
            ["fedtransfer", "deploy", "run", "--resume", str(cfg.output_path), "--connection", args.connection]
        ),
    )
    status, flower_id = outcome.status, outcome.flower_run_id
    held_out = described_accuracy(status["final_accuracy"], status.get("final_metrics"))  # with interval, records
    print(f"fedtransfer: run {status['run_id']} completed; server hold-out accuracy {held_out}")
    print(
        f"fedtransfer: run id {status['run_id']} names it in outputs, ledgers and audit logs (and stays on resume); "
        f"Flower's id of this submission is {flower_id}: `flwr log {flower_id} {args.connection}`, "
        f"`flwr ls {args.connection} --run-id {flower_id}`"
    )
    print(
        f"fedtransfer: outputs in {cfg.output_path} (run.log, metrics.jsonl, privacy.json, model.pt); "
        f"resume with --resume {cfg.output_path}"
    )
    return 0


def _from_env(name: str) -> dict[str, object]:
    """argparse keywords: the option defaults to $name, and is required only when $name is unset."""
    value = os.environ.get(name)
    return {"default": value, "required": value is None}


def add_deploy_parser(sub: argparse._SubParsersAction) -> None:
    """Register `deploy` and its subcommands on the `fedtransfer` command line."""
    dep = sub.add_parser("deploy", help="multi-site deployment: credentials, SuperLink, sites, runs")
    dep_sub = dep.add_subparsers(dest="deploy_command", required=True)

    init = dep_sub.add_parser("init", help="create a private CA, the SuperLink certificate and site keys")
    init.add_argument("--sites", required=True, help="comma-separated site names, e.g. hospital-a,bank-c")
    init.add_argument("--host", required=True, help="comma-separated hostnames/IPs of the SuperLink")
    init.add_argument("--out", default="deploy/credentials", help="output folder (default: deploy/credentials)")
    init.add_argument("--force", action="store_true", help="regenerate everything (sites must re-register)")
    init.set_defaults(func=_init)

    creds_help = "the folder `deploy init` wrote (a site needs only ca/ca.crt and sites/<name>/); "
    creds_help += "$FEDTRANSFER_CREDENTIALS"
    link = dep_sub.add_parser("superlink", help="start the SuperLink (TLS, SuperNode auth, APIs on 127.0.0.1)")
    link.add_argument("--credentials", help=creds_help, **_from_env("FEDTRANSFER_CREDENTIALS"))
    link.add_argument(
        "--port",
        type=int,
        default=os.environ.get(PORT_ENV, DEFAULT_SUPERLINK_PORT),
        help=f"loopback port of all its APIs (default {DEFAULT_SUPERLINK_PORT}); ${PORT_ENV}",
    )
    link.add_argument(
        "--database",
        default=os.environ.get("FEDTRANSFER_DATABASE"),
        help="SQLite file: keeps site registrations across restarts; $FEDTRANSFER_DATABASE",
    )
    link.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    link.set_defaults(func=_superlink)

    add_firewall_parser(dep_sub)  # the port above, for the listed local accounts only

    reg = dep_sub.add_parser("register", help="write the operator's flwr connection and register sites' keys")
    reg.add_argument("--credentials", help=creds_help, **_from_env("FEDTRANSFER_CREDENTIALS"))
    reg.add_argument("--address", default=f"{LOOPBACK}:{DEFAULT_SUPERLINK_PORT}", help="the SuperLink's Control API")
    reg.add_argument("--connection", default=DEFAULT_CONNECTION, help="connection name in $FLWR_HOME/config.toml")
    reg.add_argument("sites", nargs="+", help="site names, as given to `deploy init`")
    reg.set_defaults(func=_register)

    site = dep_sub.add_parser("site", help="check a site's YAML, credentials and port, then run its SuperNode")
    site.add_argument(
        "--config",
        help="the site's own YAML (see deploy/site.example.yaml); $FEDTRANSFER_SITE_CONFIG",
        **_from_env("FEDTRANSFER_SITE_CONFIG"),
    )
    site.add_argument("--credentials", help=creds_help, **_from_env("FEDTRANSFER_CREDENTIALS"))
    site.add_argument(
        "--superlink",
        help="Fleet endpoint HOST:PORT (the fleet proxy); $FEDTRANSFER_SUPERLINK",
        **_from_env("FEDTRANSFER_SUPERLINK"),
    )
    site.add_argument(
        "--port",
        type=int,
        default=os.environ.get("FEDTRANSFER_SUPERNODE_PORT"),
        help="loopback port of its Runtime API, one per site on a host (default: the first free from "
        "9094); $FEDTRANSFER_SUPERNODE_PORT",
    )
    site.add_argument(
        "--retry-for",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="keep retrying a refused activation this long (a crashed SuperNode of this site stays "
        "online at the SuperLink for up to ~80 s; default 120)",
    )
    site.add_argument(
        "--no-worker",
        action="store_true",
        help="no site worker: every message is answered in its own ClientApp process, which imports "
        "torch each time (slower; see client/site_worker.py)",
    )
    site.add_argument(
        "--no-zygote",
        action="store_true",
        help="start each ClientApp process afresh, as Flower does, not forked from a warm zygote (slower; see "
        f"deploy/superexec_zygote.py); ${superexec_zygote.OFF_ENV}=1",
    )
    site.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    site.set_defaults(func=_site)

    worker = dep_sub.add_parser(
        "worker", help="a site's worker on SOCKET (deploy site starts it; see client/site_worker.py)"
    )
    worker.add_argument("socket", type=Path, help="the Unix socket to listen on (STATE_DIR/worker/site.sock)")
    worker.set_defaults(func=lambda args: site_worker.run(args.socket))
    for name, module, flower in (
        ("paced-supernode", pacing, "flower-supernode"),
        ("bounded-superlink", link_sessions, "flower-superlink"),
    ):
        wrapped = dep_sub.add_parser(
            name, help=f"{flower} ARGS..., Flower 1.41.0's waits bounded ({module.__name__}; deploy starts it)"
        )
        wrapped.add_argument(
            "flower_argv", nargs=argparse.REMAINDER, metavar=f"{flower} ARGS", help=f"the {flower} command line"
        )
        wrapped.set_defaults(func=lambda args, module=module: module.main(args.flower_argv))

    zygote = dep_sub.add_parser(
        superexec_zygote.COMMAND,
        help="flower-superexec ARGS..., its ClientApps forked from a warm zygote (deploy/superexec_zygote.py; "
        "deploy site starts it)",
    )
    zygote.add_argument(
        "flower_argv",
        nargs=argparse.REMAINDER,
        metavar="flower-superexec ARGS",
        help="the flower-superexec command line",
    )
    zygote.set_defaults(func=lambda args: superexec_zygote.main(args.flower_argv))  # cli/main.py runs it first

    run = dep_sub.add_parser("run", help="submit a run to the SuperLink and wait for it (or resume one)")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--config", help="YAML run config (default: the embedded demo, see configs/demo.yaml)")
    which.add_argument("--resume", metavar="RUN_DIR", help="continue that run from its last checkpoint")
    run.add_argument("--connection", default=DEFAULT_CONNECTION, help="connection name in $FLWR_HOME/config.toml")
    run.add_argument("--quiet", action="store_true", help="print only the outcome (the log is in RUN_DIR/run.log)")
    run.add_argument("--verbose", action="store_true", help="print every log line of Flower and the ServerApp")
    run.set_defaults(func=_run)
