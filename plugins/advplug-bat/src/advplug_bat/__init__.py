"""BAT: benign adversarial training (seed paper 002, Sec. 4, App. A and D).

Atypical samples (memorisation value ``mem(x) > sigma``) that the model misclassifies with
confidence in a wrong class act as poisoning data in adversarial training. BAT

* down-weights them: poisoning score ``q(x') = max_{t != y} softmax(F(x'))_t`` (Eq. 6),
  ``w = exp(-alpha q)`` if ``mem(x) > sigma`` and ``argmax F(x') != y``, else 1 (Eq. 7), and the
  loss is normalised by the sum of weights (Eq. 8): the core receives ``w / mean(w)``, so the
  objective's batch mean is ``sum_i w_i l_i / sum_i w_i``;
* adds the discrimination loss (Eq. 9) on the penultimate representations ``h`` of the typical
  adversarial samples of the batch, ``beta * L_DL`` (Eq. 10), as a wrapper around whichever
  objective owns the loss (AT, TRADES, MART, LRAT), so BAT composes with them all.

Eq. 9, as footnote 2 reads it for mini-batches: for every ordered pair ``(i, j)``, ``i != j``,
``y_i = y_j``, both typical, the term ``-log(exp(s_ij) / sum_k exp(s_ik))`` with ``k`` over the
typical samples of the batch with another label, averaged over pairs; ``s = h_i . h_j / tau``.
By default ``s`` is the paper's raw dot product of the
penultimate features divided by ``tau`` (the paper does not give tau; 10 here: digits-CNN and
ResNet penultimate features have norms of a few units). ``--bat-similarity cosine``
L2-normalises the features first, as the contrastive losses the paper cites do (SimCLR,
SupCon), but we measured that it breaks training on small CNNs: the gradient through the
normalisation of near-zero post-ReLU features is huge, and the digits CNN collapsed to 10%
accuracy within an epoch at tau 0.1, 0.5 and 1 (raw dot products: 68% after 4 epochs).

``mem(x)`` comes from one of (``--bat-mem``):

* ``file`` (the paper's quantity): Feldman & Zhang's memorisation value
  ``mem(x_i) = P[h(x_i) = y_i | i in S] - P[h(x_i) = y_i | i not in S]`` over models ``h``
  trained on random subsets ``S``, from ``--bat-mem-file scores.npz`` with arrays ``indices``
  and ``values`` (training-set positions as advplug numbers them). ``advplug-bat-memorisation``
  (``python -m advplug_bat.memorisation``, in this package) estimates it by training
  ``--models`` models on random ``--subset`` fractions of the training set with advplug's own
  data loading and models, and writes that file; published estimates (CIFAR-100) can be mapped
  to positions the same way. Every training index must be present.
* ``confidence`` (default, because it needs nothing trained beforehand; *not* the paper's
  mem(x)): ``1 - conf(x)``, where ``conf`` is the model's own true-class probability averaged
  over the epochs so far (one snapshot per epoch: the value at the sample's last step of that
  epoch), a training-dynamics proxy in the spirit of App. A.1's confidence-based estimate
  (which averages *separately trained* models on clean inputs). The snapshot is taken after the
  step's loss, from logits the step computed anyway: the clean ones when the objective computes
  them (TRADES, MART, MeoW's Eq. 5), else (``--objective at``) the first adversarial variant's,
  so with AT it is an adversarial confidence. No extra model, no extra pass. Available from the
  second epoch.
* ``ensemble`` (App. A.1 "ensemble disagreement"): ``ed(x) = 1/m^2 sum_j sum_p JS(F_j(x), F_p(x))``
  over the models in ``--bat-mem-checkpoints a.pt,b.pt,...`` (advplug checkpoints of the same
  architecture), divided by ``ln 2`` so that it lies in [0, 1]. Computed once at start-up.

Atypical: ``mem(x) > sigma`` with the paper's ``sigma = 0.15`` for memorisation values from a
file. The confidence and ensemble estimates are not on that scale (adversarial true-class
confidence is below 0.85 for most samples, which would make nearly all "atypical"), so by
default the top 20% of their estimates count as atypical (``--bat-atypical-fraction``; the
paper reports 11% of CIFAR-10 and 40% of CIFAR-100 above 0.15). The log says which estimate is
used and how many samples count as atypical (each epoch for ``confidence``). Per-sample
confidence histories are plugin state and survive ``--resume``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from advplug import (
    NATURAL,
    DataError,
    Declaration,
    OptionError,
    SampleDump,
    StepContext,
    TrainContext,
    Variant,
    Weights,
    all_sum,
    gather_tensors,
    hookimpl,
    load_checkpoint_model,
    opt,
)
from advplug.signals import max_other_prob, true_prob

__version__ = "0.1.0"


def poisoning_score(probs: Tensor, y: Tensor) -> Tensor:
    """Eq. 6: ``q = max_{t != y} p_t`` per row of ``probs`` ``[..., B, K]``."""
    return max_other_prob(probs, y)


def bat_weights(probs: Tensor, y: Tensor, atypical: Tensor, alpha: float) -> Tensor:
    """Eq. 7: ``exp(-alpha q)`` for atypical samples the model misclassifies, 1 for the rest."""
    down = atypical & (probs.argmax(-1) != y)
    return torch.where(down, torch.exp(-alpha * poisoning_score(probs, y)), torch.ones_like(probs[..., 0]))


def discrimination_loss(h: Tensor, y: Tensor, typical: Tensor, tau: float, cosine: bool = False) -> Tensor:
    """Eq. 9 over the typical samples of a batch; 0 (with a graph) when no valid pair exists."""
    if cosine:
        h = F.normalize(h, dim=1)
    s = h @ h.t() / tau
    both = typical[:, None] & typical[None, :]
    same = y[:, None] == y[None, :]
    pos = both & same & ~torch.eye(len(y), dtype=torch.bool, device=y.device)
    neg = both & ~same
    lse = torch.logsumexp(s.masked_fill(~neg, float("-inf")), dim=1)  # log sum_k exp(s_ik)
    valid = pos & neg.any(1, keepdim=True)
    terms = (lse[:, None] - s).masked_fill(~valid, 0.0)
    return terms.sum() / valid.sum().clamp_min(1)


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    m = 0.5 * (p + q)
    return 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)


def ensemble_disagreement(probs: Tensor) -> Tensor:
    """App. A.1: ``1/m^2 sum_j sum_p JS(F_j(x), F_p(x))`` for ``probs`` ``[m, N, K]``, in nats."""
    m = probs.shape[0]
    return sum(js_divergence(probs[j], probs[p]) for j in range(m) for p in range(m)) / m**2


class BAT:
    """BAT: down-weight atypical samples predicted as a wrong class; discrimination loss on typical ones."""

    strength_hint = "--bat-alpha (higher: stronger down-weighting)"  # named by the core's inert-reweighting warning

    @dataclass(frozen=True)
    class Options:
        alpha: float = opt(1.0, "alpha of Eq. 7 (0: no reweighting)", min=0.0)
        beta: float = opt(0.2, "weight of the discrimination loss, Eq. 10 (0: none)", min=0.0)
        tau: float = opt(10.0, "temperature of Eq. 9", gt=0.0)
        similarity: str = opt(
            "dot", "Eq. 9 similarity: dot (raw features, the paper) or cosine (normalised)", choices=("dot", "cosine")
        )
        mem: str = opt(
            "confidence",
            "memorisation estimate: confidence, file or ensemble (App. A.1)",
            choices=("confidence", "file", "ensemble"),
        )
        mem_file: str = opt("", "npz with arrays indices and values (--bat-mem file)")
        mem_checkpoints: str = opt("", "comma-separated advplug checkpoints (--bat-mem ensemble)")
        sigma: float = opt(0.15, "atypical if mem(x) > sigma (Eq. 7), for --bat-mem file")
        atypical_fraction: float | None = opt(
            None,
            "count this fraction of samples with the highest mem as atypical (default 0.2 for confidence "
            "and ensemble, whose scale is not the memorisation value's; file uses sigma)",
            gt=0.0,
            max=1.0,
        )
        burn_in: int = opt(0, "epochs with weights 1 (confidence: also until the first epoch's estimate)", min=0)
        dump: bool = opt(False, "write per-sample atypical flag, poisoning score and weight with indices each epoch")

    def __init__(self, options: Options) -> None:
        self.options = options
        self.mem: Tensor | None = None  # [N] mem estimate, None until known
        self.atyp: Tensor | None = None  # [N] bool, None until known
        self.conf_sum = self.conf_count = self.conf_epoch = self.seen = None
        self.dumper: SampleDump | None = None
        self.log = print

    # -- set-up -------------------------------------------------------------------------
    @hookimpl
    def declare(self) -> Declaration:
        return Declaration(
            weights="global",
            needs=frozenset({"features"}),
            meaning=f"exp(-{self.options.alpha} q) on atypical misclassified samples (Eq. 7), mean 1 (Eq. 8); "
            f"+ {self.options.beta} L_DL (Eq. 10)",
        )

    @hookimpl
    def on_train_start(self, ctx: TrainContext) -> None:
        o = self.options
        self.log, self.device, self.n = ctx.log, ctx.device, ctx.num_train
        if o.dump:
            self.dumper = SampleDump(ctx.config.out, "bat")
        if o.mem == "confidence":
            if o.mem_file or o.mem_checkpoints:
                raise OptionError("--bat-mem confidence takes no --bat-mem-file / --bat-mem-checkpoints")
            z = torch.zeros(ctx.num_train, device=ctx.device)
            self.conf_sum, self.conf_count, self.conf_epoch = z.clone(), z.clone(), z.clone()
            self.seen = torch.zeros(ctx.num_train, dtype=torch.bool, device=ctx.device)
            self.log(
                "bat: mem = 1 - true-class confidence averaged over epochs (training dynamics); "
                f"reweighting from epoch {max(o.burn_in, 1) + 1}"
            )
        else:
            self.mem = (self.load_file(o.mem_file, ctx.num_train) if o.mem == "file" else self.ensemble(ctx)).to(
                ctx.device
            )
            self.set_atypical()

    def set_atypical(self) -> None:
        """Threshold ``self.mem`` (of the samples with an estimate) by sigma or by fraction."""
        o = self.options
        known = self.conf_count > 0 if self.conf_count is not None else torch.ones_like(self.mem, dtype=torch.bool)
        frac = o.atypical_fraction if o.atypical_fraction is not None else (None if o.mem == "file" else 0.2)
        if frac is None:
            cut, how = o.sigma, f"mem > sigma = {o.sigma}"
        else:
            cut = torch.quantile(self.mem[known].float(), 1.0 - frac) if known.any() else float("inf")
            how = f"the top {frac:.0%} of mem, mem > {float(cut):.4g}"
        self.atyp = known & (self.mem > cut)
        self.log(f"bat: mem from {o.mem}: {int(self.atyp.sum())} of {self.n} training samples atypical ({how})")

    def load_file(self, path: str, n: int) -> Tensor:
        if not path:
            raise OptionError("--bat-mem file needs --bat-mem-file PATH (npz with arrays indices and values)")
        import numpy as np

        try:
            with np.load(Path(path), allow_pickle=False) as d:
                idx, val = torch.as_tensor(d["indices"]).long(), torch.as_tensor(d["values"]).float()
                saved_n = int(d["num_train"]) if "num_train" in d.files else None
        except FileNotFoundError:
            raise DataError(f"--bat-mem-file: no file {path!r}") from None
        except (KeyError, ValueError, OSError) as e:
            raise DataError(f"--bat-mem-file {path!r}: not an npz with arrays 'indices' and 'values' ({e})") from None
        if saved_n is not None and saved_n != n:
            raise DataError(
                f"--bat-mem-file {path!r} was written for {saved_n} training samples, this run has {n} "
                "(another data set, or other held-out splits): re-run advplug-bat-memorisation with this run's settings"
            )
        if idx.shape != val.shape or idx.dim() != 1:
            raise DataError(f"--bat-mem-file {path!r}: indices {list(idx.shape)} and values {list(val.shape)} differ")
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise DataError(
                f"--bat-mem-file {path!r}: indices must lie in [0, {n}), got [{int(idx.min())}, {int(idx.max())}]"
            )
        mem = torch.full((n,), float("nan"))
        mem[idx] = val
        missing = int(mem.isnan().sum())
        if missing:
            raise DataError(f"--bat-mem-file {path!r}: {missing} of {n} training samples have no value")
        return mem

    def ensemble(self, ctx: TrainContext) -> Tensor:
        paths = [p.strip() for p in self.options.mem_checkpoints.split(",") if p.strip()]
        if len(paths) < 2:
            raise OptionError("--bat-mem ensemble needs two or more checkpoints in --bat-mem-checkpoints")
        x, _ = gather_tensors(ctx.train_data, None, torch.device("cpu"))
        probs = []
        for p in paths:
            model = load_checkpoint_model(
                p,
                default_model=ctx.config.model,
                num_classes=ctx.num_classes,
                input_shape=ctx.input_shape,
                device=ctx.device,
            )
            with torch.no_grad():
                probs.append(torch.cat([model(xb.to(ctx.device)).softmax(1) for xb in x.split(512)]))
        return ensemble_disagreement(torch.stack(probs)) / math.log(2)  # in [0, 1]

    # -- the step -----------------------------------------------------------------------
    def reweighting(self, epoch: int) -> bool:
        return self.atyp is not None and epoch >= self.options.burn_in

    @hookimpl
    def on_batch_end(self, ctx: StepContext) -> None:
        """This epoch's snapshot of conf, after the loss, from logits the step has (no sync): the
        clean ones where the objective computed them, else the first adversarial variant's."""
        if self.conf_epoch is not None:
            view = NATURAL if ctx.has_logits(NATURAL) else ctx.variants[0]
            self.conf_epoch[ctx.index] = true_prob(ctx.probs(view), ctx.y)
            self.seen[ctx.index] = True

    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> Weights | None:
        if not self.reweighting(ctx.epoch) or self.options.alpha == 0:
            return None
        atyp = self.atyp[ctx.index]
        probs = ctx.probs(ctx.anchor)  # global: one weight per instance, from the pair's anchor (LRAT's x*)
        w = bat_weights(probs, ctx.y, atyp, self.options.alpha)
        if self.dumper is not None:
            self.dumper.add(index=ctx.index, atypical=atyp, q=poisoning_score(probs, ctx.y), weight=w)
        return Weights(adv=w / ctx.batch_mean(w))  # Eq. 8: sum_i w_i l_i / sum_i w_i (w >= exp(-alpha) > 0)

    @hookimpl(wrapper=True)
    def combine_loss(self, ctx: StepContext, variants: list[Variant]):
        loss = yield
        if self.options.beta == 0 or loss is None:
            return loss
        typical = ~self.atyp[ctx.index] if self.reweighting(ctx.epoch) else torch.ones_like(ctx.y, dtype=torch.bool)
        cosine = self.options.similarity == "cosine"
        dl = torch.stack(
            [discrimination_loss(ctx.features(v), ctx.y, typical, self.options.tau, cosine) for v in variants]
        ).mean()
        return loss + self.options.beta * dl  # Eq. 10

    @hookimpl
    def on_epoch_end(self, epoch: int) -> dict[str, Any] | None:
        if self.conf_epoch is not None:
            seen = all_sum(self.seen.float())
            conf = all_sum(self.conf_epoch * self.seen)
            self.conf_sum += conf
            self.conf_count += (seen > 0).float()
            self.conf_epoch.zero_()
            self.seen.zero_()
            self.mem = 1.0 - self.conf_sum / self.conf_count.clamp_min(1)
            self.set_atypical()
        if self.dumper is not None:
            self.dumper.write(epoch)
        return {"atypical": int(self.atyp.sum()), "reweighting": self.reweighting(epoch + 1)}

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.conf_sum is None:
            return {}
        return {"conf_sum": self.conf_sum, "conf_count": self.conf_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.conf_sum is None:
            return
        if state.get("conf_sum") is None or state["conf_sum"].shape != self.conf_sum.shape:
            raise ValueError(f"bat: saved confidence history does not match {self.n} training samples")
        self.conf_sum.copy_(state["conf_sum"])
        self.conf_count.copy_(state["conf_count"])
        if bool((self.conf_count > 0).any()):
            self.mem = 1.0 - self.conf_sum / self.conf_count.clamp_min(1)
            self.set_atypical()
