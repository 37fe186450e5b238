"""Fine-tuning and personal models at many sites: the 4-site questions of benchmarks/finetune.py, asked at 16.

The same digits (or, `--demo text`, the same BBC articles with MiniLM) divided among more sites, so
each holds fewer records: server hold-out accuracy
for head / LoRA r4 on the last block / the last block, IID and Dirichlet(0.3), at ε = 3 and
without DP (`--epsilons`), with bytes and train seconds per site-round; then, under
Dirichlet(0.3) at ε = 3, each site's accuracy on its own test split for the global model
against its personal model (Ditto, what `personal:` runs). Everything else, the federation
included, is benchmarks/finetune.py's own code, so the rows compare with its 4-site rows.
One JSON, `finetune_[text_]sites<N>.json` unless `--name`, holds both tables (each row's
`question`: accuracy or personal; `--questions` asks only some).

    nice .venv/bin/python -m benchmarks.finetune_sites --sites 16 --limit 2000 --rounds 3 --local-epochs 2
    nice .venv/bin/python -m benchmarks.finetune_sites --sites 16 --epsilons 1 8 --questions accuracy \
        --name finetune_sites16_eps1_8
    nice .venv/bin/python -m benchmarks.finetune_sites --demo text --sites 16 --limit 400 --max-tokens 64 \
        --rounds 2 --local-epochs 1 --batch-size 32 --questions accuracy
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from benchmarks.finetune import DEMOS, MODES, Task, accuracy_sweep, personal_sweep
from benchmarks.harness import FedSetup, print_table, write_results


def _epsilon(text: str) -> float | None:
    """An ε from the command line: a positive number, or `none` for no DP."""
    if text.lower() == "none":
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"ε must be > 0 or none (got {text})")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=16)
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--epsilons", type=_epsilon, nargs="+", default=[3.0, None], help="numbers, or none (no DP)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--personal-epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=2000, help="use this many of the samples (digits, articles)")
    ap.add_argument("--demo", choices=list(DEMOS), default="image", help="MNIST + MobileNetV2, or BBC News + MiniLM")
    ap.add_argument("--max-tokens", type=int, default=128, help="text: backbone.max_seq_length")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--questions", nargs="+", choices=["accuracy", "personal"], default=["accuracy", "personal"])
    ap.add_argument("--name", default=None, help="results file name (default finetune_[text_]sites<N>)")
    ap.add_argument("--cache", default="~/.cache/fedtransfer")
    args = ap.parse_args()
    if args.sites < 2:
        ap.error(f"--sites: a federation needs at least 2 sites (got {args.sites})")
    task = Task(args.image_size, Path(args.cache).expanduser(), args.limit, args.demo, args.max_tokens)
    setup = FedSetup(rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size, learning_rate=0.5)
    tagged = []
    if "accuracy" in args.questions:
        rows = accuracy_sweep(task, setup, [args.sites], args.modes, args.epsilons)
        print_table(rows, ["sites", "split", "trains", "epsilon_target", "accuracy", "bytes_per_round", "train_s"])
        tagged += [{"question": "accuracy"} | r for r in rows]
    if "personal" in args.questions:
        personal = personal_sweep(
            task, replace(setup, target_epsilon=3.0), args.sites, args.modes, args.personal_epochs
        )
        print_table(personal, ["sites", "trains", "hold-out", "global_mean", "personal_mean", "gain_points"])
        tagged += [{"question": "personal"} | r for r in personal]
    params = vars(args) | {"learning_rate": setup.learning_rate}
    write_results(args.name or f"finetune_{'text_' if args.demo == 'text' else ''}sites{args.sites}", tagged, params)


if __name__ == "__main__":
    main()
