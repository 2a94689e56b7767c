"""What every twin shares: the run's facts (``Run``), the step's plain-PyTorch skeleton (``Twin``), and the few
pieces of attack code the methods' authors all write the same way (PGD by hand, the eval-mode switch, a hook that
keeps the penultimate features of a forward pass)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Run:
    """The facts of a run a twin needs: the attack budget, the data's numbers, the schedule, the seed and (BiLAW)
    the held-out validation split on the device."""

    eps: float
    alpha: float
    steps: int
    num_classes: int
    num_train: int
    epochs: int
    milestones: tuple[int, ...] = ()
    seed: int = 0
    data: str = "digits"
    model: str = "digits-cnn"
    validation: tuple[Tensor, Tensor] | None = None

    @classmethod
    def of(cls, trainer: Any) -> Run:
        """The facts of an advplug ``Trainer``'s run (its config and data; nothing from its plugins)."""
        cfg, data = trainer.cfg, trainer.data
        val = data.validation
        return cls(
            eps=cfg.eps,
            alpha=cfg.alpha,
            steps=cfg.steps,
            num_classes=data.num_classes,
            num_train=data.num_train,
            epochs=cfg.epochs,
            milestones=tuple(cfg.milestones),
            seed=cfg.seed,
            data=cfg.data,
            model=cfg.model,
            validation=None if val is None else (val[0].to(trainer.device), val[1].to(trainer.device)),
        )


class Twin:
    """One method's training step written as a researcher writes it: attack, forward, loss, backward, update.

    ``step(x, y, index, epoch)`` trains on one batch and returns the loss (detached); ``end_epoch(epoch)`` does
    the method's per-epoch upkeep (0-based epoch, as ``range(epochs)`` counts); ``epoch(batches, epoch)`` runs a
    whole pass over ``(x, y, index)`` batches."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, run: Run) -> None:
        self.model, self.opt, self.run = model, opt, run

    def step(self, x: Tensor, y: Tensor, index: Tensor, epoch: int) -> Tensor:
        raise NotImplementedError

    def end_epoch(self, epoch: int) -> None:
        return None

    def update(self, loss: Tensor) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def epoch(self, batches: Any, epoch: int) -> None:
        batches.set_epoch(epoch)
        self.model.train()
        for x, y, index in batches:
            self.step(x, y, index, epoch)
        self.end_epoch(epoch)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The whole model in eval mode while attacking (TRADES', MART's, MAIL's, GAIRAT's code), then back."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def start(x: Tensor, eps: float, how: str) -> Tensor:
    """The attack's first iterate: ``uniform`` in the eps-ball clamped to [0, 1] (Madry, GAIRAT), ``normal`` =
    ``x + 0.001 N(0, 1)`` not clamped (TRADES', MART's, MAIL's code)."""
    if how == "uniform":
        return torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1).detach()
    return (x + 0.001 * torch.randn_like(x)).detach()


def project(adv: Tensor, x: Tensor, eps: float) -> Tensor:
    return torch.clamp(x + torch.clamp(adv - x, -eps, eps), 0, 1).detach()


def pgd(model: nn.Module, x: Tensor, y: Tensor, run: Run, how: str = "uniform") -> tuple[Tensor, Tensor]:
    """PGD-K on the mean cross-entropy in eval mode, written out; ``(x_adv, kappa)`` with kappa the iterations at
    which the prediction (before the update) was still the label (GAIRAT's ``GA_PGD``)."""
    kappa = torch.zeros_like(y)
    with eval_mode(model):
        adv = start(x, run.eps, how)
        for _ in range(run.steps):
            adv.requires_grad_(True)
            logits = model(adv)
            kappa += logits.detach().argmax(1) == y
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), adv)
            adv = project(adv.detach() + run.alpha * grad.sign(), x, run.eps)
    return adv, kappa


def margin(probs: Tensor, y: Tensor) -> Tensor:
    """``p_y - max_{j != y} p_j`` per row."""
    p_y = probs.gather(1, y[:, None]).squeeze(1)
    return p_y - probs.scatter(1, y[:, None], float("-inf")).amax(1)


class Penultimate:
    """Keeps the input of the model's last ``nn.Linear`` at every forward (the penultimate features)."""

    def __init__(self, model: nn.Module) -> None:
        self.last: Tensor | None = None
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        head.register_forward_pre_hook(self.keep)

    def keep(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self.last = inputs[0]

    def __call__(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, features)`` of one forward pass."""
        logits = model(x)
        return logits, self.last
