"""Per-class accuracy: every result entry carries it (from the same predictions as its accuracy), compare shows the
worst class beside each mean, report draws it. Checked by hand on a 1-D linear model whose FGSM moves are known."""

import csv
import io
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from advplug.config import TrainConfig
from advplug.engine.final_eval import evaluate_model
from advplug.engine.trainer import Trainer
from advplug.errors import DataError
from advplug.evaluate import evaluate
from advplug.run import results
from advplug.testing import digits_subset, tiny_config
from advplug.tools.cli import cli
from advplug.tools.compare import compare
from advplug.tools.evaluation import evaluate_checkpoints
from advplug.tools.report import figures

EPS = 0.1
# x and label; logits z0 = -10 x + b0, z1 = 0, z2 = 10 x + b2, z3 = -100 (class 3: no test point).
X = torch.tensor([[0.05], [0.25], [0.45], [0.45], [0.62], [0.55], [0.95], [0.75]])
Y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])


def linear(b0: float, b2: float) -> nn.Module:
    m = nn.Linear(1, 4)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[-10.0], [0.0], [10.0], [0.0]]))
        m.bias.copy_(torch.tensor([b0, 0.0, b2, -100.0]))
    return m


# Model A: class 0 below x = 0.3, class 2 above 0.7. FGSM moves a class-0 point right (d CE / dx = 10 (1 - p0 + p2)
# > 0), a class-2 point left, a class-1 point towards the nearer of 0 and 2 (sign of p2 - p0), by EPS.
#   class 0: 0.05 -> 0.15 ok, 0.25 -> 0.35 wrong, 0.45 (already 1) -> 0.55 wrong      natural 2/3, FGSM 1/3
#   class 1: 0.45 -> 0.35 ok, 0.62 -> 0.72 wrong, 0.55 -> 0.65 ok                      natural 3/3, FGSM 2/3
#   class 2: 0.95 -> 0.85 ok, 0.75 -> 0.65 wrong                                       natural 2/2, FGSM 1/2
A = {"natural": [2 / 3, 1.0, 1.0, None], "fgsm": [1 / 3, 2 / 3, 1 / 2, None]}
# Model B: class 0 below 0.2, class 2 above 0.8.
#   class 0: 0.05 -> 0.15 ok, 0.25 (already 1) -> 0.35 wrong, 0.45 -> 0.55 wrong         natural 1/3, FGSM 1/3
#   class 1: 0.45 -> 0.35 ok, 0.62 -> 0.72 ok, 0.55 -> 0.65 ok                          natural 3/3, FGSM 3/3
#   class 2: 0.95 -> 0.85 ok, 0.75 (already 1) -> 0.65 wrong                            natural 1/2, FGSM 1/2
B = {"natural": [1 / 3, 1.0, 1 / 2, None], "fgsm": [1 / 3, 1.0, 1 / 2, None]}


def close(got: list, want: list) -> bool:
    return len(got) == len(want) and all(
        (g is None and w is None) or (g is not None and w is not None and abs(g - w) < 1e-9) for g, w in zip(got, want)
    )


@pytest.mark.parametrize("backend", ["torchattacks", "art"])
def test_per_class_accuracy_by_hand(backend):
    per: dict = {}
    acc = evaluate(linear(3.0, -7.0), X, Y, ["natural", "fgsm"], eps=EPS, num_classes=4, backend=backend, per_class=per)
    assert close(per["natural"], A["natural"]) and close(per["fgsm"], A["fgsm"]), per
    assert acc == pytest.approx({"natural": 7 / 8, "fgsm": 4 / 8})


def config(**kw) -> TrainConfig:
    return TrainConfig(data="digits", eps=EPS, final_attacks=("natural", "fgsm"), progress=False, **kw)


def test_final_evaluation_entries_carry_per_class():
    entries = evaluate_model(linear(3.0, -7.0), "last", 1, (X, Y), config(), 4, None)
    got = {e["attack"]: e for e in entries}
    assert close(got["natural"]["per_class"], A["natural"]) and close(got["fgsm"]["per_class"], A["fgsm"])
    assert got["fgsm"]["accuracy"] == pytest.approx(0.5)
    results.check(got["fgsm"])


def fake_run(root, name: str, seed: int, entries: list[dict]) -> str:
    d = root / name
    d.mkdir()
    cfg = dict(data="digits", model="digits-cnn", eps=EPS, alpha=EPS / 4, steps=10, epochs=1, batch_size=64, lr=0.05)
    (d / "config.json").write_text(json.dumps({**cfg, "milestones": [], "objective": "at", "seed": seed}))
    results.write_results(d / "results.json", [{**e, "seed": seed} for e in entries])
    return str(d)


def cells(md: str, method: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {method} "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_compare_shows_the_worst_class_beside_the_mean(tmp_path):
    """Two seeds, models A and B, evaluated as the final evaluation does and read back by compare."""
    runs = [
        fake_run(tmp_path, name, seed, evaluate_model(model, "last", 1, (X, Y), config(), 4, None))
        for name, seed, model in (("a", 0, linear(3.0, -7.0)), ("b", 1, linear(2.0, -8.0)))
    ]
    md, _ = compare(runs)
    head = cells(md, "method")
    row = dict(zip(head, cells(md, "AT")))
    # natural: A's worst is class 0 (2/3), B's class 0 (1/3): mean 50.00, class 0 (worst in both runs)
    assert row["Natural best"] == "75.00 ± 17.68 (worst: class 0, 50.00)"  # 7/8 and 5/8
    # FGSM: A's worst is class 0 (1/3), B's class 0 (1/3; class 2: 1/2): mean 33.33
    assert row["FGSM last"] == "56.25 ± 8.84 (worst: class 0, 33.33)"  # 4/8 and 5/8
    rows = list(csv.DictReader(io.StringIO(compare(runs, "csv")[0])))
    fgsm = next(r for r in rows if r["attack"] == "FGSM" and r["checkpoint"] == "last")
    assert float(fgsm["worst_class_acc"]) == pytest.approx(100 / 3, abs=1e-3) and fgsm["worst_class"] == "0"
    js = json.loads(compare(runs, "json")[0])[0]["results"]
    assert js["Natural (best)"]["worst_class"] == 0 and js["Natural (best)"]["worst_class_acc"] == pytest.approx(50)


def entry(acc: float, per_class: list | None, attack: str = "pgd20") -> dict:
    e = results.entry("last", 1, attack, acc, eps=EPS, alpha=EPS / 4, n_test=8, n_total=8, data="digits", seed=0)
    return e if per_class is None else {**e, "per_class": per_class}


def test_worst_class_is_the_most_frequent_then_the_lowest_mean(tmp_path):
    """Three runs: class 2 is worst twice (0.2, 0.4), class 1 once (0.1): worst-class accuracy (0.2 + 0.4 + 0.1) / 3,
    class 2. Two runs tied one each (class 1 at 0.3 and 0.9 mean 0.6; class 2 at 0.5 and 0.2 mean 0.35): class 2."""
    three = [
        fake_run(tmp_path, "t0", 0, [entry(0.5, [0.9, 0.5, 0.2])]),
        fake_run(tmp_path, "t1", 1, [entry(0.5, [0.8, 0.6, 0.4])]),
        fake_run(tmp_path, "t2", 2, [entry(0.5, [0.7, 0.1, 0.3])]),
    ]
    assert "(worst: class 2, 23.33)" in compare(three)[0]
    tied = [
        fake_run(tmp_path, "u0", 0, [entry(0.5, [0.9, 0.3, 0.5])]),
        fake_run(tmp_path, "u1", 1, [entry(0.5, [0.7, 0.9, 0.2])]),
    ]
    assert "(worst: class 2, 25.00)" in compare(tied)[0]


def test_runs_without_per_class_still_read_and_show_no_worst_class(tmp_path):
    old = fake_run(tmp_path, "old", 0, [entry(0.5, None)])
    new = fake_run(tmp_path, "new", 1, [entry(0.3, [0.2, 0.4, None])])
    md, _ = compare([old])
    assert "worst" not in md.split("\n\n")[0]
    md, _ = compare([old, new])  # the worst class of the one run that has it, said to be from 1 of 2
    assert "40.00 ± 14.14 (worst: class 0, 20.00, n=1/2)" in md
    assert json.loads(compare([old], "json")[0])[0]["results"]["PGD-20 (last)"].keys() == {"mean", "n"}


@pytest.mark.parametrize("bad", [[0.5, 1.5], "0.5", [0.5, "x"], [True, 0.5]])
def test_a_damaged_per_class_is_a_one_line_error(tmp_path, bad):
    run = fake_run(tmp_path, "r", 0, [entry(0.5, [0.5, 0.5])])
    raw = json.loads((tmp_path / "r" / "results.json").read_text())
    for e in raw["entries"].values():
        e["per_class"] = bad
    (tmp_path / "r" / "results.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="per_class"):
        compare([run])
    res = CliRunner().invoke(cli, ["compare", run])
    assert res.exit_code == 2 and "per_class" in res.output and "Traceback" not in res.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("per-class")
    cfg = tiny_config(str(out), epochs=1, steps=1, eval_steps=1, final_attacks=("natural", "pgd2"))
    Trainer(cfg, data=digits_subset(96, 40), log=lambda s: None).fit()
    return out


def test_training_and_eval_entries_carry_per_class_consistent_with_accuracy(trained):
    x, y = digits_subset(96, 40).test
    counts = torch.bincount(y, minlength=10).tolist()
    written = results.read_results(trained / "results.json", {})
    evaluated = evaluate_checkpoints(str(trained), ["last"], ["natural", "fgsm"], log=lambda s: None, test_data=(x, y))
    for e in written + evaluated:
        pc = e["per_class"]
        assert len(pc) == 10 and all((p is None) == (n == 0) for p, n in zip(pc, counts)), e
        correct = sum(round(p * n) for p, n in zip(pc, counts) if n)
        assert correct == round(e["accuracy"] * len(y)), e


def test_report_draws_per_class_robust_accuracy_only_when_recorded(trained, tmp_path):
    import matplotlib.pyplot as plt

    figs = figures(trained)
    assert "per_class" in figs
    ax = figs["per_class"].axes[0]
    assert len(ax.patches) == 10 and "PGD-2" in ax.get_title()  # one bar per class (best is last: one group)
    for f in figs.values():
        plt.close(f)
    res = CliRunner().invoke(cli, ["report", str(trained)])
    assert res.exit_code == 0 and str(trained / "report" / "per_class.pdf") in res.output.split()
    raw = json.loads((trained / "results.json").read_text())
    for e in raw["entries"].values():
        e.pop("per_class")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "metrics.jsonl"):
        (bare / f).write_text((trained / f).read_text())
    (bare / "results.json").write_text(json.dumps(raw))
    figs = figures(bare)
    assert "per_class" not in figs
    for f in figs.values():
        plt.close(f)
    (bare / "results.json").write_text("{")  # damaged: the other figures are still drawn, with a note
    notes: list[str] = []
    figs = figures(bare, log=notes.append)
    assert "accuracy" in figs and any("per_class.png skipped" in n and "corrupt" in n for n in notes)
    for f in figs.values():
        plt.close(f)
