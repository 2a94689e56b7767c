"""Ground-truth benchmark: injection, flags in the trainer's numbering, the table, a planted signal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from advplug.testing import installed_plugins
from benchmarks import groundtruth as gt


def test_injection_flags_are_disjoint_and_truthful():
    from advplug.data import load_digits_tensors

    (x, y), _ = load_digits_tensors()
    x, y = x[:400], y[:400]
    xi, yi, f = gt.inject(x, y, 10, flip=0.1, atypical=0.1, duplicate=0.05, seed=3, transform="rotate")
    assert len(yi) == 400 + 20 and f["flipped"].sum() == 40 and f["atypical"].sum() == 40 and f["duplicate"].sum() == 40
    assert not (f["flipped"] & f["atypical"]).any() and not (f["duplicate"] & (f["flipped"] | f["atypical"])).any()
    assert (yi.numpy()[f["flipped"]] != f["true_label"][f["flipped"]]).all()  # flipped to a wrong class
    assert (yi.numpy()[~f["flipped"]] == f["true_label"][~f["flipped"]]).all()
    assert not torch.equal(xi[:400][f["atypical"][:400]], x[f["atypical"][:400]])  # transformed
    same = ~f["atypical"][:400]
    assert torch.equal(xi[:400][same], x[same])
    assert torch.equal(xi[400:], x[f["source"][400:]])  # the copies are the originals
    for kind in gt.TRANSFORMS:
        out = gt.atypical_transform(x[:5], kind, torch.Generator().manual_seed(0))
        assert out.shape == x[:5].shape and out.min() >= 0 and out.max() <= 1


def test_flags_follow_the_trainers_numbering(tmp_path):
    """With the selection (and BiLAW's validation) split held out, flags must index the samples
    the trainer actually trains on: the labels in the run's data equal the file's at the flags' positions."""
    from advplug.engine.inputs import training_data

    f = gt.write_data(tmp_path / "d.npz", flip=0.1, atypical=0.1, duplicate=0.1, seed=0, transform="shift", n_train=300)
    s = gt.Settings(epochs=2)
    with np.load(f) as d:
        y_file = d["y_train"]
    for method in ("at", "bilaw"):
        cfg = gt.method_config(method, 0, s, f.resolve(), tmp_path / method).resolved()
        flags = gt.flags_for_config(cfg)
        data = training_data(cfg)
        assert len(flags["index"]) == data.num_train < len(y_file)
        assert (data.train[1].numpy() == y_file[flags["injected_index"]]).all()


@pytest.mark.slow
def test_benchmark_table_and_a_planted_signal(tmp_path):
    """A tiny benchmark: AT, MAIL and a test double that weighs exactly the flipped samples down
    (AUROC 1 for flipped, about 0.5 for the others); the table, CSV, JSON, plots and ROC come out."""
    s = gt.Settings(
        out=str(tmp_path / "gt"),
        methods=("at", "mail", "planted"),
        seeds=(0,),
        epochs=2,
        steps=2,
        n_train=200,
        final_attacks=("natural",),
        flip=0.1,
        atypical=0.1,
        duplicate=0.05,
    )
    with installed_plugins(planted="benchmarks.groundtruth.planted:PlantedFlipped"):
        runs = gt.run(s, log=lambda m: None)
    files = gt.write_outputs(runs, s)
    md = files["md"].read_text()
    assert "| planted | 1 |" in md and "| AT | 1 | no weights" in md and "baseline: AT true-class confidence" in md
    rows = {r["method"]: r for r in json.loads(files["json"].read_text())["rows"]}
    planted = rows["planted"]["auroc_low_weight_means_injected"]
    assert planted["flipped e2"]["mean"] == 1.0
    assert planted["atypical e2"]["mean"] == 0.5 and planted["duplicate e2"]["mean"] == 0.5
    assert rows["planted"]["relative_mean_weight"]["flipped"]["mean"] < 0.2
    assert rows["mail"]["gives_weights"] and not rows["AT"]["gives_weights"]
    assert "planted,auroc,flipped e2,1.0000" in files["csv"].read_text()
    assert (tmp_path / "gt" / "plots" / "planted.png").is_file()
    # the flags travel with the run: `advplug report` draws the ROC curves
    from advplug.tools.report import report

    with installed_plugins(planted="benchmarks.groundtruth.planted:PlantedFlipped"):
        made = report(runs["planted"][0])
    assert runs["planted"][0] / "report" / "roc.png" in made
    inj = gt.read_injection(runs["planted"][0])
    assert set(gt.GROUPS) <= set(inj) and len(inj["index"]) == len(
        np.load(runs["planted"][0] / "confidence.npz")["index"]
    )


def test_auroc_direction():
    flag = np.array([1, 1, 0, 0, 0], bool)
    clean = ~flag
    assert gt.auroc_low(flag, clean, np.array([0.1, 0.2, 1, 1, 1])) == 1.0  # low weight = injected
    assert gt.auroc_low(flag, clean, np.array([2, 3, 1, 1, 1.0])) == 0.0
    assert np.isnan(gt.auroc_low(flag, np.zeros(5, bool), np.ones(5)))
