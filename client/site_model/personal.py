"""A site's own model (personal:), Ditto-style: trained and kept at the site, never sent.

Every round, when the server's aggregate arrives for evaluation, the site trains its personal
copy (the same head, or fine-tuned top, as the global model) for `personal.epochs` local
epochs on its own training split, pulled towards the round's global model with strength
`personal.lam`, and scores both models on its own test split. The personal model starts as
the first global model it sees and is kept in `state_dir/personal/`, one file per run.

What is protected, and from whom:
- the personal model's tensors never leave the site: no message carries them, and the
  server, the other sites and the auditor never see them;
- what does leave is the two accuracies (and balanced accuracies) on the site's test split,
  which no DP covers, like every evaluation metric (train.fraction_evaluate: 0 sends none);
- with DP (`personal.dp: true`) the personal model is itself (ε, δ)-DP for the site's training
  records, with its own budget (`personal.target_epsilon`, the run's δ, accounted in
  `personal-ledger.json`): the site may then publish or deploy it.
  The choice is the site's: its own file's `policy.personal` (dp, target_epsilon) wins over the
  run config's `personal:`, and each `personal-trained` record says what was chosen and by whom.
  Someone who sees both the global updates and the personal model faces at most the sum of
  the two ε (sequential composition). With `dp: false` it is trained without noise: keep it
  inside the site (it may memorise its records).
- whether to keep one at all is the site's too (`policy.personal.keep`): with false it trains
  none, stores none and reports only the global model's scores, and its audit log says so once
  per run (`personal-not-kept`); with true it keeps one even where the run proposes none.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from fedtransfer.client.site import Site
from fedtransfer.client.site_log import record
from fedtransfer.client.site_model.final import Tuning, choose_final
from fedtransfer.client.site_model.report import build_report, write_report
from fedtransfer.client.site_model.threshold import site_threshold
from fedtransfer.common.config.run import PersonalConfig, RunConfig, SitePolicy
from fedtransfer.common.model.head import Scores, evaluate_head
from fedtransfer.common.privacy.calibration import plan_dp
from fedtransfer.common.privacy.dp_sgd import LocalTraining, train_head
from fedtransfer.common.privacy.ledger import PrivacyLedger
from fedtransfer.common.privacy.plans import GaussianPlan
from fedtransfer.common.storage import atomic
from fedtransfer.common.wire.protocol import Event
from flwr.app import Message
from torch import nn


@dataclass(frozen=True)
class PersonalChoice:
    """How this site trains its personal model, and who chose each part: the site's own file or the run config."""

    dp: bool
    dp_chosen_by: Literal["site", "run"]
    target_epsilon: float | None  # None without DP
    target_epsilon_chosen_by: Literal["site", "run"] | None


def personal_choice(policy: SitePolicy | None, run: PersonalConfig) -> PersonalChoice:
    """The site's `policy.personal` keys where it set them, else the run's `personal:` (simulation: no policy)."""
    own = None if policy is None else policy.personal
    dp_by: Literal["site", "run"] = "site" if own is not None and own.dp is not None else "run"
    dp = own.dp if own is not None and own.dp is not None else run.dp
    if not dp:
        return PersonalChoice(False, dp_by, None, None)
    if own is not None and own.target_epsilon is not None:
        return PersonalChoice(True, dp_by, own.target_epsilon, "site")
    return PersonalChoice(True, dp_by, run.target_epsilon, "run")


def kept_by(policy: SitePolicy | None, run: PersonalConfig) -> tuple[bool, Literal["site", "run"]]:
    """Whether this site keeps a personal model, and who chose: its `policy.personal.keep`, else `personal.enabled`."""
    own = None if policy is None else policy.personal.keep
    return (run.enabled, "run") if own is None else (own, "site")


def personal_scores(
    site: Site, cfg: RunConfig, global_top: nn.Module, msg: Message, run_id: str, server_round: int
) -> Scores | None:
    """This round's scores of the site's personal model (trained first), or None where it keeps none.

    A site whose own file declines one sends no personal metric at all (the server averages over
    the sites that sent one) and records its choice once per run.
    """
    keep, chosen_by = kept_by(site.policy, cfg.personal)
    if keep and not personal_choice(site.policy, cfg.personal).dp:
        final_round(site, cfg, global_top, msg, run_id, server_round)
        return None  # the final model's scores stay in the site's report
    if keep:
        return personal_round(site, cfg, global_top, msg, run_id, server_round)
    if chosen_by == "site":
        _record_not_kept(site, msg, run_id, cfg.personal.enabled)
    return None


def _record_not_kept(site: Site, msg: Message, run_id: str, run_proposed: bool) -> None:
    """The `personal-not-kept` record, once per run: a marker file (no model) says it is written."""
    marker = site.state_dir / "personal" / f"{run_id}.not-kept"
    if marker.is_file():
        return
    record(site, msg, Event.PERSONAL_NOT_KEPT, keep_chosen_by="site", run_proposed=run_proposed)
    atomic.write_text(marker, "policy.personal.keep: false; recorded in the audit log (personal-not-kept)\n")


def personal_round(
    site: Site, cfg: RunConfig, global_top: nn.Module, msg: Message, run_id: str, server_round: int
) -> Scores:
    """Train this site's personal model for `server_round` (once per round), keep it, and score it."""
    path = site.state_dir / "personal" / f"{run_id}.pt"
    personal, done = _load(path, global_top)
    if server_round > done:  # a repeated evaluation of a round (a resumed server) trains nothing again
        p, t = cfg.personal, cfg.train
        choice = personal_choice(site.policy, p)
        plan = _plan(site, cfg, choice)
        ledger = PrivacyLedger(site.state_dir / "personal-ledger.json", run_key=run_id)
        if plan is not None:
            ledger.check_round(plan)  # BudgetExceeded: the site declines, as for a training round
        opts = LocalTraining(p.epochs, t.batch_size, p.learning_rate, t.momentum, p.lam)
        seed = site.round_seed(f"{run_id}|personal", server_round)
        outcome = train_head(
            personal,
            site.train_x,
            site.train_y,
            opts,
            plan,
            ledger.history,
            seed=seed,
            secure_mode=cfg.privacy.secure_mode,
            anchor=global_top,
        )
        epsilon = None if plan is None else ledger.record_round(server_round, plan, outcome.history)
        atomic.torch_save({"round": server_round, "state": personal.cpu().state_dict()}, path)
        dp = (
            None
            if plan is None
            else {
                "noise_multiplier": plan.noise_multiplier,
                "sample_rate": plan.sample_rate,
                "steps": outcome.steps,
                "max_grad_norm": plan.max_grad_norm,
                "target_epsilon": plan.target_epsilon,
                "target_delta": plan.target_delta,
                "accountant": plan.accountant,
            }
        )
        record(
            site,
            msg,
            Event.PERSONAL_TRAINED,
            as_round=server_round,  # the model's round: a training message carries the evaluation of the one before
            keep_chosen_by=kept_by(site.policy, p)[1],
            dp_chosen=choice.dp,
            dp_chosen_by=choice.dp_chosen_by,
            target_epsilon_chosen_by=choice.target_epsilon_chosen_by,
            dp=dp,
            epsilon=epsilon,
            lam=p.lam,
            epochs=p.epochs,
            kept=str(path),
        )
    return evaluate_head(personal.to(site.backbone.device), site.test_x, site.test_y)


def final_round(
    site: Site, cfg: RunConfig, global_top: nn.Module, msg: Message, run_id: str, server_round: int
) -> Path | None:
    """After the run's last round: the site's final model (client/site_model/final.py), kept, and its report.

    Earlier rounds train nothing: the choice is made once, from the global model the site will be left
    with. Returns the report's path, or None before the last round.
    """
    if server_round < cfg.train.rounds:
        return None
    tuning = Tuning(
        learning_rate=cfg.personal.learning_rate,
        seed=site.round_seed(f"{run_id}|final", server_round),
        alone=not cfg.finetune.active,
    )
    classes = len(site.data.test.classes)
    final = choose_final(global_top, site.train_x, site.train_y, classes, tuning)
    threshold = site_threshold(
        final.model, site.train_x, site.train_y, rule_text=cfg.personal.threshold, seed=tuning.seed, num_classes=classes
    )
    path = site.state_dir / "personal" / f"{run_id}.pt"
    kept = {"round": server_round, "chosen": final.chosen, "state": final.model.state_dict()}
    if threshold is not None:  # the site's own scores and any later use of this model apply it
        kept["threshold"] = threshold.as_dict()
    atomic.torch_save(kept, path)
    report = build_report(
        site=site.name,
        run_id=run_id,
        server_round=server_round,
        final=final,
        global_model=global_top.cpu(),
        test=(site.test_x, site.test_y),
        threshold=threshold,
    )
    choice = personal_choice(site.policy, cfg.personal)
    record(
        site,
        msg,
        Event.PERSONAL_TRAINED,
        as_round=server_round,
        keep_chosen_by=kept_by(site.policy, cfg.personal)[1],
        dp_chosen=False,
        dp_chosen_by=choice.dp_chosen_by,
        target_epsilon_chosen_by=None,
        dp=None,
        epsilon=None,
        chosen=final.chosen,
        steps=tuning.steps,
        kept=str(path),
    )
    return write_report(site.state_dir, report)


def _plan(site: Site, cfg: RunConfig, choice: PersonalChoice) -> GaussianPlan | None:
    """The personal model's own DP plan over the whole run (None when no DP was chosen for it)."""
    t, priv = cfg.train, cfg.privacy
    if choice.target_epsilon is None:
        return None
    return plan_dp(
        num_samples=len(site.train_y),
        batch_size=t.batch_size,
        local_epochs=cfg.personal.epochs,
        rounds=t.rounds,
        target_epsilon=choice.target_epsilon,
        target_delta=priv.target_delta,
        max_grad_norm=priv.max_grad_norm,
        accountant=priv.accountant,
    )


def _load(path: Path, global_top: nn.Module) -> tuple[nn.Module, int]:
    """(the personal model, the last round it trained); the round's global model the first time."""
    personal = copy.deepcopy(global_top).train()  # the global model was just evaluated (eval mode)
    if path.is_file():
        try:
            kept = torch.load(path, map_location="cpu", weights_only=True)
            personal.load_state_dict(kept["state"])
            return personal.to(next(global_top.parameters()).device), int(kept["round"])
        except (RuntimeError, KeyError, ValueError, TypeError, EOFError):
            pass  # torn or of another shape: start again from the global model
    return personal, 0
