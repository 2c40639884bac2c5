"""Benchmark: what an owner waits for in `nnlaunder audit --quick` on a CIFAR-10 model, phase by phase.

    python benchmarks/perf/cifar_audit.py --models zhang-content --caches cold,warm   # ~1.5 h on 2 cores
    NNLAUNDER_DEVICE=cuda python benchmarks/perf/cifar_audit.py --dataset mnist --caches cold   # on a GPU

For each owner model (models/<dataset>/<name>, CIFAR-10 unless --dataset says otherwise) and each
cache state, in that order:
  cold  an empty cache (NNLAUNDER_CACHE=runs/perf-cifar/cache-<arch>, emptied first): the audit trains
        the clean models of its threshold seeds, times Neural Cleanse's plans, builds the native kernel;
  warm  the same cache after the cold run: no clean model is trained.
Each audit runs in a fresh workspace (runs/perf-cifar/<name>-<cache>), as `nnlaunder audit MODEL --quick`
runs it. The profile splits the wall time by phase from the audit's own records: clean models (the
trajectories' epoch seconds), and per cell setup (data, owner model, threshold, first evaluation),
Neural Cleanse, Algorithm 1 with its evaluation, retraining, the other attacks, restoration, and the
report (the rest). Rows: audit_cifar_<cache> for the Table 7 CNN content model, audit_cifar_<cache>_<name>
for any other (audit_mnist_... for MNIST; a _gpu suffix where NNLAUNDER_DEVICE puts the models on a GPU),
merged into benchmarks/results/perf.json (perf.md is rewritten by run.py --markdown-only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

RUNS = ROOT / "runs" / "perf-cifar"


def phases(workspace: Path, cache: Path, started: float) -> dict[str, float]:
    """Seconds per phase of the audit in `workspace`, from its store and the clean trajectories trained
    into `cache` since `started` (a time.time())."""
    from nnlaunder.experiments.store import Store

    out = dict.fromkeys(("clean models", "setup", "neural cleanse", "algorithm 1 + evaluation", "retraining",
                         "other attacks", "restoration"), 0.0)
    for m in (cache / "clean").glob("*/metrics.json"):
        if m.stat().st_mtime >= started:
            out["clean models"] += sum(float(e["seconds"]) for e in json.loads(m.read_text())["epochs"])
    with Store(workspace / "results.sqlite", readonly=True) as store:
        cells = store.cells()
    for c in cells:
        s = c["summary"]
        rounds = [r for r in c["rounds"] if r.get("round", 0) > 0]
        attack = float(s.get("attack_seconds", 0.0))
        restore = float(s.get("restore_seconds", 0.0))
        out["setup"] += max(0.0, c["seconds"] - attack - restore)
        out["restoration"] += restore
        if c["config"]["attack"] == "launder":
            nc = sum(float(r.get("nc_seconds") or 0) for r in rounds)
            out["neural cleanse"] += nc
            if all("retrain_seconds" in r for r in rounds):
                rt = sum(float(r["retrain_seconds"]) for r in rounds)
                out["retraining"] += rt
                out["algorithm 1 + evaluation"] += max(0.0, attack - nc - rt)
            else:                             # a store written before rounds recorded their retraining
                out["algorithm 1, retraining and evaluation"] = out.get("algorithm 1, retraining and evaluation",
                                                                        0.0) + max(0.0, attack - nc)
        else:
            out["other attacks"] += attack
    out["setup"] -= out["clean models"]       # the first cell trains them (inside its setup)
    out["report and the rest"] = 0.0
    if "algorithm 1, retraining and evaluation" in out:
        out["algorithm 1, retraining and evaluation"] += out.pop("retraining") + out.pop("algorithm 1 + evaluation")
    return {k: round(v, 1) for k, v in out.items()}


def run_one(dataset: str, name: str, cache_state: str, data_dir: str | None) -> dict:
    from common import commit, machine

    from nnlaunder.checkpoint import load_model
    from nnlaunder.device import compute_device
    from nnlaunder.experiments.audit import run_audit

    path = ROOT / "models" / dataset / name
    _, meta = load_model(path)
    gpu = compute_device().type == "cuda"
    cache = RUNS / f"cache-{meta['arch']}{'-gpu' if gpu else ''}"
    if cache_state == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    elif not any((cache / "clean").glob("*/metrics.json")):
        raise SystemExit(f"no warm cache at {cache}: run --caches cold first")
    os.environ["NNLAUNDER_CACHE"] = str(cache)
    ws = RUNS / f"{dataset}-{name}-{cache_state}{'-gpu' if gpu else ''}"
    shutil.rmtree(ws, ignore_errors=True)
    started = time.time()
    t0 = time.perf_counter()
    res = run_audit(str(path), None, {}, profile="quick", workspace=str(ws),
                    data_dir=data_dir, progress=True)
    secs = time.perf_counter() - t0
    prof = phases(ws, cache, started)
    prof["report and the rest"] = round(secs - sum(prof.values()), 1)
    outcomes = {f"{r['attack']} @ {r['budget']}": {k: r[k] for k in ("kept", "hidden", "removed", "destroyed")}
                for r in res["rows"]}
    label = (f"audit_{'cifar' if dataset == 'cifar10' else dataset}_{cache_state}"
             + ("" if name == "zhang-content" else f"_{name}") + ("_gpu" if gpu else ""))
    share = ", ".join(f"{k} {v:.0f} s" for k, v in prof.items())
    return {"name": label, "seconds": round(secs, 1), "baseline": None, "ratio": None,
            "phases": prof, "outcomes": outcomes, "model": f"models/{dataset}/{name}", "arch": meta["arch"],
            "notes": f"nnlaunder audit --quick on models/{dataset}/{name} ({meta['arch']}), {cache_state} clean-model "
                     f"cache, fresh workspace: {share}",
            "machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/perf/cifar_audit.py " + " ".join(sys.argv[1:])}


def merge(rows: list[dict]) -> None:
    """Replace perf.json's rows of the same names (others kept as they are)."""
    from common import stored, write

    names = {r["name"] for r in rows}
    write("perf.json", [r for r in stored("perf.json") if r.get("name") not in names] + rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10", help="the owner models' dataset (models/<dataset>/)")
    ap.add_argument("--models", default="zhang-content", help="comma list of models/<dataset>/<name>")
    ap.add_argument("--caches", default="cold,warm", help="cold, warm, or both in that order")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    for name in [m for m in args.models.split(",") if m]:
        for state in [c for c in args.caches.split(",") if c]:
            if state not in ("cold", "warm"):
                raise SystemExit(f"--caches: {state!r} is not cold or warm")
            row = run_one(args.dataset, name, state, args.data_dir)
            merge([row])             # each audit's row is kept as soon as it is measured
            print(f"{row['name']}: {row['seconds']:.0f} s; {row['phases']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
