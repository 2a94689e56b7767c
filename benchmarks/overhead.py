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

The GPU-scale switches (``--precision``, ``--channels-last``, ``--compile``, ``--ema``,
``--data-path``) apply to every contender, the hand-written loop included (autocast, a gradient
scaler for fp16, the memory format, torch.compile, a fused EMA update, and the same batches:
on the device with on-device crop-flip, or from a DataLoader), so each ratio compares like with
like. ``--shape cifar`` builds a CIFAR-shaped uint8 image set (as torchvision's CIFAR10 holds it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torchattacks

from advplug.config import TrainConfig
from advplug.data import DataBundle, LoaderBatches, TensorBatches, load_digits_tensors
from advplug.data.device import device_batches
from advplug.engine.trainer import Trainer
from advplug.models import build_model

# time the reweighting itself, not a burn-in period
REWEIGHT_NOW = {
    "mail": {"mail-burn-in": 0},
    "gairat": {"gairat-begin-epoch": 0},
    "bat": {"bat-burn-in": 0},
    "awp": {"awp-warmup": 0},
}
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


def plain_lrat_epoch(model, opt, loader, attacks, epoch: int, alpha=2.0, beta=0.5, c=0.1) -> None:
    """LRAT-SAA+CW with x* = PGD written by hand (Eq. 7, 11, 12, 15), same attacks as the plugin."""
    loader.set_epoch(epoch)
    model.train()
    for x, y, _ in loader:
        views = [attacks[n](x, y) for n in ("cw", "saa", "pgd")]
        logits = [model(v) for v in views]
        ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits])
        w = []
        for z in logits[:2]:
            p = z.detach().softmax(1)
            t = p.gather(1, y[:, None]).squeeze(1) - p.scatter(1, y[:, None], -1.0).amax(1)
            w.append(alpha * (1 - t).clamp_min(0) ** beta)
        w.append((c - w[0] - w[1]).clamp_min(0))
        w = torch.stack(w)
        w = w / w.sum(0).mean()
        loss = (w * ce).sum(0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


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
    args = ap.parse_args()
    dev = torch.device(args.device)
    data = bundle(args.shape, args.n)
    model_name = "digits-cnn" if args.shape == "digits" else "preactresnet18"
    eps, alpha = (0.2, 0.05) if args.shape == "digits" else (8 / 255, 2 / 255)

    def trainer(plugins: tuple[str, ...]) -> Trainer:
        opts = {k: v for p in plugins for k, v in REWEIGHT_NOW.get(p, {}).items()}
        # selection="test": every contender trains on the same samples (no held-out split)
        cfg = TrainConfig(
            data="digits",
            model=model_name,
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
            out=f"/tmp/advplug-bench/{'+'.join(plugins) or 'at'}",
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
    if args.lrat_reference:
        from advplug.attacks import make_attack

        lrat_model = fresh_copy(base, dev)
        lrat_opt = torch.optim.SGD(lrat_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        kw = dict(eps=eps, alpha=alpha, steps=args.steps)
        lrat_attacks = {
            "pgd": make_attack("pgd", lrat_model, **kw),
            "cw": make_attack("cw", lrat_model, **kw),
            "saa": make_attack("saa", lrat_model, **{**kw, "steps": 20}, n_target_classes=3),
        }
        times["hand LRAT loop"], models["hand LRAT loop"] = [], lrat_model
    counters = {name: ForwardCounter(models[name]) for name in times}
    for epoch in range(args.epochs + 1):
        for name in times:
            sync(dev)
            t0 = time.perf_counter()
            if name == "plain loop":
                plain.epoch(loader, epoch)
            elif name == "hand LRAT loop":
                plain_lrat_epoch(lrat_model, lrat_opt, loader, lrat_attacks, epoch)
            else:
                contenders[name].train_epoch(epoch)
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
