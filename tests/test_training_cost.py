"""What a run cost: results.json records the training's wall time, the model's forward and backward passes (counted
by the trainer, attack iterations included), peak memory and the device; counts survive --resume; compare --cost
shows them per method."""

import csv
import io
import json
import math

import pytest
from click.testing import CliRunner

from advplug.engine.trainer import Trainer
from advplug.run import checkpoint, results
from advplug.testing import digits_subset, run_and_resume, tiny_config
from advplug.tools.cli import cli
from advplug.tools.compare import compare

N, B, E, K = 100, 32, 2, 2  # training samples, batch, epochs, PGD steps
N_SELECT, EVAL_K = 64, 2  # --selection test on the first 64 test samples, PGD-2 there
STEPS = E * math.ceil(N / B)  # 4 batches an epoch (32, 32, 32, 4)


def cost_of(out, **kw) -> dict:
    cfg = tiny_config(str(out), epochs=E, batch_size=B, steps=K, eval_steps=EVAL_K, n_eval=N_SELECT, **kw)
    Trainer(cfg, data=digits_subset(N, N_SELECT), log=lambda s: None).fit()
    return json.loads((out / "results.json").read_text())["cost"]


def test_pgd_training_counts_k_plus_one_passes_per_step(tmp_path, one_thread):
    """Each step: K forward passes of the attack (one per iteration, each followed by the gradient in the input: a
    backward pass), then the training forward of x_adv and the loss's backward: K + 1 of each, every sample."""
    cost = cost_of(tmp_path / "at", final_attacks=("natural",))
    assert cost["forward_passes"] == STEPS * (K + 1) == 24
    assert cost["backward_passes"] == STEPS * (K + 1)
    assert cost["forward_samples"] == cost["backward_samples"] == E * N * (K + 1) == 600
    # the per-epoch selection (counted apart, not training): natural (one forward of the 64 samples) and PGD-2 (2
    # attack iterations and the forward of the result); the final evaluation is not counted
    assert cost["eval_forward_passes"] == E * (1 + EVAL_K + 1) == 8
    assert cost["eval_forward_samples"] == 8 * N_SELECT
    records = [json.loads(line) for line in (tmp_path / "at" / "metrics.jsonl").read_text().splitlines()]
    assert cost["train_seconds"] == pytest.approx(sum(r["seconds"] for r in records))
    assert cost["device"] == "cpu" and cost["peak_memory_kind"] == "cpu peak RSS"
    assert cost["peak_memory_bytes"] > 50 * 2**20  # torch alone is more


def test_trades_counts_the_natural_forwards(tmp_path, one_thread):
    """TRADES' attack: one forward of x without gradient (p(x), the KL's target), then K iterations (a forward and a
    backward each); the loss: a forward of x and of x_adv, and a backward through both: K + 3 forward, K + 2
    backward passes per step."""
    cost = cost_of(tmp_path / "trades", objective="trades", final_attacks=("natural",))
    assert cost["forward_passes"] == STEPS * (K + 3)
    assert cost["backward_passes"] == STEPS * (K + 2)
    assert cost["forward_samples"] == E * N * (K + 3) and cost["backward_samples"] == E * N * (K + 2)


COUNTS = ("forward_passes", "backward_passes", "forward_samples", "backward_samples", "eval_forward_passes")


def test_a_resumed_run_counts_what_a_straight_run_counts(tmp_path, one_thread):
    full, part = run_and_resume(tmp_path, digits_subset(96, 32), epochs=3, steps=2, final_attacks=("natural",))
    assert [c["forward_passes"] for c in full["cost"]] == [3 * 2 * 3]  # per process: 3 epochs x 2 steps x (2 + 1)
    assert full["cost"] == [{**c, "peak_memory_bytes": full["cost"][0]["peak_memory_bytes"]} for c in part["cost"]]
    a = results.read_cost(tmp_path / "full")
    b = results.read_cost(tmp_path / "part")
    assert {k: a[k] for k in COUNTS} == {k: b[k] for k in COUNTS}
    assert b["train_seconds"] == pytest.approx(sum(json.loads(x)["seconds"] for x in part["metrics"].splitlines()))
    assert checkpoint.load(tmp_path / "part", "best")["cost"]  # every checkpoint carries the counts


def test_counting_leaves_no_trace_in_the_model(tmp_path, one_thread):
    """The hooks are removed after training: the final evaluation and later calls are not counted."""
    t = Trainer(tiny_config(str(tmp_path), epochs=1, final_attacks=("natural", "pgd2")), data=digits_subset(64, 16))
    t.fit()
    assert not t.model._forward_hooks and not t.model._forward_pre_hooks
    assert t.cost.counts == {k: v for k, v in checkpoint.load(tmp_path)["cost"][0].items() if k in t.cost.counts}


def fake_run(root, name: str, seed: int, cost: dict | None, plugins=()) -> str:
    d = root / name
    d.mkdir()
    cfg = dict(data="digits", model="digits-cnn", eps=0.2, alpha=0.05, steps=10, epochs=1, batch_size=64, lr=0.05)
    (d / "config.json").write_text(json.dumps({**cfg, "plugins": list(plugins), "objective": "at", "seed": seed}))
    e = results.entry("last", 1, "pgd20", 0.5, eps=0.2, alpha=0.05, n_test=8, n_total=8, data="digits", seed=seed)
    results.write_results(d / "results.json", [e], cost=cost)
    return str(d)


def cost(seconds: float, fwd: int, bwd: int, mib: float, device: str = "cuda:0 NVIDIA H200") -> dict:
    return {
        "train_seconds": seconds,
        "forward_passes": fwd,
        "backward_passes": bwd,
        "forward_samples": fwd * 128,
        "backward_samples": bwd * 128,
        "eval_forward_passes": 7,
        "eval_forward_samples": 700,
        "peak_memory_bytes": int(mib * 2**20),
        "peak_memory_kind": "cuda max_memory_allocated",
        "device": device,
    }


def test_compare_cost_columns_are_means_over_runs(tmp_path):
    runs = [
        fake_run(tmp_path, "a0", 0, cost(100.0, 3_000_000, 2_000_000, 512)),
        fake_run(tmp_path, "a1", 1, cost(140.0, 5_000_000, 4_000_000, 1024)),
        fake_run(tmp_path, "m0", 0, cost(30.0, 1_500_000, 1_000_000, 256, "cpu"), plugins=("mail",)),
        fake_run(tmp_path, "old", 1, None, plugins=("mail",)),  # written before costs were recorded
    ]
    plain, _ = compare(runs)
    assert "passes" not in plain
    md, _ = compare(runs, cost=True)
    head = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert head[-5:] == ["train time (s)", "forward passes (M)", "backward passes (M)", "peak memory (MiB)", "device"]
    at = [c.strip() for c in next(x for x in md.splitlines() if x.startswith("| AT ")).strip("|").split("|")]
    assert at[-5:] == ["120", "4", "3", "768", "cuda:0 NVIDIA H200"]
    mail = [c.strip() for c in next(x for x in md.splitlines() if x.startswith("| mail ")).strip("|").split("|")]
    assert mail[-5:] == ["30 (n=1/2)", "1.5 (n=1/2)", "1 (n=1/2)", "256 (n=1/2)", "cpu (n=1/2)"]
    rows = list(csv.DictReader(io.StringIO(compare(runs, "csv", cost=True)[0])))
    a = next(r for r in rows if r["method"] == "AT")
    assert float(a["train_seconds"]) == 120 and float(a["forward_passes"]) == 4e6 and float(a["peak_memory_mib"]) == 768
    js = {r["method"]: r for r in json.loads(compare(runs, "json", cost=True)[0])}
    assert js["AT"]["cost"]["backward_passes"] == 3e6 and js["AT"]["cost"]["n"] == 2 and js["mail"]["cost"]["n"] == 1
    res = CliRunner().invoke(cli, ["compare", "--cost", *runs])
    assert res.exit_code == 0 and "forward passes (M)" in res.output


@pytest.mark.parametrize("model", ["custom", "sequential"])
def test_compiled_calls_count_once_and_compile_once(model):
    """A torch.compile wrapper runs the model's hooks outside Dynamo (a custom module) or traces them (a torch.nn
    container): either way one call is one pass, and the counters never make Dynamo recompile."""
    import torch
    import torch._dynamo
    from torch import nn

    from advplug.engine.cost import CostMeter

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    torch._dynamo.reset()
    net = Net() if model == "custom" else nn.Sequential(nn.Linear(4, 3))
    compiled = torch.compile(net, backend="eager")
    meter = CostMeter([net, compiled], torch.device("cpu"))
    x = torch.rand(5, 4)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(3):
        compiled(x).sum().backward()
    with torch.no_grad():
        net(x[:2])  # the model itself, uncompiled: counted too
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames == 1
    assert meter.counts["forward_passes"] == 4 and meter.counts["forward_samples"] == 17
    assert meter.counts["backward_passes"] == 3 and meter.counts["backward_samples"] == 15
    meter.close()
    compiled(x)
    assert meter.counts["forward_passes"] == 4


def test_a_watched_module_inside_another_counts_once():
    """Of nested watched modules (a wrapper calling the model eagerly, as a compiled wrapper may around a graph
    break), only the outermost call counts."""
    import torch
    from torch import nn

    from advplug.engine.cost import CostMeter

    net = nn.Linear(4, 3)
    wrapper = nn.Sequential(net)
    meter = CostMeter([net, wrapper], torch.device("cpu"))
    wrapper(torch.rand(5, 4, requires_grad=True)).sum().backward()
    net(torch.rand(2, 4))
    assert meter.counts["forward_passes"] == 2 and meter.counts["backward_passes"] == 1
    assert meter.counts["forward_samples"] == 7 and meter.depth == 0


def test_a_damaged_cost_is_a_one_line_error(tmp_path):
    run = fake_run(tmp_path, "r", 0, {**cost(1.0, 2, 2, 1), "forward_passes": "many"})
    res = CliRunner().invoke(cli, ["compare", "--cost", run])
    assert res.exit_code == 2 and "forward_passes" in res.output and "Traceback" not in res.output


def test_counting_adds_no_operation_to_the_computation():
    """The same tensor operations run, forward and backward, with the hooks as without: they count in Python only
    (no kernel, no host sync on a GPU)."""
    import torch
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode

    from advplug.engine.cost import CostMeter

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    def ops_of_a_step(net: nn.Module) -> list[str]:
        net.zero_grad(set_to_none=True)
        x = torch.rand(6, 4, requires_grad=True)
        with Ops() as mode:
            (g,) = torch.autograd.grad(net(x).sum(), x)  # an attack iteration
            net(x + g.sign()).sum().backward()  # the training forward and backward
        return mode.ops

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    plain = ops_of_a_step(net)
    meter = CostMeter([net], torch.device("cpu"))
    assert ops_of_a_step(net) == plain
    assert meter.counts["forward_passes"] == 2 and meter.counts["backward_passes"] == 2
