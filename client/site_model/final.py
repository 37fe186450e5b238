"""A site's final model: whichever of going alone, the global model, or the global model fine-tuned on the
site's own records does best on a validation split carved from the site's training split.

Why: a site joins to get a better model than it could train alone. The global model is trained under DP on
everyone's records; a site with enough of its own may beat it at home. So the site scores, on records it
held out of its own training split (never its test split), every candidate from "alone" (a logistic
regression on its own features, no global start, regularisation chosen on the same validation split) to
"global" (no local training), with fine-tuned copies of the global model pulled towards it in between
(`pull λ`, the proximal pull of client/site_model/personal.py). Being chosen on validation, the final model is at least
as good there as alone and as global.

Between alone and global also stand mixes of the two models' class probabilities (`mix w`, w the alone
model's share) and, where the site has rare classes, gates (`gate b`: the global model decides whether a record
is of the site's own classes, alone decides which). The rule: among the candidates within one paired standard
error of the lowest validation loss, the lowest-loss one that keeps the global model's answer on pseudo-records
of the site's rare classes (client/site_model/guard.py); where none does, the lowest-loss one. Why: the site's
validation holds only its own classes, so lowest loss alone picked alone-like models that forgot every class
the site had not seen (1 point better than alone at home, 10-40 points worse than global on the others' data,
benchmarks/collaboration.py). The winner is then refitted on the whole training split (alone, gated, mixed and
pulled candidates; the global model stays as it came).

No DP: these records never leave the site, and neither does the model. This module trains and chooses;
client/site_model/personal.py decides when, and client/site_model/report.py writes what the site sees.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from fedtransfer.client.site_model.guard import GUARD_MARGIN, keeps, pseudo_records, rare_classes
from fedtransfer.common.model.head import FEATURE_SCALE, make_head
from torch import nn

PULLS = (1.0, 0.1, 0.01, 0.0)  # the fine-tuned candidates, closest to the global model first
MIX_WEIGHTS = (0.25, 0.5, 0.75)  # the alone model's share of a mixed candidate, closest to the global model first
ALONE_C = (1.0, 10.0, 100.0, 1000.0)  # inverse regularisation of the alone model, on unit-length features
GATE_BIASES = (0.0, 1.0, 2.0, 3.0)  # the log-odds a Gate adds to the site's own classes, closest to global first
ABSENT_LOGIT = -30.0  # an alone model's logit for a class its site never saw
VALIDATION_SHARE = 0.2


@dataclass(frozen=True)
class Tuning:
    """How the candidates train: steps of plain SGD (no DP), batch size, learning rate, and the seed.

    A fixed number of steps rather than epochs: a site of 80 records and one of 8,000 both get enough
    updates to move from the global model, and a candidate that overfits loses on validation.
    """

    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 0.5
    seed: int = 0
    alone: bool = True  # False where the features are not vectors a logistic regression can take (fine-tuning)


@dataclass(frozen=True)
class Candidate:
    """One candidate's validation figures: mean cross-entropy, accuracy, on how many records, and what it keeps
    of the global model (client/site_model/guard.py)."""

    name: str
    loss: float
    accuracy: float
    records: int
    kept: float = 1.0  # share of pseudo-records of the site's rare classes on which it answers as global does


@dataclass(frozen=True)
class FinalModel:
    """The chosen model (refitted on the whole training split), which candidate it is, why, and all candidates.

    `alone` is the alone candidate refitted on the whole training split too, chosen or not: the site's report
    scores it beside the final model (None where no alone model can be fitted).
    """

    model: nn.Module
    chosen: str
    reason: str
    candidates: tuple[Candidate, ...]
    alone: nn.Module | None


class Mix(nn.Module):
    """A convex mix of two models' class probabilities, `weight` of `alone`'s: its output is the mix's log.

    Why a mix of probabilities rather than a model fitted between the two: at home the alone model is sharp on
    the site's own classes, while only the global model knows the classes the site never saw (alone gives them
    ABSENT_LOGIT). A mix keeps both; its log-probabilities are valid logits for argmax, softmax and
    cross-entropy, so the mix stands wherever a head does.
    """

    def __init__(self, alone: nn.Module, global_model: nn.Module, weight: float) -> None:
        super().__init__()
        self.alone, self.global_model, self.weight = alone, global_model, float(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.weight * self.alone(x).softmax(-1) + (1.0 - self.weight) * self.global_model(x).softmax(-1)
        return p.clamp_min(1e-30).log()


class Gate(nn.Module):
    """The global model says whether a record is of the site's own classes; among them, the site's own model says
    which. Its output is a log-probability per class.

    Why: under label skew a site's records cover a few classes. Its alone model is sharp among them and blind
    to the rest (ABSENT_LOGIT); the global model knows every class, less sharply. Here the group "one of the
    site's classes" gets the global model's probability, shared out among those classes as the site's model
    says, and every other class keeps the global model's own. `bias` (a log-odds, chosen on the site's
    validation split) raises the site's group: the site's own prior, as much of it as its validation asks for.
    """

    def __init__(self, alone: nn.Module, global_model: nn.Module, present: torch.Tensor, bias: float) -> None:
        super().__init__()
        self.alone, self.global_model = alone, global_model
        self.register_buffer("present", present.bool().clone())
        self.register_buffer("bias", torch.tensor(float(bias)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.global_model(x).log_softmax(-1)
        own = self.alone(x)[:, self.present].log_softmax(-1)
        group = shared[:, self.present].logsumexp(-1, keepdim=True)
        out = shared.clone()
        out[:, self.present] = group + own + self.bias
        return out.log_softmax(-1)


def validation_split(labels: torch.Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) indices of a site's training split: 20%, stratified where every class has 2 records.

    A site needs at least one record on each side; below 10 records there is nothing to hold out and the
    global model is the only honest choice (validation is then empty).
    """
    from sklearn.model_selection import train_test_split

    y = labels.cpu().numpy()
    index = np.arange(len(y))
    if len(y) < 10:
        return index, index[:0]
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    fit, val = train_test_split(index, test_size=VALIDATION_SHARE, random_state=seed % 2**32, stratify=stratify)
    return np.sort(fit), np.sort(val)


def fit_alone(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float) -> nn.Module:
    """A plain multinomial logistic regression on the site's unit-length features, as a head of the global shape.

    The objective is scikit-learn's (0.5 |W|^2 + C times the summed cross-entropy), minimised by full-batch
    L-BFGS in torch: scikit-learn's solver took seconds per fit on a site's 1,280-dim features, and a site
    fits one per candidate C. The head scales unit-length features by FEATURE_SCALE before its linear layer,
    so its weights are the regression's divided by that scale; a class the site never saw gets ABSENT_LOGIT.
    """
    unit = nn.functional.normalize(x.float().cpu(), dim=1)
    labels = y.long().cpu()
    present = torch.unique(labels)
    head = make_head(x.shape[1], num_classes)
    linear = head[-1]
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.fill_(ABSENT_LOGIT)
        linear.bias[present] = 0.0
    if len(present) == 1:  # one class only: always that class
        return head
    target = torch.searchsorted(present, labels)
    weight = torch.zeros(len(present), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(present), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")
    decay = 1.0 / (2.0 * c * len(labels))  # scikit-learn's objective divided by C times the record count

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(unit @ weight.T + bias, target) + decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        linear.weight[present] = weight.detach() / FEATURE_SCALE
        linear.bias[present] = bias.detach()
    return head


def record_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-record cross-entropy and correctness of `model` on (x, y)."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y, reduction="none")
    return loss.numpy().astype(np.float64), (logits.argmax(1) == y).numpy().astype(np.float64)


def pulled(global_model: nn.Module, x: torch.Tensor, y: torch.Tensor, pull: float, tuning: Tuning) -> nn.Module:
    """The global model fine-tuned on (x, y) without DP, pulled towards itself with strength `pull`.

    The proximal step of FedProx/Ditto after every SGD step (as common.privacy.dp_sgd does for a personal
    model), on minibatches drawn by index: no DP means no per-record machinery, and this runs once per
    candidate on every site, so it stays a plain loop over tensors.
    """
    model = copy.deepcopy(global_model).train()
    anchor = [p.detach().clone() for p in global_model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=tuning.learning_rate)
    g = torch.Generator().manual_seed(tuning.seed)
    for _ in range(tuning.steps):
        batch = torch.randint(0, len(y), (min(tuning.batch_size, len(y)),), generator=g)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
        if pull > 0:
            with torch.no_grad():
                for p, a in zip(model.parameters(), anchor, strict=True):
                    p.sub_(tuning.learning_rate * pull * (p - a))
    return model.eval()


def candidate_name(pull: float | None) -> str:
    return "alone" if pull is None else f"pull {pull:g}"


def choose_final(
    global_model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, tuning: Tuning
) -> FinalModel:
    """The site's final model: among the candidates within one paired standard error of the lowest validation
    loss, the lowest-loss one that keeps what the global model knows of the site's rare classes
    (client/site_model/guard.py); the lowest-loss candidate where none does."""
    global_model = global_model.cpu().eval()
    x, y = x.float().cpu(), y.long().cpu()
    fit, val = validation_split(y, tuning.seed)
    if len(val) == 0:
        reason = f"{len(y)} training records: too few to hold any out for validation; the global model is kept"
        alone = fit_alone(x, y, num_classes, ALONE_C[0]) if tuning.alone and len(y) else None
        return FinalModel(copy.deepcopy(global_model), "global", reason, (), alone)
    fx, fy, vx, vy = x[fit], y[fit], x[val], y[val]
    rare = rare_classes(y, num_classes)
    builders = {"global": lambda ax, ay: copy.deepcopy(global_model)}
    if tuning.alone:
        on_fit = {c: fit_alone(fx, fy, num_classes, c) for c in ALONE_C}  # deterministic: each C fitted once
        best_c = min(ALONE_C, key=lambda c: record_losses(on_fit[c], vx, vy)[0].mean())

        def alone_on(ax: torch.Tensor, ay: torch.Tensor) -> nn.Module:
            """The alone model at best_c on (ax, ay): the search's own fit on the fit split, else fitted here."""
            return on_fit[best_c] if ax is fx and ay is fy else fit_alone(ax, ay, num_classes, best_c)

        if rare.any() and not rare.all():
            for b in GATE_BIASES:
                builders[f"gate {b:g}"] = lambda ax, ay, b=b: Gate(alone_on(ax, ay), global_model, ~rare, b)
    for pull in PULLS:
        builders[candidate_name(pull)] = lambda ax, ay, p=pull: pulled(global_model, ax, ay, p, tuning)
    if tuning.alone:
        for w in MIX_WEIGHTS:
            builders[f"mix {w:g}"] = lambda ax, ay, w=w: Mix(alone_on(ax, ay), global_model, w)
        builders["alone"] = alone_on
    on_fit_models = {name: build(fx, fy) for name, build in builders.items()}
    losses = {name: record_losses(m, vx, vy) for name, m in on_fit_models.items()}
    px, py = pseudo_records(global_model, fx, rare, tuning.seed)
    kept = {name: keeps(m, px, py) for name, m in on_fit_models.items()}
    candidates = tuple(
        Candidate(n, float(lo.mean()), float(ok.mean()), len(val), kept[n]) for n, (lo, ok) in losses.items()
    )
    chosen = _select(candidates, losses)
    reason = _reason(chosen, losses, len(val), len(py))
    model = builders[chosen.name](x, y)
    alone = None
    if tuning.alone:
        alone = model if chosen.name == "alone" else model.alone if isinstance(model, Mix | Gate) else None
        alone = alone if alone is not None else builders["alone"](x, y)
    return FinalModel(model.eval(), chosen.name, reason, candidates, alone)


def _select(candidates: tuple[Candidate, ...], losses: dict[str, tuple[np.ndarray, np.ndarray]]) -> Candidate:
    """The rule of choose_final. Why the standard error: at home the site gives up no more than noise can
    explain; why the guard: within that, what the federation knows of classes the site has not seen is kept.
    `min` keeps the first of equals: the candidate closer to the global model."""
    best = min(candidates, key=lambda c: c.loss)
    floor = next(c for c in candidates if c.name == "global").kept - GUARD_MARGIN
    near = [
        c
        for c in candidates
        if c.kept >= floor and c.loss <= best.loss + paired_se(losses[c.name][0], losses[best.name][0])
    ]
    return min(near, key=lambda c: c.loss) if near else best


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """The standard error of the mean per-record difference between two models on the same records."""
    d = a - b
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0


def _reason(chosen: Candidate, losses: dict[str, tuple[np.ndarray, np.ndarray]], records: int, pseudo: int) -> str:
    """Why this candidate: its validation loss, what it keeps of the global model, and by how much (in paired
    standard errors) it beats global."""
    text = f"validation loss {chosen.loss:.3f} on {records} held-out training records"
    if pseudo:
        text += f", keeps the global model's answer on {chosen.kept:.0%} of {pseudo} records of rare classes"
    if chosen.name == "global":
        return text
    gap = float(losses["global"][0].mean()) - chosen.loss
    se = paired_se(losses["global"][0], losses[chosen.name][0])
    return f"{text}; {gap:.3f} below the global model's ({gap / se:.1f} standard errors)" if se > 0 else text
