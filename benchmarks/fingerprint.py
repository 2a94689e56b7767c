"""Behaviour fingerprint: a fixed-seed run of each built-in objective and each plugin, reduced to
hashes of what a run produces (final weights of last.pt/best.pt, metrics.jsonl without timings,
the accuracies of results.json, the `advplug compare` table). Used to show that a restructuring
changes nothing: write the fingerprint before, check it after.

    python benchmarks/fingerprint.py --write before.json
    python benchmarks/fingerprint.py --check before.json      # exits 1 and names what differs

It drives the command line only (``advplug train``, ``advplug compare``), so it runs unchanged
against any internal layout. Accuracies are read from results.json whatever its format (a list
of entries with fields, or the older display-string keys), so a change of the file's layout is
not reported as a change of numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

COMMON = ["--epochs", "2", "--steps", "3", "--eval-steps", "3", "--n-eval", "64", "--no-progress", "--seed", "3"]
CONFIG = 'final_attacks = ["natural", "pgd5"]\n'  # the final evaluation is a config-file setting
CASES: dict[str, list[str]] = {
    "at": [],
    "trades": ["--objective", "trades"],
    "mart": ["--objective", "mart"],
    "meow": ["--plugin", "meow"],
    "mail": ["--plugin", "mail", "--mail-burn-in", "0"],
    "gairat": ["--plugin", "gairat", "--gairat-begin-epoch", "0"],
    "bat": ["--plugin", "bat"],
    "bilaw": ["--plugin", "bilaw"],
    "lrat": ["--plugin", "lrat", "--lrat-saa-steps", "3"],
    "awp": ["--plugin", "awp"],
    "fat": ["--plugin", "fat"],
    "wmmr": ["--plugin", "wmmr"],
    "focal": ["--plugin", "focal"],
    "lrat+mail": ["--plugin", "lrat", "--plugin", "mail", "--lrat-saa-steps", "3", "--mail-burn-in", "0"],
    "mail-trades": ["--plugin", "mail", "--objective", "trades", "--mail-burn-in", "0"],
    "at-ema-bf16-dump": [
        "--ema",
        "0.9",
        "--precision",
        "bf16",
        "--dump-weights",
        "--plugin",
        "gairat",
        "--gairat-begin-epoch",
        "0",
    ],
}
DROP = {"seconds"}  # timings


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def _state_hash(path: Path) -> str:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for k in sorted(ck["model"]):
        h.update(k.encode())
        h.update(ck["model"][k].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _numbers(obj) -> list[float]:
    """The accuracies of results.json, sorted: layout-independent. The display-keyed layout
    (``{"last (epoch 2)": {"Natural": 0.9, ...}}``) gives every float of its inner objects; a
    layout with fields gives the values of its ``accuracy`` fields."""
    out: list[float] = []
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) and "accuracy" not in v for v in obj.values()):
        return sorted(v for res in obj.values() for v in res.values() if isinstance(v, float))

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "accuracy" and isinstance(x, float):
                    out.append(x)
                else:
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(obj)
    return sorted(out)


def _metrics(run: Path) -> str:
    recs = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs.append({k: v for k, v in r.items() if k not in DROP})
    return _sha(json.dumps(recs, sort_keys=True).encode())


def run_case(name: str, extra: list[str], root: Path) -> dict[str, str]:
    out = root / name
    conf = root / "fingerprint.toml"
    conf.write_text(CONFIG)
    cmd = ["advplug", "train", *COMMON, "--config", str(conf), *extra, "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1]}
    fp = {
        "last.pt": _state_hash(out / "last.pt"),
        "metrics": _metrics(out),
        "results": _sha(json.dumps(_numbers(json.loads((out / "results.json").read_text()))).encode()),
    }
    if (out / "best.pt").exists():
        fp["best.pt"] = _state_hash(out / "best.pt")
    dumps = sorted((out / "dumps").glob("*.npz")) if (out / "dumps").exists() else []
    if dumps:
        import numpy as np

        h = hashlib.sha256()
        for d in dumps:
            with np.load(d) as z:
                for k in sorted(z.files):
                    h.update(k.encode())
                    h.update(z[k].tobytes())
        fp["dumps"] = h.hexdigest()[:16]
    return fp


def fingerprint(only: list[str] | None = None) -> dict[str, dict[str, str]]:
    res: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, extra in CASES.items():
            if only and name not in only:
                continue
            res[name] = run_case(name, extra, root)
            print(f"{name:18s} {res[name]}", flush=True)
        if not only:
            runs = [str(root / n) for n in ("at", "mail", "gairat")]
            p = subprocess.run(["advplug", "compare", *runs], capture_output=True, text=True)
            table = "\n".join(line.replace(tmp, "TMP") for line in p.stdout.splitlines())
            res["compare"] = {"table": _sha(table.encode()), "rc": str(p.returncode)}
            print(f"{'compare':18s} {res['compare']}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="FILE")
    g.add_argument("--check", metavar="FILE")
    ap.add_argument("--only", nargs="*", help="cases to run (default: all)")
    a = ap.parse_args()
    res = fingerprint(a.only)
    if a.write:
        Path(a.write).write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
        return 0
    ref = json.loads(Path(a.check).read_text())
    bad = [
        f"{case}.{k}: {ref[case].get(k)} -> {v}"
        for case, fp in res.items()
        if case in ref
        for k, v in fp.items()
        if ref[case].get(k) != v
    ]
    bad += [f"{case}.{k}: missing" for case, fp in res.items() if case in ref for k in ref[case] if k not in fp]
    print("\n".join(bad) if bad else f"identical: {len(res)} cases")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
