"""The harder-class ground truth: the data (one class's labels half flipped, nothing else touched) and a tiny run of
every method through to its table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.groundtruth import harder_class as hc

pytestmark = pytest.mark.usefixtures("one_thread")


def test_half_of_the_hard_class_is_flipped_to_other_classes_and_nothing_else():
    y = torch.arange(10).repeat(30)  # 30 per class
    out = hc.harder(y, 3, 0.5, seed=1)
    changed = out != y
    assert changed.sum() == 15 and (y[changed] == 3).all() and (out[changed] != 3).all()
    assert torch.equal(hc.harder(y, 3, 0.5, seed=1), out) and not torch.equal(hc.harder(y, 3, 0.5, seed=2), out)
    assert len(set(out[changed].tolist())) > 3  # spread over the other classes


@pytest.mark.slow  # four tiny trainings and PGD-20 on the 360 test images: about 20 s
def test_a_tiny_run_of_every_method_writes_its_table(tmp_path):
    s = hc.Settings(out=str(tmp_path), seeds=(0,), epochs=2, n_train=200, steps=2)
    rows = hc.run(s, log=lambda line: None)
    js, md = hc.write_outputs(rows, s)
    with np.load(tmp_path / "data" / "seed0.npz") as f:
        flipped = f["y_train"] != f["true_train"]
        assert flipped.sum() == round(s.flip * (f["true_train"] == 3).sum()) and (f["true_train"][flipped] == 3).all()
    assert {r["method"] for r in rows} == {"trades", "cfa", "cfa-trades-scale", "dafa"}
    for r in rows:
        assert len(r["pgd20_per_class"]) == 10 and r["worst_pgd20"] == min(r["pgd20_per_class"])
        assert r["hard_pgd20"] == r["pgd20_per_class"][3]
    cfg = json.loads((tmp_path / "runs" / "dafa-seed0" / "config.json").read_text())
    assert cfg["plugin_options"]["dafa-warmup"] == 1 and cfg["objective"] == "trades"
    text = md.read_text()
    assert "| **trades** | mean |" in text and "| **dafa** | mean |" in text and "| **cfa** | mean |" in text
    assert json.loads(js.read_text())["settings"]["flip"] == 0.25


class AlwaysThree(torch.nn.Module):
    """Predicts class 3 for every input (no input gradient): PGD cannot move it."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return self.bias + 5.0 * torch.nn.functional.one_hot(torch.full((len(x),), 3), 10) + 0 * x.flatten(1)[:, :1]


def test_score_names_the_worst_and_the_hard_class():
    x, y = torch.rand(40, 1, 8, 8), torch.arange(10).repeat(4)
    r = hc.score(AlwaysThree(), x, y, hc.Settings())
    assert r["natural"] == r["pgd20"] == pytest.approx(0.1)
    assert r["pgd20_per_class"][3] == r["hard_pgd20"] == 1.0 and r["worst_class"] == 0 and r["worst_pgd20"] == 0.0
    r = hc.score(AlwaysThree(), x, y, hc.Settings(hard_class=5))
    assert r["hard_pgd20"] == 0.0


def test_table_orders_methods_and_says_how_many_seeds_a_mean_has():
    def row(method, model, seed, worst):
        pc = [0.5] * 10
        pc[3] = worst
        return dict(
            method=method,
            model=model,
            seed=seed,
            natural=0.9,
            pgd20=0.5,
            pgd20_per_class=pc,
            worst_class=3,
            worst_pgd20=worst,
            hard_pgd20=worst,
        )

    rows = [
        row("cfa", "last", 0, 0.1),
        row("dafa", "last", 0, 0.2),
        row("trades", "last", 0, 0.1),
        row("cfa", "last", 1, 0.3),
        row("cfa", "averaged", 1, 0.2),
        row("dafa", "last", 1, 0.4),
        row("trades", "last", 1, 0.1),
    ]
    text = hc.table(rows, hc.Settings(seeds=(0, 1)))
    names = [line.split("|")[1].strip() for line in text.splitlines()[2:]]
    assert names[0] == "trades" and names[3] == "cfa" and names[6] == "cfa (FAWA model)" and names[-1] == "**dafa**"
    assert "| **cfa** | mean | 20.0 ± 14.1 (3, 3) |" in text
    assert "| **cfa (FAWA model)** | mean of 1 of 2 | 20.0 (3) |" in text
