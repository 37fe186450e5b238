"""Privacy accounting per site: calibrate noise to the whole planned run, keep a ledger.

Opacus does the accounting; this module decides *what* is accounted: the noise
multiplier is chosen so that all rounds and local epochs the site may join together
meet its target (ε, δ), and the accountant's history lives on the site's own disk so
that the ε a site reports is always its cumulative ε, across rounds and restarts.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common import atomic

EPS_SLACK = 1e-9  # float noise between identical accountant calls


class BudgetExceeded(RuntimeError):
    """Training this round would take the site past its privacy budget."""


@dataclass(frozen=True)
class DPPlan:
    """The DP-SGD parameters a site commits to for the whole run."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    max_grad_norm: float
    target_epsilon: float
    target_delta: float
    accountant: str

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Opacus' Poisson loader takes 1/sample_rate steps per epoch, sample_rate = 1/len(loader)."""
    return max(1, math.ceil(num_samples / batch_size))


@functools.lru_cache(maxsize=256)  # a pure function of its arguments, asked again every round
def plan_dp(
    num_samples: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    target_delta: float,
    max_grad_norm: float,
    accountant: str,
) -> DPPlan:
    """Noise for the whole run: every round the site may join, every local epoch."""
    if target_delta >= 1.0 / num_samples:
        raise ValueError(
            f"privacy.target_delta {target_delta:g} must be below 1/n = {1.0 / num_samples:.3g} for this site's "
            f"{num_samples} training samples; lower target_delta"
        )
    per_epoch = steps_per_epoch(num_samples, batch_size)
    sample_rate = 1.0 / per_epoch
    steps = per_epoch * local_epochs
    sigma = get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        sample_rate=sample_rate,
        steps=steps * rounds,
        accountant=accountant,
    )
    return DPPlan(sigma, sample_rate, steps, rounds, max_grad_norm, target_epsilon, target_delta, accountant)


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """ε of a whole history of (noise multiplier, sample rate, steps), composed by Opacus."""
    if not history:
        return 0.0
    steps = [(float(sigma), float(q), int(n)) for sigma, q, n in history]
    if accountant == "rdp":  # RDP adds up over steps: consecutive runs of one (σ, q) merge exactly
        merged: list[tuple[float, float, int]] = []
        for sigma, q, n in steps:
            if merged and merged[-1][:2] == (sigma, q):
                merged[-1] = (sigma, q, merged[-1][2] + n)
            else:
                merged.append((sigma, q, n))
        steps = merged
    return _epsilon(tuple(steps), delta, accountant)


@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the RDP bound is then conservative (ε over-, never under-stated).
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta))


def require_secure_rng() -> None:
    if importlib.util.find_spec("torchcsprng") is None:
        raise ValueError(
            "privacy.secure_mode: true needs the torchcsprng package, which is not installed at this site; "
            "install it or set secure_mode: false"
        )


class PrivacyLedger:
    """One site's spent budget per run, kept as Opacus accountant history on the site's disk.

    The file survives process restarts, so a site that crashes and rejoins keeps its ε.
    Writes are atomic: a crash mid-write leaves the previous ledger intact.
    """

    def __init__(self, path: Path, run_key: str) -> None:
        self.path = path
        self.run_key = run_key
        self._data = self._read()

    def _read(self) -> dict:
        if not self.path.exists():
            return {"runs": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise RuntimeError(f"privacy ledger {self.path} is unreadable ({err}); restore it from backup") from None
        if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
            raise RuntimeError(f"privacy ledger {self.path} is not a fedtransfer ledger; restore it from backup")
        return data

    @property
    def entry(self) -> dict:
        return self._data["runs"].get(self.run_key, {"history": [], "rounds": []})

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [tuple(h) for h in self.entry["history"]]

    def spent(self, delta: float, accountant: str) -> float:
        return epsilon_of(self.history, delta, accountant)

    def spent_in_other_runs(self, delta: float, accountant: str) -> float:
        """ε of every other run on this site's data, composed: what a site-wide cap must count."""
        others = [tuple(h) for key, run in self._data["runs"].items() if key != self.run_key for h in run["history"]]
        return epsilon_of(others, delta, accountant)

    def spent_before(self, delta: float, accountant: str) -> float | None:
        """ε of the runs this ledger held before this run first trained, composed; None if it never trained.

        The ledger's `runs` object keeps the order in which runs first recorded a round (JSON
        objects keep insertion order through Python's json), so an auditor looking back at an
        old run counts what the site had spent when that run began, not runs made afterwards.
        """
        keys = list(self._data["runs"])
        if self.run_key not in keys:
            return None
        earlier = keys[: keys.index(self.run_key)]
        return epsilon_of([tuple(h) for key in earlier for h in self._data["runs"][key]["history"]], delta, accountant)

    def check_round(self, plan: DPPlan) -> float:
        """ε after one more round of `plan`; raises BudgetExceeded if it passes the target."""
        after = epsilon_of(
            [*self.history, (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)],
            plan.target_delta,
            plan.accountant,
        )
        if after > plan.target_epsilon + EPS_SLACK:
            spent = self.spent(plan.target_delta, plan.accountant)
            raise BudgetExceeded(
                f"privacy budget: another round would bring ε from {spent:.3f} to {after:.3f}, "
                f"past this site's target ε = {plan.target_epsilon:g} (δ = {plan.target_delta:g})"
            )
        return after

    def record_round(self, server_round: int, plan: DPPlan, history: list[tuple[float, float, int]]) -> float:
        """Store the accountant history after a round; returns the cumulative ε."""
        epsilon = epsilon_of(history, plan.target_delta, plan.accountant)
        entry = self.entry
        entry["history"] = [list(h) for h in history]
        entry["plan"] = asdict(plan)
        entry["rounds"] = entry["rounds"] + [{"round": server_round, "steps": plan.steps_per_round, "epsilon": epsilon}]
        self._data["runs"][self.run_key] = entry
        atomic.write_text(self.path, json.dumps(self._data, indent=1))
        return epsilon
