"""How the run's modules execute: precision (autocast, GradScaler), DDP, ``torch.compile``, the EMA of the weights,
and the attacks made on the attack model under the run's budget."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from advplug.attacks import make_attack
from advplug.config import TrainConfig
from advplug.context import Declaration
from advplug.engine.ema import EMA


class Runtime:
    """``--precision``, ``--compile``, ``--ema`` and DDP for ``model``: ``net`` (what the step's forward passes run),
    ``attack_model`` (what the attacks run), ``scaler``, ``ema``; ``autocast()`` and ``make_attack``."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        *,
        device: torch.device,
        world: int,
        local: int,
        num_classes: int,
        declarations: dict[str, Declaration],
        new_model: Callable[[], nn.Module],
        log: Callable[[str], None],
    ) -> None:
        self.cfg, self.device, self.num_classes = cfg, device, num_classes
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        net: nn.Module = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
        twice = [n for n, d in declarations.items() if "loss" in d.needs]
        if cfg.compile and twice:  # torch.compile has no double backward: the meta-gradient needs it
            log(
                f"--compile: the step's forward runs uncompiled because {', '.join(twice)} differentiates "
                "through the loss twice (no double backward under torch.compile); the attacks are compiled"
            )
        self.net = torch.compile(net, backend=cfg.compile) if cfg.compile and not twice else net
        self.attack_model = torch.compile(model, backend=cfg.compile) if cfg.compile else model
        self.ema = EMA(model, self._shadow(new_model), cfg.ema) if cfg.ema is not None else None

    def _shadow(self, new_model: Callable[[], nn.Module]) -> nn.Module:
        """EMA's model, built under a forked RNG: its initialisation (overwritten at once) must not draw from the
        training stream, or ``--ema`` would change the raw model's trajectory."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return new_model()

    def autocast(self) -> Any:
        """The low-precision context of the training attack and the step's forward passes."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def make_attack(self, name: str, **overrides: Any) -> Any:
        """A torchattacks attack on the (unwrapped) model under the run's budget and BN mode."""
        cfg = self.cfg
        kw = {
            "eps": cfg.eps,
            "alpha": cfg.alpha,
            "steps": cfg.steps,
            "bn": cfg.attack_bn,
            "start": cfg.attack_start,
            "num_classes": self.num_classes,
            "seed": cfg.seed,
        }
        kw.update(overrides)
        return make_attack(name, self.attack_model, **kw)
