"""Export to RobustBench: the ``.pt`` loads the way RobustBench's ``load_model`` reads a file and gives advplug's
outputs; the model-info JSON has RobustBench's fields in their formats; a robust accuracy that is not the
leaderboard's (fewer test points, another eps, a checkpoint chosen on the test set) is left out and said why in the
footnote; ``eval --suite robustbench`` resumes an interrupted attack from its last saved chunk to the numbers of an
uninterrupted one."""

import json
import re
import shutil
from collections import OrderedDict

import pytest
import torch
from click.testing import CliRunner

from advplug.engine.trainer import Trainer
from advplug.errors import OptionError
from advplug.models import build_model
from advplug.run import directory as rundir
from advplug.run import results
from advplug.testing import digits_subset, tiny_config
from advplug.tools import api
from advplug.tools import robustbench as rb
from advplug.tools.cli import cli

INFO_FIELDS = {
    "link",
    "name",
    "authors",
    "additional_data",
    "number_forward_passes",
    "dataset",
    "venue",
    "architecture",
    "eps",
    "clean_acc",
    "reported",
    "autoattack_acc",
    "footnote",
}
PERCENT = re.compile(r"^\d{1,3}\.\d\d$")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU


def quiet(_):
    pass


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(res, pattern):
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], res.stderr


def _train(out, **kw):
    cfg = tiny_config(str(out), eps=0.05, alpha=0.02, selection_size=32.0, **{"epochs": 2, **kw})
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(cfg, data=digits_subset(256, 32), log=quiet).fit()
    finally:
        torch.set_num_threads(n)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny digits run, best chosen on held-out training samples."""
    return _train(tmp_path_factory.mktemp("rb") / "run", selection="validation")


@pytest.fixture
def run_dir(trained, tmp_path):
    """A copy of the tiny run that a test may add evaluations to."""
    return shutil.copytree(trained, tmp_path / "run")


# -- RobustBench's loader, transcribed (robustbench 1.1.1, robustbench/utils.py: load_model) -------------------------
def _rm_substr_from_state_dict(state_dict, substr):
    """Their prefix cleaning: a key *containing* ``substr`` loses its first ``len(substr)`` characters."""
    new = OrderedDict()
    for key in state_dict.keys():
        new[key[len(substr) :] if substr in key else key] = state_dict[key]
    return new


def load_like_robustbench(path, model):
    checkpoint = torch.load(path, map_location=torch.device("cpu"))
    try:
        state_dict = _rm_substr_from_state_dict(checkpoint["state_dict"], "module.")
        state_dict = _rm_substr_from_state_dict(state_dict, "model.")
    except KeyError:
        state_dict = _rm_substr_from_state_dict(checkpoint, "module.")
        state_dict = _rm_substr_from_state_dict(state_dict, "model.")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _test_images(n=64):
    from advplug.data import load_digits_tensors

    _, (x, _) = load_digits_tensors()
    return x[:n]


def _labels(n):
    from advplug.data import load_digits_tensors

    _, (_, y) = load_digits_tensors()
    return y[:n]


def _export(run_dir, out, *extra):
    res = run("export", run_dir, "--format", "robustbench", "--out", out, *extra)
    assert res.exit_code == 0, res.output
    return res


# -- the model file --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["best", "last"])
def test_the_exported_model_loads_as_robustbench_reads_it_and_gives_the_same_outputs(run_dir, tmp_path, which):
    _export(run_dir, tmp_path / "zoo", "--which", which, "--name", "tiny")
    ckpt = torch.load(tmp_path / "zoo" / "tiny.pt", map_location="cpu", weights_only=True)
    assert list(ckpt) == ["state_dict"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict"])
    theirs = load_like_robustbench(tmp_path / "zoo" / "tiny.pt", build_model("digits-cnn", 10, (1, 8, 8)))
    ours = api.load_model(run_dir, which)
    x = _test_images()
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))
        assert torch.equal(theirs(x), theirs(x))  # eval mode: the same forward twice


def test_the_robustbench_package_loads_the_export(run_dir, tmp_path, monkeypatch):
    """With the ``robustbench`` package (not a dependency of advplug): its own ``load_model`` reads the file, the
    model registered in its zoo as a zoo entry is (its download skipped: the file is already there)."""
    import sys

    try:
        import pyautoattack

        sys.modules.setdefault("autoattack", pyautoattack)  # robustbench 1.1.1 imports the name 'autoattack'
    except ImportError:
        pass
    zoo = pytest.importorskip("robustbench.model_zoo")
    utils = pytest.importorskip("robustbench.utils")
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    _export(run_dir, tmp_path / "models" / "cifar10" / "Linf", "--which", "last", "--name", "Advplug2099Tiny")
    entry = {"model": lambda: build_model("digits-cnn", 10, (1, 8, 8)), "gdrive_id": "unused"}
    monkeypatch.setitem(zoo.model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf], "Advplug2099Tiny", entry)
    theirs = utils.load_model("Advplug2099Tiny", model_dir=tmp_path / "models", dataset="cifar10", threat_model="Linf")
    x = _test_images()
    with torch.no_grad():
        assert not theirs.training and torch.equal(theirs(x), api.load_model(run_dir, "last")(x))


def test_keys_robustbench_would_mangle_are_refused():
    """Their cleaning cuts the head of any key that contains 'model.' or 'module.' anywhere."""
    rb.check_keys({"features.0.weight": torch.zeros(1), "head.bias": torch.zeros(1)})
    with pytest.raises(OptionError, match="'backbone.model.weight'"):
        rb.check_keys({"backbone.model.weight": torch.zeros(1)})


# -- the model-info JSON ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "eps,text",
    [(8 / 255, "8/255"), (2 / 255, "2/255"), (16 / 255, "16/255"), (0.2, "0.2"), (0.3, "0.3"), (0.031, "0.031")],
)
def test_eps_is_written_as_the_fraction_it_came_from(eps, text):
    assert rb.eps_text(eps) == text


def test_model_info_has_robustbench_fields_in_their_formats(run_dir, tmp_path):
    _export(
        run_dir,
        tmp_path,
        "--which",
        "last",
        "--name",
        "tiny",
        "--link",
        "https://example.org/paper",
        "--authors",
        "A. Author, B. Author",
    )
    info = json.loads((tmp_path / "tiny.json").read_text())
    assert set(info) == INFO_FIELDS
    assert info["additional_data"] is False and info["number_forward_passes"] == 1
    assert info["link"] == "https://example.org/paper" and info["authors"] == "A. Author, B. Author"
    assert info["venue"] == "" and info["name"] == "tiny"
    assert info["dataset"] == "digits" and info["architecture"] == "DigitsCNN" and info["eps"] == "0.05"
    entries = results.read_run(run_dir, json.loads((run_dir / "config.json").read_text()))
    last = {e["attack"]: e for e in entries if e["checkpoint"] == "last"}
    assert PERCENT.match(info["clean_acc"]) and info["clean_acc"] == f"{100 * last['natural']['accuracy']:.2f}"
    assert info["autoattack_acc"] == "" and info["reported"] == ""  # no AutoAttack yet
    assert "not a RobustBench data set" in info["footnote"] and "no AutoAttack" in info["footnote"]


def test_autoattack_on_part_of_the_test_set_is_not_a_leaderboard_number(run_dir, tmp_path):
    kw = dict(eps=0.05, alpha=0.0125, n_total=360, data="digits", seed=0)
    aa = results.entry("last", 2, "aa", 0.125, n_test=8, **kw)
    others = [
        results.entry("best", 2, "aa", 0.5, n_test=360, **kw),
        results.entry("last", 1, "aa", 0.5, n_test=360, **kw),
    ]
    results.merge_evals(run_dir / "eval.json", [aa, *others])  # the last checkpoint's at its epoch is the one read
    _export(run_dir, tmp_path, "--which", "last", "--name", "refused")
    info = json.loads((tmp_path / "refused.json").read_text())
    assert info["autoattack_acc"] == "" and info["reported"] == ""
    assert "AutoAttack on 8 of the 360 test points" in info["footnote"]
    _export(run_dir, tmp_path, "--which", "last", "--name", "partial", "--allow-partial")
    info = json.loads((tmp_path / "partial.json").read_text())
    assert info["autoattack_acc"] == info["reported"] == f"{100 * aa['accuracy']:.2f}"
    assert "on 8 of the 360 test points" in info["footnote"] and "held-out" not in info["footnote"]  # last: no choice
    _export(run_dir, tmp_path, "--which", "best", "--name", "best")
    assert (
        "best PGD-3 accuracy on 32 held-out training samples"
        in json.loads((tmp_path / "best.json").read_text())["footnote"]
    )


def _aa(n_test=10_000, n_total=10_000, eps=8 / 255):
    return results.entry(
        "best", 3, "aa", 0.5, eps=eps, alpha=eps / 4, n_test=n_test, n_total=n_total, data="cifar10", seed=0
    )


@pytest.mark.parametrize(
    "aa,selection,which,reason",
    [
        (_aa(n_test=1000), "validation", "best", "AutoAttack on 1000 of the 10000 test points"),
        (_aa(eps=0.03), "validation", "best", "at eps 0.03, not cifar10's standard 8/255"),
        (_aa(), "test", "best", "chosen on the test set"),
        (_aa(), "test", "best-ema", "chosen on the test set"),
        (None, "validation", "best", "no AutoAttack"),
    ],
)
def test_what_is_not_a_leaderboard_number(aa, selection, which, reason):
    reasons = rb.leaderboard_problems(aa, data="cifar10", selection=selection, which=which, run_eps=8 / 255)
    assert len(reasons) == 1 and reason in reasons[0]


def test_a_leaderboard_number(tmp_path):
    assert rb.leaderboard_problems(_aa(), data="cifar10", selection="validation", which="best", run_eps=8 / 255) == []
    assert rb.leaderboard_problems(_aa(), data="cifar10", selection="test", which="last", run_eps=8 / 255) == []


def test_a_run_whose_best_was_chosen_on_the_test_set_says_so(tmp_path):
    out = _train(tmp_path / "run", epochs=1)  # tiny_config: selection on the test set
    _export(out, tmp_path / "zoo", "--which", "best", "--name", "t", "--allow-partial")
    assert "chosen on the test set" in json.loads((tmp_path / "zoo" / "t.json").read_text())["footnote"]


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["/nonexistent/run", "--out", "x"], "is not a run directory"),
        (["{run}", "--format", "onnx", "--out", "x"], "unknown export format 'onnx' (formats: robustbench)"),
        (["{run}", "--name", "a/b", "--out", "x"], "--name 'a/b'"),
        (["{empty}", "--out", "x"], "no checkpoint at"),
    ],
)
def test_bad_export_input_is_one_line(run_dir, tmp_path, args, pattern):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((run_dir / "config.json").read_text())
    args = [a.format(run=run_dir, empty=tmp_path / "empty") for a in args]
    if "--format" not in args:
        args += ["--format", "robustbench"]
    one_line_error(run("export", *args), pattern)


def test_an_existing_export_is_replaced_only_with_overwrite(run_dir, tmp_path):
    _export(run_dir, tmp_path, "--which", "last", "--name", "tiny")
    one_line_error(
        run("export", run_dir, "--format", "robustbench", "--out", tmp_path, "--name", "tiny"), "--overwrite"
    )
    _export(run_dir, tmp_path, "--which", "last", "--name", "tiny", "--overwrite")


# -- the resumable suite ---------------------------------------------------------------------------------------------
def _flags(run_dir, which="last"):
    return json.loads((run_dir / "robustbench" / f"{which}.partial.json").read_text())["correct"]


def _shuffled(*args, **kw):
    """In place of an attack: each batch's images in an order drawn from torch's RNG, so that which points count as
    robust depends on the RNG state far more than a real attack's random start does on a tiny model."""
    return lambda x, y: x[torch.randperm(len(x), device=x.device)]


@pytest.mark.parametrize("attack", ["pgd1", "rng"])
def test_an_interrupted_suite_resumes_to_the_uninterrupted_numbers(trained, tmp_path, monkeypatch, attack):
    """Chunks of 8 of the first 32 test points under PGD-1 from a random start (in place of AutoAttack), or an attack
    that is the RNG's: killed after its second chunk and resumed, the saved per-sample flags and the entries equal
    those of a run never stopped."""
    monkeypatch.setattr(rb, "N_POINTS", 32)
    if attack == "rng":
        monkeypatch.setattr(rb, "make_eval_attack", _shuffled)
    straight, resumed = (shutil.copytree(trained, tmp_path / n) for n in ("straight", "resumed"))
    kw = dict(chunk_size=8, attack="pgd1", log=quiet)

    monkeypatch.setenv("ADVPLUG_FAULT", "robustbench-chunk@1")
    with pytest.raises(rundir.InjectedFault):
        rb.robustbench_eval(str(resumed), ["last"], **kw)
    assert len(_flags(resumed)) == 2 and not (resumed / "eval.json").exists()
    monkeypatch.setenv("ADVPLUG_FAULT", "robustbench-chunk@2")
    lines = []
    with pytest.raises(rundir.InjectedFault):
        rb.robustbench_eval(str(resumed), ["last"], **{**kw, "log": lines.append})
    assert any("continuing from point 16 of 32" in x for x in lines) and any("chunk 3/4: 24 of 32" in x for x in lines)
    with pytest.raises(rundir.InjectedFault):
        rb.robustbench_eval(str(straight), ["last"], **kw)  # the same point: three chunks saved
    assert _flags(resumed) == _flags(straight) and len(_flags(straight)) == 3

    monkeypatch.delenv("ADVPLUG_FAULT")
    a = rb.robustbench_eval(str(resumed), ["last"], **kw)
    b = rb.robustbench_eval(str(straight), ["last"], **kw)
    assert a == b and {e["attack"] for e in a} == {"natural", "pgd1"}
    assert {(e["n_test"], e["n_total"], e["eps"]) for e in a} == {(32, 360, 0.05)}
    counts = torch.bincount(_labels(32), minlength=10).tolist()
    for e in a:  # per class, from the same per-sample results
        assert len(e["per_class"]) == 10 and all((acc is None) == (m == 0) for acc, m in zip(e["per_class"], counts))
        assert sum(acc * m for acc, m in zip(e["per_class"], counts) if m) == pytest.approx(32 * e["accuracy"])
    assert not (resumed / "robustbench" / "last.partial.json").exists()
    saved = results.read_evals(resumed / "eval.json")
    assert sorted(saved.values(), key=lambda e: e["attack"]) == sorted(a, key=lambda e: e["attack"])


def test_a_partial_file_of_other_settings_is_refused_naming_them(run_dir, monkeypatch):
    monkeypatch.setattr(rb, "N_POINTS", 32)
    monkeypatch.setenv("ADVPLUG_FAULT", "robustbench-chunk@0")
    with pytest.raises(rundir.InjectedFault):
        rb.robustbench_eval(str(run_dir), ["last"], chunk_size=8, attack="pgd1", log=quiet)
    monkeypatch.delenv("ADVPLUG_FAULT")
    with pytest.raises(OptionError, match="chunk size 8, this evaluation 16"):
        rb.robustbench_eval(str(run_dir), ["last"], chunk_size=16, attack="pgd1", log=quiet)


def test_a_partial_file_of_other_weights_is_ignored_with_a_line(run_dir, monkeypatch):
    monkeypatch.setattr(rb, "N_POINTS", 16)
    monkeypatch.setenv("ADVPLUG_FAULT", "robustbench-chunk@0")
    with pytest.raises(rundir.InjectedFault):
        rb.robustbench_eval(str(run_dir), ["last"], chunk_size=8, attack="pgd1", log=quiet)
    monkeypatch.delenv("ADVPLUG_FAULT")
    part = run_dir / "robustbench" / "last.partial.json"
    doc = json.loads(part.read_text())
    doc["settings"]["weights"] = "0" * 64
    part.write_text(json.dumps(doc))
    lines = []
    rb.robustbench_eval(str(run_dir), ["last"], chunk_size=8, attack="pgd1", log=lines.append)
    assert any("other weights" in x and "starting over" in x for x in lines)


def test_the_suite_runs_autoattack_from_the_command_line(run_dir, monkeypatch):
    """The real AutoAttack (torchattacks, standard) on 4 points in two chunks."""
    monkeypatch.setattr(rb, "N_POINTS", 4)
    res = run("eval", run_dir, "--suite", "robustbench", "--which", "last", "--chunk-size", "2", "--progress")
    assert res.exit_code == 0, res.output
    assert "the first 4 of 360 test points" in res.output and "the run's eps 0.05" in res.output
    entries = list(results.read_evals(run_dir / "eval.json").values())
    assert {(e["attack"], e["n_test"], e["eps"], e["checkpoint"]) for e in entries} == {
        ("aa", 4, 0.05, "last"),
        ("natural", 4, 0.05, "last"),
    }
    assert not (run_dir / "robustbench").exists()
    one_line_error(run("eval", run_dir, "--suite", "robustbench", "--eps", "0.1"), "--suite robustbench")
