"""Check the import contracts (`[tool.importlinter]` in pyproject.toml): `python -m tests.lint_imports`.

import-linter's graph builder (grimp) finds a package's modules by walking the folder of its spec,
without running its `__init__.py`. In the checkout `fedtransfer/` holds only that `__init__.py`, which
adds the top-level folders (`cli/`, `common/`, ...) to its `__path__` when imported, and
`[tool.setuptools.package-dir]` maps them the same way for a wheel: grimp would see one empty
package. So this builds, in a temporary folder, the layout the wheel installs (`fedtransfer/cli`,
`fedtransfer/common`, ...) out of symbolic links to the checkout's folders, and runs `lint-imports`
with that folder first on PYTHONPATH: the graph is the checkout's own code, under the names it
imports itself by, and a report's module names are the ones to grep for.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def build_view(dest: Path) -> Path:
    """Lay out `dest/fedtransfer/` as the wheel installs it, from links to the checkout; returns `dest`."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    package = dest / "fedtransfer"
    package.mkdir(parents=True)
    for entry in (ROOT / "fedtransfer").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in setuptools["package-dir"].items():
        parent, _, child = name.rpartition(".")
        assert parent == "fedtransfer", f"package-dir maps {name}: only fedtransfer's direct subpackages are linked"
        (package / child).symlink_to(ROOT / folder, target_is_directory=True)
    return dest


def run_lint_imports(view: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with pyproject.toml's contracts on the package laid out in `view`; its output in the result."""
    env = os.environ | {"PYTHONPATH": str(view)}  # view is also the working folder: lint-imports puts that first
    argv = [str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo", *args]
    return subprocess.run(argv, cwd=view, env=env, capture_output=True, text=True, timeout=300, check=False)


def lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the checkout's own code."""
    with tempfile.TemporaryDirectory(prefix="fedtransfer-imports-") as tmp:
        return run_lint_imports(build_view(Path(tmp)), *args)


def main() -> int:
    """Print import-linter's report; exit status 0 when every contract is kept."""
    done = lint_imports(*sys.argv[1:])
    print(done.stdout, end="")
    print(done.stderr, end="", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
