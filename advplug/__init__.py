"""advplug: plugin-based adversarial training for PyTorch.

This module, with ``advplug.signals``, is everything a plugin may import (``lint-imports`` checks
the shipped plugins); the rest of the package may change without notice.

Hooks
    hookimpl                 marks a plugin method as a hook implementation (specs: ``advplug.hookspecs``)
Step and run data
    StepContext              one training step: batch, cached logits/features, ``probs``, ``batch_mean``
    TrainContext             what ``on_train_start`` receives: model, config, data sizes, device, tools
    Variant                  one adversarial (or natural) view of the batch, with its attack ``stats``
    Weights                  what ``compute_weights`` returns: global ``adv``/``nat`` ``[B]``, local ``[V, B]``
    CombinedWeights          the core's product of all plugins' weights, as the loss receives it
    Declaration              what a plugin declares at start-up: weight kind, needs, meaning, ``sets``
    Budget                   a step's per-sample attack budget and loss strength (``eps``, ``alpha``, ``beta``
                             ``[B]``), what ``attack_budget`` returns and ``StepContext.budget`` holds
    ClassStats               per-class training and held-out accuracies, on the device (``ctx.class_stats``)
    NATURAL                  the name of the clean view
    FeatureTap               penultimate features of a model from its own forward (its head's input, or features(x))
    TrainConfig              a run's settings (``TrainContext.config``)
Options and errors
    opt                      a plugin option field: default, help text, bounds, choices
    AdvplugError             anything the user can fix: the CLI prints its message, no traceback
    OptionError              an invalid or misplaced option value
    DataError                a data set (or a plugin's input file) that cannot be found or read
    CheckpointError          a checkpoint that is missing, corrupt or belongs to another model
    PluginError              a plugin that breaks the hook contract
Weight helpers
    adv_matrix               a ``Weights``' adversarial part as a ``[V, B]`` matrix (ones if None)
    natural_weights          a ``Weights``' natural part, or None
    nat_vector               a ``Weights``' natural part as a ``[B]`` vector (ones if None)
Attacks
    set_bn_mode              BatchNorm mode (eval / train) of a torchattacks attack while it runs
Per-sample dumps
    SampleDump               per-sample columns collected on the device, written as npz each epoch
    burn_in_default          the first learning-rate drop, the burn-in GAIRAT and MAIL default to
Across ranks (DDP)
    all_sum                  a tensor summed over all ranks (itself when not distributed)
Outside the training loop (plugin commands)
    prepare                  a run's resolved config, training data (numbered as the trainer does), device
                             and model factory, as the trainer sets them up
    load_checkpoint_model    the network of an advplug checkpoint, in eval mode
    load_config_file         a JSON/TOML config file's settings, as ``advplug train --config`` reads it
    batches                  the trainer's batch iterator: ``(x, y, index)`` on the device
    gather_tensors           a data set (or tensor pair) as ``(x, y)`` tensors

Hooks, data types, options, errors and weight helpers are imported with this module; the other
names are loaded on first use (``_LAZY``), so that importing any advplug module (every one of them
runs this file first) never loads the engine, the run store or the data sources.
"""

from __future__ import annotations

import importlib
from typing import Any

from advplug.context import (
    NATURAL,
    Budget,
    ClassStats,
    CombinedWeights,
    Declaration,
    FeatureTap,
    StepContext,
    TrainContext,
    Variant,
    Weights,
)
from advplug.errors import AdvplugError, CheckpointError, DataError, OptionError, PluginError
from advplug.hookspecs import hookimpl
from advplug.options import opt
from advplug.weights import adv_matrix, nat_vector, natural_weights

__version__ = "0.1.0"

_LAZY = {  # public name -> the module defining it, imported on first access
    "TrainConfig": "advplug.config",
    "load_config_file": "advplug.config",
    "set_bn_mode": "advplug.attacks",
    "SampleDump": "advplug.run.dump",
    "burn_in_default": "advplug.run.dump",
    "all_sum": "advplug.engine.distributed",
    "prepare": "advplug.engine.standalone",
    "load_checkpoint_model": "advplug.engine.standalone",
    "batches": "advplug.data",
    "gather_tensors": "advplug.evaluate",
}

__all__ = [
    "__version__",
    "hookimpl",
    "StepContext",
    "TrainContext",
    "Variant",
    "Weights",
    "CombinedWeights",
    "Declaration",
    "Budget",
    "ClassStats",
    "NATURAL",
    "FeatureTap",
    "opt",
    "AdvplugError",
    "OptionError",
    "DataError",
    "CheckpointError",
    "PluginError",
    "adv_matrix",
    "natural_weights",
    "nat_vector",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'advplug' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
