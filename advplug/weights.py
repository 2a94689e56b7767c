"""How the results of several plugins combine. Pure functions, unit-tested on their own."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from advplug.context import CombinedWeights, Variant, Weights
from advplug.errors import PluginError


def merge_variants(results: Iterable[list[Variant] | None]) -> list[Variant]:
    """All plugins' variants, sorted by name; a duplicate name is an error."""
    merged = [v for r in results if r for v in r]
    names = [v.name for v in merged]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PluginError(f"two plugins produced a variant named {', '.join(map(repr, dup))}")
    return sorted(merged, key=lambda v: v.name)


def _instance_vector(w: Tensor, n_variants: int, batch: int, who: str) -> Tensor:
    if w.dim() == 2 and w.shape[0] == 1:
        w = w[0]
    if w.shape == (batch,):
        return w
    if w.shape == (n_variants, batch):
        raise PluginError(
            f"{who}: global weights (Weights.adv) are one per instance, [B]={batch}, got one per variant "
            f"{list(w.shape)}: read one view (ctx.anchor) or return local weights (Weights.local)"
        )
    raise PluginError(f"{who}: adversarial weights must have shape [B]={batch}, got {list(w.shape)}")


def _as_matrix(w: Tensor, n_variants: int, batch: int, who: str) -> Tensor:
    if w.dim() == 1 and w.shape[0] == batch:
        return w.unsqueeze(0).expand(n_variants, batch)
    if w.dim() == 2 and w.shape == (1, batch):
        return w.expand(n_variants, batch)
    if w.shape == (n_variants, batch):
        return w
    raise PluginError(
        f"{who}: adversarial weights must have shape [B]={batch} or [V, B]=[{n_variants}, {batch}], got {list(w.shape)}"
    )


def _rowmean(t: Tensor) -> Tensor:
    return t.mean(dim=-1, keepdim=True)


def _product(parts: list[Tensor], batch_mean: Callable[[Tensor], Tensor]) -> Tensor | None:
    """One part: as returned. Several: their product, rescaled so that its batch mean is the
    product of the parts' batch means (mean-1 parts leave the others' scale alone)."""
    if not parts:
        return None
    out, scale = parts[0], batch_mean(parts[0])
    for p in parts[1:]:
        out, scale = out * p, scale * batch_mean(p)
    if len(parts) > 1:
        out = out * (scale / batch_mean(out).clamp_min(torch.finfo(out.dtype).tiny))
    return out


def combine_weights(
    results: Iterable[Weights | None], n_variants: int, batch: int, batch_mean: Callable[[Tensor], Tensor] = _rowmean
) -> CombinedWeights | None:
    """Combine the plugins' weights: globals multiply, the local part distributes inside the pair.

    * Global weights (``adv`` ``[B]``, ``nat`` ``[B]``) multiply per part. One contributor: kept
      as returned. Several: the product is rescaled so that its batch mean is the product of the
      contributors' batch means (``batch_mean`` is all-reduced under DDP): MAIL's, GAIRAT's,
      BAT's, BiLAW's mean-1 weights stay mean 1 together and leave a raw-scale method (MeoW's
      Eq. 4) at its own scale.
    * Local weights (``local`` ``[V, B]``, ``local_nat`` ``[B]``): at most one contributor, kept
      exactly as returned (LRAT's floor, Eq. 7, and Eq. 15 hold on them whatever else is enabled).
    * Final: ``adv[v, b] = instance[b] * local[v, b]`` (ones for a missing part); the natural
      term's weight is the global ``nat`` product, times ``instance * local_nat`` when the
      natural input is a member of the pair.

    Abstaining (``None``) and all-ones weights change nothing. The result is detached; ``None``
    when nobody returned weights.
    """
    inst: list[Tensor] = []
    nat: list[Tensor] = []
    local: Tensor | None = None
    local_nat: Tensor | None = None
    for i, r in enumerate(results):
        if r is None:
            continue
        who = f"weights #{i}"
        if r.adv is not None:
            inst.append(_instance_vector(r.adv.detach(), n_variants, batch, who))
        for name, t in (("natural", r.nat), ("local natural", r.local_nat)):
            if t is not None and t.shape != (batch,):
                raise PluginError(f"{who}: {name} weights must have shape [B]={batch}, got {list(t.shape)}")
        if r.nat is not None:
            nat.append(r.nat.detach())
        if r.local is not None or r.local_nat is not None:
            if local is not None or local_nat is not None:
                raise PluginError(
                    "two plugins returned local weights (Weights.local): only one method may distribute "
                    "weight inside the pair"
                )
            if r.local is not None and r.local.shape != (n_variants, batch):
                raise PluginError(
                    f"{who}: local weights must have shape [V, B]=[{n_variants}, {batch}], got {list(r.local.shape)}"
                )
            local = r.local.detach() if r.local is not None else None
            local_nat = r.local_nat.detach() if r.local_nat is not None else None
    if not inst and not nat and local is None and local_nat is None:
        return None
    instance = _product(inst, batch_mean)
    if local is not None:
        adv = local * instance if instance is not None else local
    else:
        adv = instance.unsqueeze(0).expand(n_variants, batch) if instance is not None else None
    nat_global = _product(nat, batch_mean)
    nat_final = nat_global
    if local_nat is not None:
        in_pair = local_nat * instance if instance is not None else local_nat
        nat_final = in_pair * nat_global if nat_global is not None else in_pair
    return CombinedWeights(adv=adv, nat=nat_final, local=local, local_nat=local_nat, instance=instance)


def adv_matrix(weights: Weights | None, n_variants: int, batch: int, like: Tensor) -> Tensor:
    """The final ``[V, B]`` adversarial weights, ones where there are none. For weights a plugin
    passes straight to the loss (BiLAW's meta step), ``adv`` times ``local``."""
    ones = torch.ones(n_variants, batch, device=like.device, dtype=like.dtype)
    if weights is None:
        return ones
    out = ones if weights.adv is None else _as_matrix(weights.adv, n_variants, batch, "weights")
    if not isinstance(weights, CombinedWeights) and weights.local is not None:
        out = out * weights.local
    return out


def natural_weights(weights: Weights | None) -> Tensor | None:
    """The final ``[B]`` weights of the natural term, or ``None`` when there are none."""
    if weights is None:
        return None
    if isinstance(weights, CombinedWeights) or weights.local_nat is None:
        return weights.nat
    out = weights.local_nat if weights.adv is None else weights.local_nat * weights.adv.reshape(-1)
    return out * weights.nat if weights.nat is not None else out


def nat_vector(weights: Weights | None, batch: int, like: Tensor) -> Tensor:
    """The final ``[B]`` weights of the natural term, ones where there are none."""
    w = natural_weights(weights)
    return torch.ones(batch, device=like.device, dtype=like.dtype) if w is None else w


def summary(w: Tensor) -> dict[str, float]:
    """mean, std, min, max and the effective sample size fraction (sum w)^2 / (n sum w^2)."""
    w = w.detach().double().flatten()
    ess = (w.sum() ** 2 / (w.pow(2).sum() * w.numel())).item() if w.pow(2).sum() > 0 else 0.0
    return {
        "mean": w.mean().item(),
        "std": w.std(unbiased=False).item(),
        "min": w.min().item(),
        "max": w.max().item(),
        "ess": ess,
    }
