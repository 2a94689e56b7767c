"""Helpers for testing advplug and third-party plugins: tiny data, tiny configs, and
registering plugin classes as if installed through the ``advplug`` entry-point group."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from typing import Any

import torch
from torch import Tensor

from advplug import hookimpl, plugins
from advplug.config import TrainConfig
from advplug.context import StepContext, Variant, Weights
from advplug.data import DataBundle, load_digits_tensors


def digits_subset(n_train: int = 256, n_test: int = 128) -> DataBundle:
    """A small slice of the embedded digits set (fast end-to-end tests)."""
    (xt, yt), (xs, ys) = load_digits_tensors()
    return DataBundle((xt[:n_train], yt[:n_train]), (xs[:n_test], ys[:n_test]), 10, (1, 8, 8))


def tiny_config(out: str, **kw) -> TrainConfig:
    """Two quick epochs on digits: PGD-3, final evaluation natural + PGD-5, best chosen on test; the
    learning rate drops after the first epoch (no drop in a one-epoch run)."""
    # selection="test": plugin tests count and index the whole training set they pass in; the
    # held-out selection split (the default) has its own tests in tests/test_selection.py.
    base = dict(
        data="digits",
        epochs=2,
        batch_size=64,
        steps=3,
        eval_steps=3,
        out=out,
        progress=False,
        final_attacks=("natural", "pgd5"),
        n_eval=64,
        selection="test",
    )
    base.update(kw)
    base.setdefault("milestones", (1,) if base["epochs"] > 1 else ())
    return TrainConfig(**base)


@contextlib.contextmanager
def installed_plugins(**targets: str) -> Iterator[None]:
    """Make ``name="module:Class"`` pairs look installed (on top of the real ones)."""
    real = plugins.installed
    extra = {n: EntryPoint(name=n, value=t, group=plugins.GROUP) for n, t in targets.items()}
    plugins.installed = lambda: {**real(), **extra}  # type: ignore[assignment]
    try:
        yield
    finally:
        plugins.installed = real  # type: ignore[assignment]


def enabled_plugin(name: str, options: dict[str, str] | None = None, objective: str = "at") -> Any:
    """The plugin ``name`` as a run constructs it, ``options`` given as on the command line
    (``{"mail-gamma": "2.5"}``): checks an ``Options`` class and its parsing."""
    return plugins.enable([name], objective, options or {}).plugin(name)


def train_quietly(cfg: TrainConfig, data: DataBundle) -> None:
    """Train (and evaluate) ``cfg`` on ``data`` without log output: a plugin's end-to-end test."""
    from advplug.engine.trainer import Trainer

    Trainer(cfg, data=data, log=lambda s: None).fit()


class ScriptedTwoClass(torch.nn.Module):
    """Two-class logits that follow the call count, not the input: call ``i`` predicts
    ``p(class 1) = p1[i]`` (the last value after that) for every sample, with a zero gradient in
    the input. Lets a test script an attack's iterations (fooled, correct, fooled again ...)."""

    def __init__(self, p1: list[float]) -> None:
        super().__init__()
        self.p1, self.calls = p1, 0

    def forward(self, x: Tensor) -> Tensor:
        p1 = self.p1[min(self.calls, len(self.p1) - 1)]
        self.calls += 1
        z1 = torch.full((len(x),), float(torch.logit(torch.tensor(p1, dtype=torch.float64))))
        return torch.stack([torch.zeros(len(x)), z1], 1) + 0 * x.flatten(1).sum(1, keepdim=True)


class TableModel(torch.nn.Module):
    """Looks logits up by the first input value: lets a test fix each view's probabilities.
    ``x[:, 0]`` holds row numbers of ``table`` ``[N, K]``; ``head`` gives the FeatureTap a layer."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = table
        self.head = torch.nn.Linear(1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.table[x[:, 0].long()]


# -- small plugins used by the test suite -------------------------------------------------
class ConstantWeights:
    """Weights given by a fixed per-variant vector (tests of composition)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> Weights | None:
        return None if self.value is None else Weights(adv=self.value)


class BadWeights:
    """Returns weights that are NaN (``kind = "nan"``), negative (``"negative"``) or all zero (``"zero"``)."""

    kind = "nan"

    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> Weights:
        w = torch.ones(ctx.batch_size, device=ctx.x.device)
        w[0] = {"nan": float("nan"), "negative": -1.0, "zero": 0.0}[self.kind]
        return Weights(adv=w * 0 if self.kind == "zero" else w)


class DtypeProbe:
    """Records the dtypes a plugin sees (logits, features, probs) under the run's precision."""

    seen: list = []

    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant]) -> None:
        v = variants[0]
        DtypeProbe.seen.append((ctx.logits(v).dtype, ctx.features(v).dtype, ctx.probs(v).dtype))
        return None


class WrongSignature:
    """A hook whose argument is not in the spec (pluggy rejects it at registration)."""

    @hookimpl
    def compute_weights(self, ctx: StepContext, variants: list[Variant], batch) -> None:  # ``batch``: no such argument
        return None


class NaNLoss:
    """Wraps the loss and turns it into NaN from global step ``at`` on."""

    at = 3

    @hookimpl(wrapper=True)
    def combine_loss(self, ctx: StepContext):
        loss = yield
        return loss * float("nan") if ctx.step >= self.at else loss


class SecondOwner:
    """A second loss owner: must clash with any other owner."""

    @hookimpl
    def combine_loss(self, ctx: StepContext, variants: list[Variant]) -> Tensor:
        return torch.stack([ctx.logits(v).sum() for v in variants]).sum()


class Misspelt:
    """Implements a hook that does not exist."""

    @hookimpl
    def compute_weight(self, ctx: StepContext) -> None:  # sic: not a spec
        return None


def run_and_resume(tmp, data: DataBundle, epochs: int = 3, **cfg) -> tuple[dict, dict]:
    """Train ``epochs`` epochs straight, and the same run interrupted (as by Ctrl-C) after ``epochs - 1``
    then ``--resume``d for the last one; returns both final checkpoints (for exact-resume checks)."""
    from pathlib import Path

    from advplug.engine.inputs import resume_config
    from advplug.engine.trainer import Trainer
    from advplug.errors import Interrupted
    from advplug.run import checkpoint

    class StopsBeforeTheLastEpoch(Trainer):
        def _epoch(self, epoch: int) -> None:
            super()._epoch(epoch)
            if epoch + 2 == self.cfg.epochs:  # after the checkpoint of epoch epochs - 1
                raise KeyboardInterrupt

    full, part = Path(tmp) / "full", Path(tmp) / "part"
    Trainer(tiny_config(str(full), epochs=epochs, **cfg), data=data, log=lambda s: None).fit()
    with contextlib.suppress(Interrupted):
        StopsBeforeTheLastEpoch(tiny_config(str(part), epochs=epochs, **cfg), data=data, log=lambda s: None).fit()
    Trainer(resume_config(part), data=data, resume=True, log=lambda s: None).fit()
    return checkpoint.load(full), checkpoint.load(part)


def same_tensors(a: dict, b: dict, atol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol) for k in a)


# -- graph breaks under torch.compile -----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GraphBreak:
    """One graph break: where dynamo stopped tracing (``file:line``) and why, in one line."""

    where: str
    reason: str


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What ``torch._dynamo`` made of one call: the graphs it compiled and every break it logged (a break inside a
    loop also skips the rest of that frame, which then runs eagerly: its reason ends in ``(frame skipped)``)."""

    graphs: int
    breaks: tuple[GraphBreak, ...]


def _short_reason(text: str) -> str:
    """The informative first line of dynamo's ``Graph Break Reason`` text."""
    generic = ("Encountered graph break when attempting to trace", "Failed to handle graph break gracefully")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(generic)] or lines or ["?"]
    skipped = "graph break in loop" in text or "Failed to handle graph break gracefully" in text
    return lines[0] + (" (frame skipped)" if skipped else "")


def _break_from_log(message: str) -> GraphBreak | None:
    """A ``GraphBreak`` from one record of dynamo's ``graph_breaks`` log (``None``: not a break record)."""
    import re

    where = re.search(r"in user code at (\S+):(\d+)", message) or re.search(r'File "([^"]+)", line (\d+)', message)
    if "Graph Break Reason:" in message:
        reason = _short_reason(message.split("Graph Break Reason:", 1)[1])
    elif "cannot properly resume" in message:
        reason = "cannot resume after a graph break (frame skipped)"
    else:
        return None
    path = where.group(1) if where else "?"
    for root in ("site-packages/", "/advplug/", "/plugins/", "/benchmarks/", "/tests/"):
        if root in path:
            path = (root.strip("/") + "/" if root != "site-packages/" else "") + path.split(root, 1)[1]
            break
    return GraphBreak(f"{path}:{where.group(2)}" if where else path, reason)


def graph_breaks(fn: Any, *args: Any, **kwargs: Any) -> CompileReport:
    """Run ``fn(*args, **kwargs)`` once under ``torch._dynamo.explain`` (no compiler, works on the CPU) and report its
    graphs and graph breaks, each with its place and reason (read from dynamo's ``graph_breaks`` log, which also
    sees the breaks that skip a frame and that ``explain``'s own count misses). ``fn`` runs: its side effects
    happen. Resets dynamo's caches before and after.

    >>> graph_breaks(plugin.compute_weights, ctx, ctx.variants).breaks  # (): compiles as one graph
    """
    import logging

    import torch._dynamo

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    names = [
        n for n in list(logging.root.manager.loggerDict) if n.startswith("torch.") and n.endswith("__graph_breaks")
    ]
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    handler = Collect(logging.DEBUG)
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
        lg.addHandler(handler)
    try:
        out = torch._dynamo.explain(fn)(*args, **kwargs)
    finally:
        for lg, (level, propagate) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
    found = [b for b in map(_break_from_log, records) if b is not None]
    return CompileReport(graphs=out.graph_count, breaks=tuple(found))
