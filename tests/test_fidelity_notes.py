"""Where a plugin or objective differs from its authors' code, its docstring says so (and the help text states the
rule the code applies): the notes an independent check of WMMR, FAT, AWP and TRADES against that code asked for."""

import dataclasses
import math
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_wmmr_names_the_commit_that_broke_the_trades_attack():
    import advplug_wmmr

    doc = " ".join(advplug_wmmr.__doc__.split())
    assert "TRADES_base/trades.py`` as of commit ``66dc538``" in doc
    assert "Commit ``0652a2d``" in doc and "``break``" in doc and "before its first sign step" in doc


def test_fat_documents_its_two_differences_and_their_options():
    import advplug_fat

    doc = " ".join(advplug_fat.__doc__.split())
    assert "``--fat-noise``" in doc and "draws only for them (``continuing``)" in doc
    assert "``--fat-schedule-base``" in doc and "ignores ``--tau``" in doc
    row = next(line for line in README.splitlines() if line.startswith("| `fat` |"))
    assert "--fat-noise continuing" in row and "--fat-schedule-base zero" in row


def test_trades_documents_the_second_natural_forward():
    from advplug import objectives

    doc = " ".join(objectives.__doc__.split())
    assert "``--trades-natural-forwards``" in doc and "runs it twice in train mode" in doc
    assert "--trades-natural-forwards 2" in README


def awp_warmup_help():
    from advplug_awp import AWP

    return next(f.metadata["help"] for f in dataclasses.fields(AWP.Options) if f.name == "warmup")


def test_awp_states_the_scripts_200_epochs_not_100():
    import advplug_awp

    doc = " ".join(advplug_awp.__doc__.split())
    assert "the script's default 200 epochs" in doc and "a 4.5 % share" in doc
    assert "of its 200 epochs" in awp_warmup_help() and "our rule" in awp_warmup_help()


@pytest.mark.parametrize("epochs", [10, 20, 50, 99, 100, 150, 200])
def test_awp_warmup_default_is_the_rule_its_help_states(epochs):
    from advplug_awp import AWP

    from advplug import TrainContext

    awp = AWP(AWP.Options())
    awp.on_train_start(
        TrainContext(
            model=__import__("torch").nn.Linear(2, 2),
            config=None,
            num_train=8,
            num_classes=2,
            input_shape=(2,),
            device=None,
            epochs=epochs,
            milestones=(),
            objective="trades",
            make_attack=None,
            log=lambda s: None,
            loss_fn=lambda *a: None,
        )
    )
    assert awp.options.warmup == min(9, math.floor(9 * epochs / 100))  # "9 %, rounded down", 9 from 100 epochs
