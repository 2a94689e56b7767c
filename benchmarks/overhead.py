"""Framework overhead: advplug's AT epoch against a plain hand-written PGD-AT loop, side by side.

Same model architecture and initialisation, same data and batch order, same attack
(torchattacks PGD, BatchNorm in eval mode while attacking), same optimizer. Epochs alternate
between the two so that machine noise hits both; the median per-epoch ratio is printed. Also
times ART's ``AdversarialTrainerMadryPGD`` on the same work, and each ``--plugin`` against
plain advplug AT.

    python benchmarks/overhead.py                              # digits, CPU
    python benchmarks/overhead.py --shape cifar --device cuda  # PreActResNet-18, 32x32x3
    python benchmarks/overhead.py --plugin meow --plugin mail
    python benchmarks/overhead.py --shape cifar --n 64 --precision bf16 --channels-last --ema 0.999
    python benchmarks/overhead.py --twin --plugin mail --epochs 5 --runs 3   # advplug MAIL vs MAIL by hand
    python benchmarks/overhead.py --twin --plugin all                       # every method vs its twin

``--twin``: each method (a plugin, or the objective ``at``/``trades``/``mart``) against its hand-written twin
(``benchmarks/twins``: the same math on the same samples, checked equal in ``tests/test_twins.py``), both from the same
initial model, on the same batches, epochs alternating; per method the per-epoch times, the machine's load and, last,
``ratio NAME <advplug time / twin time>``: the median over the timed epochs of the paired per-epoch ratios (with
``--runs R``, the median of the R runs' medians, whose range is printed before it). ``--twin`` alone is ``at`` against
the plain loop; the GPU-scale switches apply to ``at`` only (the other twins are fp32 eager loops).

The GPU-scale switches (``--precision``, ``--channels-last``, ``--compile``, ``--ema``,
``--data-path``) apply to every contender, the hand-written loop included (autocast, a gradient
scaler for fp16, the memory format, torch.compile, a fused EMA update, and the same batches:
on the device with on-device crop-flip, or from a DataLoader), so each ratio compares like with
like. ``--shape cifar`` builds a CIFAR-shaped uint8 image set (as torchvision's CIFAR10 holds it).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchattacks

from advplug.config import TrainConfig
from advplug.data import DataBundle, LoaderBatches, TensorBatches, load_digits_tensors
from advplug.data.device import device_batches
from advplug.engine.inputs import train_batches
from advplug.engine.trainer import Trainer
from advplug.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.twins importable
from benchmarks.twins import METHODS, REWEIGHT_NOW, TWINS, advplug_settings, make_twin  # noqa: E402

# Baselines: `--plugin awp` costs one extra forward and backward per step (its proxy
# step: work 1 + 1/(K + 1) of AT's for PGD-K, 1.09 for PGD-10), so its time/work should stay near 1
# (<= 1.05); `--plugin fat` does less work than AT (early-stopped PGD); `--plugin wmmr` the same.


class ForwardCounter:
    """Counts the samples that pass through a model's forward (attack iterations included): the
    work a contender asks for. Attached during the untimed warm-up epoch only."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, module, inputs, output) -> None:
        self.n += inputs[0].shape[0]

    def stop(self) -> int:
        self.handle.remove()
        return self.n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Plain:
    """The loop a researcher writes by hand, with the same switches as advplug's run."""

    def __init__(self, model, opt, attack, precision: str, channels_last: bool, ema: float | None) -> None:
        self.model, self.opt, self.attack, self.channels_last = model, opt, attack, channels_last
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=precision == "fp16")
        self.ema = [p.detach().clone() for p in model.parameters()] if ema else None
        self.decay, self.t = ema, 0

    def epoch(self, loader, epoch: int) -> None:
        loader.set_epoch(epoch)
        self.model.train()
        dev = next(self.model.parameters()).device.type
        for x, y, _ in loader:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev, dtype=self.dtype, enabled=self.dtype is not None):
                x_adv = self.attack(x, y)
                logits = self.model(x_adv)
            loss = F.cross_entropy(logits.float(), y)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.ema is not None:
                d = min(self.decay, (1 + self.t) / (10 + self.t))
                self.t += 1
                with torch.no_grad():
                    torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()], 1 - d)


def fresh_copy(trainer: Trainer, dev: torch.device) -> torch.nn.Module:
    m = build_model(trainer.cfg.model, trainer.data.num_classes, trainer.data.input_shape).to(dev)
    m.load_state_dict(trainer.model.state_dict())
    return m


class CifarShaped(torch.utils.data.Dataset):
    """Random CIFAR-shaped images stored as torchvision's CIFAR10 stores them (uint8 NHWC ``data``,
    ``targets``), with the usual crop-flip augmentation in ``__getitem__`` for the loader path."""

    def __init__(self, n: int) -> None:
        import numpy as np
        from torchvision import transforms

        g = np.random.default_rng(0)
        self.data = g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = g.integers(0, 10, n).tolist()
        self.t = transforms.Compose(
            [transforms.ToTensor(), transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        )

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.t(self.data[i]), self.targets[i]


def bundle(shape: str, n: int) -> DataBundle:
    if shape == "digits":
        train, test = load_digits_tensors()
        return DataBundle(train, test, 10, (1, 8, 8))
    ds = CifarShaped(n)
    x = torch.as_tensor(ds.data[:256]).permute(0, 3, 1, 2).float() / 255
    return DataBundle(ds, (x, torch.tensor(ds.targets[:256])), 10, (3, 32, 32), augment="crop-flip")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["digits", "cifar"], default="digits")
    ap.add_argument("--n", type=int, default=2048, help="samples for --shape cifar")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs per contender (after one warm-up)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument(
        "--plugin", action="append", default=[], help="also time advplug with this plugin (a+b: both together)"
    )
    ap.add_argument("--no-art", action="store_true")
    ap.add_argument(
        "--lrat-reference", action="store_true", help="also time LRAT written by hand (compare with --plugin lrat)"
    )
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", choices=["inductor", "aot_eager", "eager"], default=None)
    ap.add_argument("--ema", type=float, default=None)
    ap.add_argument("--data-path", choices=["auto", "device", "loader"], default="auto")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for --data-path loader")
    ap.add_argument(
        "--twin",
        action="store_true",
        help="each --plugin NAME (a plugin or at/trades/mart; all: every method) against its hand-written twin",
    )
    ap.add_argument("--runs", type=int, default=1, help="--twin: repeat the whole alternation this many times")
    args = ap.parse_args()
    if args.twin:
        check_twin_args(ap, args)
    dev = torch.device(args.device)
    data = bundle(args.shape, args.n)
    model_name = "digits-cnn" if args.shape == "digits" else "preactresnet18"
    eps, alpha = (0.2, 0.05) if args.shape == "digits" else (8 / 255, 2 / 255)

    def trainer(plugins: tuple[str, ...], objective: str = "at") -> Trainer:
        opts = {k: v for p in plugins for k, v in REWEIGHT_NOW.get(p, {}).items()}
        # selection="test": every contender trains on the same samples (no held-out split)
        cfg = TrainConfig(
            data="digits",
            model=model_name,
            objective=objective,
            plugins=plugins,
            plugin_options=opts,
            epochs=1000,
            batch_size=args.batch_size,
            lr=0.01,
            milestones=(),
            eps=eps,
            alpha=alpha,
            steps=args.steps,
            device=args.device,
            progress=False,
            out=f"/tmp/advplug-bench/{'+'.join(plugins) or objective}",
            n_eval=16,
            selection="test",
            precision=args.precision,
            channels_last=args.channels_last,
            compile=args.compile,
            ema=args.ema,
            data_path=args.data_path,
            workers=args.workers,
        )
        torch.manual_seed(0)
        return Trainer(cfg, data=data, log=lambda s: None, overwrite=True)  # one run directory per contender

    if args.twin:
        twin_mode(
            args, trainer, dev, f"{args.shape} ({model_name}, PGD-{args.steps}, batch {args.batch_size}) on {dev}"
        )
        return
    contenders = {"advplug AT": trainer(())}
    for p in args.plugin:
        contenders[f"advplug +{p}"] = trainer(tuple(p.split("+")))
    base = contenders["advplug AT"]
    plain_model = fresh_copy(base, dev)
    if args.channels_last:
        plain_model = plain_model.to(memory_format=torch.channels_last)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    fwd = torch.compile(plain_model, backend=args.compile) if args.compile else plain_model
    plain = Plain(
        fwd,
        plain_opt,
        torchattacks.PGD(fwd, eps=eps, alpha=alpha, steps=args.steps),
        args.precision,
        args.channels_last,
        args.ema,
    )
    loader = device_batches(data.train, data.augment, args.data_path, args.batch_size, dev, 0, 0, 1) or LoaderBatches(
        data.train, args.batch_size, True, dev, 0, args.workers
    )
    x, y = (
        (loader.x.float() / 255 if loader.x.dtype == torch.uint8 else loader.x, loader.y)
        if isinstance(loader, TensorBatches)
        else (torch.stack([data.train[i][0] for i in range(len(data.train))]), torch.tensor(data.train.targets))
    )
    x, y = x.cpu(), y.cpu()

    times: dict[str, list[float]] = {"plain loop": [], **{k: [] for k in contenders}}
    models = {"plain loop": plain_model, **{k: t.model for k, t in contenders.items()}}
    if args.lrat_reference:  # LRAT's twin (benchmarks/twins/lrat.py) on the same model init and batches
        lrat_twin = make_twin("lrat", base)
        times["hand LRAT loop"], models["hand LRAT loop"] = [], lrat_twin.model
    counters = {name: ForwardCounter(models[name]) for name in times}
    for epoch in range(args.epochs + 1):
        for name in times:
            sync(dev)
            t0 = time.perf_counter()
            if name == "plain loop":
                plain.epoch(loader, epoch)
            elif name == "hand LRAT loop":
                lrat_twin.epoch(loader, epoch)
            else:  # the plugins' epoch-end upkeep too (burn-ins, estimates: BAT's, DAFA's class weights)
                trainer = contenders[name]
                trainer.pm.hook.on_epoch_end(epoch=epoch, metrics=trainer.train_epoch(epoch))
            sync(dev)
            if epoch > 0:  # epoch 0 warms up
                times[name].append(time.perf_counter() - t0)

    work = {name: c.stop() for name, c in counters.items()}
    ref = statistics.median(times["plain loop"])
    at = statistics.median(times["advplug AT"])
    print(
        f"{args.shape} ({len(y)} samples, {model_name}, PGD-{args.steps}, batch {args.batch_size}) on {dev}, "
        f"median of {args.epochs} epochs; precision {args.precision}, channels_last {args.channels_last}, "
        f"compile {args.compile}, ema {args.ema}, data path {type(loader).__name__}"
    )
    print(
        "work: sample-forwards per epoch (attack iterations included) relative to advplug AT; "
        "time/work: time ratio over work ratio (1.0: the contender costs exactly its extra passes)"
    )
    print(f"{'contender':<22} {'s/epoch':>9} {'vs plain':>9} {'vs AT':>7} {'work':>7} {'time/work':>9}")
    for name, ts in times.items():
        m = statistics.median(ts)
        wr = work[name] / work["advplug AT"]
        print(f"{name:<22} {m:9.3f} {m / ref:9.3f} {m / at:7.3f} {wr:7.2f} {m / at / wr:9.3f}")
    if not args.no_art and args.precision == "fp32" and not args.compile:
        art_time = time_art(fresh_copy(base, dev), x, y, eps, alpha, args.steps, args.batch_size, dev)
        print(f"{'ART MadryPGD':<22} {art_time:9.3f} {art_time / ref:9.3f} {art_time / at:7.3f}")


def check_twin_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--twin``: methods with a twin, one at a time (no ``a+b``); the GPU-scale switches for ``at`` only."""
    if args.plugin == ["all"]:
        args.plugin = list(METHODS)
    args.plugin = args.plugin or ["at"]
    unknown = [p for p in args.plugin if p not in TWINS]
    if unknown:
        ap.error(f"--twin: no twin for {', '.join(unknown)} (methods: {', '.join(METHODS)}, or all)")
    switches = args.precision != "fp32" or args.channels_last or args.compile or args.ema is not None
    if switches and args.plugin != ["at"]:
        ap.error(
            "--twin: --precision, --channels-last, --compile and --ema apply to at only (the twins run fp32 eager)"
        )
    if args.runs < 1 or args.epochs < 1:
        ap.error("--runs and --epochs must be >= 1")


def twin_mode(args: argparse.Namespace, trainer: Callable[..., Trainer], dev: torch.device, setting: str) -> None:
    """Each method against its twin: per method the per-epoch times, the load, and ``ratio NAME x`` last; with
    several methods a summary table after them."""
    print(
        f"advplug vs its hand-written twin: {setting}, {args.epochs} timed epochs after one warm-up, {args.runs} run(s)"
    )
    rows = []
    for name in args.plugin:
        settings = advplug_settings(name)
        new_trainer = functools.partial(trainer, settings["plugins"], settings["objective"])
        runs = [twin_run(name, args, new_trainer, dev) for _ in range(args.runs)]
        ratios = [r["ratio"] for r in runs]
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
        print(f"{name}: load average {load} (1, 5, 15 min) on {os.cpu_count()} CPUs")
        if args.runs > 1:
            spread = f"median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})"
            print(f"{name}: per-run medians {' '.join(f'{r:.3f}' for r in ratios)}: {spread}")
        print(f"ratio {name} {statistics.median(ratios):.3f}")
        rows.append((name, runs))
    if len(rows) > 1:
        print(
            f"{'method':<8} {'advplug s/epoch':>15} {'twin s/epoch':>12} {'twin work':>9} {'ratio':>6}  range of runs"
        )
        for name, runs in rows:
            ratios = [r["ratio"] for r in runs]
            a, t = (statistics.median(x for r in runs for x in r[k]) for k in ("advplug", "twin"))
            print(
                f"{name:<8} {a:15.3f} {t:12.3f} {runs[0]['work']:9.2f} {statistics.median(ratios):6.3f}"
                f"  {min(ratios):.3f}-{max(ratios):.3f}"
            )


def twin_run(name: str, args: argparse.Namespace, new_trainer: Callable[[], Trainer], dev: torch.device) -> dict:
    """One alternation: advplug and the twin from the same initial model on the same batches, epoch by epoch (epoch 0
    warms up, and counts each one's sample-forwards: ``work``, the twin's over advplug's)."""
    adv = new_trainer()
    try:
        twin = twin_of(name, adv, args, dev)
        batches = train_batches(adv.cfg, adv.data, dev, 0, 1)  # the trainer's batches, in the trainer's order
        counters = (ForwardCounter(adv.model), ForwardCounter(getattr(twin.model, "_orig_mod", twin.model)))
        times: dict[str, list[float]] = {"advplug": [], "twin": []}
        work = float("nan")
        for epoch in range(args.epochs + 1):
            for who in ("advplug", "twin") if epoch % 2 else ("twin", "advplug"):  # who goes first alternates
                sync(dev)
                t0 = time.perf_counter()
                if who == "advplug":
                    adv.pm.hook.on_epoch_end(epoch=epoch, metrics=adv.train_epoch(epoch))
                else:
                    twin.epoch(batches, epoch)
                sync(dev)
                if epoch > 0:
                    times[who].append(time.perf_counter() - t0)
            if epoch == 0:
                work = counters[1].stop() / max(counters[0].stop(), 1)
    finally:
        adv.close()
    ratio = statistics.median(a / t for a, t in zip(times["advplug"], times["twin"]))
    cells = " ".join(f"{a:.3f}/{t:.3f}" for a, t in zip(times["advplug"], times["twin"]))
    print(f"{name}: s/epoch advplug/twin {cells}; twin work {work:.2f} of advplug's; median ratio {ratio:.3f}")
    return {**times, "ratio": ratio, "work": work}


def twin_of(name: str, adv: Trainer, args: argparse.Namespace, dev: torch.device) -> object:
    """``at``: the plain loop with the run's GPU-scale switches (``Plain``); else the method's twin."""
    if name != "at":
        return make_twin(name, adv)
    model = fresh_copy(adv, dev)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.parameters(), lr=adv.cfg.lr, momentum=adv.cfg.momentum, weight_decay=adv.cfg.weight_decay
    )
    fwd = torch.compile(model, backend=args.compile) if args.compile else model
    attack = torchattacks.PGD(fwd, eps=adv.cfg.eps, alpha=adv.cfg.alpha, steps=adv.cfg.steps)
    return Plain(fwd, opt, attack, args.precision, args.channels_last, args.ema)


def time_art(model, x, y, eps, alpha, steps, batch_size, dev) -> float:
    """ART's AdversarialTrainerMadryPGD, one epoch over the same data (numpy in, as ART wants)."""
    import numpy as np
    from art.defences.trainer import AdversarialTrainerMadryPGD
    from art.estimators.classification import PyTorchClassifier

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    clf = PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=opt,
        input_shape=tuple(x.shape[1:]),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="gpu" if dev.type == "cuda" else "cpu",
    )
    xn, yn = x.numpy(), np.eye(10, dtype=np.float32)[y.numpy()]
    ts = []
    for i in range(3):
        trainer = AdversarialTrainerMadryPGD(
            clf, nb_epochs=1, batch_size=batch_size, eps=eps, eps_step=alpha, max_iter=steps
        )
        t0 = time.perf_counter()
        trainer.fit(xn, yn)
        if i > 0:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


if __name__ == "__main__":
    main()
