"""RobustBench: a run's checkpoint exported as RobustBench's ``load_model`` reads a model of its zoo, with the
model-info JSON of its leaderboards (``advplug export``), and the leaderboard's evaluation (``advplug eval RUN
--suite robustbench``): AutoAttack standard on the first 10,000 test points at the data set's standard eps,
attacked in chunks, each saved as it finishes, so that an interrupted evaluation continues where it stopped.

A robust accuracy goes into the JSON only as the leaderboard measures it (``leaderboard_problems``): otherwise
``autoattack_acc`` is empty and the footnote says why, unless ``allow_partial`` (then the footnote states it)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advplug.attack_names import canonical_spec, display_name
from advplug.attacks import make_eval_attack
from advplug.config import TrainConfig, read_run_config
from advplug.devices import pick_device
from advplug.errors import CheckpointError, DataError, OptionError
from advplug.evaluate import class_accuracy, evaluate
from advplug.models import build_model
from advplug.run import checkpoint, results
from advplug.run.directory import RunLock, fault_point, subdir, write_bytes, write_json
from advplug.tools.eval_inputs import checkpoint_model, checkpoint_test_set, load_checkpoint

LEADERBOARD_EPS = {"cifar10": 8 / 255, "cifar100": 8 / 255}  # RobustBench's Linf leaderboards advplug has data for
RB_DATASETS = ("cifar10", "cifar100", "imagenet")
N_POINTS = 10_000  # the leaderboard's test points: the first 10,000
CHUNK = 500
WHICH = ("best", "last", "best-ema", "last-ema")
FORMATS = ("robustbench",)
ARCHITECTURES = {
    "preactresnet18": "PreActResNet-18",
    "resnet18": "ResNet-18",
    "wrn-34-10": "WideResNet-34-10",
    "wrn-28-10": "WideResNet-28-10",
    "wrn-32-10": "WideResNet-32-10",
    "small-cnn": "SmallCNN",
    "tiny-cnn": "TinyCNN",
    "digits-cnn": "DigitsCNN",
    "fc1": "FC1",
}
PARTIAL = "advplug-robustbench-partial"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# settings a saved chunk depends on, as a refusal names them (checkpoint and weights: see ``_saved_chunks``)
_SETTINGS = {"attack": "attack", "eps": "eps", "n": "points", "chunk": "chunk size", "batch_size": "batch size"}
_SETTINGS |= {"seed": "seed", "data": "data"}


# -- what the leaderboard takes --------------------------------------------------------------------------------------
def eps_text(eps: float) -> str:
    """``"8/255"`` for an eps that is k/255 and has no short decimal spelling; ``"0.2"`` for 0.2 (= 51/255)."""
    short = f"{eps:.6g}"
    if float(short) == eps:
        return short
    k = round(eps * 255)
    return f"{k}/255" if k and abs(eps - k / 255) < 1e-12 else short


def standard_eps(data: str, run_eps: float) -> float:
    """The eps of the data set's RobustBench Linf leaderboard; for a data set without one, the run's."""
    return LEADERBOARD_EPS.get(data, run_eps)


def leaderboard_problems(
    aa: dict[str, Any] | None, *, data: str, selection: str, which: str, run_eps: float
) -> list[str]:
    """Why an AutoAttack entry ``aa`` of checkpoint ``which`` is not a leaderboard number (``[]``: it is): too few
    of the first 10,000 test points (all if fewer), another eps than the data set's standard one, a checkpoint
    chosen on the test set, or no AutoAttack entry at all."""
    out = []
    if aa is None:
        out.append(
            f"no AutoAttack result for checkpoint {which} (advplug eval RUN --suite robustbench --which {which})"
        )
    else:
        total = aa.get("n_total")
        if total is None or aa["n_test"] is None:
            out.append("the number of test points AutoAttack saw is not recorded")
        elif aa["n_test"] < min(N_POINTS, total):
            out.append(f"AutoAttack on {aa['n_test']} of the {min(N_POINTS, total)} test points the leaderboard uses")
        std = standard_eps(data, run_eps)
        if abs(aa["eps"] - std) > 1e-9:
            out.append(f"AutoAttack at eps {eps_text(aa['eps'])}, not {data}'s standard {eps_text(std)}")
    if which.startswith("best") and selection == "test":
        out.append(f"checkpoint {which} was chosen on the test set (--selection test)")
    return out


def check_keys(state: dict[str, Tensor]) -> None:
    """RobustBench's loader cuts the first 7 (8) characters of every key that contains ``model.`` (``module.``)
    anywhere: a model with such a key would not load there."""
    bad = next((k for k in state if "model." in k or "module." in k), None)
    if bad is not None:
        raise OptionError(
            f"the model's weight {bad!r} contains 'model.' or 'module.', which RobustBench's loader cuts off: "
            "rename that submodule to export it"
        )


# -- a checkpoint and its model --------------------------------------------------------------------------------------
def _run_dir(target: str | Path) -> Path:
    run = Path(target)
    if not run.is_dir():
        raise OptionError(f"{str(target)!r} is not a run directory")
    return run


def _unprefixed(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys without DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes."""
    out = {}
    for k, v in state.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def _checkpoint_model(run: Path, which: str, model: str | None) -> tuple[dict[str, Any], TrainConfig, nn.Module]:
    """Checkpoint ``which`` (one of ``WHICH``), the run's settings and its model with the checkpoint's weights
    (keys without prefixes), in eval mode on the CPU."""
    if which not in WHICH:
        raise OptionError(f"--which {which!r}: choose from {', '.join(WHICH)}")
    ck = load_checkpoint(run, which)
    cfg, net = checkpoint_model({**ck, "model": _unprefixed(ck["model"])}, model)
    return ck, cfg, net


def _probe(shape: list[int]) -> Tensor:
    return torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))


def check_deterministic(net: nn.Module, shape: list[int]) -> None:
    """RobustBench counts one forward pass per prediction: the same input must give the same output in eval mode."""
    x = _probe(shape)
    with torch.no_grad():
        if not torch.equal(net(x), net(x)):
            raise OptionError(
                "the model's forward is not deterministic in eval mode (two passes over the same images differ): "
                "RobustBench's number_forward_passes 1 does not describe it"
            )


def weights_digest(net: nn.Module) -> str:
    """SHA-256 of the model's weights: a saved chunk belongs to these weights only."""
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- export ----------------------------------------------------------------------------------------------------------
def _pick(entries: list[dict[str, Any]], eps: float | None) -> dict[str, Any] | None:
    """Of one checkpoint's entries of an attack: the standard eps first, then the most test points, then the latest."""
    ranked = [((eps is None or abs(e["eps"] - eps) < 1e-9), e["n_test"] or 0, i) for i, e in enumerate(entries)]
    return entries[max(ranked)[2]] if entries else None


def _pct(e: dict[str, Any] | None) -> str:
    return "" if e is None else f"{100 * e['accuracy']:.2f}"


def _chosen(cfg: TrainConfig, config: dict[str, Any], which: str, epoch: int) -> str:
    weights = "EMA weights" if which.endswith("-ema") else "weights"
    if not which.startswith("best"):
        return f"Checkpoint {which}: the {weights} after the last epoch ({epoch})."
    if cfg.selection == "test":
        return f"Checkpoint {which} (epoch {epoch}): chosen on the test set (--selection test)."
    n = config.get("num_selection")
    on = f"{n} held-out training samples" if n else "held-out training samples"
    return f"Checkpoint {which} (epoch {epoch}): the {weights} with the best PGD-{cfg.eval_steps} accuracy on {on}."


def model_info(
    run: Path, ck: dict[str, Any], cfg: TrainConfig, which: str, *, title: str, bib: dict[str, str], allow_partial: bool
) -> dict[str, Any]:
    """RobustBench's model-info fields, from the run's results (``results.json`` and ``eval.json``)."""
    config = read_run_config(run, CheckpointError) if (run / "config.json").is_file() else checkpoint.saved_config(ck)
    epoch = int(ck["epoch"]) + 1
    mine = [
        e
        for e in results.read_run(run, config)
        if e["checkpoint"] == which and e["epoch"] == epoch and e["precision"] == "fp32" and e["backend"] != "art"
    ]
    std = standard_eps(cfg.data, cfg.eps)
    aa = _pick([e for e in mine if e["attack"] == "aa"], std)
    clean = _pick([e for e in mine if e["attack"] == "natural"], None)
    problems = leaderboard_problems(aa, data=cfg.data, selection=cfg.selection, which=which, run_eps=cfg.eps)
    given = aa is not None and (allow_partial or not problems)
    notes = []
    if cfg.data not in RB_DATASETS:
        notes.append(f"Data set {cfg.data!r} (advplug's name): not a RobustBench data set ({', '.join(RB_DATASETS)}).")
    if aa is not None:
        notes.append(
            f"AutoAttack standard (torchattacks, seed {aa['seed']}) on {aa['n_test']} of the {aa['n_total']} test "
            f"points at eps {eps_text(aa['eps'])}."
        )
    if problems:
        notes.append(
            ("Given with --allow-partial, " if given else "") + "not a leaderboard number: " + "; ".join(problems) + "."
        )
    notes.append(_chosen(cfg, config, which, epoch))
    if clean is not None and clean["n_total"] is not None and clean["n_test"] < clean["n_total"]:
        notes.append(f"Clean accuracy on {clean['n_test']} of the {clean['n_total']} test points.")
    method = ", ".join(cfg.plugins) or "no plugin"
    notes.append(
        f"Trained with advplug: {method}, objective {cfg.objective}, {cfg.epochs} epochs, eps {eps_text(cfg.eps)}."
    )
    return {
        "link": bib["link"],
        "name": title,
        "authors": bib["authors"],
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": cfg.data,
        "venue": bib["venue"],
        "architecture": ARCHITECTURES.get(cfg.model, cfg.model),
        "eps": eps_text(aa["eps"] if given else std),
        "clean_acc": _pct(clean),
        "reported": _pct(aa) if given else "",
        "autoattack_acc": _pct(aa) if given else "",
        "footnote": " ".join(notes),
    }


def _load_back(path: Path, model: str, ck: dict[str, Any]) -> nn.Module:
    """The file read back as RobustBench's ``load_model`` reads it (``torch.load``, ``state_dict``, prefixes cut)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for sub in ("module.", "model."):
        state = {k[len(sub) :] if sub in k else k: v for k, v in state.items()}
    net = build_model(model, int(ck["num_classes"]), tuple(ck["input_shape"]), allow_import=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def export(
    target: str | Path,
    out: str | Path,
    *,
    fmt: str = "robustbench",
    which: str = "best",
    name: str | None = None,
    title: str | None = None,
    link: str = "",
    authors: str = "",
    venue: str = "",
    allow_partial: bool = False,
    overwrite: bool = False,
    model: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Path, Path]:
    """Write ``OUT/<name>.pt`` (``{"state_dict": ...}``: the model's own keys, no ``module.``/``_orig_mod.``
    prefixes; inputs in [0, 1], any normalisation inside the model) and ``OUT/<name>.json`` (RobustBench's
    model-info fields) for checkpoint ``which`` of a run. Returns both paths."""
    if fmt not in FORMATS:
        raise OptionError(f"unknown export format {fmt!r} (formats: {', '.join(FORMATS)})")
    run = _run_dir(target)
    name = name or f"{run.resolve().name}-{which}"
    if not _NAME.fullmatch(name):
        raise OptionError(
            f"--name {name!r}: a file name of letters, digits, '_', '-' and '.' (e.g. Wang2023Better_WRN-28-10)"
        )
    dest = Path(out)
    pt, js = dest / f"{name}.pt", dest / f"{name}.json"
    taken = [str(p) for p in (pt, js) if p.exists()]
    if taken and not overwrite:
        raise OptionError(f"{taken[0]!r} exists: --overwrite replaces it, or choose another --name or --out")
    ck, cfg, net = _checkpoint_model(run, which, model)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    check_keys(state)
    check_deterministic(net, ck["input_shape"])
    bib = {"link": link, "authors": authors, "venue": venue}
    info = model_info(run, ck, cfg, which, title=title or name, bib=bib, allow_partial=allow_partial)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(f"--out {str(dest)!r}: cannot create it ({e.strerror or e})") from None
    buf = io.BytesIO()
    torch.save({"state_dict": state}, buf)
    write_bytes(pt, buf.getvalue())
    write_json(js, info)
    x = _probe(ck["input_shape"])
    with torch.no_grad():
        if not torch.equal(_load_back(pt, cfg.model, ck)(x), net(x)):
            raise CheckpointError(f"{str(pt)!r} read back does not give the model's outputs: not exported")
    aa = info["autoattack_acc"] or "not given"
    log(
        f"wrote {pt} ({cfg.model}, {which}, epoch {int(ck['epoch']) + 1}) and {js} (clean {info['clean_acc'] or '-'}, "
        f"AutoAttack {aa})"
    )
    return pt, js


# -- the resumable suite ---------------------------------------------------------------------------------------------
def _what(cfg: TrainConfig, attack: str, n: int, total: int, eps: float) -> str:
    points = f"the first {n} of {total} test points" if n < total else f"all {total} test points"
    if total < N_POINTS:
        points += f" (fewer than {N_POINTS})"
    if cfg.data in LEADERBOARD_EPS:
        at = f"eps {eps_text(eps)} (RobustBench's Linf standard for {cfg.data}"
        at += ")" if abs(cfg.eps - eps) < 1e-12 else f"; the run trained at eps {eps_text(cfg.eps)})"
    else:
        at = f"the run's eps {eps_text(eps)} ({cfg.data} has no RobustBench leaderboard)"
    return f"{display_name(attack)} on {points} at {at}"


def _chunk_correct(net: nn.Module, x: Tensor, y: Tensor, s: dict[str, Any], num_classes: int) -> list[int]:
    """Per-sample correct flags of one chunk under the attack, seeded alike for every chunk (resumed = straight)."""
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(s["seed"])
        atk = make_eval_attack(s["attack"], net, eps=s["eps"], alpha=None, num_classes=num_classes, seed=s["seed"])
        hits = []
        for i in range(0, len(y), s["batch_size"]):
            xb, yb = x[i : i + s["batch_size"]], y[i : i + s["batch_size"]]
            xa = xb if atk is None else atk(xb, yb)
            with torch.no_grad():
                hits.append(net(xa).argmax(1) == yb)
    return torch.cat(hits).int().tolist()


def _saved_chunks(path: Path, s: dict[str, Any], log: Callable[[str], None]) -> list[list[int]]:
    """The chunks an interrupted evaluation saved: ``[]`` if none, or saved for other weights (said in a line); an
    evaluation of other settings is refused, naming the setting."""
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
        saved, correct = doc["settings"], doc["correct"]
        if doc.get("format") != PARTIAL or not isinstance(saved, dict) or not isinstance(correct, list):
            raise ValueError("not a partial evaluation of advplug")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{str(path)!r} is damaged ({e}): delete it to start the evaluation over") from None
    if (saved.get("weights"), saved.get("epoch")) != (s["weights"], s["epoch"]):
        log(
            f"ignoring {path}: it was saved for other weights (epoch {saved.get('epoch')}) than {s['checkpoint']} "
            f"has now (epoch {s['epoch']}): starting over"
        )
        return []
    for k, label in _SETTINGS.items():
        if saved.get(k) != s[k]:
            raise OptionError(
                f"{str(path)!r} holds an evaluation with {label} {saved.get(k)}, this evaluation {s[k]}: "
                "repeat its settings to continue it, or delete the file to start over"
            )
    sizes = [min(s["chunk"], s["n"] - i) for i in range(0, s["n"], s["chunk"])]
    ok = len(correct) <= len(sizes) and all(
        isinstance(c, list) and len(c) == m and set(c) <= {0, 1} for c, m in zip(correct, sizes)
    )
    if not ok:
        raise DataError(f"{str(path)!r} is damaged (its chunks do not fit): delete it to start the evaluation over")
    return correct


def _attack_in_chunks(
    net: nn.Module, x: Tensor, y: Tensor, s: dict[str, Any], path: Path, num_classes: int, progress: bool, log
) -> list[int]:
    """Per-sample correct flags of all ``s["n"]`` points, chunk by chunk, each chunk saved (atomically) as it ends."""
    correct = _saved_chunks(path, s, log)
    k, n, c = len(correct), s["n"], s["chunk"]
    if k:
        log(f"{path}: continuing from point {k * c} of {n} ({k} chunk{'s' if k > 1 else ''} saved)")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=min(k * c, n), desc=display_name(s["attack"]), unit="pt")
    try:
        for i in range(k, -(-n // c)):
            correct.append(_chunk_correct(net, x[i * c : (i + 1) * c], y[i * c : (i + 1) * c], s, num_classes))
            write_json(path, {"format": PARTIAL, "version": 1, "settings": s, "correct": correct})
            done = min((i + 1) * c, n)
            if bar is not None:
                bar.update(done - i * c)
            else:
                robust = sum(map(sum, correct)) / done
                log(f"chunk {i + 1}/{-(-n // c)}: {done} of {n} points, {100 * robust:.2f} % robust so far (saved)")
            fault_point("robustbench-chunk", i)
    finally:
        if bar is not None:
            bar.close()
    return [f for chunk in correct for f in chunk]


def _entries(
    net: nn.Module, x: Tensor, y: Tensor, flags: list[int], s: dict[str, Any], total: int, k: int
) -> list[dict[str, Any]]:
    """The result entries of the points: clean accuracy and the attack's, each with its per-class accuracy."""
    per_class: dict[str, list[float | None]] = {}
    accs = evaluate(
        net, x, y, ["natural"], eps=s["eps"], num_classes=k, batch_size=s["batch_size"], per_class=per_class
    )
    accs[s["attack"]] = sum(flags) / len(flags)
    hit = torch.tensor(flags, dtype=torch.bool, device=y.device)
    per_class[s["attack"]] = class_accuracy(torch.bincount(y[hit], minlength=k), y, k)
    kw = dict(eps=s["eps"], alpha=s["eps"] / 4, n_test=len(flags), n_total=total, data=s["data"], seed=s["seed"])
    return [results.entry(s["checkpoint"], s["epoch"], a, acc, per_class=per_class[a], **kw) for a, acc in accs.items()]


def robustbench_eval(
    target: str | Path,
    whiches: list[str],
    *,
    chunk_size: int = CHUNK,
    batch_size: int = 256,
    device: str | None = None,
    data_root: str | None = None,
    model: str | None = None,
    data: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    attack: str = "aa",
) -> list[dict[str, Any]]:
    """The leaderboard's evaluation of a run's checkpoints: ``attack`` (AutoAttack standard; another spec only in
    tests) and clean accuracy on the first ``N_POINTS`` test samples at ``standard_eps``, seeded by the run's seed.
    Chunks of ``chunk_size`` points are saved in ``RUN/robustbench/<which>.partial.json`` as they end; a later call
    continues from there. At the end the entries go into ``RUN/eval.json`` and the partial file is removed."""
    run = _run_dir(target)
    if chunk_size < 1 or batch_size < 1:
        raise OptionError(f"--chunk-size and --batch-size must be >= 1, got {chunk_size} and {batch_size}")
    attack = canonical_spec(attack)
    dev = pick_device(device)
    out: list[dict[str, Any]] = []
    with RunLock(run):
        results.read_evals(run / "eval.json")  # a damaged eval.json: found now, not after hours of attacks
        done: dict[str, str] = {}  # weights digest -> the checkpoint evaluated with them
        for which in whiches:
            ck, cfg, net = _checkpoint_model(run, which, model)
            epoch, digest = int(ck["epoch"]) + 1, weights_digest(net)
            if digest in done:
                out += [{**e, "checkpoint": which} for e in out if e["checkpoint"] == done[digest]]
                results.merge_evals(run / "eval.json", [e for e in out if e["checkpoint"] == which])
                log(f"{which} has the weights of {done[digest]} (epoch {epoch}): its results are reused")
                continue
            done[digest] = which
            if data_root:
                cfg.data_root = data_root
            net.to(dev)
            x, y, total = checkpoint_test_set(cfg, ck, data, N_POINTS, dev)
            eps, n = standard_eps(cfg.data, cfg.eps), len(y)
            log(
                f"{which} (epoch {epoch}): {_what(cfg, attack, n, total, eps)}, chunks of {chunk_size}, seed {cfg.seed}"
            )
            s = dict(checkpoint=which, epoch=epoch, weights=digest, attack=attack, eps=eps, n=n, chunk=chunk_size)
            s |= dict(batch_size=batch_size, seed=int(cfg.seed), data=cfg.data)
            path = subdir(run, "robustbench") / f"{which}.partial.json"
            flags = _attack_in_chunks(net, x, y, s, path, int(ck["num_classes"]), progress, log)
            new = _entries(net, x, y, flags, s, total, int(ck["num_classes"]))
            results.merge_evals(run / "eval.json", new)
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # empty once no checkpoint's evaluation is pending
                path.parent.rmdir()
            log(results.results_table(new, f"{ck['path']}: saved in {run / 'eval.json'}"))
            out += new
    return out
