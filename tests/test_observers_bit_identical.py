"""Switches that only observe a run (EMA, TensorBoard, weight dumps, progress bars, how often the selection split
is evaluated) leave the raw model's trajectory bit-identical at the same seed."""

import json
from pathlib import Path

import pytest
import torch

from advplug.engine.trainer import Trainer
from advplug.run import checkpoint
from advplug.testing import digits_subset, tiny_config

DATA = digits_subset(n_train=192, n_test=64)
TRAINING_KEYS = ("epoch", "lr", "train_loss", "train_acc", "weights")


def train(out: Path, **kw) -> tuple[dict, list[dict]]:
    """A tiny run (2 epochs, PGD-2): the raw model's final state_dict and the metrics' training values."""
    cfg = tiny_config(str(out), steps=2, eval_steps=2, final_attacks=("natural",), **kw)
    Trainer(cfg, data=DATA, log=lambda s: None).fit()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return checkpoint.load(out, "last")["model"], [{k: r[k] for k in TRAINING_KEYS if k in r} for r in recs]


def assert_identical(a: tuple[dict, list[dict]], b: tuple[dict, list[dict]]) -> None:
    (sa, ma), (sb, mb) = a, b
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"raw model differs in {differ}"
    assert ma == mb


@pytest.mark.parametrize(
    "switch, base",
    [
        ({"ema": 0.9}, {}),
        ({"ema": 0.9}, {"plugins": ("mail",)}),
        ({"tensorboard": True}, {}),
        ({"dump_weights": True}, {"plugins": ("mail",)}),
        ({"progress": True}, {}),
        ({"eval_every": 2}, {}),
    ],
    ids=["ema", "ema-mail", "tensorboard", "dump-weights", "progress", "eval-every"],
)
def test_observer_leaves_raw_run_identical(tmp_path, one_thread, switch, base):
    plain = train(tmp_path / "plain", **base)
    observed = train(tmp_path / "observed", **base, **switch)
    assert_identical(plain, observed)
