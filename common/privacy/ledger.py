"""A site's privacy ledger: the accountant history it has spent, per run, on its own disk.

The ε a site reports is always its cumulative ε, across rounds and restarts: the history
survives the process, and every release (each round, the feature statistics) is counted
before it is sent (`check_round`, then `record_round`). Composition is `epsilon_of`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedtransfer.common.privacy.calibration import epsilon_of
from fedtransfer.common.privacy.events import History, SelfComposedDpEvent, from_json, to_json
from fedtransfer.common.privacy.plans import Plan
from fedtransfer.common.storage import atomic

EPS_SLACK = 1e-9  # float noise between identical accountant calls


class BudgetExceeded(RuntimeError):
    """Training this round would take the site past its privacy budget."""


class PrivacyLedger:
    """One site's spent budget per run, kept as accountant events on the site's disk.

    The file survives process restarts, so a site that crashes and rejoins keeps its ε.
    Writes are atomic: a crash mid-write leaves the previous ledger intact. Each event is
    stored as the list ledgers have always held (`events.to_json`), so older ledgers load as they are;
    `plan` is the run's plan as `Plan.as_record` gives it, for people reading the file (never read back).
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
    def history(self) -> History:
        return self._events(self.entry)

    def _events(self, run: dict) -> History:
        try:
            return [from_json(h) for h in run["history"]]
        except (ValueError, TypeError) as err:
            raise RuntimeError(f"privacy ledger {self.path}: {err}; restore it from backup") from None

    @property
    def evaluation(self) -> dict:
        """The run's evaluation releases: their own history and rounds (parallel to training's, see below)."""
        return self.entry.get("evaluation", {"history": [], "rounds": []})

    @property
    def evaluation_history(self) -> History:
        return self._events(self.evaluation)

    def check_evaluation(
        self, event: SelfComposedDpEvent, *, target_epsilon: float, delta: float, accountant: str
    ) -> float:
        """ε of the evaluation releases after one more (`event`); BudgetExceeded past the evaluation budget.

        The evaluation's history is kept apart from training's: its records (the test split) are not the
        training records, so the two budgets compose in parallel (each record is protected by one of them).
        """
        after = epsilon_of([*self.evaluation_history, event], delta, accountant)
        if after > target_epsilon + EPS_SLACK:
            spent = epsilon_of(self.evaluation_history, delta, accountant)
            raise BudgetExceeded(
                f"evaluation budget: another evaluation would bring its ε from {spent:.3f} to {after:.3f}, "
                f"past privacy.evaluation_epsilon = {target_epsilon:g} (δ = {delta:g})"
            )
        return after

    def record_evaluation(
        self, server_round: int, event: SelfComposedDpEvent, *, delta: float, accountant: str, plan: dict
    ) -> float:
        """Store one evaluation release (before it is sent); returns the evaluation ε so far."""
        history = [*self.evaluation_history, event]
        epsilon = epsilon_of(history, delta, accountant)
        entry = self.entry
        rounds = [*self.evaluation["rounds"], {"round": server_round, "epsilon": epsilon}]
        entry["evaluation"] = {"history": [to_json(e) for e in history], "rounds": rounds, "plan": plan}
        self._data["runs"][self.run_key] = entry
        atomic.write_text(self.path, json.dumps(self._data, indent=1))
        return epsilon

    def spent(self, delta: float, accountant: str) -> float:
        return epsilon_of(self.history, delta, accountant)

    def spent_in_other_runs(self, delta: float, accountant: str) -> float:
        """ε of every other run on this site's data, composed: what a site-wide cap must count."""
        others = [e for key, run in self._data["runs"].items() if key != self.run_key for e in self._events(run)]
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
        return epsilon_of([e for key in earlier for e in self._events(self._data["runs"][key])], delta, accountant)

    def check_round(self, plan: Plan, step: SelfComposedDpEvent | None = None) -> float:
        """ε after one more round of `plan` (or `step`: the statistics release); BudgetExceeded past the target."""
        after = epsilon_of([*self.history, step or plan.round_event], plan.target_delta, plan.accountant)
        if after > plan.target_epsilon + EPS_SLACK:
            spent = self.spent(plan.target_delta, plan.accountant)
            raise BudgetExceeded(
                f"privacy budget: another round would bring ε from {spent:.3f} to {after:.3f}, "
                f"past this site's target ε = {plan.target_epsilon:g} (δ = {plan.target_delta:g})"
            )
        return after

    def record_round(self, server_round: int, plan: Plan, history: History, release: str | None = None) -> float:
        """Store the accountant history after a round (or a named release: round 0's statistics); returns ε."""
        epsilon = epsilon_of(history, plan.target_delta, plan.accountant)
        entry = self.entry
        entry["history"] = [to_json(e) for e in history]
        entry["plan"] = plan.as_record()
        steps = 1 if release else plan.steps_per_round
        done = {"round": server_round, "steps": steps, "epsilon": epsilon} | ({"release": release} if release else {})
        if plan.distributed:  # the second ε of distributed trust: against this site's own message
            done["epsilon_individual"] = epsilon_of(history, plan.target_delta, plan.accountant, individual=True)
        entry["rounds"] = entry["rounds"] + [done]
        self._data["runs"][self.run_key] = entry
        atomic.write_text(self.path, json.dumps(self._data, indent=1))
        return epsilon
