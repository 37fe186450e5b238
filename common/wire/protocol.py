"""What sites and the coordinator agree on, spelt once: message keys, audit events, refusals, DP records.

Client, server, audit and benchmarks import these names instead of writing string
literals, so a renamed key is one edit and a typo is an AttributeError, not a silent
mismatch. A site's identity and its DP parameters travel in typed records: nothing is
ever parsed back out of a human-readable sentence.

Flower's error replies carry only a code and a reason string. A site's refusal is such
an error reply (so Flower's SecAgg+ workflow sees an ordinary failure), with code
`REFUSAL_CODE` and a reason that is the JSON form of `Refusal`. Any other error (a
SuperLink answering for a lapsed node, a crashed ClientApp) is not a refusal: the server
attributes it to the node it asked and records a dropout.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from flwr.app import ConfigRecord, Error, RecordDict


class Rec(StrEnum):
    """Records of a message's RecordDict."""

    ARRAYS = "arrays"  # the head's tensors (Flower's strategies read and write this key)
    CONFIG = "config"  # the server's instructions (Flower's strategies write this key)
    METRICS = "metrics"
    SITE = "site"  # SiteIdentity
    DP = "dp"  # DPRecord, in a training reply under DP
    EVALUATION = "evaluation"  # an evaluation reply's released statistics (common/privacy/evaluation.py)
    EVALUATION_DP = "evaluation-dp"  # DPRecord of that release, with its composition with training
    # the same statistics as tensor bytes (numpy's .npy form), in a SecAgg+ training reply under local trust:
    # secaggplus_mod empties every ArrayRecord of the reply it masks, and the Gaussian release is not part of the
    # masked sum (under distributed trust the statistics go in the masked slots instead, never here)
    EVALUATION_BYTES = "evaluation-bytes"


class Cfg(StrEnum):
    """Keys of the server's config record."""

    SERVER_ROUND = "server-round"  # set by Flower's strategies
    RUN_ID = "run-id"
    FINGERPRINT = "backbone-fingerprint"
    APP_VERSION = "app-version"
    PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
    HEAD_NAMES = "head-names"  # SecAgg+ carries tensors in order, without their names
    RELEASE = "release"  # round 0: which one-shot DP release the server asks for (FEATURE_STATS, RECORD_COUNTS)
    # a training message's request to score the head it carries first (the model of the round before,
    # server-round − 1, the round named here): its evaluation rides in the training reply (one message a round)
    EVALUATE_ROUND = "evaluate-round"


FEATURE_STATS = "feature-stats"  # the release of per-class feature sums and counts (DP), before round 1
# under DP without the statistics (privacy.feature_stats: false): the release of per-class record counts alone
RECORD_COUNTS = "record-counts"


class Metric(StrEnum):
    """Keys of a reply's metric record."""

    NUM_EXAMPLES = "num-examples"  # Flower's FedAvg weights by this key; under DP a released count (dp_count.py)
    STEPS = "steps"
    WIRE_BYTES = "wire-bytes"
    TRAIN_SECONDS = "train-seconds"
    TRAIN_LOSS = "train-loss"  # only without DP: a statistic of private data that DP does not cover
    EPSILON = "epsilon"  # the site's cumulative ε in this run, after this training
    # privacy.trust: distributed: ε against one site's own message (its noise share alone); EPSILON is the aggregate's
    EPSILON_INDIVIDUAL = "epsilon-individual"
    EXPECTED_BATCH = "expected-batch"  # fedsgd: q·(the released count); the server divides the gradient sum by Σ
    EVAL_EPSILON = "eval-epsilon"  # the site's cumulative ε of its evaluation releases in this run
    EVAL_EPSILON_INDIVIDUAL = "eval-epsilon-individual"  # under distributed trust: against its own messages
    EVAL_LOSS = "eval-loss"
    EVAL_ACCURACY = "eval-accuracy"
    EVAL_BALANCED_ACCURACY = "eval-balanced-accuracy"
    # A site's AUROC exists only when its test split holds 2+ classes: it sends AUROC × defined and defined
    # (1 or 0), so the weighted means' ratio is the mean over the sites where it exists (server/federation/rounds.py).
    EVAL_AUROC = "eval-auroc"
    EVAL_AUROC_DEFINED = "eval-auroc-defined"
    # personal: the site's own model (client/site_model/personal.py) on its own test split, beside the global
    # model's scores
    PERSONAL_ACCURACY = "personal-accuracy"
    PERSONAL_BALANCED_ACCURACY = "personal-balanced-accuracy"


class Event(StrEnum):
    """Audit-log events. The coordinator's log: RUN_* to MODEL_EXPORTED; a site's: the rest."""

    RUN_STARTED = "run-started"
    RUN_RESUMED = "run-resumed"
    UPDATE_RECEIVED = "update-received"
    UPDATE_REFUSED = "update-refused"
    ROUND_AGGREGATED = "round-aggregated"
    MODEL_EXPORTED = "model-exported"
    SERVING_EXPORTED = "serving-exported"  # `fedtransfer export`: model.onnx / model.torchscript.pt, checked
    RUN_FAILED = "run-failed"
    BACKBONE_CHECKED = "backbone-checked"
    UPDATE_TRAINED = "update-trained"  # a training under SecAgg+: the plain head stays at the site
    UPDATE_SENT = "update-sent"
    REPLY_REPLAYED = "reply-replayed"
    DECLINED = "declined"
    EVALUATION_SENT = "evaluation-sent"  # an evaluation's released statistics (by hash), its DP record and ε
    # a training message asked for an evaluation the site declined (budget, split): it trains and sends none
    EVALUATION_DECLINED = "evaluation-declined"
    PERSONAL_TRAINED = "personal-trained"  # the site's own model trained (never sent): its DP choice and ε
    PERSONAL_NOT_KEPT = "personal-not-kept"  # the site's file declines a personal model (once per run)
    PERSONAL_SCORED = "personal-scored"  # its own model's and the global one's test scores: kept, never sent


class SiteStatus(StrEnum):
    """What a site did in a round, as `metrics.jsonl` and `privacy.json` record it."""

    TRAINED = "trained"  # it trained (ε spent) and its update passed screening (or went into the SecAgg+ mean)
    REFUSED = "refused"  # it sent an update the server's screening refused
    DECLINED = "declined"  # it refused the round itself (budget, policy, mismatch), with its reason
    FAILED = "failed"  # its ClientApp answered with an error that is not a refusal
    NO_REPLY = "no-reply"  # asked, but no answer came from it (crashed, lapsed, timed out)
    OFFLINE = "offline"  # known to the run, but not connected when the round started
    NOT_SELECTED = "not-selected"  # connected, but not sampled for this round (train.fraction_train < 1)


TRAININGS = (Event.UPDATE_SENT, Event.UPDATE_TRAINED)  # site-log records of a training: plain, or before masking
REFUSAL_CODE = 4001  # Error.code of a site's refusal (budget, policy, mismatch, malformed message)
_REFUSAL_TAG = "fedtransfer-refusal/1"


@dataclass(frozen=True)
class Refusal:
    """A site declining a message: who, and why in words for the operator."""

    site: str
    reason: str

    def to_error(self) -> Error:
        body = json.dumps({"format": _REFUSAL_TAG, "site": self.site, "reason": self.reason}, ensure_ascii=False)
        return Error(code=REFUSAL_CODE, reason=body)

    @staticmethod
    def from_error(error: Error) -> Refusal | None:
        """The refusal an error reply carries, or None when it is any other failure."""
        if error.code != REFUSAL_CODE or not error.reason:
            return None
        try:
            body = json.loads(error.reason)
        except ValueError:
            return None
        if not isinstance(body, dict) or body.get("format") != _REFUSAL_TAG:
            return None
        site, reason = body.get("site"), body.get("reason")
        if not isinstance(site, str) or not site or not isinstance(reason, str):
            return None
        return Refusal(site, reason)


def site_record(name: str) -> ConfigRecord:
    return ConfigRecord({"name": name})


def site_of(content: RecordDict) -> str | None:
    """The site name a reply's own SITE record gives, or None."""
    record = content.config_records.get(Rec.SITE)
    name = record.get("name") if record is not None else None
    return name if isinstance(name, str) and name else None


SKELLAM_FIELDS = ("noise_variance", "noise_share", "min_survivors", "quantum", "l1_sensitivity", "l2_sensitivity")


@dataclass(frozen=True)
class DPRecord:
    """One training's DP parameters: what the site logs, sends and the auditor recomputes ε from.

    One spelling everywhere: the audit log's `dp` field, the reply's DP record and each
    round of `privacy.json` use these field names. Under `privacy.trust: distributed` the
    mechanism is "skellam": `noise_variance` μ is the aggregate's per-coordinate variance in
    units of `quantum` γ, `noise_share` the variance this site added (μ/(`min_survivors` − `colluding_sites`)),
    the sensitivities are integer ones, and `noise_multiplier` is √μ/Δ2 (for policies).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    accountant: str
    mechanism: str = "gaussian"
    noise_variance: float = 0.0
    noise_share: float = 0.0
    min_survivors: int = 0
    quantum: float = 0.0
    l1_sensitivity: float = 0.0
    l2_sensitivity: float = 0.0
    colluding_sites: int = 0  # t: sites that may reveal their shares (each adds μ/(K_min − t))

    FIELDS = (
        "noise_multiplier",
        "sample_rate",
        "steps",
        "clip_norm",
        "delta",
        "accountant",
        "mechanism",
        *SKELLAM_FIELDS,
        "colluding_sites",
    )

    def as_dict(self) -> dict[str, Any]:
        """All fields; a Gaussian record leaves out the mechanism and the Skellam fields, a Skellam one t when it is
        0 (records keep the form they had before those existed, and read back the same)."""
        out = asdict(self)
        if self.mechanism == "gaussian":
            for name in ("mechanism", *SKELLAM_FIELDS):
                del out[name]
        if not self.colluding_sites:
            del out["colluding_sites"]
        return out

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self.as_dict())

    @staticmethod
    def from_mapping(raw: Any) -> DPRecord:
        """From a log entry, a JSON object or a ConfigRecord; ValueError naming the field that is wrong."""
        if not hasattr(raw, "get"):
            raise ValueError(f"DP parameters must be an object, got {type(raw).__name__}")
        fields = [
            ("noise_multiplier", float),
            ("sample_rate", float),
            ("steps", int),
            ("clip_norm", float),
            ("delta", float),
            ("accountant", str),
        ]
        mechanism = raw.get("mechanism", "gaussian")
        if mechanism not in ("gaussian", "skellam"):
            raise ValueError(f"DP field mechanism must be gaussian or skellam, got {mechanism!r:.40}")
        if mechanism == "skellam":
            fields += [(n, int if n == "min_survivors" else float) for n in SKELLAM_FIELDS]
        values: dict[str, Any] = {"mechanism": mechanism}
        for name, kind in fields:
            values[name] = _typed(name, kind, raw.get(name))
        if mechanism == "skellam" and raw.get("colluding_sites") is not None:  # records before it existed: t = 0
            values["colluding_sites"] = _typed("colluding_sites", int, raw.get("colluding_sites"))
        return DPRecord(**values)


def _typed(name: str, kind: type, value: Any) -> Any:
    numeric = kind is not str and isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ValueError(f"DP field {name} must be an integer, got {value!r:.40}")
    if kind is float and not (numeric and math.isfinite(value)):
        raise ValueError(f"DP field {name} must be a finite number, got {value!r:.40}")
    if kind is str and not isinstance(value, str):
        raise ValueError(f"DP field {name} must be a string, got {value!r:.40}")
    return kind(value)
