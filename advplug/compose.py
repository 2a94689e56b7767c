"""How the results of several plugins combine. Pure functions, unit-tested on their own."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from .context import Variant, Weights
from .errors import PluginError


def merge_variants(results: Iterable[list[Variant] | None]) -> list[Variant]:
    """All plugins' variants, sorted by name; a duplicate name is an error."""
    merged = [v for r in results if r for v in r]
    names = [v.name for v in merged]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PluginError(f"two plugins produced a variant named {', '.join(map(repr, dup))}")
    return sorted(merged, key=lambda v: v.name)


def _as_matrix(w: Tensor, n_variants: int, batch: int, who: str) -> Tensor:
    if w.dim() == 1 and w.shape[0] == batch:
        return w.unsqueeze(0).expand(n_variants, batch)
    if w.shape == (n_variants, batch):
        return w
    raise PluginError(f"{who}: adversarial weights must have shape [B]={batch} or [V, B]=[{n_variants}, {batch}], got {list(w.shape)}")


def _rowmean(t: Tensor) -> Tensor:
    return t.mean(dim=-1, keepdim=True)


def combine_weights(
    results: Iterable[Weights | None],
    n_variants: int,
    batch: int,
    batch_mean: Callable[[Tensor], Tensor] = _rowmean,
) -> Weights | None:
    """Multiply the plugins' weights per part (``adv`` as ``[V, B]``, ``nat`` as ``[B]``).

    One contributor to a part: its weights are kept as returned. Two or more: the product keeps
    its shape within each variant row and is rescaled so that the row's batch mean equals the
    product of the contributors' row means (``batch_mean`` is all-reduced under DDP). Mean-1
    methods (MAIL, GAIRAT) thus leave the scale of the others alone, and a method that puts
    different scales on different variants (LRAT's floor term, Eq. 15) keeps them. The result
    is detached. ``None`` when nobody returned weights.
    """
    adv: list[Tensor] = []
    nat: list[Tensor] = []
    for i, r in enumerate(results):
        if r is None:
            continue
        if r.adv is not None:
            adv.append(_as_matrix(r.adv.detach(), n_variants, batch, f"weights #{i}"))
        if r.nat is not None:
            if r.nat.shape != (batch,):
                raise PluginError(f"weights #{i}: natural weights must have shape [B]={batch}, got {list(r.nat.shape)}")
            nat.append(r.nat.detach())
    if not adv and not nat:
        return None

    def product(parts: list[Tensor]) -> Tensor | None:
        if not parts:
            return None
        out, scale = parts[0], batch_mean(parts[0])
        for p in parts[1:]:
            out, scale = out * p, scale * batch_mean(p)
        if len(parts) > 1:
            out = out * (scale / batch_mean(out).clamp_min(torch.finfo(out.dtype).tiny))
        return out

    return Weights(adv=product(adv), nat=product(nat))


def adv_matrix(weights: Weights | None, n_variants: int, batch: int, like: Tensor) -> Tensor:
    """The ``[V, B]`` adversarial weights, ones where there are none."""
    if weights is None or weights.adv is None:
        return torch.ones(n_variants, batch, device=like.device, dtype=like.dtype)
    return _as_matrix(weights.adv, n_variants, batch, "weights")


def nat_vector(weights: Weights | None, batch: int, like: Tensor) -> Tensor:
    if weights is None or weights.nat is None:
        return torch.ones(batch, device=like.device, dtype=like.dtype)
    return weights.nat


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
