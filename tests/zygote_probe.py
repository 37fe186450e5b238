"""A SuperExec's side of the ClientApp zygote, driven by a test (tests/test_superexec_zygote.py).

`python -m tests.zygote_probe ARGS...` starts a zygote as the SuperExec wrapper does (in a fresh,
single-threaded interpreter, not in pytest), prints its pid, asks it to fork `flwr-clientapp ARGS...`
and prints the child's pid, then waits for the test to write a line before it exits. With `--kill`
first it kills the zygote and launches through the patched Popen, which must fall back to Flower's.
"""

from __future__ import annotations

import os
import signal
import sys

from fedtransfer.deploy.superexec_zygote import CLIENTAPP, Zygote, _ZygotePopen


def main(argv: list[str]) -> None:
    kill = argv[:1] == ["--kill"]
    zygote = Zygote.start()
    print(f"zygote {zygote.pid} fd {zygote._sock.fileno()}", flush=True)
    if kill:
        os.kill(zygote.pid, signal.SIGKILL)
        proc = _ZygotePopen(zygote).Popen([CLIENTAPP, *argv[1:]])
        print(f"child {proc.pid} popen {type(proc).__name__}", flush=True)
        proc.wait()
    else:
        print(f"child {zygote.fork([CLIENTAPP, *argv], suppress_output=False)}", flush=True)
    sys.stdin.readline()
    zygote.close()


if __name__ == "__main__":
    main(sys.argv[1:])
