"""The `fedtransfer` command: simulate, predict, export, audit, data, deploy (one module each in cli/).

User errors (fedtransfer.common.errors.InputError, and the deployment's refusals) end with one line
on stderr and exit status 2, no traceback. Anything else is a bug: its traceback, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

PRIVATE_COMMANDS = ("simulate", "deploy")  # what they and their children write is the owner's alone


def build_parser() -> argparse.ArgumentParser:
    """Every `fedtransfer` subcommand: this is the only command-line entry point of the project."""
    from fedtransfer.cli.audit import add_audit_parser
    from fedtransfer.cli.data import add_data_parser
    from fedtransfer.cli.deploy import add_deploy_parser
    from fedtransfer.cli.export import add_export_parser
    from fedtransfer.cli.predict import add_predict_parser
    from fedtransfer.cli.simulate import add_simulate_parser

    parser = argparse.ArgumentParser(prog="fedtransfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate_parser(sub)
    add_predict_parser(sub)
    add_audit_parser(sub)
    add_export_parser(sub)  # model.onnx / model.torchscript.pt for serving
    add_data_parser(sub)  # data check: a site's data looked over locally before it joins
    add_deploy_parser(sub)  # init, superlink, register, site, run
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `fedtransfer` command; returns its exit status (2: a user error, said in one line)."""
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["deploy"]:  # only there: other commands import nothing of it
        from fedtransfer.deploy import superexec_zygote  # the standard library only

        if given[1:2] == [superexec_zygote.COMMAND] and given[2:3] and not given[2].startswith("-"):
            # a flower-superexec command line: the zygote forks before the parser imports grpc and numpy
            return superexec_zygote.main(given[2:])  # `deploy site` started it: its umask is already the owner's
    args = build_parser().parse_args(argv)
    from fedtransfer.server.federation.console import plain_when_redirected

    plain_when_redirected()  # Flower's coloured "WARNING :" only on a terminal, never in a redirected log
    from fedtransfer.common.encoders.interface import EncoderError
    from fedtransfer.common.errors import InputError
    from fedtransfer.common.storage.locking import FolderInUse
    from fedtransfer.common.storage.private import restrict_umask
    from fedtransfer.deploy.credentials import CredentialsError
    from fedtransfer.deploy.launch import PortError
    from fedtransfer.deploy.supernode import ActivationError
    from fedtransfer.server.launch.launcher import LaunchError, RunFailed

    # InputError covers ConfigError, DataError, ModelFileError, ExportError, AuditLogError; a bare ValueError is a bug
    user_errors = (InputError, EncoderError, LaunchError, CredentialsError, PortError, ActivationError, FolderInUse)
    # runs and deployments write ledgers, audit logs, databases: owner-only, also in every process they start
    previous_umask = restrict_umask() if args.command in PRIVATE_COMMANDS else None
    try:
        return args.func(args)
    except RunFailed as failed:  # it ran, and failed: not the user's input, and never a success
        print(f"fedtransfer: {failed}", file=sys.stderr)
        return 1
    except user_errors as err:
        print(f"fedtransfer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtransfer: interrupted; checkpoints written so far are intact (resume with --resume)", file=sys.stderr)
        return 130
    finally:
        if previous_umask is not None:  # a caller in this process (a test, a notebook) keeps its own
            os.umask(previous_umask)
