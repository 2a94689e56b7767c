"""No per-step tensor outlives its step.

Live tensor memory is read from torch's CPU allocator (the profiler's memory events: every allocation and free with
its size, those of tensors held only by autograd graphs included; ``benchmarks/memory.py`` uses the same). After
step 3 and after step 10 of an epoch (garbage collected), the live memory may differ only by what the epoch's own
records gained in between: the combined weights kept for the epoch's summary and the ``--dump-weights`` / plugin dump
columns, which stay on the device until the epoch's end and are released there (the end of epoch 3 holds what the end
of epoch 2 held). Per-sample histories of the plugins (BAT's confidence, MeoW's codebook and ring) are allocated once.
"""

import gc
import sys

import pytest
from torch.profiler import ProfilerActivity, profile, record_function

from advplug import hookimpl
from advplug.engine.step import Step
from advplug.engine.trainer import Trainer
from advplug.run.dump import SampleDump
from advplug.testing import digits_subset, installed_plugins, tiny_config

MARK_STEPS = (3, 10)  # steps within the measured epoch (batch 16 of 192 samples: 12 steps)
EPOCHS = 3


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def epoch_records(trainer: Trainer, frame) -> int:
    """Bytes the running epoch keeps by design: ``train_epoch``'s weights for the summary and every dump's columns."""
    dumps = [trainer.weight_dump] + [
        d for _, p in trainer.pm.list_name_plugin() for d in vars(p).values() if isinstance(d, SampleDump)
    ]
    tensors = list(frame.f_locals.get("weights_seen", []))
    tensors += [t for d in dumps if d is not None for parts in d.parts.values() for t in parts]
    return storage_bytes(tensors)


class Marks:
    """Marks in the profile after chosen steps of the measured epoch (and at epochs' ends), with the epoch's records."""

    def __init__(self) -> None:
        self.records: dict[str, int] = {}
        self.n = 0

    def mark(self, name: str, records: int = 0) -> None:
        gc.collect()
        with record_function(f"mark:{name}"):
            pass
        self.records[name] = records


def live_at(prof, names) -> dict[str, int]:
    """Allocated bytes at each mark, from the start of profiling (the running sum of allocations and frees)."""
    events = prof.profiler.kineto_results.events()
    marks = {e.name()[5:]: e.start_ns() for e in events if e.name().startswith("mark:")}
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    return {n: sum(b for t, b in mem if t <= marks[n]) for n in names}


def train_marked(monkeypatch, tmp_path, **cfg) -> tuple[dict[str, int], dict[str, int]]:
    """Three epochs of a tiny run, profiled from before its set-up; (live bytes, epoch records) at each mark."""
    marks = Marks()
    real = Step.__call__

    def marked(self, *args, **kw):
        out = real(self, *args, **kw)
        epoch, k = args[3], marks.n % 12 + 1
        marks.n += 1
        if epoch == 1 and k in MARK_STEPS:
            marks.mark(f"step{k}", epoch_records(trainer, sys._getframe(1)))
        return out

    monkeypatch.setattr(Step, "__call__", marked)
    config = tiny_config(str(tmp_path), batch_size=16, steps=2, epochs=EPOCHS, dump_weights=True, ema=0.99, **cfg)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = Trainer(config, data=digits_subset(192, 16), log=lambda s: None)
        for epoch in range(EPOCHS):
            trainer._epoch(epoch)
            marks.mark(f"epoch{epoch + 1}")
        trainer.close()
    return live_at(prof, marks.records), marks.records


CASES = [
    ((), "at", {}),
    ((), "trades", {}),
    (("mail",), "at", {"mail-burn-in": 0, "mail-dump": True}),
    (("meow",), "at", {}),
    (("gairat",), "at", {"gairat-begin-epoch": 0, "gairat-dump": True}),
    (("bat",), "at", {"bat-burn-in": 0, "bat-dump": True}),
]


@pytest.mark.parametrize("plugins,objective,options", CASES, ids=["at", "trades", "mail", "meow", "gairat", "bat"])
def test_live_memory_does_not_grow_with_steps(monkeypatch, tmp_path, one_thread, plugins, objective, options):
    live, records = train_marked(monkeypatch, tmp_path, plugins=plugins, objective=objective, plugin_options=options)
    grew = live["step10"] - live["step3"]
    kept = records["step10"] - records["step3"]
    assert kept > 0 or not plugins  # weights (and dumps) are kept for the epoch's records: what a step may keep
    assert grew == kept, f"live memory grew by {grew} bytes from step 3 to step 10, the epoch's records by {kept}"
    assert live["epoch3"] == live["epoch2"]  # the records are released at the epoch's end


class KeepsContexts:
    """A leaking plugin: keeps every step's context."""

    kept: list = []

    @hookimpl
    def on_batch_end(self, ctx) -> None:
        KeepsContexts.kept.append(ctx)


def test_a_plugin_keeping_its_step_contexts_is_caught(monkeypatch, tmp_path, one_thread):
    """The measurement sees a leak: a plugin that keeps each step's context (its cached logits, features, variants)."""
    with installed_plugins(leaky="tests.test_step_memory:KeepsContexts"):
        monkeypatch.setitem(sys.modules, "tests.test_step_memory", sys.modules[__name__])
        live, records = train_marked(monkeypatch, tmp_path, plugins=("leaky",))
    KeepsContexts.kept.clear()
    assert live["step10"] - live["step3"] > records["step10"] - records["step3"]


@pytest.mark.parametrize(
    "plugins,objective,options,graph",
    [
        (("mail",), "at", {"mail-margin": "nat", "mail-burn-in": 0}, False),  # AT's loss reads the variants only
        (("mail", "bat"), "at", {"mail-margin": "nat", "mail-burn-in": 0}, True),  # a wrapper of the loss: kept
        (("mail",), "trades", {"mail-margin": "nat", "mail-burn-in": 0}, True),  # TRADES' CE on the natural logits
        (("meow",), "at", {}, True),  # MeoW's loss (Eq. 5) has a natural term
    ],
    ids=["at", "at-wrapped", "trades", "meow"],
)
def test_natural_forward_keeps_its_graph_only_when_the_loss_reads_it(tmp_path, plugins, objective, options, graph):
    """A natural forward pass that only plugins' signals read (MAIL's PM-nat, BiLAW's margins under AT) records no
    autograd graph, so its activations are not held through the step (BiLAW's meta step: 22.2 -> 17.6 MiB on
    digits, batch 128); where the run's loss may read it, it keeps its gradient."""
    config = tiny_config(str(tmp_path), plugins=plugins, objective=objective, plugin_options=options)
    t = Trainer(config, data=digits_subset(64, 16), log=lambda s: None)
    x, y, i = next(iter(t.loader))
    _, ctx, _ = t.step(x, y, i, 0, 0)
    t.close()
    assert ctx.has_logits("natural")
    assert ctx.logits("natural").requires_grad is graph
