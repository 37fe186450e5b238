"""`fedtransfer data check`: a site's data looked over before it joins, at the site, nothing sent.

Exit status: 0 the data is clean (warnings may be printed), 1 the check found errors (each printed and
in the report), 2 the check could not run (a config that is not valid, a report folder that cannot be
written), in one line on stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

CLEAN, ERRORS = 0, 1


def add_data_parser(subparsers: Any) -> None:
    """Register `fedtransfer data check` on the top-level parser's subparsers."""
    data = subparsers.add_parser("data", help="look over a site's data locally before it joins (nothing is sent)")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser(
        "check",
        help="records per class and split, unreadable files, persons and pixels on both sides; HTML + JSON report",
        description="Exit status: 0 clean, 1 errors found, 2 the check could not run.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--site", type=Path, metavar="FILE", help="a deployed site's own YAML file (its data_source)")
    which.add_argument("--config", type=Path, metavar="FILE", help="a simulation config: its data split as simulated")
    p.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="with --site: the run's backbone.image_size the images are resized to (default 64)",
    )
    p.add_argument(
        "--report-dir",
        type=Path,
        help="where data-check.html and .json go (default: the site's state_dir, or the config's output_dir)",
    )
    p.set_defaults(func=data_check_command)


def data_check_command(args: argparse.Namespace) -> int:
    """Check, write the report, print every error and warning and the verdict."""
    from fedtransfer.common.config.run import load_config
    from fedtransfer.common.config.site import check_site_files, load_site_config, site_paths
    from fedtransfer.common.data.check import check_run, check_site
    from fedtransfer.common.data.check_report import write_check
    from fedtransfer.common.errors import InputError

    if args.site is not None:
        site = load_site_config(args.site)
        paths = site_paths(site, args.site)
        check_site_files(site, paths)
        report, default_dir = check_site(site, paths, args.image_size), paths.state_dir
    else:
        cfg = load_config(args.config)
        report, default_dir = check_run(cfg, args.config), cfg.output_path
    out_dir = args.report_dir or default_dir
    try:
        html_path, json_path = write_check(report, out_dir)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise InputError(f"{out_dir}: cannot write the data check report ({reason}); give --report-dir") from None
    for name, split in report.splits.items():
        persons = "" if split["persons"] is None else f", {split['persons']} persons"
        print(f"  {name}: {split['records']} records{persons}")
    for warning in report.warnings:
        print(f"  warning: {warning}")
    for error in report.errors:
        print(f"ERROR {error}")
    verdict = "clean" if report.clean else f"{len(report.errors)} error(s)"
    print(f"fedtransfer data check: {verdict}; report {html_path} and {json_path} (nothing was sent)")
    return CLEAN if report.clean else ERRORS
