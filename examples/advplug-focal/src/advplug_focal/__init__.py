"""A third-party reweighting plugin in a few lines: up-weight examples the model finds hard."""

from dataclasses import dataclass

from advplug import StepContext, Variant, Weights, hookimpl, opt


class FocalWeights:
    """Focal-style weights (1 - p_y(x'))^gamma per instance, mean 1 per batch."""

    @dataclass(frozen=True)
    class Options:
        gamma: float = opt(2.0, "focusing strength", min=0.0)

    def __init__(self, options: Options) -> None:
        self.options = options

    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> Weights:
        p = ctx.probs(ctx.anchor).gather(1, ctx.y[:, None]).squeeze(1)  # the pair's view, logits the step has
        w = (1 - p) ** self.options.gamma  # one global weight per instance [B]
        return Weights(adv=w / ctx.batch_mean(w).clamp_min(1e-12))
