"""The wheel a user installs: built from the repository, installed non-editable into a fresh environment.

An editable install or a checkout on `sys.path` hides a module missing from `[tool.setuptools] packages`
(`fedtransfer audit` once could not import outside the checkout), so these tests build the wheel from a
copy of the sources and run the installed `fedtransfer` from a folder outside the checkout, with no
PYTHONPATH. The fresh environment reuses the shared virtualenv's dependencies through a `.pth` file
instead of installing them again (nothing downloads).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from fedtransfer.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIRS = {"fedtransfer": "fedtransfer"} | SETUPTOOLS["package-dir"]  # import name -> folder in the repository
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "credentials")


def _package_folders() -> dict[str, Path]:
    """Every folder with an `__init__.py` under the mapped top-level folders, by its import name."""
    found = {}
    for name, folder in PACKAGE_DIRS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / folder)
            found[".".join((name, *relative.parts))] = init.parent
    return found


def _expected_modules() -> set[str]:
    """The wheel paths of every .py file under the packages (fedtransfer/server/audit/run.py, ...)."""
    expected = set()
    for name, folder in PACKAGE_DIRS.items():
        prefix = Path(*name.split("."))
        for module in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in module.parts:
                expected.add((prefix / module.relative_to(ROOT / folder)).as_posix())
    return expected


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel --no-deps .` builds, from a copy (the build writes build/ and *.egg-info/)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, source / folder, ignore=IGNORED)
    out = tmp_path_factory.mktemp("wheel")
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out)]
    done = subprocess.run([*argv, str(source)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (built,) = out.glob("fedtransfer-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed (not editable); returns its bin folder."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    # the shared environment's packages (torch, flwr, pip...) without copying them; its own .pth files (the
    # checkout's editable install) are not read from a directory named in a .pth file, so they stay out
    (purelib / "shared-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    bin_dir = venv / "bin"
    _flower_scripts(Path(sys.executable).parent, bin_dir)
    done = _run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], venv)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return bin_dir


def _flower_scripts(shared: Path, bin_dir: Path) -> None:
    """Flower's and Ray's commands, run by the fresh environment's interpreter, as pip would have installed them:
    `simulate` starts flower-superlink, which starts the ServerApp, from the environment's bin folder."""
    for script in shared.iterdir():
        text = script.read_bytes()
        if script.name.startswith(("flwr", "flower-", "ray")) and text.startswith(b"#!"):
            body = text.split(b"\n", 1)[1]
            (bin_dir / script.name).write_bytes(b"#!" + str(bin_dir / "python").encode() + b"\n" + body)
            (bin_dir / script.name).chmod(0o755)


def _outside_env() -> dict[str, str]:
    """This environment without what would put the checkout on `sys.path` or select another venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=_outside_env(), capture_output=True, text=True, timeout=timeout)


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser: (), ("simulate",), ..., ("deploy", "init"), ..."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _subcommands(sub, (*prefix, name))
    return paths


def test_every_package_folder_is_declared() -> None:
    """A folder with an __init__.py left out of `packages` is left out of the wheel, silently."""
    declared = set(SETUPTOOLS["packages"])
    folders = _package_folders()
    assert sorted(set(folders) - declared) == [], "add these to [tool.setuptools] packages in pyproject.toml"
    assert sorted(declared - set(folders)) == [], "packages declared in pyproject.toml with no folder"


def test_wheel_holds_every_module_and_nothing_at_top_level(wheel: Path) -> None:
    """Every module ships, and only under `fedtransfer` (no generic `common`, `server`... in a user's environment)."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert sorted(_expected_modules() - names) == []
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fedtransfer"}


# one interpreter for every command (each start imports torch, seconds on a busy machine): the console script's
# entry point, as the installed metadata declares it, called with each command's --help
HELP_ALL = """
import contextlib, importlib.metadata, io, json, sys
import fedtransfer, fedtransfer.server.audit.run, fedtransfer.client.client_app
(main,) = [e.load() for e in importlib.metadata.entry_points(group="console_scripts", name="fedtransfer")]
shown = {}
for command in json.loads(sys.argv[1]):
    out, code = io.StringIO(), None
    with contextlib.redirect_stdout(out):
        try:
            main([*command, "--help"])
        except SystemExit as exited:
            code = exited.code
    shown[" ".join(command)] = [code, out.getvalue()]
modules = [fedtransfer.server.audit.run.__file__, fedtransfer.client.client_app.__file__, *fedtransfer.__path__]
print(json.dumps({"help": shown, "modules": modules}))
"""


def test_installed_wheel_works_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    """`fedtransfer --help` and every subcommand's --help work from the installed wheel alone, the audit imports,
    and every `fedtransfer` module comes from site-packages, not from a checkout."""
    assert (installed / "fedtransfer").is_file()
    commands = _subcommands(build_parser())
    assert {(), ("simulate",), ("audit",), ("export",), ("predict",), ("deploy", "init")} <= set(commands)
    done = _run([str(installed / "python"), "-c", HELP_ALL, json.dumps(commands)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    for command in commands:
        usage = " ".join(("usage: fedtransfer", *command))
        code, text = report["help"][" ".join(command)]
        assert code == 0 and text.startswith(usage), (command, code, text[:300])
    site = installed.parent.resolve()
    assert all(Path(m).resolve().is_relative_to(site) for m in report["modules"]), report["modules"]


@pytest.mark.slow  # by hand: the Flower processes start inside the installed `fedtransfer`, where conftest cannot look
def test_installed_wheel_simulates_a_tiny_run(installed: Path, tmp_path: Path) -> None:
    """`fedtransfer simulate` from the wheel alone: Flower's app loading finds the installed package."""
    run_dir = tmp_path / "run"
    config = {
        "run_name": "wheel",
        "output_dir": str(run_dir),
        "cache_dir": str(tmp_path / "cache"),
        "backbone": {"image_size": 32},
        "data": {"num_sites": 2, "max_samples": 600, "split": "iid"},
        "train": {"rounds": 1, "local_epochs": 2, "protocol": "fedavg", "learning_rate": 0.5},
        "privacy": {"target_epsilon": 3.0, "target_delta": 1.0e-4, "feature_stats": False, "accountant": "rdp"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = _run([str(installed / "fedtransfer"), "simulate", "--config", str(path), "--quiet"], tmp_path, timeout=600)
    log = run_dir / "run.log"
    assert done.returncode == 0, done.stderr[-2000:] + (log.read_text()[-3000:] if log.is_file() else "")
    assert "completed" in done.stdout
    assert (run_dir / "model.pt").is_file() and (run_dir / "privacy.json").is_file()
