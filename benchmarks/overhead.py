"""Framework overhead: advplug's AT epoch against a plain hand-written PGD-AT loop, side by side.

Same model architecture and initialisation, same data and batch order, same attack
(torchattacks PGD, BatchNorm in eval mode while attacking), same optimizer. Epochs alternate
between the two so that machine noise hits both; the median per-epoch ratio is printed. Also
times ART's ``AdversarialTrainerMadryPGD`` on the same work, and each ``--plugin`` against
plain advplug AT.

    python benchmarks/overhead.py                              # digits, CPU
    python benchmarks/overhead.py --shape cifar --device cuda  # PreActResNet-18, 32x32x3
    python benchmarks/overhead.py --plugin meow --plugin mail
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torchattacks

from advplug.config import TrainConfig
from advplug.data import DataBundle, TensorBatches, load_digits_tensors
from advplug.models import build_model
from advplug.trainer import Trainer


# time the reweighting itself, not a burn-in period
REWEIGHT_NOW = {"mail": {"mail-burn-in": 0}, "gairat": {"gairat-begin-epoch": 0}, "bat": {"bat-burn-in": 0},
                "awp": {"awp-warmup": 0}}
# Baselines (issue 17): `--plugin awp` costs one extra forward and backward per step (its proxy
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


def plain_epoch(model, opt, loader, attack, epoch: int) -> None:
    """The loop a researcher writes by hand."""
    loader.set_epoch(epoch)
    model.train()
    for x, y, _ in loader:
        x_adv = attack(x, y)
        loss = F.cross_entropy(model(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


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


def bundle(shape: str, n: int) -> DataBundle:
    if shape == "digits":
        train, test = load_digits_tensors()
        return DataBundle(train, test, 10, (1, 8, 8))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataBundle((x, y), (x[:256], y[:256]), 10, (3, 32, 32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["digits", "cifar"], default="digits")
    ap.add_argument("--n", type=int, default=2048, help="samples for --shape cifar")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs per contender (after one warm-up)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--plugin", action="append", default=[], help="also time advplug with this plugin (a+b: both together)")
    ap.add_argument("--no-art", action="store_true")
    ap.add_argument("--lrat-reference", action="store_true", help="also time LRAT written by hand (compare with --plugin lrat)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    data = bundle(args.shape, args.n)
    model_name = "digits-cnn" if args.shape == "digits" else "preactresnet18"
    eps, alpha = (0.2, 0.05) if args.shape == "digits" else (8 / 255, 2 / 255)

    def trainer(plugins: tuple[str, ...]) -> Trainer:
        opts = {k: v for p in plugins for k, v in REWEIGHT_NOW.get(p, {}).items()}
        cfg = TrainConfig(data="digits", model=model_name, plugins=plugins, plugin_options=opts, epochs=1000, batch_size=args.batch_size,
                          lr=0.01, milestones=(1000,), eps=eps, alpha=alpha, steps=args.steps, device=args.device,
                          progress=False, out=f"/tmp/advplug-bench/{'+'.join(plugins) or 'at'}", n_eval=16)
        torch.manual_seed(0)
        return Trainer(cfg, data=data, log=lambda s: None, overwrite=True)  # one run directory per contender

    contenders = {"advplug AT": trainer(())}
    for p in args.plugin:
        contenders[f"advplug +{p}"] = trainer(tuple(p.split("+")))
    base = contenders["advplug AT"]
    plain_model = fresh_copy(base, dev)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    plain_attack = torchattacks.PGD(plain_model, eps=eps, alpha=alpha, steps=args.steps)
    x, y = data.train
    loader = TensorBatches(x.to(dev), y.to(dev), args.batch_size, True, seed=0)

    times: dict[str, list[float]] = {"plain loop": [], **{k: [] for k in contenders}}
    models = {"plain loop": plain_model, **{k: t.model for k, t in contenders.items()}}
    if args.lrat_reference:
        from advplug.attacks import make_attack

        lrat_model = fresh_copy(base, dev)
        lrat_opt = torch.optim.SGD(lrat_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        kw = dict(eps=eps, alpha=alpha, steps=args.steps)
        lrat_attacks = {"pgd": make_attack("pgd", lrat_model, **kw), "cw": make_attack("cw", lrat_model, **kw),
                        "saa": make_attack("saa", lrat_model, **{**kw, "steps": 20}, n_target_classes=3)}
        times["hand LRAT loop"], models["hand LRAT loop"] = [], lrat_model
    counters = {name: ForwardCounter(models[name]) for name in times}
    for epoch in range(args.epochs + 1):
        for name in times:
            sync(dev)
            t0 = time.perf_counter()
            if name == "plain loop":
                plain_epoch(plain_model, plain_opt, loader, plain_attack, epoch)
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
    print(f"{args.shape} ({len(y)} samples, {model_name}, PGD-{args.steps}, batch {args.batch_size}) on {dev}, "
          f"median of {args.epochs} epochs")
    print("work: sample-forwards per epoch (attack iterations included) relative to advplug AT; "
          "time/work: time ratio over work ratio (1.0: the contender costs exactly its extra passes)")
    print(f"{'contender':<22} {'s/epoch':>9} {'vs plain':>9} {'vs AT':>7} {'work':>7} {'time/work':>9}")
    for name, ts in times.items():
        m = statistics.median(ts)
        wr = work[name] / work["advplug AT"]
        print(f"{name:<22} {m:9.3f} {m / ref:9.3f} {m / at:7.3f} {wr:7.2f} {m / at / wr:9.3f}")
    if not args.no_art:
        art_time = time_art(fresh_copy(base, dev), x, y, eps, alpha, args.steps, args.batch_size, dev)
        print(f"{'ART MadryPGD':<22} {art_time:9.3f} {art_time / ref:9.3f} {art_time / at:7.3f}")


def time_art(model, x, y, eps, alpha, steps, batch_size, dev) -> float:
    """ART's AdversarialTrainerMadryPGD, one epoch over the same data (numpy in, as ART wants)."""
    import numpy as np
    from art.defences.trainer import AdversarialTrainerMadryPGD
    from art.estimators.classification import PyTorchClassifier

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), optimizer=opt, input_shape=tuple(x.shape[1:]),
                            nb_classes=10, clip_values=(0.0, 1.0), device_type="gpu" if dev.type == "cuda" else "cpu")
    xn, yn = x.numpy(), np.eye(10, dtype=np.float32)[y.numpy()]
    ts = []
    for i in range(3):
        trainer = AdversarialTrainerMadryPGD(clf, nb_epochs=1, batch_size=batch_size, eps=eps, eps_step=alpha, max_iter=steps)
        t0 = time.perf_counter()
        trainer.fit(xn, yn)
        if i > 0:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


if __name__ == "__main__":
    main()
