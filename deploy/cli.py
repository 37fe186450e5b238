"""`fedtransfer deploy ...`: the few commands an operator and each site need, built on deploy.launch.

    init       the CA, the SuperLink's certificate and one key pair per site
    superlink  start the SuperLink: TLS, SuperNode authentication, Control API on loopback
    register   write the operator's flwr connection and register sites' public keys
    site       check a site's own YAML and credentials, then start its SuperNode
    run        submit a run (a YAML config, or --resume RUN_DIR) and wait for its outcome

`superlink` and `site` replace themselves with the Flower process (exec), so a service
manager supervises Flower directly; `--dry-run` prints the command line instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import tomli_w

from common.config import ConfigError, RunConfig, config_from_dict, load_config, load_site_config, to_nested
from deploy.credentials import CredentialsError, credential_paths, init_deployment
from deploy.launch import (
    DEFAULT_CONNECTION,
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    LOOPBACK,
    RegistrationError,
    flower_env,
    register_site,
    site_node_config,
    superlink_argv,
    supernode_argv,
    write_flwr_config,
)


class DeployError(RuntimeError):
    """A deployed run did not complete; the message says why and where to look."""


APP_DIR = Path(__file__).resolve().parent.parent  # the app `flwr run` ships: the repository root
BIN_DIR = Path(sys.executable).parent


def _bin(name: str) -> str:
    return str(BIN_DIR / name) if (BIN_DIR / name).exists() else name


def _env() -> dict[str, str]:
    """Quiet flower env; this interpreter's bin first, since Flower spawns flower-superexec by name."""
    env = flower_env()
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    return env


def _flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")).expanduser()


def _exec(argv: list[str], dry_run: bool) -> int:
    if dry_run:
        print(shlex.join(argv))
        return 0
    os.execvpe(argv[0], argv, _env())


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
    argv = superlink_argv(creds, port=args.port, database=database, executable=_bin("flower-superlink"))
    return _exec(argv, args.dry_run)


def _register(args: argparse.Namespace) -> int:
    creds = credential_paths(Path(args.credentials), args.sites)
    _require_files(creds.ca_cert, *(pair.public_key for pair in creds.sites.values()))
    path = write_flwr_config(_flwr_home(), address=args.address, root_certificates=creds.ca_cert, name=args.connection)
    print(f"fedtransfer: connection {args.connection!r} ({args.address}) written to {path}")
    failed = 0
    for site in args.sites:
        try:
            node_id = register_site(creds, site, args.connection, env=_env(), executable=_bin("flwr"))
        except RegistrationError as err:
            print(f"fedtransfer: error: {err}", file=sys.stderr)
            failed += 1
        else:
            print(f"fedtransfer: registered site {site}: node id {node_id}")
    return 1 if failed else 0


def _site(args: argparse.Namespace) -> int:
    """Refuse to start a SuperNode whose site config or credentials would only fail at the first round."""
    config = Path(args.config).expanduser().resolve()
    sc = load_site_config(config)
    try:
        creds = credential_paths(Path(args.credentials), [sc.name])
    except ValueError as err:
        raise ConfigError(f"{config}: name: {err} (it names the site's key pair sites/<name>/)") from None
    _require_files(creds.ca_cert, creds.sites[sc.name].private_key)
    if sc.data_path is not None and not (config.parent / Path(sc.data_path).expanduser()).exists():
        raise ConfigError(f"{config}: data_path: {sc.data_path} does not exist")
    argv = supernode_argv(creds, sc.name, superlink=args.superlink, node_config=site_node_config(config),
                          port=args.port, executable=_bin("flower-supernode"))  # fmt: skip
    return _exec(argv, args.dry_run)


def resume_config(run_dir: Path) -> RunConfig:
    """The config a run saved in its output_dir, set to resume there: a resumed run is the same run."""
    saved = run_dir / "config.json"
    try:
        raw = json.loads(saved.read_text(encoding="utf-8"))
    except OSError:
        raise ConfigError(f"{saved}: missing; --resume takes the output_dir of an earlier run") from None
    except json.JSONDecodeError:
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
    # the ServerApp runs in the SuperLink's working directory: give it absolute paths
    cfg = replace(cfg, output_dir=str(cfg.output_path), cache_dir=str(cfg.cache_path))
    run_dir = cfg.output_path
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = run_dir / "run-config.toml"
    overrides.write_text(tomli_w.dumps(to_nested(cfg)), encoding="utf-8")
    status_path = run_dir / "status.json"
    status_path.unlink(missing_ok=True)  # never read a previous run's verdict as this one's
    argv = [_bin("flwr"), "run", str(APP_DIR), args.connection, "--run-config", str(overrides), "--stream"]
    done = subprocess.run(argv, env=_env(), cwd=APP_DIR, check=False)
    if done.returncode != 0:
        raise DeployError(f"flwr run exited with code {done.returncode}")  # flwr has printed why
    if not status_path.exists():
        raise DeployError(f"the run ended without writing {status_path}; see `flwr log <run-id> {args.connection}`")
    status = json.loads(status_path.read_text(encoding="utf-8"))
    if status.get("status") != "completed":
        raise DeployError(status.get("error", f"the run failed; see `flwr log <run-id> {args.connection}`"))
    print(f"fedtransfer: run {status['run_id']} completed; server hold-out accuracy {status['final_accuracy']:.4f}")
    print(f"fedtransfer: outputs in {run_dir} (metrics.jsonl, privacy.json, model.pt); resume with --resume {run_dir}")
    return 0


def add_deploy_parser(sub: argparse._SubParsersAction) -> None:
    dep = sub.add_parser("deploy", help="multi-site deployment: credentials, SuperLink, sites, runs")
    dep_sub = dep.add_subparsers(dest="deploy_command", required=True)

    init = dep_sub.add_parser("init", help="create a private CA, the SuperLink certificate and site keys")
    init.add_argument("--sites", required=True, help="comma-separated site names, e.g. hospital-a,bank-c")
    init.add_argument("--host", required=True, help="comma-separated hostnames/IPs of the SuperLink")
    init.add_argument("--out", default="deploy/credentials", help="output folder (default: deploy/credentials)")
    init.add_argument("--force", action="store_true", help="regenerate everything (sites must re-register)")
    init.set_defaults(func=_init)

    creds_help = "the folder `deploy init` wrote (a site needs only ca/ca.crt and sites/<name>/)"
    link = dep_sub.add_parser("superlink", help="start the SuperLink (TLS, SuperNode auth, APIs on 127.0.0.1)")
    link.add_argument("--credentials", required=True, help=creds_help)
    link.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT, help="loopback port of all its APIs")
    link.add_argument("--database", help="SQLite file: keeps site registrations across restarts")
    link.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    link.set_defaults(func=_superlink)

    reg = dep_sub.add_parser("register", help="write the operator's flwr connection and register sites' keys")
    reg.add_argument("--credentials", required=True, help=creds_help)
    reg.add_argument("--address", default=f"{LOOPBACK}:{DEFAULT_SUPERLINK_PORT}", help="the SuperLink's Control API")
    reg.add_argument("--connection", default=DEFAULT_CONNECTION, help="connection name in $FLWR_HOME/config.toml")
    reg.add_argument("sites", nargs="+", help="site names, as given to `deploy init`")
    reg.set_defaults(func=_register)

    site = dep_sub.add_parser("site", help="check a site's YAML and credentials, then start its SuperNode")
    site.add_argument("--config", required=True, help="the site's own YAML (see deploy/site.example.yaml)")
    site.add_argument("--credentials", required=True, help=creds_help)
    site.add_argument("--superlink", required=True, help="Fleet endpoint HOST:PORT (the fleet proxy)")
    site.add_argument("--port", type=int, default=DEFAULT_SUPERNODE_PORT, help="loopback port of its Runtime API")
    site.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    site.set_defaults(func=_site)

    run = dep_sub.add_parser("run", help="submit a run to the SuperLink and wait for it (or resume one)")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--config", help="YAML run config (default: the embedded demo, see configs/demo.yaml)")
    which.add_argument("--resume", metavar="RUN_DIR", help="continue that run from its last checkpoint")
    run.add_argument("--connection", default=DEFAULT_CONNECTION, help="connection name in $FLWR_HOME/config.toml")
    run.set_defaults(func=_run)
