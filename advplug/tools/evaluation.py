"""Evaluation of a run's saved checkpoints (``advplug eval``, ``advplug.tools.api.evaluate``): each
checkpoint's model rebuilt from its saved configuration and attacked on the run's test set, as
result entries (``advplug.run.results``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from advplug.attack_names import parse_eval_attack
from advplug.devices import pick_device
from advplug.errors import OptionError
from advplug.evaluate import check_art_autoattack, evaluate
from advplug.run import results
from advplug.tools.eval_inputs import checkpoint_model, checkpoint_test_set, load_checkpoint

SUITES = {"paper": ("natural", "pgd20", "pgd100", "cw20", "apgd-ce", "aa")}


def evaluate_checkpoints(
    target: str,
    whiches: list[str | None],
    specs: Iterable[str],
    *,
    backend: str = "torchattacks",
    eps: float | None = None,
    alpha: float | None = None,
    n_eval: int | None = None,
    n_eval_aa: int | None = 1000,
    batch_size: int = 256,
    device: str | None = None,
    data_root: str | None = None,
    model: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    data: str | None = None,
    test_data: tuple | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the named checkpoints of a run (``which`` best / last / best-ema / last-ema, or
    ``None`` for a checkpoint file); returns one result entry per checkpoint and attack, each with its per-class
    accuracy (``per_class``).

    AutoAttack runs on the first ``n_eval_aa`` test samples, the other attacks on the first
    ``n_eval`` (all if ``None``); each entry records its eps, step, backend, seed, data set and the
    number of test samples it saw. ``best`` is the recorded best (``checkpoint.load_best``).
    A checkpoint whose model is ``module:callable`` is evaluated only if ``model`` names it, one
    trained on ``module:`` data only if ``data`` names it; ``test_data``: an ``(x, y)`` pair to
    evaluate on instead of the run's test set (a run whose data came from Python in memory).
    """
    specs = [specs] if isinstance(specs, str) else list(specs)  # "pgd20" is one attack, not five
    for s in specs:
        parse_eval_attack(s)
    if backend == "art" and any(parse_eval_attack(s)[0] == "aa" for s in specs):
        check_art_autoattack()  # before minutes of other attacks
    if batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1, got {batch_size}")
    if eps is not None and not 0 < eps < 1:
        raise OptionError(f"--eps must be in (0, 1) (inputs are in [0, 1]), got {eps}")
    if alpha is not None and not 0 < alpha <= 1:
        raise OptionError(f"--alpha must be in (0, 1], got {alpha}")
    dev = pick_device(device)
    entries: list[dict[str, Any]] = []
    data_cache: dict = {}
    done: dict[tuple[bool, int], str] = {}  # (EMA?, epoch) -> the checkpoint name evaluated there
    for which in whiches:
        ck = load_checkpoint(target, which)
        cfg, net = checkpoint_model(ck, model, dev)
        if data_root:
            cfg.data_root = data_root
        if test_data is not None and cfg.data not in data_cache:
            _check_test_data(test_data, ck)
            data_cache[cfg.data] = tuple(t.to(dev) for t in test_data)
        if cfg.data not in data_cache:
            data_cache[cfg.data] = checkpoint_test_set(cfg, ck, data, None, dev)[:2]
        x, y = data_cache[cfg.data]
        e = eps if eps is not None else cfg.eps
        a = alpha if alpha is not None else e / 4
        kw = dict(
            eps=e,
            alpha=a,
            num_classes=int(ck["num_classes"]),
            batch_size=batch_size,
            backend=backend,
            progress=progress,
            seed=cfg.seed,
            log=log,
        )
        n_main = len(y) if n_eval is None else min(n_eval, len(y))
        n_aa = n_main if n_eval_aa is None else min(n_eval_aa, n_main)
        name = which or "checkpoint"
        epoch = int(ck["epoch"]) + 1
        # best and last of the same epoch are the same weights: evaluated once, said once
        same = (which is not None and which.endswith("-ema"), int(ck["epoch"]))
        if which is not None and same in done:
            entries += [{**r, "checkpoint": name} for r in entries if r["checkpoint"] == done[same]]
            log(f"{name} is {done[same]} (both epoch {epoch}): its results are reused")
            continue
        if which is not None:
            done[same] = name
        res: dict[str, float] = {}
        per_class: dict[str, list[float | None]] = {}
        main = [s for s in specs if parse_eval_attack(s)[0] != "aa"]
        if main:
            res.update(evaluate(net, x[:n_main], y[:n_main], main, per_class=per_class, **kw))
        if len(main) < len(specs):
            res.update(evaluate(net, x[:n_aa], y[:n_aa], ["aa"], per_class=per_class, **kw))
        new = [
            results.entry(
                name,
                epoch,
                spec,
                float(acc),
                backend=backend,
                eps=float(e),
                alpha=float(a),
                n_test=n_aa if spec == "aa" else n_main,
                n_total=len(y),
                data=cfg.data,
                seed=int(cfg.seed),
                per_class=per_class[spec],
            )
            for spec, acc in res.items()
        ]
        log(
            results.results_table(
                new,
                f"{ck['path']}: eps {e:.4g}, step {a:.4g}, backend {backend}, "
                + ", ".join(f"{results.label(r)} on {r['n_test']}" for r in new),
            )
        )
        entries += new
    return entries


def _check_test_data(test_data: tuple, ck: dict[str, Any]) -> None:
    """Test images of the shape the checkpoint's model takes, labels among its classes: a one-line error naming
    both, not a shape error from inside the model."""
    x, y = test_data
    want, k = tuple(int(d) for d in ck["input_shape"]), int(ck["num_classes"])
    if tuple(x.shape[1:]) != want:
        raise OptionError(
            f"test images are {tuple(x.shape[1:])} (channels, height, width), but {ck['path']!r}'s model takes {want}"
        )
    if len(y) and int(y.max()) >= k:
        raise OptionError(f"test labels go up to label {int(y.max())}, but {ck['path']!r} has {k} classes (0..{k - 1})")
