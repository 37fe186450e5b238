"""Files a run or a site writes are its owner's alone, however the process was started.

A site's state folder holds its privacy ledger, audit log, reply cache and secret noise seed;
the SuperLink's database holds every registration and run. The systemd units set `UMask=0077`,
but a site started by hand from a shell with the usual umask 022 wrote them world-readable.
Tightening the umask here reaches every file the process and its children write: Flower's
SuperLink and SuperNode, the ClientApp and ServerApp processes, Ray and its workers.
"""

from __future__ import annotations

import os
from pathlib import Path

OWNER_ONLY = 0o077  # umask bits: nothing for the group, nothing for others


def restrict_umask() -> int:
    """Add owner-only to this process's umask (an operator's stricter one stays); returns the previous one."""
    previous = os.umask(OWNER_ONLY)
    os.umask(previous | OWNER_ONLY)
    return previous


def make_private(folder: Path) -> None:
    """Make a folder this process owns owner-only: one an earlier version left open is closed again.

    A folder owned by another account (a shared mount the operator set up) is left as it is.
    """
    if folder.is_dir() and folder.stat().st_uid == os.geteuid():
        folder.chmod(folder.stat().st_mode & 0o700)
