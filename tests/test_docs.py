"""The manual cannot drift from the code: its commands parse, its configs load, its make targets exist.

Each test reads the pages under docs/ (and README.md) as a user copies from them: a command line
that the parser refuses, a config that `load_config` refuses or a `make` target that is gone is a
user's first failure, so it fails here first. The reference pages are generated from the code;
these tests check that what they generate is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
from fedtransfer.cli.main import build_parser
from fedtransfer.common.config.run import RunConfig, load_config, to_run_config
from fedtransfer.common.config.site import SiteConfig, load_site_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}
FENCE = re.compile(r"^( *)```(\w*)[^\n]*\n(.*?)^\1```", re.S | re.M)
COMMAND = re.compile(r"^(?:\$ )?(?:\.venv/bin/)?(fedtransfer|flwr)\s")


def fenced(path: Path) -> list[tuple[str, str, int]]:
    """Every fenced block of a Markdown file: (language, body, line number of its first body line)."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for m in FENCE.finditer(text):
        body = "\n".join(line[len(m.group(1)) :] for line in m.group(3).splitlines())
        blocks.append((m.group(2), body, text.count("\n", 0, m.start(3)) + 1))
    return blocks


def command_lines(path: Path) -> list[tuple[str, int]]:
    """Every `fedtransfer ...` / `flwr ...` line of a page's shell blocks, continuation lines joined."""
    found = []
    for lang, body, first in fenced(path):
        if lang not in SHELL_LANGS:
            continue
        lines = body.splitlines()
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            if COMMAND.match(line.strip()):
                found.append((line.strip().removeprefix("$ "), first + start))
            i += 1
    return found


def fedtransfer_argvs(line: str) -> list[list[str]]:
    """The argument lists a shell gives `fedtransfer` for this line (comments dropped).

    A `[--port 9095]` group is usage notation for an optional part: the line must parse both
    without it and with it.
    """
    optional = re.compile(r"\[(-[^\]]*)\]")
    variants = {optional.sub("", line), optional.sub(r"\1", line)}
    return [shlex.split(v, comments=True)[1:] for v in sorted(variants)]


def refusal(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """What the parser says when it refuses `argv` (None: it parses; `--help` exits 0 and parses too)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as stop:
        if stop.code not in (0, None):
            return (stderr.getvalue().strip().splitlines() or ["refused"])[-1]
    return None


def documents() -> list[Path]:
    return [*PAGES, ROOT / "README.md"]


def test_every_fedtransfer_command_in_the_docs_parses():
    parser = build_parser()
    bad, seen = [], 0
    for path in documents():
        for line, lineno in command_lines(path):
            if not re.match(r"(\.venv/bin/)?fedtransfer\s", line):
                continue
            seen += 1
            for argv in fedtransfer_argvs(line):
                if (why := refusal(parser, argv)) is not None:
                    bad.append(f"{path.relative_to(ROOT)}:{lineno}: {line!r}: {why}")
    assert seen >= 20, f"only {seen} fedtransfer command lines found: the extraction broke"
    assert not bad, "command lines the real parser refuses:\n" + "\n".join(bad)


def test_a_wrong_command_line_is_caught():
    """The check above can fail: a flag that does not exist is refused by the same parser."""
    parser = build_parser()
    assert "--rounds" in refusal(parser, fedtransfer_argvs(".venv/bin/fedtransfer simulate --rounds 3")[0])
    assert refusal(parser, fedtransfer_argvs("fedtransfer audit runs/demo --empirical  # a comment")[0]) is None
    argvs = fedtransfer_argvs("fedtransfer deploy site --config s.yaml --credentials c --superlink h:1 [--port x]")
    assert len(argvs) == 2 and any("invalid int" in (refusal(parser, a) or "") for a in argvs)


def yaml_blocks() -> list[tuple[Path, int, str]]:
    """The YAML blocks of the site's pages (README.md's cannot carry the markers: it shrinks to links into them)."""
    return [(p, n, body) for p in PAGES for lang, body, n in fenced(p) if lang in ("yaml", "yml")]


def test_every_yaml_config_in_the_docs_loads(tmp_path):
    """A block that is a whole config loads; a part of one says so (`# fragment`), a site's file `# site-config`."""
    bad, loaded = [], 0
    for i, (path, lineno, body) in enumerate(yaml_blocks()):
        head = body.lstrip().splitlines()[0] if body.strip() else ""
        if head.startswith("# fragment"):
            continue
        file = tmp_path / f"block{i}.yaml"
        file.write_text(body, encoding="utf-8")
        try:
            (load_site_config if head.startswith("# site-config") else load_config)(file)
            loaded += 1
        except Exception as err:
            bad.append(f"{path.relative_to(ROOT)}:{lineno}: {err}")
    assert loaded >= 1, "no YAML block loaded: the extraction broke"
    assert not bad, "YAML blocks that are neither a loadable config nor marked '# fragment':\n" + "\n".join(bad)


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M)}


def test_every_make_target_named_in_the_docs_exists():
    targets = makefile_targets()
    assert {"demo", "test", "docs"} <= targets
    named = []
    for path in documents():
        text = path.read_text(encoding="utf-8")
        code = re.findall(r"`make ([^`]+)`", text)
        code += [line for _, body, _ in fenced(path) for line in re.findall(r"^make ([^\n#]+)", body, re.M)]
        named += [(path, word) for args in code for word in args.split() if "=" not in word]
    missing = sorted({f"{p.relative_to(ROOT)}: make {t}" for p, t in named if t not in targets})
    assert len(named) >= 3
    assert not missing, "make targets the Makefile lacks:\n" + "\n".join(missing)


def test_the_readmes_links_into_the_manual_resolve():
    """README.md is outside the strict site build: each relative link names a file (and a heading) that exists."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((?!https?:)([^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert len(links) >= 20 and any(target.startswith("docs/how-to/") for target, _ in links)
    bad = []
    for target, anchor in links:
        path = ROOT / target
        if not path.exists():
            bad.append(target)
        elif anchor:
            slugs = {
                re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
            }
            if anchor not in slugs:
                bad.append(f"{target}#{anchor}")
    assert not bad, f"README.md links to what the manual lacks: {bad}"
    assert len(readme.splitlines()) <= 220, "README.md is the front page: keep it near 200 lines, the rest in docs/"


def test_bare_commands_say_they_need_the_virtualenv():
    """`fedtransfer` and `flwr` live in .venv/bin: a page that runs them bare says how to activate it."""
    bad = []
    for path in documents():
        bare = [(line, n) for line, n in command_lines(path) if not line.startswith(".venv/bin/")]
        if bare and "source .venv/bin/activate" not in path.read_text(encoding="utf-8"):
            bad += [f"{path.relative_to(ROOT)}:{n}: {line}" for line, n in bare]
    assert not bad, "commands run bare on a page that never says to activate .venv:\n" + "\n".join(bad)


@pytest.fixture
def refgen(monkeypatch):
    monkeypatch.syspath_prepend(str(DOCS))
    import hooks

    return hooks


def test_the_config_reference_documents_every_key(refgen):
    from refgen.config_keys import config_keys, load_meanings

    meanings = load_meanings()
    run_keys = config_keys(RunConfig, meanings["run"])
    assert {k.name for k in run_keys} == set(to_run_config(RunConfig()))  # every key the run config accepts
    site_keys = config_keys(SiteConfig, meanings["site"])
    undocumented = [k.name for k in run_keys + site_keys if not k.meaning.strip()]
    assert not undocumented, (
        f"keys with no meaning: comment the field or add them to config-meanings.yaml: {undocumented}"
    )
    stale = set(meanings["run"]) - {k.name for k in run_keys} | set(meanings["site"]) - {k.name for k in site_keys}
    assert not stale, f"config-meanings.yaml documents keys the dataclasses no longer have: {sorted(stale)}"
    page = refgen.page("config")
    assert all(f"| `{k.name}` |" in page for k in run_keys + site_keys)
    assert '| `train.protocol` | "fedavg" \\| "fedsgd" | `"fedsgd"` |' in page


def test_the_cli_reference_lists_every_command_and_flag(refgen):
    from refgen.cli_flags import commands

    page = refgen.page("cli")
    parser = build_parser()
    subcommands = list(commands(parser))
    assert len(subcommands) >= 9  # simulate, predict, audit, export, deploy and its five
    for path, _, sub in subcommands:
        assert f"`fedtransfer {' '.join(path)}`" in page
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            for flag in action.option_strings:
                assert f"`{flag}" in page or f", {flag}" in page, f"fedtransfer {' '.join(path)} {flag} missing"


def test_every_generated_placeholder_is_known(refgen):
    from refgen.enums import placeholders

    known = placeholders()
    for path in PAGES:
        for name in re.findall(r"<!-- generated: ([\w-]+) -->", path.read_text(encoding="utf-8")):
            assert name in known, f"{path.relative_to(ROOT)}: unknown placeholder {name}"
    assert "`update-sent`" in known["audit-events"] and "`no-reply`" in known["site-statuses"]


def test_the_benchmarks_page_lists_every_result_file_with_its_script(refgen):
    """A committed result with no script that writes it would be a figure nobody can reproduce."""
    from refgen.benchmarks import results_table

    table = results_table()
    results = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert results
    for path in results:
        row = next(line for line in table.splitlines() if line.startswith(f"| `{path.name}` |"))
        assert "`python -m benchmarks." in row, f"{path.name}: no benchmarks/*.py script writes it"
    assert "NVIDIA H200" in next(line for line in table.splitlines() if "round_time_cuda.json" in line)
