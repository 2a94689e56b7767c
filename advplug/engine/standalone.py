"""The trainer's set-up for code outside its loop (plugin commands such as BAT's memorisation
estimate, start-up work such as BAT's checkpoint ensemble): a run's data, device and models built
as the trainer builds them. Public as ``advplug.prepare`` and ``advplug.load_checkpoint_model``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from advplug.config import TrainConfig
from advplug.data import DataBundle
from advplug.devices import pick_device
from advplug.engine.inputs import training_data
from advplug.models import auto_model, build_model
from advplug.run import checkpoint


@dataclass(frozen=True)
class Prepared:
    """A run's parts: its resolved ``config`` (an ``auto`` model chosen from the data's shape), its
    training ``data`` numbered as the trainer numbers it, and the ``device`` it would train on."""

    config: TrainConfig
    data: DataBundle
    device: torch.device

    def new_model(self, *, allow_import: bool = False) -> nn.Module:
        """A freshly initialised model (from torch's global RNG) on the device. ``allow_import``:
        the user named a ``module:callable`` model (importing it runs code)."""
        return build_model(
            self.config.model, self.data.num_classes, self.data.input_shape, allow_import=allow_import
        ).to(self.device)


def prepare(cfg: TrainConfig) -> Prepared:
    """The run of ``cfg`` as the trainer sets it up: the data loaded, with the model-selection and
    the plugins' validation splits held out as the run's settings and plugins ask, and the device."""
    cfg = cfg.resolved()
    data = training_data(cfg, None, None)
    if cfg.model == "auto":  # your own data: the model follows the input shape
        cfg = dataclasses.replace(cfg, model=auto_model(data.input_shape))
    return Prepared(cfg, data, pick_device(cfg.device))


def load_checkpoint_model(
    path: str | Path, *, default_model: str, num_classes: int, input_shape: tuple[int, ...], device: torch.device
) -> nn.Module:
    """The network of an advplug checkpoint (a ``.pt`` file, or a run directory's ``best.pt``) in
    eval mode on ``device``; ``default_model`` for a checkpoint that names no model. A checkpoint
    naming a ``module:callable`` model is refused (code is imported only when the user names it)."""
    ck = checkpoint.load(path, "best")
    name = ck.get("model_name") or default_model
    model = build_model(name, num_classes, input_shape).to(device).eval()
    checkpoint.load_model_state(model, ck, name)
    return model
