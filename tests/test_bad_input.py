"""Bad input gets a one-line error (exit 2 from the CLI): wrong types in a config file, bad values,
damaged checkpoints and epoch counters on resume, a config.json edited after the checkpoint,
another world size; a plugin's bad weights or hook signature are named, and an infinite plugin
value keeps metrics.jsonl strict JSON."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

from advplug.engine.inputs import resume_config
from advplug.engine.trainer import Trainer
from advplug.errors import CheckpointError
from advplug.run import checkpoint
from advplug.testing import digits_subset, tiny_config
from advplug.tools.cli import cli


def quiet(_):
    pass


def one_line_error(res, pattern, code=2):
    assert res.exit_code == code, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], res.stderr


def train(out, **kw):
    return Trainer(tiny_config(str(out), **kw), data=digits_subset(128, 32), log=quiet)


@pytest.mark.parametrize(
    "toml,pattern",
    [
        ('epochs = "three"', "epochs must be a whole number, got 'three'"),
        ("epochs = 1.5", "epochs must be a whole number, got 1.5"),
        ('eps = "big"', "eps must be a number, got 'big'"),
        ("milestones = 5", "milestones must be a list of whole epochs, got 5"),
        ('plugins = "mail"', "plugins must be a list of names, got 'mail'"),
        ('tensorboard = "yes"', "tensorboard must be true or false"),
        ("lr = inf", "lr must be a finite number, got inf"),
        ("selection_size = inf", "selection-size must be a finite number, got inf"),
        ("weight_decay = 1e400", "weight-decay must be a finite number, got inf"),
        ("seed = 99999999999999999999999", "--seed must be in 0..4294967295"),
    ],
)
def test_wrong_types_in_a_config_file(tmp_path, toml, pattern):
    f = tmp_path / "c.toml"
    f.write_text(toml + "\n")
    one_line_error(CliRunner().invoke(cli, ["train", "--config", str(f), "--out", str(tmp_path / "r")]), pattern)


@pytest.mark.parametrize(
    "name,content,pattern",
    [
        ("c.json", b"[1]", "expected a table of settings, got list"),
        ("c.json", b'"x"', "expected a table of settings, got str"),
        ("c.json", b'{"plugin_options": [1]}', "plugin_options must be a table"),
        ("c.toml", b"\xcc\xff\x00", "cannot be parsed: 'utf-8' codec can't decode"),
    ],
)
def test_a_config_file_that_is_not_a_table_of_settings(tmp_path, name, content, pattern):
    f = tmp_path / name
    f.write_bytes(content)
    one_line_error(CliRunner().invoke(cli, ["train", "--config", str(f), "--out", str(tmp_path / "r")]), pattern)


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["train", "--eps", "2"], "--eps must be < 1 (inputs are in [0, 1]"),
        (["train", "--alpha", "3"], "--alpha (attack step size) must be <= 1"),
        (["train", "--model", "builtins:dict"], "--model builtins:dict returned a dict, not a torch.nn.Module"),
        (["train", "--device", "nonsense"], "--device 'nonsense' is not a device"),
        (["train", "--selection-size", "inf"], "selection-size must be a finite number, got inf"),
        (["train", "--seed", "-1"], "--seed must be in 0..4294967295"),
    ],
)
def test_bad_values(tmp_path, args, pattern):
    one_line_error(CliRunner().invoke(cli, [*args, "--epochs", "1", "--out", str(tmp_path / "r")]), pattern)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu(tmp_path):
    one_line_error(
        CliRunner().invoke(cli, ["train", "--device", "cuda", "--out", str(tmp_path / "r")]),
        "this machine has no usable CUDA GPU",
    )


def test_eval_bad_eps_and_mismatched_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    one_line_error(CliRunner().invoke(cli, ["eval", str(out), "--eps", "-1"]), "--eps must be in (0, 1)")
    ck = checkpoint.load(out, need="training")
    ck["num_classes"] = 7
    checkpoint.save(tmp_path / "odd.pt", {k: v for k, v in ck.items() if k not in ("path", "format", "version")})
    one_line_error(
        CliRunner().invoke(cli, ["eval", str(tmp_path / "odd.pt"), "--attack", "natural"]), "does not fit model"
    )


def test_zero_byte_and_damaged_checkpoints_on_resume(tmp_path):
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    good = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(b"")
    one_line_error(CliRunner().invoke(cli, ["train", "--resume", str(out)]), "is empty (0 bytes)")
    ck = checkpoint._read  # the real loader, on a checkpoint with a missing key
    (out / "last.pt").write_bytes(good)
    raw = checkpoint.load(out, need="training")
    del raw["rng"]
    checkpoint.save(out / "last.pt", {k: v for k, v in raw.items() if k not in ("path", "format", "version")})
    one_line_error(CliRunner().invoke(cli, ["train", "--resume", str(out)]), "has no 'rng' entry")
    assert ck is not None


def test_resume_refuses_a_config_json_edited_after_the_checkpoint(tmp_path):
    """--resume reads config.json; one that no longer matches last.pt would continue the run under
    other settings, silently. Raising epochs (extending the run) and the device stay allowed."""
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "eps": 0.3, "epochs": 2}))
    res = CliRunner().invoke(cli, ["train", "--resume", str(out)])
    one_line_error(res, "config.json' does not match the run's checkpoint")
    assert "eps 0.3 (last.pt: 0.2)" in res.stderr
    (out / "config.json").write_text(json.dumps({**saved, "epochs": 2, "device": "cpu"}))
    Trainer(resume_config(out), data=digits_subset(128, 32), resume=True, log=quiet).fit()
    assert checkpoint.load(out)["epoch"] == 1


@pytest.mark.parametrize(
    "change,pattern",
    [
        (dict(epoch=-3), "it is after epoch -2, this run has epochs 1..2"),  # would train epochs -2..0 unlabelled
        (dict(epoch=10**9), "it is after epoch 1000000001"),  # would end at once as if finished
        (dict(best_acc=float("nan")), "accuracy nan do not fit"),  # no epoch would ever be "best"
        (dict(best_epoch=-5), "best epoch -4"),
        (dict(metrics="[1]\n"), "does not hold one object per epoch"),
        (dict(metrics=""), "(0 entries for 1 epochs)"),
    ],
)
def test_resume_refuses_damaged_epoch_counters(tmp_path, change, pattern):
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "epochs": 2}))
    ck = checkpoint.load(out, need="training")
    checkpoint.save(
        out / "last.pt", {**{k: v for k, v in ck.items() if k not in ("path", "format", "version")}, **change}
    )
    with pytest.raises(CheckpointError, match=re.escape(pattern)):
        Trainer(resume_config(out), data=digits_subset(128, 32), resume=True, log=quiet)


@pytest.mark.parametrize(
    "damage,pattern",
    [
        (lambda b: torch.zeros(3), "momentum_buffer of parameter 0 is of shape (3,), expected"),
        (lambda b: b * float("nan"), "momentum_buffer of parameter 0 is not finite"),
    ],
)
def test_resume_refuses_a_damaged_optimizer_state(tmp_path, damage, pattern):
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "epochs": 2}))
    ck = checkpoint.load(out, need="training")
    state = ck["optimizer"]["state"][0]
    state["momentum_buffer"] = damage(state["momentum_buffer"])
    checkpoint.save(out / "last.pt", {k: v for k, v in ck.items() if k not in ("path", "format", "version")})
    with pytest.raises(CheckpointError, match=re.escape(pattern)):
        Trainer(resume_config(out), data=digits_subset(128, 32), resume=True, log=quiet)


def test_resume_with_another_world_size_is_refused(tmp_path):
    out = tmp_path / "run"
    train(out, epochs=1).fit()
    raw = checkpoint.load(out, need="training")
    raw["world_size"], raw["rng"] = 2, raw["rng"] * 2
    checkpoint.save(out / "last.pt", {k: v for k, v in raw.items() if k not in ("path", "format", "version")})
    with pytest.raises(
        CheckpointError, match=r"written by 2 process\(es\), this run has 1: resume with the same number"
    ):
        Trainer(resume_config(out), data=digits_subset(128, 32), resume=True, log=quiet)


@pytest.mark.parametrize(
    "kind,pattern",
    [
        ("nan", "plugin 'bad' returned negative or non-finite weights in epoch 1"),
        ("negative", "plugin 'bad' returned negative or non-finite weights in epoch 1"),
        ("zero", "the combined weights of a whole batch were zero in epoch 1"),
    ],
)
def test_bad_weights_name_the_plugin_not_the_loss(tmp_path, monkeypatch, kind, pattern):
    from advplug.errors import PluginError
    from advplug.testing import BadWeights, installed_plugins

    monkeypatch.setattr(BadWeights, "kind", kind)
    with installed_plugins(bad="advplug.testing:BadWeights"):
        with pytest.raises(PluginError, match=pattern):
            train(tmp_path / "run", plugins=("bad",), epochs=1).fit()
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_plugin_with_a_wrong_hook_signature(tmp_path):
    from advplug.testing import installed_plugins

    with installed_plugins(wrongsig="advplug.testing:WrongSignature"):
        res = CliRunner().invoke(cli, ["plugins"])
        assert res.exit_code == 0 and 'plugin "wrongsig" does not fit the hook contract' in res.stderr
        assert "  wrongsig " not in res.output  # not listed as fine
        one_line_error(
            CliRunner().invoke(cli, ["train", "--plugin", "wrongsig", "--out", str(tmp_path / "r")]),
            "{'batch'} are declared in the hookimpl but can not be found in the hookspec",
        )


def test_metrics_are_strict_json_even_with_an_infinite_plugin_value(tmp_path):
    """GAIRAT records lambda = inf before its schedule starts: metrics.jsonl stays strict JSON."""

    def strict(s):
        return json.loads(s, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    train(tmp_path / "run", plugins=("gairat",), epochs=2).fit()
    recs = [strict(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and "gairat" in recs[0]
