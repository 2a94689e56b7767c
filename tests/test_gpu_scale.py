"""The GPU-scale switches on the CPU: --precision, --channels-last, --compile, --ema, the
on-device data path; weights in fp32 under autocast; exact resume with each."""

import json

import pytest
import torch

from advplug.engine.ema import EMA
from advplug.engine.trainer import Trainer
from advplug.run import checkpoint
from advplug.testing import DtypeProbe, digits_subset, installed_plugins, run_and_resume, same_tensors, tiny_config


def quiet(_):
    pass


def small():
    return digits_subset(128, 32)


def test_bf16_trains_with_fp32_weights_and_records_a_low_precision_evaluation(tmp_path):
    DtypeProbe.seen = []
    with installed_plugins(probe="advplug.testing:DtypeProbe"):
        res = Trainer(
            tiny_config(str(tmp_path), epochs=1, precision="bf16", plugins=("probe",)), data=small(), log=quiet
        ).fit()
    assert DtypeProbe.seen and all(d == (torch.float32,) * 3 for d in DtypeProbe.seen)
    last = res["last (epoch 1)"]
    assert set(last) == {"Natural", "PGD-5", "PGD-5 (bf16 eval)"}  # fp32 final evaluation, and the bf16 one beside
    assert json.loads((tmp_path / "config.json").read_text())["precision"] == "bf16"


def test_the_step_forward_runs_in_bf16(tmp_path):
    t = Trainer(tiny_config(str(tmp_path), epochs=1, precision="bf16"), data=small(), log=quiet)
    seen = []
    t.model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x, y, idx = next(iter(t.loader))
    t.step(x, y, idx, 0, 0)
    assert torch.bfloat16 in seen  # attack iterations and the loss forward ran under autocast
    t.close()


@pytest.mark.parametrize("kw", [dict(precision="bf16"), dict(ema=0.9), dict(channels_last=True)])
@pytest.mark.slow
def test_resume_is_exact_with_each_switch(tmp_path, kw):
    full, part = run_and_resume(tmp_path, small(), epochs=2, milestones=(1,), **kw)
    assert same_tensors(full["model"], part["model"], atol=0)
    if "ema" in kw:
        assert full["ema"]["steps"] == part["ema"]["steps"] == 4
        assert same_tensors(full["ema"]["model"], part["ema"]["model"], atol=0)


@pytest.mark.slow
def test_fp16_uses_a_gradient_scaler_and_resumes_it(tmp_path):
    full, part = run_and_resume(tmp_path, small(), epochs=2, milestones=(1,), precision="fp16")
    assert full["scaler"]["scale"] == part["scaler"]["scale"] and "_growth_tracker" in full["scaler"]
    assert same_tensors(full["model"], part["model"], atol=0)


@pytest.mark.slow
def test_compile_runs_the_step_and_the_attack(tmp_path):
    t = Trainer(tiny_config(str(tmp_path), epochs=1, compile="eager"), data=digits_subset(64, 16), log=quiet)
    assert t.net is not t.model and t.attack.model is t.attack_model is not t.model
    t.fit()
    assert checkpoint.load(tmp_path)["model"].keys() == t.model.state_dict().keys()  # no "_orig_mod." prefix


def test_ema_formula_by_hand():
    """decay_t = min(decay, (1 + t) / (10 + t)); ema = decay_t * ema + (1 - decay_t) * w."""
    w = torch.nn.Linear(1, 1, bias=False)
    shadow = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        w.weight.fill_(1.0)
    ema = EMA(w, shadow, decay=0.5)
    expect = 1.0
    for t, value in enumerate([3.0, 5.0, -1.0, 2.0]):
        with torch.no_grad():
            w.weight.fill_(value)
        ema.update()
        d = min(0.5, (1 + t) / (10 + t))  # 0.1, 0.1818, 0.25, 0.3077: warm-up below 0.5
        expect = d * expect + (1 - d) * value
        assert ema.model.weight.item() == pytest.approx(expect, rel=1e-6)
    assert ema.steps == 4


@pytest.mark.slow
def test_ema_is_evaluated_selected_and_reported(tmp_path):
    res = Trainer(
        tiny_config(str(tmp_path), epochs=3, milestones=(2,), ema=0.5, selection="validation"),
        data=digits_subset(200, 32),
        log=quiet,
    ).fit()
    assert any(k.startswith("last-ema") for k in res)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("ema_val_pgd_acc" in r for r in recs)
    last = checkpoint.load(tmp_path, need="training")
    best = checkpoint.load_best(tmp_path, ema=True)
    assert best["epoch"] == last["best_ema_epoch"] == max(range(3), key=lambda e: (recs[e]["ema_val_pgd_acc"], -e))
    from click.testing import CliRunner

    from advplug.tools.cli import cli

    out = CliRunner().invoke(cli, ["eval", str(tmp_path), "--which", "all", "--attack", "natural", "--n-eval", "16"])
    assert out.exit_code == 0, out.output
    entries = json.loads((tmp_path / "eval.json").read_text())["entries"]
    assert {e["checkpoint"] for e in entries.values()} == {"best", "last", "best-ema", "last-ema"}
    from advplug.tools.compare import compare

    md, _ = compare([str(tmp_path)])
    assert "Natural best-ema" in md and "Natural last-ema" in md


def test_bad_switch_values():
    from advplug.errors import OptionError

    for kw, pattern in (
        (dict(ema=1.5), "--ema"),
        (dict(precision="fp8"), "--precision"),
        (dict(compile="tvm"), "--compile"),
        (dict(data_path="disk"), "--data-path"),
    ):
        with pytest.raises(OptionError, match=pattern):
            tiny_config(None, **kw).resolved()


@pytest.mark.slow
def test_compile_with_a_meta_gradient_plugin_falls_back_for_the_step(tmp_path):
    """BiLAW differentiates through the loss twice, which torch.compile cannot: the step runs
    uncompiled (said in the log), the attacks compiled, and training works."""
    logs = []
    t = Trainer(
        tiny_config(str(tmp_path), plugins=("bilaw",), epochs=1, compile="eager"),
        data=digits_subset(96, 16),
        log=logs.append,
    )
    assert t.net is t.model and t.attack_model is not t.model
    assert any("runs uncompiled because bilaw" in m for m in logs)
    t.fit()
