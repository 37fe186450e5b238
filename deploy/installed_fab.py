"""A forked ClientApp skips unpacking a FAB its site has already installed and verified (issue 25).

Flower 1.41.0's ClientApp calls `install_from_fab(fab.content, skip_prompt=True)` for every message
(flwr/supernode/runtime/run_clientapp.py:155). That unpacks the whole FAB into a temporary folder and
hashes every file against its CONTENT list, and only then finds the app installed already
(flwr/cli/install.py `validate_and_install`: "if install_path.exists(): return install_path") and
returns that folder. Four sites on two cores paid 0.3-0.4 s of CPU for it per message, every round.

The zygote (deploy/superexec_zygote.py) gives its ClientApps this `install_from_fab` instead:
- the first time a FAB reaches the site, Flower's own `install_from_fab` runs (unpacked, hashes
  verified, installed), and then `MARKER` is written into the installed folder, holding the sha256
  of the whole FAB;
- later, for a FAB whose sha256 equals the marker in the folder Flower would return for it
  (`get_project_dir` of the FAB's own pyproject.toml), that folder is returned without unpacking.
That is Flower's own early return, with a stronger condition: Flower accepts any existing folder
whose name matches the FAB's first 8 hex digits; here the whole digest must match a FAB that was
verified once. Anything else (a path, another install folder, a prompt, an unreadable FAB) goes to
Flower's function unchanged.

It replaces how one Flower version's private code behaves, so it is pinned like pacing.py: the
sources of `install_from_fab`, `validate_and_install` and `get_project_dir` must hash to
PINNED_SOURCES, else Flower's function stays (said in one line); tests/test_installed_fab.py fails
when they change.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import os
import tempfile
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from fedtransfer.common.wire.flower_pin import pin_refusal

MARKER = ".fedtransfer-fab-sha256"  # in the installed app folder: the sha256 of the FAB verified into it
# sha256 of inspect.getsource(...) in flwr 1.41.0
PINNED_SOURCES = {
    ("flwr.cli.install", "install_from_fab"): "481bd04cde5823220658a8a3e84e827a5ef38254223972e4e14c4cb3968e917e",
    ("flwr.cli.install", "validate_and_install"): "628b69fb852ae8584e978595f2e8451175a3e60acbad678df3f8e08fe27f13c6",
    ("flwr.common.config", "get_project_dir"): "155c70517e73e59826aed10b3e3a0ba06e02feb3573fee44d23a32798edb632c",
}


def source_refusal() -> str | None:
    """Why Flower's `install_from_fab` stays (one line), or None: a pinned source differs from flwr 1.41.0's."""
    for (module, qualname), digest in PINNED_SOURCES.items():
        if (refused := pin_refusal(importlib.import_module(module), qualname, digest)) is not None:
            return refused
    return None


def installed_folder(fab: bytes, digest: str) -> Path | None:
    """The folder Flower installs `fab` into (its pyproject.toml's publisher, name and version, and the
    digest's first 8 hex digits, under FLWR_HOME), or None where the FAB is not a readable app."""
    from flwr.common.config import get_metadata_from_config, get_project_dir

    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            config = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
        fab_id, version = get_metadata_from_config(config)
        return get_project_dir(fab_id, version, digest)
    except (zipfile.BadZipFile, KeyError, ValueError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def _write_marker(folder: Path, digest: str) -> None:
    """MARKER in `folder`, whole or not at all (a temporary file renamed over it)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=MARKER)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(digest)
        os.replace(tmp, folder / MARKER)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_once(install: Callable[..., Path]) -> Callable[..., Path]:
    """Flower's `install_from_fab` (`install`), returning at once a folder this site verified the same FAB into."""

    @functools.wraps(install)
    def install_from_fab(fab_file: Any, install_dir: Path | None = None, skip_prompt: bool = False) -> Path:
        if not isinstance(fab_file, bytes) or install_dir is not None or not skip_prompt:
            return install(fab_file, install_dir, skip_prompt)
        digest = hashlib.sha256(fab_file).hexdigest()
        folder = installed_folder(fab_file, digest)
        if folder is not None:
            try:
                if (folder / MARKER).read_text(encoding="ascii") == digest:
                    return folder
            except (OSError, UnicodeDecodeError):
                pass  # not verified here yet: Flower installs it below
        path = install(fab_file, install_dir, skip_prompt)
        if folder is not None and Path(path) == folder:
            _write_marker(folder, digest)
        return path

    return install_from_fab


def install(runtime: ModuleType) -> str | None:
    """Give `runtime` (flwr.supernode.runtime.run_clientapp) `install_once(its install_from_fab)`; None when
    done, else why not (one line: a pinned source differs)."""
    refused = source_refusal()
    if refused is None:
        runtime.install_from_fab = install_once(runtime.install_from_fab)
    return refused
