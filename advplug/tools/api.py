"""The Python API for notebooks and scripts: one call trains, one call evaluates.

    import advplug.tools.api as ap

    res = ap.train(data=((x_train, y_train), (x_test, y_test)), plugins=["mail"], epochs=10)
    res.results            # {"last (epoch 10)": {"Natural": 0.91, "PGD-20": 0.52, ...}, "best (epoch 8)": ...}
    res.metrics[-1]        # the last line of metrics.jsonl
    model = res.model()    # the best checkpoint's network, in eval mode

The guarantees are the CLI's (the same ``Trainer``): the settings are checked before anything
runs, a run directory holds one run (refused unless ``overwrite=True``), ``best`` is chosen on a
held-out split of the training data (``selection="test"`` to choose on the test set), and every
epoch is checkpointed so that ``train(resume=run_dir)`` continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from advplug.config import TrainConfig, build_config, merge_settings
from advplug.data import PYTHON, DataBundle, as_bundle
from advplug.errors import OptionError

__all__ = ["train", "evaluate", "load_model", "Result"]


@dataclass
class Result:
    """What a run left: its directory, the final test accuracies, the per-epoch metrics, the
    resolved configuration (``config.json``)."""

    run_dir: Path
    results: dict[str, dict[str, float]]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def model(self, which: str = "best", device: str | None = None) -> nn.Module:
        """The network of ``best`` or ``last`` (eval mode)."""
        return load_model(self.run_dir, which, device=device)


def _bundle(data: Any, image_size: int | None) -> tuple[str | None, DataBundle | None]:
    """(the data name for the config, the in-memory bundle or None)."""
    if data is None:
        return None, None
    if isinstance(data, str):
        return data, None
    return PYTHON, as_bundle(data, "data", image_size)


def train(
    config: TrainConfig | dict | str | Path | None = None,
    *,
    data: Any = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    **settings: Any,
) -> Result:
    """Train and evaluate one run; returns its :class:`Result`.

    ``config``: a :class:`~advplug.config.TrainConfig`, a dict of its fields, or a JSON/TOML config
    file; keyword ``settings`` (the same field names: ``plugins=["mail"]``, ``epochs=10``,
    ``plugin_options={"mail-gamma": 10}``) override it. ``data``: a built-in name or source string
    (``"cifar10"``, ``"folder:PATH"``, ``"npz:PATH"``, ``"module:pkg.mod:callable"``), or the data
    itself: ``(train, test)`` with each an ``(x, y)`` pair of tensors/arrays (images ``[N, C, H, W]``
    uint8 or float in [0, 1]) or a torch ``Dataset`` of ``(image, label)``, or a
    :class:`~advplug.data.DataBundle`. In-memory data is recorded as ``data = "python"``: pass it
    again to resume or evaluate. ``resume``: a run directory to continue (with ``data`` again when
    it was in memory or ``module:``; ``epochs=N`` extends a finished or interrupted run to N epochs,
    as ``advplug train --resume RUN --epochs N``; no other settings). ``log``: where progress lines go
    (``None``: quiet; progress bars are off unless ``progress=True``).
    """
    from advplug.engine.inputs import resume_config
    from advplug.engine.trainer import Trainer
    from advplug.run.metrics import read_metrics

    say = log if log is not None else (lambda s: None)
    if resume is not None:
        if config is not None or set(settings) - {"epochs", "model"} or out is not None or overwrite:
            raise OptionError(
                "resume continues the saved configuration; pass only data= (if it was in memory or module:), "
                "epochs= (to extend it) and log="
            )
        name, bundle = _bundle(data, None)
        cfg = resume_config(resume, settings.get("model"), name if name != PYTHON else None)
        if cfg.data == PYTHON and bundle is None:
            raise OptionError(f"{resume}: this run's data was passed from Python: pass it again as data=")
        cfg = build_config(cfg, {"progress": False})
        trainer = Trainer(cfg, data=bundle, resume=True, epochs=settings.get("epochs"), log=say)
    else:
        s = merge_settings({"progress": False}, config, settings, {"out": str(out)} if out is not None else None)
        name, bundle = _bundle(data, s.get("image_size"))
        cfg = build_config(s, {"data": name} if name is not None else None)
        trainer = Trainer(cfg, data=bundle, overwrite=overwrite, log=say)
    results = trainer.fit()
    run = Path(trainer.cfg.out)
    import json

    return Result(run, results, read_metrics(run), json.loads((run / "config.json").read_text()))


def evaluate(
    run_dir: str | Path,
    attacks: str | tuple[str, ...] | list[str] = ("natural", "pgd20", "cw20"),
    *,
    which: str = "best",
    test: Any = None,
    data: str | None = None,
    model: str | None = None,
    n_eval: int | None = None,
    eps: float | None = None,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Accuracies of a run's ``best`` / ``last`` checkpoint under ``attacks`` (as ``advplug eval``),
    on its test set, or on ``test=(x, y)`` (required when the run's data was in memory; images of the
    shape the model was trained on), by the names tables show (``{"Natural": 0.9, "PGD-20": 0.5}``);
    one attack may be given as a string (``"pgd20"``). ``data`` / ``model``: repeat a run's ``module:``
    data or model to allow importing it."""
    from advplug.data import as_images, as_labels
    from advplug.run.results import label
    from advplug.tools.evaluation import evaluate_checkpoints

    attacks = [attacks] if isinstance(attacks, str) else list(attacks)  # evaluate(run, "pgd20"): one attack
    pair = None
    if test is not None:
        x = as_images(test[0], "test x")
        pair = (x, as_labels(test[1], len(x), "test y"))
    entries = evaluate_checkpoints(
        str(run_dir),
        [which],
        list(attacks),
        eps=eps,
        n_eval=n_eval,
        device=device,
        model=model,
        data=data,
        test_data=pair,
        log=log or (lambda s: None),
    )
    return {label(e): e["accuracy"] for e in entries}


def load_model(
    run_dir: str | Path, which: str = "best", *, model: str | None = None, device: str | None = None
) -> nn.Module:
    """The network of a run's ``best`` / ``last`` checkpoint (eval mode). A ``module:callable``
    model is imported only if ``model`` repeats it."""
    from advplug.devices import pick_device
    from advplug.models import build_model, check_model_import
    from advplug.run import checkpoint

    ck = checkpoint.load_best(run_dir) if which == "best" else checkpoint.load(run_dir, which, need="eval")
    name = checkpoint.saved_config(ck)["model"]
    check_model_import(name, model)
    net = build_model(name, int(ck["num_classes"]), tuple(ck["input_shape"]), allow_import=True)
    checkpoint.load_model_state(net, ck, name)
    return net.to(pick_device(device)).eval()
