"""Sites started together on one host each get their own SuperNode port.

`supernode_port` finds a port nobody listens on, but the SuperNode binds it seconds later: three
sites started 2 s apart (as systemd starts its units, in parallel) all found 9094 free, and two
died with "SuperNode Runtime HTTP API failed to start". A site now claims the port it picked
with an advisory lock it holds for its life (`deploy site` is the SuperNode's parent), so a
second site skips a claimed port even before the first SuperNode listens. The kernel drops the
lock when its holder exits, however it exits: a crash leaves no stale claim.

The lock files live in the system's temp folder, shared by every account on the host. One is
opened read-only where it exists (another account's file in a sticky /tmp cannot be opened to
write), created with O_EXCL where it does not, and never followed through a symlink.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedtransfer.deploy.launch import (
    DEFAULT_SUPERNODE_PORT,
    LOOPBACK,
    SUPERNODE_PORT_SPAN,
    PortError,
    port_is_free,
)

LOCK_PREFIX = "fedtransfer-supernode-port-"


def lock_dir() -> Path:
    return Path(tempfile.gettempdir())


def _open_claim(path: Path) -> int:
    """A descriptor of the port's lock file, creating it readable to all (every account locks it)."""
    while True:
        try:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue  # another site created it between our two opens: open theirs
        os.fchmod(fd, 0o644)  # whatever our umask, other accounts' sites can lock it too
        return fd


def _claim(port: int) -> int | None:
    """This host's claim on `port` (a locked descriptor), or None where another site holds or uses it."""
    try:
        fd = _open_claim(lock_dir() / f"{LOCK_PREFIX}{port}.lock")
    except OSError:
        return None  # a symlink planted there, or a file we may not read: not a port to use
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    if not port_is_free(port):  # a SuperNode whose parent died, or any other program, listens there
        os.close(fd)
        return None
    return fd


@contextmanager
def claimed_supernode_port(requested: int | None) -> Iterator[int]:
    """Hold the SuperNode's Runtime API port for the block: `requested`, else the first unclaimed free one."""
    candidates = (
        [requested]
        if requested is not None
        else range(DEFAULT_SUPERNODE_PORT, DEFAULT_SUPERNODE_PORT + SUPERNODE_PORT_SPAN)
    )
    for port in candidates:
        if (fd := _claim(port)) is not None:
            break
    else:
        if requested is not None:
            raise PortError(
                f"--port {requested}: {LOOPBACK}:{requested} is in use (another SuperNode on this host?); "
                "give each site on a host its own --port, or leave --port out to take a free one"
            )
        last = DEFAULT_SUPERNODE_PORT + SUPERNODE_PORT_SPAN - 1
        raise PortError(f"ports {DEFAULT_SUPERNODE_PORT}-{last} on {LOOPBACK} are all in use; pass a free --port")
    try:
        yield port
    finally:
        os.close(fd)
