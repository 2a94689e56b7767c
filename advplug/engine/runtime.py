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
from advplug.errors import OptionError, PluginError
from advplug.plugins import Enabled


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
        averaged_by: str | None = None,
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
        self.averaged_by = averaged_by  # the plugin whose average_weights keeps the EMA slot, per epoch
        decay = cfg.ema if averaged_by is None else None
        self.ema = EMA(model, self._shadow(new_model), decay) if cfg.ema is not None or averaged_by else None

    def average(self, d: object) -> None:
        """The averaging plugin's decay for this epoch (``average_weights``), checked, applied to the EMA slot."""
        ok = isinstance(d, (int, float)) and not isinstance(d, bool) and 0.0 <= d <= 1.0
        if not ok:
            raise PluginError(
                f"plugin {self.averaged_by!r}: average_weights must return a decay in [0, 1] or None, got {d!r}"
            )
        self.ema.blend(float(d))

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


def averaging_plugin(enabled: Enabled, ema: float | None) -> str | None:
    """The plugin that keeps the run's averaged model (``provides={"averaging"}`` and ``average_weights``), or
    ``None``; one line naming it when it clashes with ``--ema`` or declares half of it (two averagers:
    ``composition.check_averaging``)."""
    declared = [n for n, d in enabled.declarations.items() if "averaging" in d.provides]
    implements = [
        i.plugin_name for i in enabled.pm.hook.average_weights.get_hookimpls() if not (i.wrapper or i.hookwrapper)
    ]
    for n in implements:
        if n not in declared:
            raise PluginError(
                f"plugin {n!r} implements average_weights but does not declare provides={{'averaging'}}: the run "
                "keeps no averaged model for it"
            )
    for n in declared:
        if n not in implements:
            raise PluginError(f"plugin {n!r} declares provides={{'averaging'}} but implements no average_weights")
    if declared and ema is not None:
        raise OptionError(
            f"--ema: plugin {declared[0]!r} keeps the run's averaged model (average_weights, once per epoch); "
            "drop --ema or the plugin"
        )
    return declared[0] if declared else None
