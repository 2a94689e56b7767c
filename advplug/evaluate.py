"""Robust accuracy of a model under named attacks: torchattacks by default, ART as a cross-check."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from advplug.attacks import display_name, make_eval_attack, parse_eval_attack
from advplug.errors import OptionError


def _batches(x: Tensor, y: Tensor, batch_size: int):
    for i in range(0, len(y), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def gather_tensors(data, n: int | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``n`` samples (all if ``None``) of a tensor pair or data set, as device tensors."""
    if isinstance(data, tuple):
        x, y = data
    else:
        m = len(data) if n is None else min(n, len(data))
        items = [data[i] for i in range(m)]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([int(it[1]) for it in items])
    if n is not None:
        x, y = x[:n], y[:n]
    return x.to(device), y.to(device)


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x).argmax(1) == y).sum()


def evaluate(model: nn.Module, x: Tensor, y: Tensor, attacks: Iterable[str], *, eps: float,
             alpha: float | None = None, num_classes: int = 10, batch_size: int = 256, seed: int = 0,
             backend: str = "torchattacks", progress: bool = False) -> dict[str, float]:
    """Accuracy per attack spec (``natural``, ``fgsm``, ``pgd20``, ``cw``, ``apgd-ce``, ``aa``),
    keyed by display name. The model is evaluated in eval mode and left as it was.

    Reproducible: each attack runs under its own RNG stream seeded with ``seed`` (random starts
    are the same whenever the same model is evaluated), and the caller's RNG is left untouched."""
    attacks = list(attacks)
    for a in attacks:
        parse_eval_attack(a)
    if backend == "art":
        return evaluate_art(model, x, y, attacks, eps=eps, alpha=alpha, num_classes=num_classes, batch_size=batch_size)
    if backend != "torchattacks":
        raise OptionError(f"unknown backend {backend!r} (torchattacks or art)")
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for spec in attacks:
            with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
                torch.manual_seed(seed)
                atk = make_eval_attack(spec, model, eps=eps, alpha=alpha, num_classes=num_classes, seed=seed)
                correct = torch.zeros((), dtype=torch.long, device=x.device)
                it = _batches(x, y, batch_size)
                if progress:
                    from tqdm import tqdm

                    it = tqdm(it, total=-(-len(y) // batch_size), desc=display_name(spec), leave=False)
                for xb, yb in it:
                    xa = xb if atk is None else atk(xb, yb)
                    correct += _correct(model, xa, yb)
                out[display_name(spec)] = correct.item() / len(y)
    finally:
        model.train(was_training)
    return out


def evaluate_art(model: nn.Module, x: Tensor, y: Tensor, attacks: list[str], *, eps: float, alpha: float | None,
                 num_classes: int, batch_size: int) -> dict[str, float]:
    """The same evaluation through ART's ``PyTorchClassifier`` (PGD, FGSM, AutoAttack)."""
    import numpy as np
    from art.attacks.evasion import (
        AutoAttack,
        FastGradientMethod,
        ProjectedGradientDescent,
    )
    from art.estimators.classification import PyTorchClassifier

    was_training = model.training
    model.eval()
    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=num_classes, clip_values=(0.0, 1.0),
                            device_type="gpu" if x.is_cuda else "cpu")
    xn, yn = x.detach().cpu().numpy(), y.detach().cpu().numpy()
    alpha = alpha if alpha is not None else eps / 4
    out: dict[str, float] = {}
    np_state = np.random.get_state()
    np.random.seed(0)  # ART's random starts come from numpy's global RNG: reproducible, then restored
    try:
        for spec in attacks:
            kind, steps = parse_eval_attack(spec)
            if kind == "natural":
                xa = xn
            elif kind == "fgsm":
                xa = FastGradientMethod(clf, norm=np.inf, eps=eps, batch_size=batch_size).generate(xn)
            elif kind == "pgd":
                xa = ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps or 20,
                                              num_random_init=1, batch_size=batch_size, verbose=False).generate(xn, yn)
            elif kind == "aa":
                xa = AutoAttack(clf, norm=np.inf, eps=eps, eps_step=alpha, batch_size=batch_size).generate(xn, yn)
            else:
                raise OptionError(f"attack {spec!r} is not available with --backend art (natural, fgsm, pgdK, aa)")
            pred = clf.predict(xa, batch_size=batch_size).argmax(1)
            out[display_name(spec) + " (ART)"] = float((pred == yn).mean())
    finally:
        np.random.set_state(np_state)
        model.train(was_training)
    return out


SUITES = {"paper": ("natural", "pgd20", "pgd100", "cw20", "apgd-ce", "aa")}


def evaluate_checkpoints(target: str, whiches: list[str | None], specs: Iterable[str], *, backend: str = "torchattacks",
                         eps: float | None = None, alpha: float | None = None, n_eval: int | None = None,
                         n_eval_aa: int | None = 1000, batch_size: int = 256, device: str | None = None,
                         data_root: str | None = None, model: str | None = None, progress: bool = False,
                         log=print, data: str | None = None, test_data: tuple | None = None) -> dict:
    """Evaluate the named checkpoints of a run (``which`` best / last, or ``None`` for a file).

    AutoAttack runs on the first ``n_eval_aa`` test samples, the other attacks on the first
    ``n_eval`` (all if ``None``). Returns ``{"settings": ..., "results": {which: {attack: acc,
    "epoch": E}}}``; the settings record eps, step, backend, seed, the data set, and per attack
    the number of test samples it saw. ``best`` is the recorded best (``checkpoint.load_best``).
    A checkpoint whose model is ``module:callable`` is evaluated only if ``model`` names it, one
    trained on ``module:`` data only if ``data`` names it; ``test_data``: an ``(x, y)`` pair to
    evaluate on instead of the run's test set (a run whose data came from Python in memory).
    """
    import json

    from advplug.config import TrainConfig
    from advplug.data import check_data_import, load_dataset
    from advplug.engine.trainer import check_model_import, pick_device
    from advplug.errors import CheckpointError
    from advplug.models import build_model
    from advplug.run import checkpoint
    from advplug.run.metrics import results_table

    specs = list(specs)
    for s in specs:
        parse_eval_attack(s)
    if eps is not None and not 0 < eps < 1:
        raise OptionError(f"--eps must be in (0, 1) (inputs are in [0, 1]), got {eps}")
    if alpha is not None and not 0 < alpha <= 1:
        raise OptionError(f"--alpha must be in (0, 1], got {alpha}")
    dev = pick_device(device)
    results: dict = {}
    settings: dict = {}
    data_cache: dict = {}
    done: dict[tuple[bool, int], str] = {}  # (EMA?, epoch) -> the checkpoint name evaluated there
    for which in whiches:
        if which in ("best", "best-ema"):
            ck = checkpoint.load_best(target, ema=which == "best-ema")
        elif which == "last-ema":
            ck = checkpoint.last_as(checkpoint.load(target, "last", need="eval"), ema=True)
        else:
            ck = checkpoint.load(target, which or "last", need="eval")
        try:
            cfg = TrainConfig.from_json(json.loads(ck["config"])).resolved()
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{ck['path']!r} is damaged: its config is not readable ({e})") from None
        check_model_import(cfg.model, model)
        if test_data is None:
            check_data_import(cfg.data, data)
        if data_root:
            cfg.data_root = data_root
        try:
            net = build_model(cfg.model, int(ck["num_classes"]), tuple(ck["input_shape"]), allow_import=True).to(dev)
        except RuntimeError as e:  # e.g. a damaged input shape that asks for terabytes
            raise CheckpointError(f"{ck['path']!r}: model {cfg.model!r} cannot be built for {ck['num_classes']} classes "
                                  f"of shape {tuple(ck['input_shape'])} ({checkpoint._first_line(e)})") from None
        checkpoint.load_model_state(net, ck, cfg.model)
        if test_data is not None and cfg.data not in data_cache:
            data_cache[cfg.data] = tuple(t.to(dev) for t in test_data)
        if cfg.data not in data_cache:
            bundle = load_dataset(cfg.data, cfg.data_root, False, image_size=cfg.image_size,
                                  test_fraction=cfg.test_fraction, allow_import=True)  # module: repeated (checked above)
            if (bundle.num_classes, tuple(bundle.input_shape)) != (int(ck["num_classes"]), tuple(ck["input_shape"])):
                raise CheckpointError(
                    f"{ck['path']!r} was trained for {ck['num_classes']} classes of shape {tuple(ck['input_shape'])}, "
                    f"but its data set {cfg.data!r} has {bundle.num_classes} classes of shape {tuple(bundle.input_shape)}")
            data_cache[cfg.data] = gather_tensors(bundle.test, None, dev)
        x, y = data_cache[cfg.data]
        e = eps if eps is not None else cfg.eps
        a = alpha if alpha is not None else e / 4
        kw = dict(eps=e, alpha=a, num_classes=int(ck["num_classes"]), batch_size=batch_size, backend=backend,
                  progress=progress, seed=cfg.seed)
        n_main = len(y) if n_eval is None else min(n_eval, len(y))
        n_aa = n_main if n_eval_aa is None else min(n_eval_aa, n_main)
        res: dict = {}
        name = which or "checkpoint"
        # best and last of the same epoch are the same weights: evaluated once, said once
        same = (which is not None and which.endswith("-ema"), int(ck["epoch"]))
        if which is not None and same in done:
            results[name] = dict(results[done[same]])
            log(f"{name} is {done[same]} (both epoch {int(ck['epoch']) + 1}): its results are reused")
            continue
        if which is not None:
            done[same] = name
        main = [s for s in specs if parse_eval_attack(s)[0] != "aa"]
        if main:
            res.update(evaluate(net, x[:n_main], y[:n_main], main, **kw))
        if len(main) < len(specs):
            res.update(evaluate(net, x[:n_aa], y[:n_aa], ["aa"], **kw))
        results[name] = {**res, "epoch": int(ck["epoch"]) + 1}
        settings = {"data": cfg.data, "eps": e, "alpha": a, "backend": backend, "attacks": specs, "seed": cfg.seed,
                    "n_total": len(y),  # the whole test set: compare shows n_test == n_total as "all"
                    "n_test": {k: (n_aa if k.startswith("AutoAttack") else n_main) for k in res}}
        log(results_table({f"{name} (epoch {int(ck['epoch']) + 1})": res},
                          f"{ck['path']}: eps {e:.4g}, step {a:.4g}, backend {backend}, "
                          + ", ".join(f"{k} on {v}" for k, v in settings["n_test"].items())))
    return {"settings": settings, "results": results}
