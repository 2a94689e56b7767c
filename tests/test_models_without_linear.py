"""Models without an nn.Linear head (all-convolutional: conv, 1x1 conv classifier, global pooling, flatten) train;
penultimate features are taken only when a plugin declares it needs them, and then the model must expose them."""

import textwrap

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from advplug import models
from advplug.engine.trainer import Trainer
from advplug.errors import OptionError
from advplug.testing import digits_subset, tiny_config
from advplug.tools.cli import cli

DATA = digits_subset(n_train=128, n_test=32)


class AllConv(nn.Module):
    """conv - conv - 1x1 conv classifier - global average pooling - flatten: no nn.Linear anywhere."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 8, 8)) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(input_shape[0], 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
        )
        self.classifier = nn.Sequential(nn.Conv2d(32, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


class AllConvWithFeatures(AllConv):
    """The documented convention: ``features(x)`` returns the penultimate features, and ``forward`` calls it."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@pytest.fixture
def all_conv(monkeypatch):
    monkeypatch.setitem(models.MODELS, "all-conv", AllConv)
    monkeypatch.setitem(models.MODELS, "all-conv-features", AllConvWithFeatures)


def fit(out, **kw):
    cfg = tiny_config(str(out), epochs=1, steps=2, eval_steps=2, final_attacks=("natural",), **kw)
    return Trainer(cfg, data=DATA, log=lambda s: None).fit()


@pytest.mark.parametrize(
    "plugins, options",
    [((), {}), (("mail",), {"mail-burn-in": 0}), (("gairat",), {"gairat-begin-epoch": 0}), (("awp",), {})],
    ids=["at", "mail", "gairat", "awp"],  # awp taps features for its scratch forwards, where the model has them
)
def test_all_conv_model_trains_when_no_plugin_reads_features(tmp_path, one_thread, all_conv, plugins, options):
    results = fit(tmp_path, model="all-conv", plugins=plugins, plugin_options=options)
    assert "Natural" in results["last (epoch 1)"]


def test_feature_reader_on_model_without_features_names_plugin_and_convention(tmp_path, one_thread, all_conv):
    with pytest.raises(OptionError) as e:
        fit(tmp_path, model="all-conv", plugins=("bat",))
    msg = str(e.value)
    assert "\n" not in msg
    assert "bat" in msg and "AllConv" in msg and "features(x)" in msg


def test_feature_reader_error_from_the_cli_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "my_allconv.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def net(num_classes, input_shape):
                return nn.Sequential(nn.Conv2d(input_shape[0], 8, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(8, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    res = CliRunner().invoke(
        cli, ["train", "--model", "my_allconv:net", "--plugin", "bat", "--epochs", "1", "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "bat" in lines[0] and "features(x)" in lines[0], res.stderr


@pytest.mark.parametrize("plugins", [("bat",), ("meow",)])
def test_features_method_exposes_features(tmp_path, one_thread, all_conv, plugins):
    results = fit(tmp_path, model="all-conv-features", plugins=plugins)
    assert "Natural" in results["last (epoch 1)"]


def test_features_method_is_read_from_the_same_forward(one_thread):
    from advplug.context import FeatureTap, StepContext

    model = AllConvWithFeatures()
    tap = FeatureTap(model, needed_by=["probe"])
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    x = torch.rand(4, 1, 8, 8)
    ctx = StepContext(
        model=model, x=x, y=torch.zeros(4, dtype=torch.long), index=torch.arange(4), epoch=0, step=0,
        num_classes=10, config=None, lr=0.1, tap=tap,
    )  # fmt: skip
    f = ctx.features()
    assert len(calls) == 1 and ctx.forward_count == 1  # no second forward pass for the features
    assert torch.equal(f, model.body(x).flatten(1))  # [B, C, H, W] read as [B, D]
    tap.remove()
    assert "features" not in vars(model)


def test_linear_head_models_are_tapped_only_when_asked():
    from advplug.context import FeatureTap

    model = models.DigitsCNN()
    FeatureTap(model, needed_by=[])
    assert not model.head._forward_pre_hooks
    FeatureTap(model, needed_by=["bat"])
    assert len(model.head._forward_pre_hooks) == 1


class FeaturesNotCalled(AllConvWithFeatures):
    """Defines ``features(x)`` but its ``forward`` does not call it: no features are seen."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


@pytest.mark.parametrize("plugin", ["bat", "meow"])
def test_features_method_not_called_by_forward_is_a_one_line_error(tmp_path, one_thread, monkeypatch, plugin):
    monkeypatch.setitem(models.MODELS, "features-not-called", FeaturesNotCalled)
    with pytest.raises(OptionError) as e:
        fit(tmp_path, model="features-not-called", plugins=(plugin,))
    msg = str(e.value)
    assert "\n" not in msg and plugin in msg and "forward" in msg and "features(x)" in msg, msg
