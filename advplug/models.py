"""Models by name. Inputs are in [0, 1]; any normalisation lives inside the model.

Penultimate features. Plugins that declare ``needs={"features"}`` (BAT, MeoW) read the penultimate
features of the training forward itself, never from a pass of their own (``advplug.context.FeatureTap``),
and only when such a plugin is enabled. A model exposes them in one of three ways, tried in this order:

* an ``advplug_head`` attribute holding its classifier module: the classifier's input;
* a method ``features(x)`` returning the penultimate features, called by ``forward``
  (``return self.classifier(self.features(x))``): its output, read flattened to ``[B, D]``. This is the
  way for a model without an ``nn.Linear`` head (all-convolutional: a 1x1-conv classifier, global pooling);
* otherwise the input of its last ``nn.Linear``, as in every model here (``features`` is a submodule
  there, so the head's input is the same tensor).

A model that exposes none trains with every other plugin; with a plugin that reads features the run
is refused at start-up, naming the plugin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advplug.errors import DataError, OptionError
from advplug.usercode import import_callable


def _flat_dim(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).flatten(1).shape[1])


class DigitsCNN(nn.Module):
    """The default small CNN for 8x8 digits: conv(32)-conv(64)-pool-fc(128)-fc(nc)."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 8, 8)) -> None:
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (input_shape[1] // 2) * (input_shape[2] // 2), 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FC1(nn.Module):
    """BiLAW App. Table 4: FC(1024)-ReLU-FC(nc)."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)) -> None:
        super().__init__()
        d = 1
        for s in input_shape:
            d *= s
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(d, 1024), nn.ReLU())
        self.head = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyCNN(nn.Module):
    """BiLAW App. Table 4 (Wong & Kolter 2018): conv(16,4x4,s2)-conv(32,4x4,s2)-fc(100)-fc(nc)."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)) -> None:
        super().__init__()
        conv = nn.Sequential(
            nn.Conv2d(input_shape[0], 16, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.features = nn.Sequential(conv, nn.Linear(_flat_dim(conv, input_shape), 100), nn.ReLU())
        self.head = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _small_block(cin: int, c: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """BiLAW App. Tables 4-5: three blocks (64, 128, 196) of 2x(conv3x3-BN-ReLU)+maxpool, FC(256), FC(nc)."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        super().__init__()
        conv = nn.Sequential(
            _small_block(input_shape[0], 64), _small_block(64, 128), _small_block(128, 196), nn.Flatten()
        )
        self.features = nn.Sequential(conv, nn.Linear(_flat_dim(conv, input_shape), 256), nn.ReLU())
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + sc


class PreActResNet18(nn.Module):
    """PreActResNet-18 (He et al., 2016) for 32x32 inputs, as in Rice et al. (2020)."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        sc = self.shortcut(o) if self.shortcut is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(o)))) + sc


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis, 2016), (depth - 4) // 6 blocks per stage, as the
    TRADES / MART / GAIRAT code builds WRN-34-10, WRN-28-10 and WRN-32-10."""

    def __init__(
        self, depth: int = 34, width: int = 10, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)
    ) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(WideBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool)."""
    from torchvision.models import resnet18 as tv_resnet18

    m = tv_resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


MODELS = {
    "digits-cnn": DigitsCNN,
    "fc1": FC1,
    "tiny-cnn": TinyCNN,
    "small-cnn": SmallCNN,
    "preactresnet18": PreActResNet18,
    "resnet18": resnet18,
    "wrn-34-10": lambda num_classes, input_shape: WideResNet(34, 10, num_classes, input_shape),
    "wrn-28-10": lambda num_classes, input_shape: WideResNet(28, 10, num_classes, input_shape),
    "wrn-32-10": lambda num_classes, input_shape: WideResNet(32, 10, num_classes, input_shape),
}


def auto_model(input_shape: tuple[int, ...]) -> str:
    """The default model for your own data, by image size: digits-cnn below 16 px, small-cnn up to
    64 px, preactresnet18 above (its global pooling takes any size)."""
    side = min(input_shape[1:]) if len(input_shape) == 3 else 0
    if len(input_shape) != 3:
        raise DataError(f"images must be [C, H, W]; the data has samples of shape {tuple(input_shape)}")
    return "digits-cnn" if side < 16 else "small-cnn" if max(input_shape[1:]) <= 64 else "preactresnet18"


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], *, allow_import: bool = False) -> nn.Module:
    """A model by name, or ``package.module:callable`` called as ``f(num_classes=, input_shape=)``.

    Importing ``module:callable`` runs code, so it happens only with ``allow_import=True``: when
    the user named the model on the command line (or in Python), never because a run directory
    or a checkpoint says so.
    """
    if name in MODELS:
        return MODELS[name](num_classes=num_classes, input_shape=tuple(input_shape))
    if ":" in name:
        factory = import_callable(name, "model", name, allow_import, OptionError)
        try:
            model = factory(num_classes=num_classes, input_shape=tuple(input_shape))
        except Exception as e:  # the user's factory failed: say where, in one line (its first non-empty one)
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:200]
            raise OptionError(
                f"--model {name}: calling it with num_classes={num_classes}, input_shape="
                f"{tuple(input_shape)} failed ({type(e).__name__}: {first})"
            ) from None
        if not isinstance(model, nn.Module):
            raise OptionError(f"--model {name} returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    raise OptionError(f"unknown model {name!r} (choose from {', '.join(MODELS)}, or module:callable)")


def check_model_import(saved: object, given: str | None) -> None:
    """Refuse a saved ``module:callable`` model unless the user named the same one."""
    if isinstance(saved, str) and ":" in saved and given != saved:
        raise OptionError(
            f"this run's model {saved!r} is code to import; advplug imports code only when you "
            f"name it: add --model {saved}" + (f" (you gave {given!r})" if given else "")
        )
    if given is not None and given != saved:
        raise OptionError(f"--model {given}: this run was trained with model {saved!r}")
