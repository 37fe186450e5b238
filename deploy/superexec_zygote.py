"""A site's SuperExec that forks its ClientApp processes from a warm zygote (issue 25).

Flower 1.41.0's SuperExec starts a fresh `flwr-clientapp` process for every message
(`SubprocessExecutor.launch`, flwr/supercore/superexec/executor/subprocess_executor.py:76, :83), and
that process spends 1.5-1.7 s of an idle core importing Flower before it asks for its message; four
sites on two cores pay it at once, every round. Flower's warm executor pools are Kubernetes-only.

`deploy site` therefore runs the SuperExec as
`python -m fedtransfer.cli deploy zygote-superexec flower-superexec ARGS...`, which `fedtransfer`'s
main runs before its parser imports anything. Before anything imports grpc or starts a thread,
this forks a zygote: a single-threaded process that imports what
`flwr-clientapp` imports (Flower's ClientApp runtime, numpy; not fedtransfer, whose app code comes
from each run's FAB) and then waits on one end of a socketpair. The other end stays here, where
Flower's SuperExec runs with `SubprocessExecutor.launch`'s Popen (its module's only use of
`subprocess`) sending the argv instead; the zygote forks a child that becomes what the console
script would have been (see `_become`), and reaps it. numpy's OpenBLAS starts a thread pool at
import; its own fork handler stops the pool before each fork, so every fork is of one thread.
The zygote also gives its ClientApps two of fedtransfer's changes to Flower's runtime: a FAB the site
has verified once is not unpacked again (deploy/installed_fab.py), and an object not there yet is asked
for again after 0.05 s, not 1 s (common/wire/flower_pin.py).

Trust: the socketpair has no name in any file system, so no other process can connect to it; only
this process and the zygote hold its ends (a forked ClientApp closes its copy first), and reaching
another process's descriptors (/proc/PID/fd, pidfd_getfd, ptrace) needs its account. Only the
site's own account can ask the zygote to fork. The zygote is forked before Flower reads the
SuperExec's secret, so it never holds it.

If the zygote has died, launches go to Flower's own Popen, said in one line. It patches one Flower
version's private code, so it refuses any other in one line and runs Flower's plain SuperExec.
This module imports nothing but the standard library until the zygote is forked.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from fedtransfer.common.wire.flower_pin import (  # the standard library only
    FLOWER_VERSION,
    flower_version,
    pin_refusal,
    quick_object_pulls,
)

# sha256 of inspect.getsource(SubprocessExecutor.launch) in flwr 1.41.0: its Popen is what is replaced
LAUNCH_SOURCE_SHA256 = "83abf3dbe02281fdf384ef650928e34eccc073dadcf690d34e9cb0eaab46b56c"
CLIENTAPP = "flwr-clientapp"  # flwr/supercore/constant.py TASK_TYPE_TO_COMMAND: the one command forked
RUNTIME = "flwr.supernode.runtime.run_clientapp"  # its install_from_fab: deploy/installed_fab.py
PREIMPORTS = ("flwr.supernode.cli.flwr_clientapp", RUNTIME, "numpy")
ZYGOTE_NAME = b"superexec-zygot"  # its /proc/PID/comm (15 bytes at most); ClientApps get CLIENTAPP's
COMMAND = "zygote-superexec"  # the internal `fedtransfer deploy` command (cli/main.py dispatches it first)
OFF_ENV = "FEDTRANSFER_NO_ZYGOTE"  # set to 1: `deploy site` runs Flower's plain SuperExec
REPLY_TIMEOUT_S = 60.0  # a first launch may wait for the zygote's imports on a loaded machine
REAP_EVERY_S = 0.5
MAX_REQUEST = 1 << 20
_PR_SET_NAME = 15


def log(message: str) -> None:
    print(f"fedtransfer: SuperExec: {message}", file=sys.stderr, flush=True)


def zygote_argv(flower_argv: list[str], python: str = sys.executable) -> list[str]:
    """The command line running `flower_argv` (a flower-superexec command) through this module."""
    return [python, "-m", "fedtransfer.cli", "deploy", COMMAND, *flower_argv]


# ---- the zygote -------------------------------------------------------------------------------


class Zygote:
    """The SuperExec's handle on its zygote: `fork(argv)` asks it for a child; None once it has died."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self._lock = threading.Lock()
        self.alive = True

    @classmethod
    def start(cls, preimports: tuple[str, ...] = PREIMPORTS) -> Zygote:
        """Fork the zygote; it returns here only in the parent (a forked ClientApp never leaves `_serve`)."""
        parent_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            parent_end.close()
            try:
                request = _serve(zygote_end, preimports)
            except BaseException as err:  # the SuperExec falls back to Flower's Popen, in one line
                log(f"the ClientApp zygote stopped: {type(err).__name__}: {err}")
                os._exit(1)
            if request is None:
                os._exit(0)
            _become(request)  # never returns
        zygote_end.close()
        return cls(pid, parent_end)

    def fork(self, argv: list[str], *, suppress_output: bool) -> int | None:
        """The pid of a child running `argv` as its console script would, or None (the zygote has died)."""
        request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "quiet": suppress_output}
        with self._lock:
            if not self.alive:
                return None
            try:
                self._sock.send(json.dumps(request).encode())
                ready, _, _ = select.select([self._sock], [], [], REPLY_TIMEOUT_S)
                answer = json.loads(self._sock.recv(MAX_REQUEST) if ready else b"")
                if "error" in answer:  # this fork failed (say, EAGAIN); the zygote serves on
                    log(f"the ClientApp zygote could not fork ({answer['error']}); this one starts with Popen")
                    return None
                return int(answer["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                self._died()
                return None

    def close(self) -> None:
        """End the zygote (it sees end of file) and reap it; its children run on."""
        with self._lock:
            self.alive = False
            self._sock.close()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)

    def _died(self) -> None:
        self.alive = False
        self._sock.close()
        try:
            os.kill(self.pid, signal.SIGKILL)  # a hung one: it will not be asked again
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        log(f"the ClientApp zygote (pid {self.pid}) has died; starting ClientApps with Flower's own Popen")


def _serve(sock: socket.socket, preimports: tuple[str, ...]) -> dict[str, Any] | None:
    """The zygote's loop: None when the SuperExec has gone, a request in each forked child."""
    _set_name(ZYGOTE_NAME)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in handlers:  # a Ctrl-C or a stop for the group: the SuperExec's end closing ends this loop
        signal.signal(sig, signal.SIG_IGN)
    for name in preimports:
        importlib.import_module(name)
    if RUNTIME in preimports:  # the ClientApp's FAB: unpacked once per site, not once per message
        from fedtransfer.deploy import installed_fab

        if (refused := installed_fab.install(sys.modules[RUNTIME])) is not None:
            log(f"{refused}: each ClientApp unpacks the run's FAB again, as Flower does")
    if (refused := quick_object_pulls()) is not None:  # its ClientApps ask again soon for a message not stored yet
        log(f"{refused}: ClientApps retry an object not there yet after Flower's 1 s")
    gc.collect()
    gc.freeze()  # what the imports made is shared, never traversed by a child's collector: fewer pages copied
    while True:
        ready, _, _ = select.select([sock], [], [], REAP_EVERY_S)
        _reap()
        if not ready:
            continue
        data = sock.recv(MAX_REQUEST)
        if not data:
            return None
        try:
            request = json.loads(data)
            pid = os.fork()
        except (ValueError, OSError) as err:
            sock.send(json.dumps({"error": str(err)}).encode())
            continue
        if pid == 0:
            sock.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            return request
        sock.send(json.dumps({"pid": pid}).encode())


def _reap() -> None:
    """Collect every child that has exited: the zygote leaves no zombies."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _become(request: dict[str, Any]) -> None:
    """In a forked child: what `subprocess.Popen(argv)` of the console script would have run; exits.

    The same process group and descriptors 0-2 (or /dev/null where Flower asked for it), the
    SuperExec's environment and working directory at the launch, the signal handlers of a fresh
    interpreter, a fresh numpy seed, the console script's sys.argv and sys.path[0], and no
    fedtransfer module: the ClientApp imports the run's FAB copy of it. What differs: /proc/PID/cmdline
    is the SuperExec's (the token is not in it), and str hashes use the zygote's seed.
    """
    argv = list(request["argv"])
    if request["quiet"]:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    script = shutil.which(argv[0]) or argv[0]
    sys.argv = [script, *argv[1:]]
    if sys.path:
        sys.path[0] = os.path.dirname(os.path.abspath(script))
    for name in [m for m in sys.modules if m == "fedtransfer" or m.startswith("fedtransfer.")]:
        del sys.modules[name]
    importlib.invalidate_caches()  # folders Flower unpacked a FAB into since the zygote started
    _set_name(os.path.basename(argv[0]).encode()[:15])
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # a fresh process would draw its own; `random` reseeds at fork
    from flwr.supernode.cli import flwr_clientapp

    sys.exit(flwr_clientapp())


def _set_name(name: bytes) -> None:
    """The process's name in ps and /proc/PID/comm (prctl PR_SET_NAME); nothing where that is missing."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    except (OSError, AttributeError):
        pass


# ---- the SuperExec ----------------------------------------------------------------------------


class _ZygotePopen:
    """`subprocess` as SubprocessExecutor.launch sees it: a flwr-clientapp Popen goes to the zygote."""

    def __init__(self, zygote: Zygote) -> None:
        self._zygote = zygote

    def Popen(self, args: list[str], **kwargs: Any) -> Any:  # subprocess's name
        quiet = kwargs.get("stdout") == subprocess.DEVNULL
        if args and args[0] == CLIENTAPP and set(kwargs) <= {"stdout", "stderr"}:
            pid = self._zygote.fork(list(args), suppress_output=quiet)
            if pid is not None:
                return pid
        return subprocess.Popen(args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def version_refusal() -> str | None:
    """Why this Flower gets no zygote (one line), or None; reads package metadata only, imports no Flower."""
    installed = flower_version()
    if installed != FLOWER_VERSION:
        return f"flwr {installed} is installed; the ClientApp zygote patches flwr {FLOWER_VERSION} only"
    return None


def source_refusal(executor_module: Any) -> str | None:
    """Why this SubprocessExecutor gets no zygote (one line), or None: its launch is not the one pinned."""
    return pin_refusal(executor_module, "SubprocessExecutor.launch", LAUNCH_SOURCE_SHA256)


def start_zygote(start: Callable[[], Zygote] | None = None) -> Zygote | None:
    """A zygote serving Flower's SubprocessExecutor, or None (said in one line) where this Flower is not pinned."""
    refused = version_refusal()  # before forking: nothing of Flower is imported yet
    if refused is None:
        zygote = (start or Zygote.start)()
        from flwr.supercore.superexec.executor import subprocess_executor

        refused = source_refusal(subprocess_executor)
        if refused is None:
            subprocess_executor.subprocess = _ZygotePopen(zygote)  # launch's Popen: the module's only use
            log(f"ClientApps are forked from a warm zygote (pid {zygote.pid}); {OFF_ENV}=1 turns it off")
            return zygote
        zygote.close()
    log(f"{refused}: Flower's plain SuperExec starts each ClientApp afresh")
    return None


def run(flower_argv: list[str], *, start: Callable[[], Zygote] | None = None) -> None:
    """Flower's SuperExec (`flower_argv`), its ClientApps forked from a zygote when this Flower allows."""
    if flower_argv and sys.path:  # as its console script has it: that script's folder, not `-m`'s working directory
        sys.path[0] = os.path.dirname(os.path.abspath(shutil.which(flower_argv[0]) or flower_argv[0]))
    zygote = start_zygote(start)
    from flwr.supercore.cli import flower_superexec

    sys.argv = list(flower_argv)
    try:
        flower_superexec()
    finally:
        if zygote is not None:
            zygote.close()


def main(flower_argv: list[str]) -> int:
    """`fedtransfer deploy zygote-superexec flower-superexec ARGS...` (cli/main.py runs it before its parser)."""
    if not flower_argv:
        log(f"`fedtransfer deploy {COMMAND}` needs a flower-superexec command line")
        return 2
    run(flower_argv)
    return 0
