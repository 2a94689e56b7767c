"""The command line: listings, and bad input as one line on stderr with exit status 2."""

import json

import pytest
from click.testing import CliRunner

from advplug.engine.trainer import Trainer
from advplug.testing import digits_subset, tiny_config
from advplug.tools.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


def one_line_error(res, pattern):
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], res.output


def test_plugins_json_lists_meow_with_options():
    res = run("plugins", "--json")
    assert res.exit_code == 0
    data = json.loads(res.output)
    meow = next(p for p in data["plugins"] if p["name"] == "meow")
    assert meow["version"] == "0.1.0" and "compute_weights" in meow["hooks"]
    assert {"name": "temperature", "flag": "--meow-temperature"}.items() <= next(
        o for o in meow["options"] if o["name"] == "temperature"
    ).items()


def test_hooks_shows_order_and_owner():
    res = run("hooks", "--plugin", "meow")
    assert res.exit_code == 0
    block = res.output.split("combine_loss:")[1].split("on_batch_end:")[0]
    assert "meow  [owns the loss]" in block and "at  [trylast, yields]" in block


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["train", "--plugin", "nosuch"], 'unknown plugin "nosuch" (installed:'),
        (["train", "--eps", "-1"], "--eps must be > 0"),
        (["train", "--steps", "0"], "--steps must be >= 1"),
        (["train", "--objective", "xent"], "unknown objective 'xent'"),
        (["train", "--meow-temperature", "3"], "which is not enabled (add --plugin meow)"),
        (["train", "--plugin", "meow", "--meow-temperature", "-3"], "--meow-temperature: must be > 0.0"),
        (
            ["train", "--plugin", "meow", "--objective", "mart", "--epochs", "1"],
            "'meow' with 'mart': meow weighs the natural term",
        ),
        (["train", "--data", "cifar10", "--data-root", "/nonexistent/x"], "pass --download"),
        (["eval", "/nonexistent/run"], "no checkpoint at"),
    ],
)
def test_bad_input_is_one_clear_line(args, pattern, tmp_path):
    one_line_error(run(*args, *(["--out", str(tmp_path)] if args[0] == "train" else [])), pattern)


@pytest.mark.slow
def test_eval_a_run_directory(tmp_path):
    Trainer(tiny_config(str(tmp_path)), data=digits_subset(), log=lambda s: None).fit()
    res = run("eval", str(tmp_path), "--which", "last", "--attack", "natural", "--attack", "cw5", "--n-eval", "64")
    assert res.exit_code == 0, res.output
    assert "CW-Linf margin (PGD-5) on 64" in res.output and "Natural on 64" in res.output
    saved = json.loads((tmp_path / "eval.json").read_text())["entries"]
    assert {(e["checkpoint"], e["attack"], e["n_test"]) for e in saved.values()} == {
        ("last", "natural", 64),
        ("last", "cw5", 64),
    }


def test_eval_refuses_a_damaged_eval_json_before_evaluating(tmp_path, monkeypatch):
    """The results of minutes of attacks are never computed only to be lost on a corrupt eval.json
    (which is kept as it is)."""
    import advplug.tools.evaluation

    Trainer(tiny_config(str(tmp_path), epochs=1), data=digits_subset(128, 32), log=lambda s: None).fit()
    (tmp_path / "eval.json").write_text('{"format": "advplug-eval", "version": 2, "entries": [')

    def never(*a, **k):
        raise AssertionError("evaluated despite a damaged eval.json")

    monkeypatch.setattr(advplug.tools.evaluation, "evaluate_checkpoints", never)
    one_line_error(run("eval", str(tmp_path), "--attack", "natural"), "eval.json' is corrupt")
    assert (tmp_path / "eval.json").read_text().endswith("[")


@pytest.mark.slow
def test_eval_adds_to_eval_json_and_is_reproducible(tmp_path):
    """A later quick evaluation never wipes an earlier one; the same key is replaced, with the
    same number (seeded random starts)."""
    Trainer(tiny_config(str(tmp_path)), data=digits_subset(), log=lambda s: None).fit()
    assert run("eval", str(tmp_path), "--which", "last", "--attack", "pgd5", "--n-eval", "64").exit_code == 0
    first = json.loads((tmp_path / "eval.json").read_text())["entries"]
    assert run("eval", str(tmp_path), "--which", "last", "--attack", "fgsm", "--n-eval", "32").exit_code == 0
    assert run("eval", str(tmp_path), "--which", "last", "--attack", "pgd5", "--n-eval", "64").exit_code == 0
    second = json.loads((tmp_path / "eval.json").read_text())["entries"]
    assert len(second) == 2 and set(first) < set(second)
    (key,) = first
    assert second[key]["accuracy"] == first[key]["accuracy"]  # same checkpoint, same seed: same result
    assert (
        run("eval", str(tmp_path), "--which", "last", "--attack", "pgd5", "--n-eval", "64", "--eps", "0.1").exit_code
        == 0
    )
    assert len(json.loads((tmp_path / "eval.json").read_text())["entries"]) == 3  # other settings: a new entry


def test_resume_refuses_new_settings(tmp_path):
    one_line_error(
        run("train", "--resume", str(tmp_path), "--eps", "0.1"), "--resume continues the saved configuration"
    )


@pytest.mark.slow
def test_art_backend_cross_checks_pgd(tmp_path):
    Trainer(tiny_config(str(tmp_path)), data=digits_subset(), log=lambda s: None).fit()
    res = run(
        "eval",
        str(tmp_path),
        "--which",
        "last",
        "--backend",
        "art",
        "--attack",
        "natural",
        "--attack",
        "pgd5",
        "--n-eval",
        "64",
    )
    assert res.exit_code == 0, res.output
    assert "PGD-5 (ART)" in res.output and "Natural (ART)" in res.output


@pytest.mark.slow
def test_config_file_and_tensorboard(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        'epochs = 1\nsteps = 2\neval_steps = 2\nfinal_attacks = ["natural"]\n'
        f'out = "{tmp_path / "run"}"\n[meow]\ntemperature = 5.0\n'
    )
    res = run("train", "--config", str(cfg), "--plugin", "meow", "--tensorboard", "--no-progress")
    assert res.exit_code == 0, res.output
    import json

    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["resolved_plugin_options"]["meow"]["temperature"] == 5.0 and saved["epochs"] == 1
    assert any((tmp_path / "run" / "tensorboard").iterdir())
