"""The layering (pyproject.toml's `[tool.importlinter]`): kept by the checkout, and a break is reported."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.lint_imports import ROOT, build_view, lint_imports, run_lint_imports


def test_the_checkout_keeps_every_import_contract() -> None:
    done = lint_imports()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "Analyzed 1" in done.stdout  # ~100 modules seen, not one empty package


def test_an_upward_import_breaks_the_contract_and_is_named(tmp_path: Path) -> None:
    """common importing the server is reported with the importing module (the check sees the real code)."""
    view = build_view(tmp_path)
    common = view / "fedtransfer" / "common"
    common.unlink()
    shutil.copytree(ROOT / "common", common, ignore=shutil.ignore_patterns("__pycache__"))
    errors = common / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom fedtransfer.server.federation import loop  # noqa\n")
    done = run_lint_imports(view)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "fedtransfer.common.errors -> fedtransfer.server.federation.loop" in done.stdout, done.stdout[-3000:]
