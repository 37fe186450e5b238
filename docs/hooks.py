"""MkDocs hooks: the reference pages generated from the code as the site builds (mkdocs.yml `hooks:`).

Generated, not hand-written, so that they cannot drift: the config keys come from the config
dataclasses, the command line from the argparse parser, the audit events from their enum.
"""

from __future__ import annotations

import os

from mkdocs.structure.files import File, Files

# mkdocs puts this folder on sys.path only while it imports this file: the generators are imported now
from refgen import cli_flags, config_keys, enums

GENERATED = {"reference/config.md": "config", "reference/cli.md": "cli"}


def page(kind: str) -> str:
    """The Markdown of one generated page (also what tests/test_docs.py checks)."""
    if kind == "config":
        from fedtransfer.common.config.run import RunConfig, SiteConfig

        return config_keys.render(RunConfig, SiteConfig)
    from fedtransfer.cli.main import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines at the terminal's width: the same on every machine
    return cli_flags.render(build_parser())


def on_files(files: Files, config) -> Files:
    """Add the generated reference pages to the site's files before the navigation is built."""
    for uri, kind in GENERATED.items():
        files.append(File.generated(config, uri, content=page(kind)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Fill `<!-- generated: NAME -->` placeholders of hand-written pages (audit events, site statuses)."""
    if "<!-- generated:" not in markdown:
        return markdown
    for name, text in enums.placeholders().items():
        markdown = markdown.replace(f"<!-- generated: {name} -->", text)
    return markdown
