"""The papers' numbers beside ours: ``[[reported]]`` entries (a file of their own, or a sweep file's section), the
table ``compare --reported FILE`` and ``sweep --report`` print (reported, measured mean ± std, the difference, the
flag when the paper's number is outside our spread), and the settings in which our runs differ from the paper's.
The measured numbers come from hand-written run directories, so every expected value below is computed by hand."""

import csv
import io
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from advplug.attack_names import canonical_spec
from advplug.config import TrainConfig, read_settings_file
from advplug.run import directory as rundir
from advplug.run import results
from advplug.tools import sweep as sw
from advplug.tools.cli import cli

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
    plugins=[],
    plugin_options={},
    selection="validation",
)
PAPER = 'paper = "Madry et al. 2018"\ntable = "Table 1, row AT"\n'


def ent(which: str, attack: str, acc: float, seed: int, n_test: int = 360) -> dict:
    return results.entry(
        which, 1, attack, acc, eps=0.2, alpha=0.05, n_test=n_test, n_total=360, data="digits", seed=seed
    )


def run_dir(root: Path, name: str, seed: int, accs: dict[str, float], **cfg) -> str:
    """A finished one-epoch run whose results.json holds its last checkpoint (best is last): ``accs`` by attack."""
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**CONFIG, **cfg, "seed": seed}))
    results.write_results(d / "results.json", [ent("last", a, v, seed) for a, v in accs.items()])
    return str(d)


def reported_file(tmp_path: Path, *entries: str, name: str = "paper.toml") -> str:
    p = tmp_path / name
    p.write_text("".join(f"[[reported]]\n{PAPER}{e}\n" for e in entries))
    return str(p)


def compare_json(runs: list[str], file: str) -> list[dict]:
    res = CliRunner().invoke(cli, ["compare", *runs, "--reported", file, "--format", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert isinstance(out["table"], list) and out["table"][0]["method"] == "AT"  # the compare table is kept
    return out["reported"]


def row(rows: list[dict], attack: str, checkpoint: str = "last") -> dict:
    (r,) = [r for r in rows if r["attack"] == attack and r["checkpoint"] == checkpoint]
    return r


@pytest.fixture
def three_seeds(tmp_path):
    """PGD-20 (last) 50, 52, 57 %: mean 53, sample std sqrt(((-3)^2 + (-1)^2 + 4^2) / 2) = sqrt(13) = 3.6056."""
    return [
        run_dir(tmp_path, f"at-s{s}", s, {"natural": nat, "pgd20": pgd})
        for s, nat, pgd in ((0, 0.90, 0.50), (1, 0.92, 0.52), (2, 0.97, 0.57))
    ]


def test_mean_std_difference_and_the_two_std_flag(tmp_path, three_seeds):
    file = reported_file(
        tmp_path,
        'method = "AT"\nattack = "pgd20"\ncheckpoint = "last"\nvalue = 45.0',  # 8.00 below our mean: > 2 x 3.61
        'method = "AT"\nattack = "natural"\ncheckpoint = "last"\nvalue = 88.0',  # 5.00 below 93: < 2 x 3.61
    )
    rows = compare_json(three_seeds, file)
    pgd, nat = row(rows, "pgd20"), row(rows, "natural")
    assert pgd["n"] == 3 and pgd["mean"] == pytest.approx(53.0) and pgd["std"] == pytest.approx(math.sqrt(13))
    assert pgd["reported"] == 45.0 and pgd["diff"] == pytest.approx(8.0) and pgd["outside"] is True
    assert nat["mean"] == pytest.approx(93.0) and nat["std"] == pytest.approx(math.sqrt(13))  # 90, 92, 97
    assert nat["diff"] == pytest.approx(5.0) and nat["outside"] is False  # 5 < 7.21
    assert pgd["paper"] == "Madry et al. 2018" and pgd["table"] == "Table 1, row AT" and pgd["status"] == "measured"
    md = CliRunner().invoke(cli, ["compare", *three_seeds, "--reported", file]).stdout
    assert "| AT | pgd20 | last | 45.00 | 53.00 ± 3.61 (n=3) | +8.00 | yes | Madry et al. 2018, Table 1, row AT |" in md
    assert "| AT | natural | last | 88.00 | 93.00 ± 3.61 (n=3) | +5.00 | no |" in md
    assert md.index("| AT | 3 | validation |") < md.index("| AT | pgd20 |")  # compare's table, then the papers'


def test_one_seed_flags_more_than_one_point(tmp_path):
    run = run_dir(tmp_path, "at-s0", 0, {"natural": 0.5, "pgd20": 0.25})
    file = reported_file(
        tmp_path,
        'method = "AT"\nattack = "natural"\ncheckpoint = "last"\nvalue = 51.0',  # exactly 1 point: inside
        'method = "AT"\nattack = "pgd20"\ncheckpoint = "last"\nvalue = 26.5',  # 1.5 points: outside
        'method = "AT"\nattack = "pgd20"\ncheckpoint = "best"\nvalue = 24.5\nstd = 0.3',  # best is last here: 0.5
    )
    rows = compare_json([run], file)
    nat, pgd, best = row(rows, "natural"), row(rows, "pgd20"), row(rows, "pgd20", "best")
    assert nat["n"] == 1 and nat["std"] is None and nat["diff"] == pytest.approx(-1.0) and nat["outside"] is False
    assert pgd["diff"] == pytest.approx(-1.5) and pgd["outside"] is True
    assert best["mean"] == pytest.approx(25.0) and best["outside"] is False and best["reported_std"] == 0.3


def test_not_run_and_not_evaluated_rows(tmp_path, three_seeds):
    file = reported_file(
        tmp_path,
        'method = "mail"\nattack = "pgd20"\ncheckpoint = "best"\nvalue = 55.25',  # no run of the method
        'method = "AT"\nattack = "aa"\ncheckpoint = "best"\nvalue = 44.9',  # runs, but none evaluated with AA
    )
    rows = compare_json(three_seeds, file)
    mail, aa = row(rows, "pgd20", "best"), row(rows, "aa", "best")
    assert mail["status"] == "not run" and mail["mean"] is None and mail["diff"] is None and mail["outside"] is None
    assert aa["status"] == "not evaluated" and aa["n"] == 0 and aa["outside"] is None
    md = CliRunner().invoke(cli, ["compare", *three_seeds, "--reported", file]).stdout
    assert "| mail | pgd20 | best | 55.25 | not run |" in md and "| AT | aa | best | 44.90 | not evaluated |" in md
    assert "methods of these runs: AT" in md  # a misspelt method is seen as such


def test_settings_that_differ_from_the_papers_are_computed_from_the_runs(tmp_path, three_seeds):
    cfg = json.loads(Path(three_seeds[2], "config.json").read_text())
    Path(three_seeds[2], "config.json").write_text(json.dumps({**cfg, "epochs": 2}))
    file = reported_file(
        tmp_path,
        'method = "AT"\nattack = "pgd20"\ncheckpoint = "best"\nvalue = 52.81\n'
        'data = "cifar10"\nmodel = "resnet18"\nepochs = 100\neps = "8/255"\nselection = "test"',
        'method = "AT"\nattack = "natural"\ncheckpoint = "last"\nvalue = 90.0\n'  # the runs' own setting
        'data = "digits"\nmodel = "digits-cnn"\nepochs = 1\neps = 0.2\nn_test = 360',
        'method = "AT"\nattack = "pgd20"\ncheckpoint = "last"\nvalue = 50.0\ndata = "cifar10"\nn_test = 1000',
    )
    rows = compare_json(three_seeds, file)
    assert row(rows, "pgd20", "best")["settings_differ"] == [
        "data digits (paper cifar10)",
        "model digits-cnn (paper resnet18)",
        "epochs 1, 2 (paper 100)",
        "eps 0.2 (paper 8/255)",
        "test samples 360 (paper 10000)",  # the paper's default: CIFAR-10's whole test set
        "best chosen on validation (paper: test)",
    ]
    assert row(rows, "natural")["settings_differ"] == ["epochs 1, 2 (paper 1)"]  # only what differs
    assert row(rows, "pgd20")["settings_differ"] == ["data digits (paper cifar10)", "test samples 360 (paper 1000)"]
    md = CliRunner().invoke(cli, ["compare", *three_seeds, "--reported", file]).stdout
    assert (
        "AT (pgd20 best): data digits (paper cifar10); model digits-cnn (paper resnet18); epochs 1, 2 (paper 100)" in md
    )
    assert "AT (natural last): epochs 1, 2 (paper 1)" in md


def test_selection_not_stated_by_the_paper_is_said(tmp_path, three_seeds):
    file = reported_file(tmp_path, 'method = "AT"\nattack = "pgd20"\ncheckpoint = "best"\nvalue = 53.0')
    assert row(compare_json(three_seeds, file), "pgd20", "best")["settings_differ"] == [
        "best chosen on validation (paper: not stated)"
    ]


def test_csv_carries_the_columns(tmp_path, three_seeds):
    file = reported_file(tmp_path, 'method = "AT"\nattack = "pgd20"\ncheckpoint = "last"\nvalue = 45.0')
    res = CliRunner().invoke(cli, ["compare", *three_seeds, "--reported", file, "--format", "csv"])
    (r,) = list(csv.DictReader(io.StringIO(res.stdout)))
    assert {"reported", "paper", "table", "diff", "outside", "mean", "std", "n"} <= set(r)
    assert (r["reported"], r["diff"], r["outside"], r["n"]) == ("45.00", "8.0000", "yes", "3")
    assert float(r["mean"]) == pytest.approx(53.0) and float(r["std"]) == pytest.approx(math.sqrt(13), abs=1e-4)


REPORTED_SWEEP = """
[base]
epochs = 1
steps = 1
final_attacks = ["natural", "pgd20"]

[grid]
seed = [0, 1]

[[method]]
name = "at"

[[method]]
name = "mail-at"
plugins = ["mail"]

[reported_defaults]
paper = "MAIL (NeurIPS 2021)"
data = "cifar10"
model = "resnet18"
epochs = 100
selection = "test"

[[reported]]
method = "at"
attack = "pgd20"
checkpoint = "best"
value = 48.91
table = "Table 2, row AT"

[[reported]]
method = "mail-at"
attack = "pgd20"
checkpoint = "best"
value = 55.25
table = "Table 2, row MAIL-AT"
note = "PGD-100 in the paper"
"""


def test_sweep_report_shows_the_sweeps_reported_numbers(tmp_path):
    file = tmp_path / "s.toml"
    file.write_text(f'out = "{tmp_path / "out"}"\n' + REPORTED_SWEEP)
    s = sw.load_sweep(file)
    assert [(r.method, r.table, r.data, r.epochs) for r in s.reported] == [
        ("at", "Table 2, row AT", "cifar10", 100),
        ("mail-at", "Table 2, row MAIL-AT", "cifar10", 100),
    ]
    for p, pgd in zip([q for q in s.points if q.method == "at"], (0.40, 0.46)):  # two finished seeds of "at"
        run = s.dir(p)
        run.mkdir(parents=True)
        rundir.write_json(run / "config.json", TrainConfig(**p.settings).resolved().to_json())
        seed = p.settings["seed"]
        results.write_results(
            run / "results.json", [ent("last", "natural", 0.9, seed), ent("last", "pgd20", pgd, seed)]
        )
    res = CliRunner().invoke(cli, ["sweep", str(file), "--report"])
    assert res.exit_code == 0, res.output
    # 40 and 46: mean 43, std sqrt(18) = 4.24; 48.91 is 5.91 above, inside 2 std (8.49)
    assert (
        "| at ⚠ | pgd20 | best | 48.91 | 43.00 ± 4.24 (n=2) | -5.91 | no | MAIL (NeurIPS 2021), Table 2, row AT |"
        in res.stdout
    )
    assert "| mail-at | pgd20 | best | 55.25 | not run |" in res.stdout and "PGD-100 in the paper" in res.stdout
    assert "at: data digits (paper cifar10); model digits-cnn (paper resnet18); epochs 1 (paper 100)" in res.stdout


def test_compare_takes_a_sweep_file_and_names_runs_by_its_methods(tmp_path):
    file = tmp_path / "s.toml"
    file.write_text(REPORTED_SWEEP)
    runs = [run_dir(tmp_path, "a", 0, {"pgd20": 0.5}, epochs=1), run_dir(tmp_path, "m", 0, {"pgd20": 0.6})]
    Path(runs[1], "config.json").write_text(json.dumps({**CONFIG, "plugins": ["mail"], "seed": 0}))
    rows = json.loads(CliRunner().invoke(cli, ["compare", *runs, "--reported", str(file), "--format", "json"]).stdout)
    by = {r["method"]: r for r in rows["reported"]}
    assert by["at"]["mean"] == pytest.approx(50.0) and by["mail-at"]["mean"] == pytest.approx(60.0)


def test_compare_refuses_sweep_methods_it_cannot_tell_apart(tmp_path, three_seeds):
    file = tmp_path / "s.toml"
    file.write_text(
        '[[method]]\nname = "at"\n\n[[method]]\nname = "at-long"\nepochs = 40\n\n'
        '[[reported]]\nmethod = "at"\nattack = "pgd20"\ncheckpoint = "last"\nvalue = 45.0\npaper = "p"\ntable = "t"\n'
    )
    res = CliRunner().invoke(cli, ["compare", *three_seeds, "--reported", str(file)])
    assert res.exit_code == 2 and "methods 'at' and 'at-long' of the sweep are one method to compare (AT)" in res.output


BAD = [
    ('method = "AT"\nattack = "pgd20"\ncheckpoint = "last"\nvalue = 45.0\nvaule = 1', "unknown key 'vaule'"),
    ('method = "AT"\nattack = "pgd20"\ncheckpoint = "last"\nvalue = 120', "value 120 is not a percentage in [0, 100]"),
    ('method = "AT"\nattack = "pgd20"\ncheckpoint = "last"\nvalue = -1', "value -1 is not a percentage in [0, 100]"),
    ('method = "AT"\nattack = "pgd-x"\ncheckpoint = "last"\nvalue = 4', "unknown attack 'pgd-x'"),
    ('method = "AT"\nattack = "pgd20"\ncheckpoint = "middle"\nvalue = 4', "checkpoint 'middle' is not one of"),
    ('method = "AT"\nattack = "pgd20"\ncheckpoint = "best"', "has no 'value'"),
    ('method = "AT"\nattack = "pgd20"\ncheckpoint = "best"\nvalue = "45"', "value '45' is not a number"),
    ('method = "AT"\nattack = "pgd20"\ncheckpoint = "best"\nvalue = 4\neps = "8/0"', "eps '8/0' is not"),
    ('method = "AT"\nattack = "pgd20"\ncheckpoint = "best"\nvalue = 4\nselection = "dev"', "selection 'dev' is not"),
]


@pytest.mark.parametrize("entry, message", BAD, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_reported_entries_are_one_line_errors_naming_the_entry(tmp_path, three_seeds, entry, message):
    ok = 'method = "AT"\nattack = "natural"\ncheckpoint = "last"\nvalue = 90.0'
    file = reported_file(tmp_path, ok, entry)
    res = CliRunner().invoke(cli, ["compare", *three_seeds, "--reported", file])
    assert res.exit_code == 2 and "Traceback" not in res.output
    (line,) = res.output.strip().splitlines()
    assert line.startswith("error: ") and "[[reported]] #2 (AT" in line and message in line, line


def test_a_reported_method_not_in_the_sweep_is_an_error(tmp_path):
    file = tmp_path / "s.toml"
    file.write_text(REPORTED_SWEEP.replace('method = "mail-at"', 'method = "mail-trades"'))
    res = CliRunner().invoke(cli, ["sweep", str(file), "--dry-run"])
    assert res.exit_code == 2, res.output
    assert "[[reported]] #2 (mail-trades pgd20 best): method 'mail-trades' is not a method of the sweep" in res.output
    assert "(its methods: at, mail-at)" in res.output


def test_unnamed_methods_sharing_a_name_are_numbered(tmp_path):
    file = tmp_path / "s.toml"
    file.write_text(
        '[[method]]\nplugins = ["mail"]\n\n[[method]]\nplugins = ["mail"]\n"mail-gamma" = 2.0\n\n[[method]]\n'
    )
    assert [p.method for p in sw.load_sweep(file).points] == ["mail-at#1", "mail-at#2", "at"]


def test_the_same_entry_twice_and_a_file_without_entries(tmp_path, three_seeds):
    e = 'method = "AT"\nattack = "pgd20"\ncheckpoint = "last"\nvalue = 45.0'
    res = CliRunner().invoke(cli, ["compare", *three_seeds, "--reported", reported_file(tmp_path, e, e)])
    assert res.exit_code == 2 and "[[reported]] #2 (AT pgd20 last) repeats #1" in res.output
    empty = tmp_path / "empty.toml"
    empty.write_text("[reported_defaults]\npaper = 'x'\n")
    res = CliRunner().invoke(cli, ["compare", *three_seeds, "--reported", str(empty)])
    assert res.exit_code == 2 and "has no [[reported]] entries" in res.output


EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "sweeps").glob("*.toml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_sweeps_carry_their_papers_numbers(example):
    s = sw.load_sweep(example)
    methods = {p.method for p in s.points}
    raw = read_settings_file(example, "sweep")["reported"]
    assert len(s.reported) == len(raw) >= 6
    assert {r.method for r in s.reported} <= methods
    for r in s.reported:
        assert r.attack == canonical_spec(r.attack) and 0 <= r.value <= 100 and r.checkpoint in ("best", "last")
        assert r.paper and r.table.startswith("Table ") and r.data == "cifar10" and r.model and r.epochs
