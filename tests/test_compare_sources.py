"""compare merges a run's results.json and eval.json per evaluation, says how many runs each cell
averages, and flags a column that does not come from every run."""

import csv
import io
import json

import pytest
from click.testing import CliRunner

from advplug.run import results
from advplug.tools.cli import cli
from advplug.tools.compare import compare, load_run

CONFIG = dict(
    data="digits",
    model="digits-cnn",
    eps=0.2,
    alpha=0.05,
    steps=10,
    epochs=1,
    batch_size=64,
    lr=0.05,
    milestones=[1],
    attack_bn="eval",
    objective="at",
    plugin_options={},
    selection="validation",
)


def ent(which: str, attack: str, acc: float, seed: int, n_test: int = 360) -> dict:
    return results.entry(
        which, 1, attack, acc, eps=0.2, alpha=0.05, n_test=n_test, n_total=360, data="digits", seed=seed
    )


def trained(root, name: str, seed: int, nat: float, pgd: float, cw: float) -> str:
    """A finished one-epoch run: results.json holds its last checkpoint only (best is last)."""
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**CONFIG, "seed": seed}))
    entries = [ent("last", "natural", nat, seed), ent("last", "pgd20", pgd, seed), ent("last", "cw20", cw, seed)]
    results.write_results(d / "results.json", entries)
    return str(d)


@pytest.fixture
def two_seeds(tmp_path):
    return trained(tmp_path, "at-s0", 0, 0.40, 0.12, 0.06), trained(tmp_path, "at-s1", 1, 0.30, 0.10, 0.08)


def test_eval_json_is_merged_with_results_json_not_substituted(two_seeds):
    """`advplug eval RUN --attack pgd20` on seed 0 only: every other column still averages both seeds."""
    s0, s1 = two_seeds
    results.merge_evals(f"{s0}/eval.json", [ent("best", "pgd20", 0.14, 0)])
    md, warnings = compare([s0, s1])
    assert "(n=" not in md and warnings == []
    assert "| AT | 2 | validation | 35.00 ± 7.07 | 35.00 ± 7.07 | 12.00 ± 2.83 | 11.00 ± 1.41 | 7.00 ± 1.41 |" in md
    rows = csv.DictReader(io.StringIO(compare([s0, s1], "csv")[0]))
    got = {(r["attack"], r["checkpoint"]): (float(r["mean"]), int(r["n"])) for r in rows}
    assert got[("PGD-20", "best")] == (12.0, 2)  # seed 0's eval (14) replaced its training result (12): (14 + 10) / 2
    assert got[("Natural", "last")] == (35.0, 2) and got[("CW-Linf margin (PGD-20)", "best")] == (7.0, 2)


def test_merge_rule_same_evaluation_replaced_others_kept(two_seeds):
    s0, _ = two_seeds
    results.merge_evals(
        f"{s0}/eval.json",
        [ent("last", "pgd20", 0.20, 0), ent("last", "natural", 0.90, 0, n_test=100), ent("last", "aa", 0.05, 0, 100)],
    )
    merged = results.read_run(s0, {**CONFIG, "seed": 0})
    by = {(e["checkpoint"], e["attack"], e["n_test"]): e["accuracy"] for e in merged}
    assert by[("last", "pgd20", 360)] == 0.20  # the same evaluation (key): eval.json's, the newer, replaces it
    assert by[("last", "natural", 360)] == 0.40 and by[("last", "natural", 100)] == 0.90  # other settings: both kept
    assert by[("last", "cw20", 360)] == 0.06 and by[("last", "aa", 100)] == 0.05  # only in one file: kept
    assert by[("best", "cw20", 360)] == 0.06  # best is last: training recorded last only
    run = load_run(s0)
    assert run.results["last"]["Natural"] == 0.40  # of the same column, the one on more test samples
    assert run.results["last"]["PGD-20"] == 0.20 and run.results["last"]["AutoAttack"] == 0.05


def test_a_column_missing_in_some_runs_says_n_and_is_flagged(two_seeds):
    s0, s1 = two_seeds
    results.merge_evals(f"{s0}/eval.json", [ent("best", "aa", 0.05, 0, n_test=360)])
    md, _ = compare([s0, s1])
    line = next(x for x in md.splitlines() if x.startswith("| AT |"))
    head = next(x for x in md.splitlines() if x.startswith("| method |"))
    cells = dict(zip([c.strip() for c in head.split("|")], [c.strip() for c in line.split("|")]))
    assert cells["AutoAttack best"] == "5.00 (n=1/2)"
    assert cells["Natural best"] == "35.00 ± 7.07"  # from both: no mark
    assert cells["AutoAttack last"] == "-"  # in no run
    note = next(x for x in md.splitlines() if x.startswith("AT: "))
    assert note == f"AT: AutoAttack best: none in {s1}"  # names the run without it
    assert "n=k/N" in md
    rows = list(csv.DictReader(io.StringIO(compare([s0, s1], "csv")[0])))
    aa = next(r for r in rows if r["attack"] == "AutoAttack")
    assert (aa["runs"], aa["n"], aa["missing in"]) == ("2", "1", s1)
    assert all(r["missing in"] == "" for r in rows if r["attack"] != "AutoAttack")
    js = json.loads(compare([s0, s1], "json")[0])[0]["results"]
    assert js["AutoAttack (best)"]["missing_in"] == [s1] and "missing_in" not in js["Natural (best)"]


def test_output_to_a_directory_is_a_one_line_error(two_seeds, tmp_path):
    s0, s1 = two_seeds
    for target in (tmp_path, tmp_path / "no-such-dir" / "t.md"):
        res = CliRunner().invoke(cli, ["compare", s0, s1, "-o", str(target)])
        assert res.exit_code == 2, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
        err = res.output.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(target) in err[0], res.output
    ok = CliRunner().invoke(cli, ["compare", s0, s1, "-o", str(tmp_path / "t.md")])
    assert ok.exit_code == 0 and "| AT | 2 |" in (tmp_path / "t.md").read_text()


def test_a_cell_averaging_different_eps_is_marked(two_seeds):
    """`advplug eval s0 --attack fgsm` and `advplug eval s1 --attack fgsm --eps 0.1`: the FGSM cell averages two
    budgets and says so in the cell, the CSV and the JSON (the row's settings warning alone is not enough)."""
    s0, s1 = two_seeds

    def fgsm(acc, seed, eps):
        return results.entry(
            "last", 1, "fgsm", acc, eps=eps, alpha=eps, n_test=360, n_total=360, data="digits", seed=seed
        )

    results.merge_evals(f"{s0}/eval.json", [fgsm(0.20, 0, 0.2)])
    results.merge_evals(f"{s1}/eval.json", [fgsm(0.40, 1, 0.1)])
    md, _ = compare([s0, s1])
    assert "30.00 ± 14.14 (eps mixed: 0.1, 0.2)" in md
    assert "| 35.00 ± 7.07 |" in md and "35.00 ± 7.07 (eps" not in md  # natural: one budget, unmarked
    rows = [r for r in csv.DictReader(io.StringIO(compare([s0, s1], "csv")[0])) if r["attack"].startswith("FGSM")]
    assert [r["eps mixed"] for r in rows] == ["0.1; 0.2"]
    (row,) = json.loads(compare([s0, s1], "json")[0])
    assert [v.get("eps_mixed") for k, v in row["results"].items() if k.startswith("FGSM")] == [[0.1, 0.2]]
