"""AWP's training step against a transcription of the authors' code (``csdongxian/AWP``,
``AT_AWP/utils_awp.py`` and the step in ``AT_AWP/train_cifar10.py``): the same perturbation per layer,
and the same update, up to the documented difference of where the optimizer steps."""

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from advplug import hookimpl
from advplug.engine.trainer import Trainer
from advplug.models import build_model
from advplug.testing import digits_subset, tiny_config

GAMMA, LR, MOMENTUM, WD, PROXY_LR = 0.01, 0.05, 0.9, 0.05, 0.01  # a large weight decay: lr * wd * v shows


def diff_in_weights(model: nn.Module, proxy: nn.Module) -> OrderedDict:
    """The authors' ``diff_in_weights``, line by line."""
    diff = OrderedDict()
    for (old_k, old_w), (_, new_w) in zip(model.state_dict().items(), proxy.state_dict().items()):
        if len(old_w.size()) <= 1:
            continue
        if "weight" in old_k:
            diff_w = new_w - old_w
            diff[old_k] = old_w.norm() / (diff_w.norm() + 1e-20) * diff_w
    return diff


def add_into_weights(model: nn.Module, diff: OrderedDict, coeff: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in diff:
                param.add_(coeff * diff[name].to(param.dtype))


def calc_awp(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> OrderedDict:
    """The authors' ``calc_awp``: one SGD step (lr 0.01) on a proxy with the negated CE. The proxy runs
    in float64 here, so that ``new_w - old_w`` is free of float32 cancellation."""
    proxy = copy.deepcopy(model).double()
    proxy.train()
    proxy_opt = torch.optim.SGD(proxy.parameters(), lr=PROXY_LR)
    loss = -F.cross_entropy(proxy(x_adv.double()), y)
    proxy_opt.zero_grad()
    loss.backward()
    proxy_opt.step()
    return diff_in_weights(copy.deepcopy(model).double(), proxy)


class Probe:
    """The weights as the loss sees them (at w + v)."""

    seen: dict[str, torch.Tensor] = {}

    @hookimpl
    def compute_weights(self, ctx, variants):
        self.seen = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}


def test_step_equals_the_authors_perturb_step_restore(tmp_path):
    cfg = tiny_config(
        str(tmp_path / "r"), plugins=("awp",), model="digits-cnn", lr=LR, momentum=MOMENTUM, weight_decay=WD
    )
    t = Trainer(cfg, data=digits_subset(64, 32), log=lambda s: None)
    probe = Probe()
    t.pm.register(probe, name="probe")
    x, y = t.data.train
    for step in range(2):  # the second step has a momentum buffer
        xb, yb = x[32 * step : 32 * (step + 1)], y[32 * step : 32 * (step + 1)]
        # the authors' model and optimizer in the state of advplug's, before the step
        ref = build_model("digits-cnn", 10, (1, 8, 8))
        ref.load_state_dict(t.model.state_dict())
        opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        for p, q in zip(ref.parameters(), t.model.parameters()):
            if "momentum_buffer" in t.opt.state.get(q, {}):
                opt.state[p]["momentum_buffer"] = t.opt.state[q]["momentum_buffer"].clone()
        before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        torch.manual_seed(step)
        _, ctx, _ = t.step(xb, yb, torch.arange(32), 0, step)
        x_adv = ctx.variants[0].x.detach()

        # authors: calc_awp, perturb, loss and opt.step at w + v, restore (subtract v after the step)
        diff = calc_awp(ref, x_adv, yb)
        assert list(diff) == ["features.0.weight", "features.2.weight", "features.6.weight", "head.weight"]
        for name, d in diff.items():  # the perturbation per layer: gamma * diff
            v = probe.seen[name].double() - before[name].double()
            assert torch.allclose(v, GAMMA * d, rtol=1e-4, atol=1e-7), name
        for name in ("features.0.bias", "head.bias"):
            assert torch.equal(probe.seen[name], before[name])
        add_into_weights(ref, diff, GAMMA)
        loss = F.cross_entropy(ref(x_adv), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        add_into_weights(ref, diff, -GAMMA)

        # the same update, except that the authors' weight decay also acts on v: theirs is lr * wd * v smaller
        ours = dict(t.model.named_parameters())
        for name, p in ref.named_parameters():
            expected = p.detach() + (LR * WD * GAMMA * diff[name]).float() if name in diff else p.detach()
            assert torch.allclose(ours[name].detach(), expected, rtol=0, atol=2e-7), name
        assert any(not torch.equal(ours[n], before[n]) for n in before)  # and the step did move the weights
