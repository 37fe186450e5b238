"""What a run shows on the console, and what only its log file keeps.

`flwr run --stream` relays every log record of the ServerApp twice (Flower's coloured line and
the log stream's timestamped copy) plus DEBUG records of Ray and the Simulation Engine and
Python warnings from libraries. The launcher writes all of it to the run's log file and passes
each line through `ConsoleFilter`, which by default keeps one line per round (`round_summary`),
the run's start, and every record at WARNING or above, once. `verbose` keeps everything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_COLOURED = re.compile(r"^\x1b\[\d+m(?P<level>[A-Z]+)\s*\x1b\[0m:\s*(?P<message>.*)$")
_STAMPED = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:(?P<level>[A-Z]+):(?P<message>.*)$")
_ALWAYS = frozenset({"WARNING", "ERROR", "CRITICAL"})
# what the round loop logs at INFO that a user reads: the run's start (or resume) and each round; the
# command itself prints the outcome
_SUMMARY = re.compile(r"^(round \d+/\d+ \| |Run \w+: |Resuming run \w+ )")
# Flower's hint about its default federation size: fedtransfer always sets num-supernodes itself
_NOT_FOR_USERS = ("default simulated SuperNodes changed",)


def round_summary(
    rnd: int,
    rounds: int,
    *,
    trained: int,
    asked: int,
    server_accuracy: float,
    sites_accuracy: float | None,
    epsilon_max: float | None,
    target_epsilon: float | None,
    seconds: float,
) -> str:
    """The one console line of a round; `target_epsilon` None means the run has no DP."""
    sites = "-" if sites_accuracy is None else f"{sites_accuracy:.4f}"
    spent = "-" if epsilon_max is None else f"{epsilon_max:.3f}"
    target = "no DP" if target_epsilon is None else f"{target_epsilon:g}"
    return (
        f"round {rnd}/{rounds} | sites trained {trained}/{asked} | server acc {server_accuracy:.4f} | "
        f"sites' acc {sites} | ε spent max {spent} (target {target}) | {seconds:.1f}s"
    )


@dataclass
class ConsoleFilter:
    """Decides, line by line, what of a streamed run reaches the console (`show` returns it, or None)."""

    verbose: bool = False
    _shown: list[tuple[str, str]] = field(default_factory=list)

    def show(self, line: str) -> str | None:
        """The text to print for one line of `flwr run --stream` output, or None to keep it in the log only."""
        line = line.rstrip("\n")
        if self.verbose:
            return line
        match = _COLOURED.match(line) or _STAMPED.match(line)
        if match is None:
            return None  # Flower's CLI chatter, library warnings, tracebacks: the log file has them
        level, message = match["level"], match["message"].strip()
        wanted = level in _ALWAYS or (level == "INFO" and _SUMMARY.match(message) is not None)
        if not wanted or any(noise in message for noise in _NOT_FOR_USERS):
            return None
        if (level, message) in self._shown:
            return None  # the log stream's copy of a line already shown
        self._shown = [*self._shown[-19:], (level, message)]
        return message if level == "INFO" else f"{level}: {message}"
