"""Smoke run of benchmarks/finetune_sites.py (the many-site fine-tuning and personal-model rows), tiny sizes."""

from __future__ import annotations

import subprocess
import sys

from tests.test_benchmarks import ROOT, _run


def test_finetune_sites_smoke() -> None:
    args = (
        "--sites",
        "3",
        "--modes",
        "head",
        "--epsilons",
        "3",
        "none",
        "--limit",
        "300",
        "--image-size",
        "32",
        "--rounds",
        "1",
        "--local-epochs",
        "1",
        "--personal-epochs",
        "1",
    )
    result = _run("benchmarks.finetune_sites", *args)
    accuracy = [r for r in result["rows"] if r["question"] == "accuracy"]
    personal = [r for r in result["rows"] if r["question"] == "personal"]
    expected = [("iid", 3.0), ("iid", None), ("dirichlet", 3.0), ("dirichlet", None)]
    assert [(r["split"], r["epsilon_target"]) for r in accuracy] == expected
    assert all(r["sites"] == 3 and 0 <= r["accuracy"] <= 1 for r in accuracy)
    [row] = personal
    assert len(row["per_site"]) == 3 and 0 <= row["personal_mean"] <= 1
    assert result["params"]["epsilons"] == [3.0, None]


def test_finetune_sites_refuses_a_bad_epsilon_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.finetune_sites", "--epsilons", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "ε must be > 0 or none (got 0)" in done.stderr and "Traceback" not in done.stderr


def test_finetune_sites_text_demo_asks_only_the_questions_named(tmp_path) -> None:
    """`--demo text --questions accuracy`: the MiniLM rows only, no personal rows, in finetune_text_sites<N>."""
    args = (
        "--demo",
        "text",
        "--sites",
        "3",
        "--modes",
        "head",
        "--epsilons",
        "3",
        "--limit",
        "80",
        "--max-tokens",
        "16",
        "--rounds",
        "1",
        "--local-epochs",
        "1",
        "--batch-size",
        "16",
        "--questions",
        "accuracy",
        "--cache",
        str(tmp_path),
    )
    result = _run("benchmarks.finetune_sites", *args)
    assert result["benchmark"] == "finetune_text_sites3"
    assert [(r["question"], r["split"]) for r in result["rows"]] == [("accuracy", "iid"), ("accuracy", "dirichlet")]
    assert all(r["sites"] == 3 and 0 <= r["accuracy"] <= 1 for r in result["rows"])
    assert result["params"]["batch_size"] == 16 and result["params"]["max_tokens"] == 16
