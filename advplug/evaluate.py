"""Robust accuracy of a model under named attacks: torchattacks by default, ART as a cross-check."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from advplug.attack_names import canonical_spec, display_name, parse_eval_attack
from advplug.attacks import make_eval_attack
from advplug.errors import OptionError


def _batches(x: Tensor, y: Tensor, batch_size: int):
    for i in range(0, len(y), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


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
def _class_correct(model: nn.Module, x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """``[K]``: the samples of each class the model classifies correctly (on the device)."""
    return torch.bincount(y[model(x).argmax(1) == y], minlength=num_classes)


def class_accuracy(correct: Tensor, y: Tensor, num_classes: int) -> list[float | None]:
    """Per-class accuracy from per-class correct counts ``[K]`` and the labels: ``None`` for a class with no sample
    (JSON has no NaN)."""
    seen = torch.bincount(y, minlength=num_classes).tolist()
    return [c / n if n else None for c, n in zip(correct.tolist(), seen)]


def worst_class(per_class: list[float | None]) -> tuple[int, float] | None:
    """(the class with the lowest accuracy, its accuracy); ties: the lowest class index; ``None`` if no class has a
    sample."""
    present = [(acc, k) for k, acc in enumerate(per_class) if acc is not None]
    if not present:
        return None
    acc, k = min(present)
    return k, acc


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Iterable[str],
    *,
    eps: float,
    alpha: float | None = None,
    num_classes: int = 10,
    batch_size: int = 256,
    seed: int = 0,
    backend: str = "torchattacks",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    per_class: dict[str, list[float | None]] | None = None,
) -> dict[str, float]:
    """Accuracy per attack spec (``natural``, ``fgsm``, ``pgd20``, ``cw``, ``apgd-ce``, ``aa``),
    keyed by canonical spec (``pgd`` -> ``pgd20``). The model is evaluated in eval mode and left as it was.
    ``log``: where a warning goes before a long attack (ART's AutoAttack, with its estimated time).
    ``per_class``: a dict filled with each spec's per-class accuracy (``class_accuracy``: ``[K]``, ``None`` for a
    class absent from ``y``), from the same predictions as the overall accuracy.

    Reproducible: each attack runs under its own RNG stream seeded with ``seed`` (random starts
    are the same whenever the same model is evaluated), and the caller's RNG is left untouched."""
    attacks = [attacks] if isinstance(attacks, str) else list(attacks)
    for a in attacks:
        parse_eval_attack(a)
    if batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1, got {batch_size}")
    if backend == "art":
        return evaluate_art(
            model,
            x,
            y,
            attacks,
            eps=eps,
            alpha=alpha,
            num_classes=num_classes,
            batch_size=batch_size,
            progress=progress,
            log=log,
            per_class=per_class,
        )
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
                correct = torch.zeros(num_classes, dtype=torch.long, device=x.device)
                it = _batches(x, y, batch_size)
                if progress:
                    from tqdm import tqdm

                    it = tqdm(it, total=-(-len(y) // batch_size), desc=display_name(spec), leave=False)
                for xb, yb in it:
                    xa = xb if atk is None else atk(xb, yb)
                    correct += _class_correct(model, xa, yb, num_classes)
                out[canonical_spec(spec)] = correct.sum().item() / len(y)
                if per_class is not None:
                    per_class[canonical_spec(spec)] = class_accuracy(correct, y, num_classes)
    finally:
        model.train(was_training)
    return out


def evaluate_art(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: list[str],
    *,
    eps: float,
    alpha: float | None,
    num_classes: int,
    batch_size: int,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    per_class: dict[str, list[float | None]] | None = None,
) -> dict[str, float]:
    """The same evaluation through ART's ``PyTorchClassifier`` (PGD, FGSM, AutoAttack), keyed by canonical spec.
    AutoAttack is ART's default ensemble: it needs ``multiprocess`` (checked first) and takes long, so a warning
    with an estimate goes to ``log`` first; ``progress``: ART's own progress bars of its attacks."""
    if any(parse_eval_attack(s)[0] == "aa" for s in attacks):
        check_art_autoattack()
    import numpy as np
    from art.attacks.evasion import AutoAttack, FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    was_training = model.training
    model.eval()
    clf = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=num_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if x.is_cuda else "cpu",
    )
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
                xa = ProjectedGradientDescent(
                    clf,
                    norm=np.inf,
                    eps=eps,
                    eps_step=alpha,
                    max_iter=steps or 20,
                    num_random_init=1,
                    batch_size=batch_size,
                    verbose=False,
                ).generate(xn, yn)
            elif kind == "aa":
                if log is not None:
                    log(art_autoattack_warning(model, x))
                aa = AutoAttack(clf, norm=np.inf, eps=eps, eps_step=alpha, batch_size=batch_size)
                for a in aa.attacks:  # APGD, DeepFool and Square each have a tqdm bar
                    if hasattr(a, "verbose"):
                        a.verbose = progress
                xa = aa.generate(xn, yn)
            else:
                raise OptionError(f"attack {spec!r} is not available with --backend art (natural, fgsm, pgdK, aa)")
            pred = clf.predict(xa, batch_size=batch_size).argmax(1)
            out[canonical_spec(spec)] = float((pred == yn).mean())
            if per_class is not None:
                hits = torch.as_tensor(pred == yn, device=y.device)
                per_class[canonical_spec(spec)] = class_accuracy(
                    torch.bincount(y[hits], minlength=num_classes), y, num_classes
                )
    finally:
        np.random.set_state(np_state)
        model.train(was_training)
    return out


def check_art_autoattack() -> None:
    """ART's AutoAttack imports ``multiprocess`` when it runs (a dependency of advplug; an environment may lack
    it): missing, a one-line error before anything runs, not a traceback after the other attacks."""
    try:
        import multiprocess  # noqa: F401
    except ImportError:
        raise OptionError(
            "--backend art --attack aa: ART's AutoAttack needs the package multiprocess: pip install multiprocess"
        ) from None


# ART's default AutoAttack (APGD-CE and APGD-DLR with 5 restarts x 100 iterations, DeepFool, Square with 5 restarts x
# 5000 queries) costs mostly per call, not per image: on a PGD-trained digits-cnn it took 5-6 min for 32 and for 128
# test images on one CPU core, about 40 000 times one forward and backward pass of 32 images (torchattacks' aa: 1 min).
ART_AA_PASSES = 40_000
ART_AA_IMAGES_PER_UNIT = 128  # the time grows by about one unit per this many images (an estimate, not a bound)


def art_autoattack_warning(model: nn.Module, x: Tensor) -> str:
    """One line before ART's AutoAttack starts: what it runs and about how long it takes here, from the time of one
    forward and backward pass of 32 images on this machine (the best of three)."""
    xb = x[:32].detach().clone().requires_grad_(True)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        torch.autograd.grad(model(xb).sum(), xb)
        if xb.is_cuda:
            torch.cuda.synchronize(xb.device)
        times.append(time.perf_counter() - t)
    minutes = ART_AA_PASSES * min(times) * math.ceil(len(x) / ART_AA_IMAGES_PER_UNIT) / 60
    return (
        f"warning: ART's AutoAttack (its defaults: APGD-CE, APGD-DLR, DeepFool, Square) on {len(x)} images takes "
        f"about {max(minutes, 0.1):.1f} min here (estimated); torchattacks' aa, the default backend, is far faster; "
        "--n-eval-aa N attacks fewer images"
    )
