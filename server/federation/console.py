"""What a run shows on the console, and what only its log file keeps.

`flwr run --stream` relays every log record of the ServerApp twice (Flower's coloured line and
the log stream's timestamped copy) plus DEBUG records of Ray and the Simulation Engine and
Python warnings from libraries. The launcher writes all of it to the run's log file and passes
each line through `ConsoleFilter`, which by default keeps one line per round (`round_summary`),
the run's start, and every record at WARNING or above, once. `verbose` keeps everything.

The command's own process logs through Flower's logger too (the preflight loads the data, and a
table's "values clipped" warning with it): `plain_when_redirected` drops the colour codes when
stderr is not a terminal, and `recorded_warnings` collects what the preflight said so the
ServerApp's copy of the same warning is not shown a second time.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO
from typing import Any, TextIO

from fedtransfer.common.config.run import RunConfig
from flwr.common.logger import FLOWER_LOGGER, log, update_console_handler

_COLOURED = re.compile(r"^\x1b\[\d+m(?P<level>[A-Z]+)\s*\x1b\[0m:\s*(?P<message>.*)$")
_STAMPED = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:(?P<level>[A-Z]+):(?P<message>.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # a terminal's colour codes: never in a log file
_ALWAYS = frozenset({"WARNING", "ERROR", "CRITICAL"})
# what the round loop logs at INFO that a user reads: the run's start (or resume), each round and the final
# model's evaluation; the command itself prints the outcome
_SUMMARY = re.compile(r"^(round \d+/\d+ \| |final model \(round \d+\) \| |Run \w+: |Resuming run \w+ )")
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
    server_measured: tuple[list[float] | None, int | None] = (None, None),
    sites_measured: tuple[list[float] | None, int | None] = (None, None),
    sites_round: int | None = None,
) -> str:
    """The one console line of a round; `target_epsilon` None means the run has no DP.

    `server_measured`, `sites_measured`: each accuracy's 95% Wilson interval and the records it was measured
    on, shown where known: a 0.907 on 43 records and one on 4,300 must not read alike. `sites_round`: the
    model the sites scored when it is not this round's (their scores ride in the next round's replies).
    """
    sites = "-" if sites_accuracy is None else _measured(sites_accuracy, *sites_measured)
    if sites_accuracy is not None and sites_round is not None and sites_round != rnd:
        sites += f" (round {sites_round}'s model)"
    spent = "-" if epsilon_max is None else f"{epsilon_max:.3f}"
    target = "no DP" if target_epsilon is None else f"{target_epsilon:g}"
    return (
        f"round {rnd}/{rounds} | sites trained {trained}/{asked} | "
        f"server acc {_measured(server_accuracy, *server_measured)} | "
        f"sites' acc {sites} | ε spent max {spent} (target {target}) | {seconds:.1f}s"
    )


def final_evaluation_summary(
    rnd: int,
    rounds: int,
    *,
    sites_accuracy: float | None,
    sites_measured: tuple[list[float] | None, int | None] = (None, None),
) -> str:
    """The console line of the final model's evaluation, the run's one exchange of evaluation alone."""
    sites = "-" if sites_accuracy is None else _measured(sites_accuracy, *sites_measured)
    return f"final model (round {rnd}) | sites' acc {sites} | its evaluation exchange, after round {rnd}/{rounds}"


def log_round(
    rnd: int, cfg: RunConfig, record: dict[str, Any], asked: int, *, scored: tuple[int | None, dict | None]
) -> None:
    """The one console line of a round (fedtransfer.server.federation.console shows it by default, and little else).

    `scored`: the model round whose federated metrics this round's replies carried, and the metrics.
    """
    eps = [s["epsilon"] for s in record["sites"].values() if s.get("epsilon") is not None]
    sites_round, fed = scored
    log(
        INFO,
        "%s",
        round_summary(
            rnd,
            cfg.train.rounds,
            trained=record["sites_trained"],
            asked=asked,
            server_accuracy=record["server"]["accuracy"],
            server_measured=(record["server"].get("accuracy_interval95"), record["server"].get("records")),
            sites_accuracy=fed["accuracy"] if fed else None,
            sites_measured=(fed.get("accuracy_interval95"), fed.get("records")) if fed else (None, None),
            sites_round=sites_round,
            epsilon_max=max(eps) if eps else None,
            target_epsilon=cfg.privacy.target_epsilon if cfg.privacy.enabled else None,
            seconds=record["time_s"],
        ),
    )


def _measured(accuracy: float, interval: list[float] | None, records: int | None) -> str:
    """`0.9070 [0.784, 0.963] on 43`: the accuracy, its interval and its record count where known."""
    text = f"{accuracy:.4f}"
    if interval is not None:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text if records is None else f"{text} on {records}"


@dataclass
class ConsoleFilter:
    """Decides, line by line, what of a streamed run reaches the console (`show` returns it, or None)."""

    verbose: bool = False
    _shown: list[tuple[str, str]] = field(default_factory=list)

    def already_shown(self, warnings: Iterable[str]) -> None:
        """Warnings this process printed itself (`recorded_warnings`): the run's copies of them are not shown."""
        self._shown += [("WARNING", message.strip()) for message in warnings]

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


def plain_when_redirected(stream: TextIO | None = None) -> None:
    """Flower's console handler writes colour codes only to a terminal: a redirected log stays plain text."""
    stream = sys.stderr if stream is None else stream
    update_console_handler(colored=bool(getattr(stream, "isatty", lambda: False)()))


@contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    """The messages of Flower-logger warnings (and worse) emitted inside the block, as they were printed."""
    seen: list[str] = []

    class _Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    recorder = _Recorder(logging.WARNING)
    FLOWER_LOGGER.addHandler(recorder)
    try:
        yield seen
    finally:
        FLOWER_LOGGER.removeHandler(recorder)
