"""The command-line reference, walked from the real argparse parser (`fedtransfer.cli.main.build_parser`).

Generated at build time so that a flag added to a subcommand is in the manual the next time the
site builds; the help texts in cli/*.py are the only place a flag's meaning is written.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

Command = tuple[tuple[str, ...], str, argparse.ArgumentParser]


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[Command]:
    """Every (sub)command as (its words after `fedtransfer`, its one-line help, its parser), depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), helps.get(name, ""), sub
                yield from commands(sub, (*path, name))


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{names}`"
    value = action.metavar or (action.choices and "{" + ",".join(map(str, action.choices)) + "}") or action.dest.upper()
    return f"`{names} {value}`"


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        text = (action.help or "").replace("%(default)s", str(action.default)).replace("|", "\\|")
        text = " ".join(text.split())
        if action.required and action.option_strings:
            text = f"(required) {text}"
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text = f"{text} (default: `{action.default}`)"
        rows.append(f"| {_flag(action)} | {text} |")
    return ["| argument | meaning |", "| --- | --- |", *rows] if rows else []


def render(parser: argparse.ArgumentParser) -> str:
    """The whole CLI reference page in Markdown: one section per command, its usage and every argument."""
    out = [
        "# Command line",
        "",
        "Generated from the argparse parsers (`fedtransfer.cli.main.build_parser`) every time the site builds.",
        "`fedtransfer` is installed into the virtualenv: run it as `.venv/bin/fedtransfer`, or activate",
        "the virtualenv first (`source .venv/bin/activate`). `fedtransfer COMMAND --help` prints the same.",
        "",
        "```text",
        parser.format_usage().strip(),
        "```",
        "",
    ]
    for path, help_text, sub in commands(parser):
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            out += [f"## `fedtransfer {' '.join(path)}`", "", help_text.capitalize() + ".", ""]
            continue
        level = "##" if len(path) == 1 else "###"
        out += [f"{level} `fedtransfer {' '.join(path)}`", "", (help_text or sub.description or "").strip(), ""]
        if sub.description and help_text:
            out += [" ".join(sub.description.split()), ""]
        out += ["```text", sub.format_usage().strip(), "```", "", *_arguments(sub), ""]
    return "\n".join(out)
