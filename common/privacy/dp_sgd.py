"""Local training of the head on cached features, with Opacus DP-SGD.

Per-sample clipping and Gaussian noise come from Opacus' PrivacyEngine; the accountant
is restored from the site's ledger before training and saved after, so Opacus composes
every round this site has trained in this run. It lives in common/ because two parties
run the very same procedure: each site, and the auditor's empirical privacy test
(server/audit/empirical.py), which must exercise the site's code, not a copy of it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from fedtransfer.common.model.finetune import parameter_groups
from fedtransfer.common.privacy.events import History, from_opacus, to_opacus
from fedtransfer.common.privacy.plans import GaussianPlan
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class LocalTraining:
    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.0
    proximal_mu: float = 0.0  # FedProx: pull towards the round's global head


@dataclass(frozen=True)
class TrainOutcome:
    loss: float
    steps: int
    history: History  # the accountant's full history after this round


def train_head(
    head: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    opts: LocalTraining,
    plan: GaussianPlan | None,
    history: History,
    seed: int,
    secure_mode: bool = False,
    anchor: nn.Module | None = None,
) -> TrainOutcome:
    """Train `head` in place. With a plan, DP-SGD under Opacus; without, plain SGD.

    Under DP each epoch is 1/q Poisson-sampled steps at the plan's rate q (Opacus' DPDataLoader over all the
    records): the plan chooses q, from the site's released count under a run's DP plan (plan_dp), so nothing
    Opacus accounts or the site reports follows from the exact count.

    `seed` fixes batch sampling and noise for reproducible simulations; it is a site-side
    secret in deployments (see client/site.py), and ignored in secure_mode, where noise
    comes from a cryptographically secure generator. The proximal pull (`opts.proximal_mu`)
    is towards `anchor`'s parameters (a personal model's global model), else towards the start.
    """
    device = next(head.parameters()).device
    data = TensorDataset(features.to(device), labels.to(device))
    loader = DataLoader(data, batch_size=opts.batch_size, shuffle=plan is None)
    if plan is not None:  # Opacus samples at 1/len(loader): the plan's rate, not one of the exact count
        loader = DataLoader(data, batch_size=1, sampler=range(round(1 / plan.sample_rate)))
    # a fine-tuned top trains the encoder's tensors at their own rate (finetune.backbone_lr_scale)
    optimizer = torch.optim.SGD(
        parameter_groups(head, opts.learning_rate), lr=opts.learning_rate, momentum=opts.momentum
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
        # Opacus' hooks on a head fed with features (no input grad) trigger this harmless PyTorch notice.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        torch.manual_seed(seed)
        engine = None
        model: nn.Module = head
        if plan is not None:
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            engine = PrivacyEngine(accountant=plan.accountant, secure_mode=secure_mode)
            engine.accountant.history = to_opacus(history)  # Opacus steps on from what was spent
            model, optimizer, loader = engine.make_private(
                module=head,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.max_grad_norm,
                poisson_sampling=True,
            )
        start = [p.detach().clone() for p in (head if anchor is None else anchor).parameters()]
        loss, steps = _epochs(model, head, optimizer, loader, opts, private=engine is not None, anchor=start)
    new_history = from_opacus(engine.accountant.history) if engine is not None else list(history)
    if engine is not None:
        _detach_opacus(model)
    return TrainOutcome(loss, steps, new_history)


def _epochs(
    model: nn.Module,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    opts: LocalTraining,
    private: bool,
    anchor: list[torch.Tensor],
) -> tuple[float, int]:
    """The local epochs: (mean training loss, optimizer steps). Under DP, `model` is Opacus' wrapper of `head`."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    total, count, steps = 0.0, 0, 0
    for _ in range(opts.epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(y):  # Poisson sampling may draw an empty batch; it still counts as a step
                loss = criterion(model(x), y)
                loss.backward()
                total += loss.item() * len(y)
                count += len(y)
            elif private:
                # Opacus needs (zero-size) per-sample gradients to clip, noise and account an empty step
                model(x).sum().backward()
            optimizer.step()
            steps += 1
            if opts.proximal_mu > 0:
                _proximal_step(head, anchor, opts.learning_rate * opts.proximal_mu)
    return total / max(count, 1), steps


def _proximal_step(head: nn.Module, anchor: list[torch.Tensor], rate: float) -> None:
    """FedProx's proximal gradient step; data-independent, so it costs no privacy."""
    with torch.no_grad():
        for p, a in zip(head.parameters(), anchor, strict=True):
            p.sub_(rate * (p - a))


def _detach_opacus(model: nn.Module) -> None:
    """Remove Opacus hooks so the head is a plain module again for exchange and evaluation."""
    model.to_standard_module()
