"""advplug compare (numbers by hand, flags), report (every PNG), eval suite settings."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from advplug.engine.trainer import Trainer
from advplug.testing import digits_subset, tiny_config
from advplug.tools.cli import cli
from advplug.tools.compare import compare, load_run, table
from advplug.tools.evaluation import evaluate_checkpoints

BASE = dict(
    data="digits",
    model="digits-cnn",
    eps=0.2,
    alpha=0.05,
    steps=10,
    epochs=20,
    batch_size=64,
    lr=0.05,
    milestones=[12, 17],
    attack_bn="eval",
    objective="at",
    plugin_options={},
)


def fake_run(root, name, seed, nat_last, pgd_last, nat_best=None, pgd_best=None, **cfg):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**BASE, "seed": seed, **cfg}))
    res = {"last (epoch 20)": {"Natural": nat_last, "PGD-20": pgd_last}}
    if nat_best is not None:
        res["best (epoch 15)"] = {"Natural": nat_best, "PGD-20": pgd_best}
    (d / "results.json").write_text(json.dumps(res))
    return str(d)


def test_table_means_and_stds_by_hand(tmp_path):
    runs = [fake_run(tmp_path, f"mail{s}", s, 0.80 + 0.02 * s, 0.40 + 0.01 * s, plugins=["mail"]) for s in range(3)]
    runs += [fake_run(tmp_path, f"at{s}", s, 0.85, 0.45 - 0.02 * s, 0.86, 0.50, plugins=[]) for s in range(2)]
    rows = {r["method"]: r for r in table([load_run(p) for p in runs])}
    mail = rows["mail"]["cells"]
    assert mail[("Natural", "last")][:2] == pytest.approx((82.0, 2.0))  # 80, 82, 84: sample std 2
    assert mail[("PGD-20", "last")][:2] == pytest.approx((41.0, 1.0))
    assert mail[("Natural", "best")] == mail[("Natural", "last")]  # best was the last epoch
    at = rows["AT"]["cells"]
    assert at[("PGD-20", "last")][:2] == pytest.approx((44.0, 2**0.5))  # 45, 43
    assert at[("PGD-20", "best")][:2] == pytest.approx((50.0, 0.0))
    assert rows["AT"]["seeds"] == [0, 1] and rows["mail"]["n"] == 3
    md, warnings = compare(runs)
    assert "| mail | 3 | test | 82.00 ± 2.00 | 82.00 ± 2.00 | 41.00 ± 1.00 | 41.00 ± 1.00 |" in md
    assert warnings == []
    js = json.loads(compare(runs, "json")[0])
    assert js[1]["results"]["PGD-20 (last)"]["mean"] == pytest.approx(44.0)
    csv_text = compare(runs, "csv")[0]
    assert "mail,3,test,Natural,last,82.0000,2.0000,3," in csv_text


def test_plugin_order_does_not_split_a_method_but_options_do(tmp_path):
    a = fake_run(tmp_path, "a", 0, 0.8, 0.4, plugins=["mail", "lrat"])
    b = fake_run(tmp_path, "b", 1, 0.8, 0.4, plugins=["lrat", "mail"])
    c = fake_run(tmp_path, "c", 0, 0.8, 0.4, plugins=["mail"], objective="trades", plugin_options={"mail-gamma": 5})
    methods = [r["method"] for r in table([load_run(p) for p in (a, b, c)])]
    assert methods == ["lrat+mail", "mail (TRADES) mail-gamma=5"]


def test_mismatched_settings_are_flagged(tmp_path):
    runs = [fake_run(tmp_path, f"r{s}", s, 0.8, 0.4) for s in range(3)]
    runs.append(fake_run(tmp_path, "odd", 3, 0.9, 0.6, eps=0.3))
    md, warnings = compare(runs)
    assert len(warnings) == 1 and "odd" in warnings[0] and "eps 0.3 (others: 0.2)" in warnings[0]
    assert "| AT ⚠ | 4 |" in md and "not comparable" in md
    res = CliRunner().invoke(cli, ["compare", *runs])
    assert res.exit_code == 0 and "warning: settings differ" in res.output


def test_eval_json_is_preferred_and_its_settings_compared(tmp_path):
    """eval.json's Natural (360 test samples) is chosen over results.json's (not recorded); results.json's
    PGD-20, which eval.json lacks, is kept (the files are merged)."""
    a = fake_run(tmp_path, "a", 0, 0.8, 0.4, 0.81, 0.45)
    b = fake_run(tmp_path, "b", 1, 0.8, 0.4, 0.81, 0.45)
    for path, n_aa in ((a, 1000), (b, 500)):
        (tmp_path / path / "eval.json").write_text(
            json.dumps(
                {
                    "settings": {
                        "eps": 0.2,
                        "alpha": 0.05,
                        "backend": "torchattacks",
                        "n_test": {"Natural": 360, "AutoAttack": n_aa},
                    },
                    "results": {
                        "best": {"Natural": 0.9, "AutoAttack": 0.3, "epoch": 15},
                        "last": {"Natural": 0.88, "AutoAttack": 0.2, "epoch": 20},
                    },
                }
            )
        )
    md, warnings = compare([a, b])
    assert "AutoAttack best" in md
    row = (
        "| AT ⚠ | 2 | test | 90.00 ± 0.00 | 88.00 ± 0.00 | 45.00 ± 0.00 | 40.00 ± 0.00 | "
        + "30.00 ± 0.00 | 20.00 ± 0.00 |"
    )
    assert row in md
    assert len(warnings) == 1 and "AutoAttack 500" in warnings[0]
    with pytest.raises(Exception, match="not a run directory"):
        compare([str(tmp_path / "nowhere")])


def test_compare_shows_and_flags_where_best_was_chosen(tmp_path):
    a = fake_run(tmp_path, "a", 0, 0.8, 0.4, 0.8, 0.45, selection="validation")
    b = fake_run(tmp_path, "b", 1, 0.8, 0.4, 0.8, 0.45, selection="validation")
    c = fake_run(tmp_path, "c", 2, 0.8, 0.4, 0.8, 0.45, selection="test")
    md, warnings = compare([a, b])
    assert "| AT | 2 | validation |" in md and warnings == []
    md, warnings = compare([a, b, c])
    assert "| AT ⚠ | 3 | test/validation |" in md and "selection test (others: validation)" in warnings[0]


def test_old_result_files_read_as_fields_and_compare_as_new_ones(tmp_path):
    """results.json of version 1 (display-keyed) and eval.json of versions 1 and 2 (display names as
    attacks) read as entries with fields, and compare exactly as the same results written today."""
    from advplug.run import results

    old = {
        "last (epoch 20)": {"Natural": 0.8, "PGD-20": 0.4, "PGD-20 (bf16 eval)": 0.41},
        "best (epoch 15)": {"Natural": 0.81, "PGD-20": 0.45, "PGD-20 (bf16 eval)": 0.46},
    }
    a = fake_run(tmp_path, "a", 0, 0.8, 0.4)
    (tmp_path / "a" / "results.json").write_text(json.dumps(old))
    entries = results.read_results(tmp_path / "a" / "results.json", {**BASE, "seed": 0})
    assert [(e["checkpoint"], e["epoch"], e["attack"], e["precision"], e["eps"]) for e in entries[:3]] == [
        ("last", 20, "natural", "fp32", 0.2),
        ("last", 20, "pgd20", "fp32", 0.2),
        ("last", 20, "pgd20", "bf16", 0.2),
    ]
    assert results.by_row(entries) == old
    b = fake_run(tmp_path, "b", 1, 0.8, 0.4)
    results.write_results(
        tmp_path / "b" / "results.json", [{**e, "n_test": 360, "n_total": 360, "seed": 1} for e in entries]
    )
    assert results.read_results(tmp_path / "b" / "results.json", {})[2]["attack"] == "pgd20"
    md, warnings = compare([a, b])
    assert warnings == [] and "| PGD-20 (bf16 eval) best | PGD-20 (bf16 eval) last |" in md
    assert (
        "| AT | 2 | test | 81.00 ± 0.00 | 80.00 ± 0.00 | 45.00 ± 0.00 | 40.00 ± 0.00 | 46.00 ± 0.00 | 41.00 ± 0.00 |"
        in md
    )

    v2 = {**ENTRY, "attack": "CW-Linf margin (PGD-5)"}
    art = {**ENTRY, "attack": "PGD-5 (ART)", "backend": "art"}
    (tmp_path / "a" / "eval.json").write_text(
        json.dumps({"format": "advplug-eval", "version": 2, "entries": {"x": v2, "y": art}})
    )
    got = list(results.read_evals(tmp_path / "a" / "eval.json").values())
    assert [(e["attack"], e["backend"], results.label(e)) for e in got] == [
        ("cw5", "torchattacks", "CW-Linf margin (PGD-5)"),
        ("pgd5", "art", "PGD-5 (ART)"),
    ]
    merged = results.merge_evals(tmp_path / "a" / "eval.json", [{**got[0], "accuracy": 0.25}])  # same key: replaced
    assert len(merged) == 2 and json.loads((tmp_path / "a" / "eval.json").read_text())["version"] == 3
    assert [e["accuracy"] for e in results.read_evals(tmp_path / "a" / "eval.json").values()] == [0.5, 0.25]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(
        str(out),
        plugins=("mail",),
        epochs=3,
        milestones=(2,),
        dump_weights=True,
        plugin_options={"mail-burn-in": 0, "mail-dump": "true"},
    )
    Trainer(cfg, data=digits_subset(128, 32), log=lambda s: None).fit()
    return out


def test_report_writes_every_plot(small_run):
    res = CliRunner().invoke(cli, ["report", str(small_run)])
    assert res.exit_code == 0, res.output
    names = {"accuracy.png", "weights.png", "weight_vs_signal.png", "extremes.png", "per_class.png"}
    for n in names:
        p = small_run / "report" / n
        assert p.is_file() and p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"
    pdfs = {n.replace(".png", ".pdf") for n in names}  # a vector copy beside each PNG
    assert set(res.output.split()) == {str(small_run / "report" / n) for n in names | pdfs}


def test_eval_suite_records_the_autoattack_subset(small_run):
    entries = evaluate_checkpoints(
        str(small_run), ["best", "last"], ["natural", "pgd5", "aa"], n_eval=32, n_eval_aa=8, log=lambda s: None
    )
    last = {e["attack"]: e for e in entries if e["checkpoint"] == "last"}
    assert {a: e["n_test"] for a, e in last.items()} == {"natural": 32, "pgd5": 32, "aa": 8}
    assert all(e["alpha"] == pytest.approx(e["eps"] / 4) for e in entries)
    assert {e["checkpoint"] for e in entries} == {"best", "last"} and {e["epoch"] for e in last.values()} == {3}
    assert 0.0 <= last["aa"]["accuracy"] <= last["natural"]["accuracy"]


def test_example_configs_are_valid():
    from pathlib import Path

    from advplug.config import TrainConfig, load_config_file
    from advplug.plugins import enable

    files = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.toml"))
    assert len(files) >= 5
    for f in files:
        d = load_config_file(f)
        cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}).resolved()
        enable(list(cfg.plugins), cfg.objective, cfg.plugin_options)  # options exist and are valid


def test_corrupt_results_and_bad_eval_counts_are_one_line_errors(tmp_path):
    from advplug import DataError

    a = fake_run(tmp_path, "a", 0, 0.8, 0.4)
    (tmp_path / "a" / "eval.json").write_text("{not json")
    with pytest.raises(DataError, match="eval.json' is corrupt"):
        compare([a])
    res = CliRunner().invoke(cli, ["compare", a])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "is corrupt" in res.output
    res = CliRunner().invoke(cli, ["eval", a, "--suite", "paper", "--n-eval-aa", "0"])
    assert res.exit_code == 2 and "--n-eval-aa" in res.output
    res = CliRunner().invoke(cli, ["eval", a, "--suite", "paper", "--attack", "pgd20"])
    assert res.exit_code == 2 and "exclude each other" in res.output


DAMAGE = [  # (file, content, message): hand-edited or damaged run files, each one line, exit 2
    ("config.json", "[1]", "config.json' is damaged: expected a JSON object of settings, got list"),
    ("config.json", json.dumps({**BASE, "eps": "x"}), "config.json' is damaged: eps must be a number, got 'x'"),
    ("config.json", json.dumps({**BASE, "eps": None}), "config.json' is damaged: eps is null"),
    ("config.json", '{"eps": NaN}', "config.json' is damaged: eps must be a finite number, got nan"),
    ("config.json", json.dumps({**BASE, "seed": "x"}), "config.json' is damaged: seed must be a whole number"),
    ("config.json", json.dumps({**BASE, "plugins": "mail"}), "plugins must be a list of names, got 'mail'"),
    ("config.json", json.dumps({**BASE, "objective": 3}), "objective must be a string, got 3"),
    ("config.json", json.dumps({**BASE, "plugin_options": [1]}), "plugin-options must be a table"),
    ("results.json", "[1, 2]", "results.json' is damaged: expected an object of checkpoints, got list"),
    ("results.json", '{"last (epoch 20)": "abc"}', "entry 'last (epoch 20)' is not a checkpoint's results"),
    ("results.json", '{"": {"Natural": 0.5}}', "entry '' is not a checkpoint's results"),
    ("results.json", '{"last (epoch 20)": {"Natural": NaN}}', "Natural: expected an accuracy in [0, 1], got nan"),
    ("results.json", '{"last (epoch 20)": {"Natural": 7}}', "Natural: expected an accuracy in [0, 1], got 7"),
    ("results.json", '{"last (epoch 20)": {"Natural": "0.5"}}', "expected an accuracy in [0, 1], got '0.5'"),
    ("eval.json", '{"format": "advplug-eval", "version": 2, "entries": [1]}', "'entries' is a list, not an object"),
    ("eval.json", '{"format": "advplug-eval", "version": 2, "entries": {"k": 1}}', "an entry is a int, not an object"),
]
ENTRY = {
    "checkpoint": "best",
    "epoch": 19,
    "attack": "Natural",
    "accuracy": 0.5,
    "data": "digits",
    "eps": 0.2,
    "alpha": 0.05,
    "backend": "torchattacks",
    "n_test": 360,
    "seed": 0,
    "n_total": 360,
}
for field, value, message in [
    ("accuracy", "x", "accuracy 'x' is not a number"),
    ("accuracy", float("nan"), "accuracy nan is not in [0, 1]"),
    ("accuracy", 7, "accuracy 7 is not in [0, 1]"),
    ("eps", "x", "eps 'x' is not a number"),
    ("eps", float("inf"), "is not finite"),
    ("epoch", "x", "epoch 'x' is not a whole number"),
    ("checkpoint", [1], "checkpoint [1] is not a string"),
    ("n_test", "x", "n_test 'x' is not a whole number"),
]:
    DAMAGE.append(
        (
            "eval.json",
            json.dumps({"format": "advplug-eval", "version": 2, "entries": {"k": {**ENTRY, field: value}}}),
            message,
        )
    )


@pytest.mark.parametrize("name,content,message", DAMAGE)
def test_damaged_run_files_are_one_line_errors_in_compare(tmp_path, name, content, message):
    a = fake_run(tmp_path, "a", 0, 0.8, 0.4)
    (tmp_path / "a" / name).write_text(content)
    res = CliRunner().invoke(cli, ["compare", a])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and message in res.output, res.output


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"epoch": 1, "val_pgd_acc": 0.', "line 1 is not JSON"),
        ("[1]", "line 1 is not a JSON object"),
        ('{"epoch": 1, "val_pgd_acc": NaN}', "line 1: val_pgd_acc nan is not an accuracy in [0, 1]"),
        ('{"epoch": 1, "val_pgd_acc": "x"}', "val_pgd_acc 'x' is not an accuracy"),
        ('{"val_pgd_acc": 0.3}', "epoch None is not a whole number >= 0"),
        ('{"epoch": "a"}', "epoch 'a' is not a whole number >= 0"),
        ('{"epoch": 1}\n{"epoch": 2, "weights": 3}', "line 2: weights 3 has no numbers min, mean and max"),
    ],
)
def test_damaged_metrics_are_one_line_errors_in_report(tmp_path, content, message):
    a = fake_run(tmp_path, "a", 0, 0.8, 0.4)
    (tmp_path / "a" / "metrics.jsonl").write_text(content + "\n")
    res = CliRunner().invoke(cli, ["report", a])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and message in res.output, res.output
    (tmp_path / "a" / "metrics.jsonl").write_bytes(b"\xff\xfe\x00")
    res = CliRunner().invoke(cli, ["report", a])
    assert res.exit_code == 2 and "metrics.jsonl' is not readable" in res.output, res.output


def test_the_same_run_given_twice_is_refused(tmp_path):
    """Listed twice (or once through another spelling of its path), one run would be averaged as two seeds."""
    a = fake_run(tmp_path, "a", 0, 0.8, 0.4)
    res = CliRunner().invoke(cli, ["compare", a, str(tmp_path / "." / "a") + "/"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "is the same run directory as" in res.output, (
        res.output
    )


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: p.write_text("hi"), "is not a readable dump (pickled objects, which advplug never loads)"),
        (lambda p: p.write_bytes(p.read_bytes()[:300]), "is not a readable dump"),
        (lambda p: np.savez(p, index=np.array([1, "a"], dtype=object)), "is not a readable dump"),
        (lambda p: np.savez(p, index=np.arange(3)), "lacks the 'margin' or weight column"),
        (
            lambda p: np.savez(p, **{**dict(np.load(p)), "index": np.arange(5)}),
            "not a numeric column of the length of 'index'",
        ),
        (
            lambda p: np.savez(p, **{k: v * np.nan if k.startswith("weight") else v for k, v in np.load(p).items()}),
            "holds NaN or Inf",
        ),
    ],
)
def test_damaged_weight_dumps_are_one_line_errors_in_report(small_run, tmp_path, damage, message):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    damage(run / "dumps" / "weights-epoch003.npz")
    res = CliRunner().invoke(cli, ["report", str(run)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and message in res.output, res.output
