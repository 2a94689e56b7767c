"""Per-class statistics from one place in the core (``advplug.ClassStats``: ``TrainContext.class_stats``,
``StepContext.class_stats``): the training counts from the logits ``train_acc`` counts, the held-out per-class
accuracies, the worst class in ``metrics.jsonl``, all recomputed independently here; checkpointed, so a resumed run
that reads them continues exactly."""

from __future__ import annotations

import json
from typing import ClassVar

import torch

from advplug import Budget, ClassStats, Declaration, hookimpl
from advplug.engine.trainer import Trainer
from advplug.evaluate import evaluate
from advplug.testing import digits_subset, installed_plugins, run_and_resume, tiny_config

HERE = __name__
DATA = digits_subset(128, 48)


class Spy:
    """Counts, per class, the anchor's correct predictions of every step by itself (host loops), and at each epoch's
    end copies what ``ClassStats`` holds and evaluates the model on the selection split itself."""

    log: ClassVar[dict] = {}

    @hookimpl
    def on_train_start(self, ctx):
        Spy.log = {"ctx": ctx, "epochs": [], "steps": []}
        self.correct, self.seen = [0] * 10, [0] * 10

    @hookimpl
    def on_batch_end(self, ctx):
        pred = ctx.logits(ctx.variants[0]).argmax(1)
        for y, p in zip(ctx.y.tolist(), pred.tolist()):
            self.seen[y] += 1
            self.correct[y] += int(p == y)
        Spy.log["steps"].append((ctx.epoch, ctx.class_stats))

    @hookimpl
    def on_epoch_end(self, epoch, metrics):
        ctx, cs = Spy.log["ctx"], Spy.log["ctx"].class_stats
        pc: dict = {}
        x, y = DATA.test
        evaluate(ctx.model, x[:48], y[:48], ["natural", "pgd3"], eps=ctx.config.eps, seed=ctx.config.seed, per_class=pc)
        Spy.log["epochs"].append(
            {
                "mine": (list(self.correct), list(self.seen)),
                "core": (cs.train_correct.tolist(), cs.train_seen.tolist(), cs.train_robust_acc.clone()),
                "val": (cs.val_clean_acc.clone(), cs.val_robust_acc.clone(), cs.val_seen.tolist(), cs.val_epoch),
                "eval": pc,
                "epoch": epoch,
                "train_acc": metrics["train_acc"],
            }
        )
        self.correct, self.seen = [0] * 10, [0] * 10


def worst(per_class: list[float | None]) -> tuple[float, int]:
    """The lowest accuracy over the classes present, the lowest index among ties (by hand)."""
    acc = min(a for a in per_class if a is not None)
    return acc, next(k for k, a in enumerate(per_class) if a == acc)


def test_class_stats_and_worst_class_equal_a_recomputation(tmp_path, one_thread):
    with installed_plugins(spy=f"{HERE}:Spy"):
        cfg = tiny_config(str(tmp_path), plugins=("spy",), n_eval=48)
        Trainer(cfg, data=DATA, log=lambda s: None).fit()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ctx = Spy.log["ctx"]
    assert isinstance(ctx.class_stats, ClassStats)
    assert all(cs is ctx.class_stats for _, cs in Spy.log["steps"])  # one object, in every step's context
    for rec, e in zip(recs, Spy.log["epochs"]):
        correct, seen, robust = e["core"]
        assert (correct, seen) == e["mine"]
        assert sum(correct) / sum(seen) == rec["train_acc"] == e["train_acc"]
        hand = [c / n if n else None for c, n in zip(*e["mine"])]
        assert torch.allclose(robust, torch.tensor([a or 0.0 for a in hand]))
        assert (rec["train_worst_class_acc"], rec["train_worst_class"]) == worst(hand)
        clean, rob, val_seen, val_epoch = e["val"]
        assert val_epoch == e["epoch"]
        assert val_seen == torch.bincount(DATA.test[1][:48], minlength=10).tolist()
        assert torch.allclose(clean, torch.tensor([a or 0.0 for a in e["eval"]["natural"]]))
        assert torch.allclose(rob, torch.tensor([a or 0.0 for a in e["eval"]["pgd3"]]))
        assert (rec["test_pgd_worst_class_acc"], rec["test_pgd_worst_class"]) == worst(e["eval"]["pgd3"])
        assert rec["test_pgd_acc"] == sum((a or 0) * n for a, n in zip(e["eval"]["pgd3"], val_seen)) / 48


def test_the_averaged_model_gets_its_worst_class_too(tmp_path, one_thread):
    Trainer(tiny_config(str(tmp_path), ema=0.9, epochs=1), data=DATA, log=lambda s: None).fit()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"ema_test_pgd_worst_class_acc", "ema_test_pgd_worst_class", "train_worst_class"} <= set(rec)
    assert rec["ema_test_pgd_worst_class_acc"] <= rec["ema_test_pgd_acc"]


def test_before_the_first_epoch_nothing_is_known():
    cs = ClassStats(3)
    assert cs.train_robust_acc is None and cs.val_robust_acc is None and cs.train_epoch == cs.val_epoch == -1
    cs.add(torch.tensor([0, 0, 2]), torch.tensor([True, False, True]))
    cs.end_epoch(0)
    assert cs.train_correct.tolist() == [1, 0, 1] and cs.train_seen.tolist() == [2, 0, 1]
    assert cs.train_robust_acc.tolist() == [0.5, 0.0, 1.0]  # class 1 not seen: 0
    cs.end_epoch(1)  # the next epoch starts from zero counts
    assert cs.train_seen.tolist() == [0, 0, 0]


class StatsEps:
    """A budget from the per-class statistics, as CFA's CCM: ``eps_b = (0.5 + train_robust_acc[y_b]) eps`` from the
    second epoch on; a resumed run must read the same statistics."""

    @hookimpl
    def declare(self):
        return Declaration(sets=frozenset({"eps"}))

    @hookimpl
    def attack_budget(self, ctx):
        acc = ctx.class_stats.train_robust_acc
        return None if acc is None else Budget(eps=(0.5 + acc[ctx.y]) * ctx.config.eps)


def test_a_run_reading_class_stats_resumes_exactly(tmp_path, one_thread):
    with installed_plugins(statseps=f"{HERE}:StatsEps"):
        full, part = run_and_resume(tmp_path, digits_subset(96, 16), plugins=("statseps",))
    assert all(torch.equal(full["model"][k], part["model"][k]) for k in full["model"])
    assert full["class_stats"]["train_epoch"] == 2
    assert torch.equal(full["class_stats"]["val_robust_acc"], part["class_stats"]["val_robust_acc"])
