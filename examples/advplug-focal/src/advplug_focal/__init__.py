"""A third-party reweighting plugin in a few lines: up-weight examples the model finds hard."""
from dataclasses import dataclass

import torch

from advplug import StepContext, Variant, Weights, hookimpl, opt


class FocalWeights:
    """Focal-style weights (1 - p_y(x'))^gamma on each adversarial variant, mean 1 per batch."""

    @dataclass(frozen=True)
    class Options:
        gamma: float = opt(2.0, "focusing strength", min=0.0)

    def __init__(self, options: Options) -> None:
        self.options = options

    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> Weights:
        p = [ctx.probs(v).gather(1, ctx.y[:, None]).squeeze(1) for v in variants]
        w = (1 - torch.stack(p)) ** self.options.gamma  # [V, B], from logits the step already has
        return Weights(adv=w / ctx.batch_mean(w).clamp_min(1e-12))

