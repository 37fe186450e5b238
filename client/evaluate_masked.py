"""A site's evaluation under distributed trust: its statistics go only masked, in the SecAgg+ round's slots.

Under `privacy.trust: distributed` the server adds zero tensors named like the statistics to the head of a round
that carries an evaluation (the slots, `common.privacy.evaluation_skellam.slots`). A site asked to score the model
fills them with its integer statistics plus its Skellam share (common/privacy/evaluation_skellam.py), every other
site of the round with its share on zeros, and Flower's `secaggplus_mod` masks them with the head: the server
learns only their sum. A share never leaves unmasked: asked for an evaluation without slots, the site declines it.
"""

from __future__ import annotations

import torch
from fedtransfer.client.secure import head_names
from fedtransfer.client.site import Site
from fedtransfer.common.config.run import RunConfig
from fedtransfer.common.privacy.evaluation_skellam import (
    SkellamEvaluationPlan,
    evaluation_quantum,
    plan_skellam_evaluation,
    share_values,
    slots,
)
from fedtransfer.common.privacy.fedsgd import make_generator
from fedtransfer.common.privacy.mechanisms import mechanism_for
from fedtransfer.common.wire.protocol import Cfg, Rec
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

NOISE_SALT = 0x6D61736B  # "mask": the share a site adds on zeros is never its evaluation's or a training's noise


def evaluation_releases(cfg: RunConfig) -> int:
    """How many evaluations the run may ask a site for: the rounds `train.evaluates` names (round 0 with the
    statistics release), the final model's included; at least 1."""
    first = 0 if cfg.privacy.feature_stats else 1
    return max(sum(cfg.train.evaluates(r) for r in range(first, cfg.train.rounds + 1)), 1)


def masked_plan(cfg: RunConfig, num_classes: int) -> SkellamEvaluationPlan:
    """The run's plan for masked evaluations: the same at every site (public configuration only)."""
    p, t, s = cfg.privacy, cfg.train, cfg.secagg
    return plan_skellam_evaluation(
        releases=evaluation_releases(cfg),
        target_epsilon=p.evaluation_budget,
        target_delta=p.target_delta,
        accountant=p.accountant,
        num_classes=num_classes,
        quantum=evaluation_quantum(s),
        min_survivors=s.fewest_survivors(t.min_sites),
        colluding_sites=p.colluding_sites,
    )


def masked_evaluation(cfg: RunConfig, conf: ConfigRecord, *, secure: bool) -> bool | None:
    """Whether a training message's evaluation goes masked (True), Gaussian and plain (None: local trust or a
    plain message), or must be declined (False: distributed trust, but the round holds no slots for it)."""
    if not secure or not mechanism_for(cfg).distributed:
        return None
    return bool(slots(head_names(conf)))


def with_slots(site: Site, cfg: RunConfig, answer: RecordDict, conf: ConfigRecord, server_round: int) -> RecordDict:
    """The reply as SecAgg+ masks it: the slots filled with the evaluation's values, or this site's share on zeros.

    The share on zeros is seeded by the round (a replayed reply sends the same values); it is no release: it
    depends on no record. The reply's own evaluation record is taken out, so nothing of it travels unmasked.
    """
    names = slots(head_names(conf))
    if not names:
        return answer
    out = RecordDict(dict(answer.items()))
    if Rec.EVALUATION in out.array_records:
        values = {k: v.numpy() for k, v in out.pop(Rec.EVALUATION).items()}
    else:
        plan = masked_plan(cfg, len(site.data.test.classes))
        seed = site.round_seed(str(conf[Cfg.RUN_ID]), server_round) ^ NOISE_SALT
        generator = make_generator(seed, cfg.privacy.secure_mode, torch.device("cpu"))
        values = share_values(None, plan, len(site.data.test.classes), generator)
    out[Rec.ARRAYS] = ArrayRecord({**dict(answer[Rec.ARRAYS].items()), **{n: Array(values[n]) for n in names}})
    return out
