"""Benchmark: does the fast Neural Cleanse preset hand laundering the class the faithful one would?

    python benchmarks/perf/nc_check.py --datasets cifar10 --seeds 1 [--models zhang-noise,adi-pt]

On each Table 2 owner model and attacker seed (the row's budget, the same stratified subset the engine's
Table 2 cells draw), both presets run on the same images; laundering's strong variant acts on the flagged
class(es), else the smallest-mask one, so that choice is what must agree. Neural Cleanse results are kept
under runs/nc-check/ (one file per model, seed and settings), so a rerun only adds what is missing. Writes
benchmarks/results/table2-nc-check.json (one row per model and seed, written as each finishes) and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, ROWS, provenance, stored, write  # noqa: E402

from nnlaunder import data as D  # noqa: E402
from nnlaunder.attacks.neural_cleanse import nc_config  # noqa: E402
from nnlaunder.checkpoint import load_model, model_digest  # noqa: E402
from nnlaunder.experiments.nc_memo import kept_nc  # noqa: E402

OUT = "table2-nc-check.json"
CACHE = ROOT / "runs" / "nc-check"
# The stored rows compared Wang et al.'s algorithm with the fast preset as it was then (the library's
# fast-bf16: bf16 wherever the hardware has it, masks not confirmed); they say "fast" for it.
PRESETS = {"fast": "fast-bf16", "faithful": "faithful"}


def check(ds: str, name: str, budget: float, seed: int, tr: D.Dataset, cmd: str) -> dict:
    path = ROOT / "models" / ds / name
    model, _ = load_model(path)
    sha = model_digest(path)
    clean = D.stratified_subset(tr, fraction=budget, seed=seed)
    a, b = (kept_nc(CACHE, model, clean, dataclasses.replace(nc_config(PRESETS[p]), seed=seed))
            for p in ("fast", "faithful"))
    ra, rb = torch.argsort(torch.argsort(a.l1)).double(), torch.argsort(torch.argsort(b.l1)).double()
    rho = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    return {"dataset": ds, "name": name, "seed": seed, "model_sha256": sha,
            "smallest": {"fast": a.most_likely, "faithful": b.most_likely},
            "flagged": {"fast": a.flagged, "faithful": b.flagged},
            "l1": {"fast": a.l1.tolist(), "faithful": b.l1.tolist()},
            "seconds": {"fast": a.seconds, "faithful": b.seconds}, "same_smallest": a.most_likely == b.most_likely,
            "same_flagged": a.flagged == b.flagged, "spearman": rho, **provenance(cmd)}


def _used_pair(r: dict) -> str:
    """The class(es) the strong attack would act on with each preset: the flagged ones, else the smallest."""
    fast, faithful = (r["flagged"][p] or [r["smallest"][p]] for p in ("fast", "faithful"))
    return f"seed {r['seed']}: {fast} / {faithful}"


def markdown(rows: list[dict]) -> str:
    lines = ["# Neural Cleanse: does the fast preset rank classes as the faithful one does?", "",
             "Same owner model, same attacker subset and seed; `python benchmarks/perf/nc_check.py`. The laundering "
             "attack acts on the smallest-mask class (or the flagged ones), so that is what must agree. \"fast\" here "
             f"is the `{PRESETS['fast']}` preset (bf16, no plan tuning, masks not confirmed), as the stored rows ran "
             "it.", "",
             "| row | seeds | same smallest class | same flagged set | class(es) the attack uses, fast / faithful | "
             "Spearman of mask sizes (median) | seconds fast / faithful (mean) |", "|---|---|---|---|---|---|---|"]
    for ds, name in [(d, n) for d, rs in ROWS.items() for n, _ in rs]:
        rs = [r for r in rows if (r["dataset"], r["name"]) == (ds, name)]
        lines += [f"| {ds}/{name} | {len(rs)} | {sum(r['same_smallest'] for r in rs)}/{len(rs)} | "
                  f"{sum(r['same_flagged'] for r in rs)}/{len(rs)} | {'; '.join(_used_pair(r) for r in rs)} | "
                  f"{statistics.median(r['spearman'] for r in rs):.2f} | "
                  f"{statistics.mean(r['seconds']['fast'] for r in rs):.0f} / "
                  f"{statistics.mean(r['seconds']['faithful'] for r in rs):.0f} |"] if rs else []
    return "\n".join([*lines, "", f"Machines: {'; '.join(sorted({r['machine'] for r in rows}))}. The watermark's "
                      "class is 0 (airplane) in every Zhang row.", ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="cifar10", help="comma-separated: mnist, cifar10")
    ap.add_argument("--models", default=None, help="comma-separated row names (default: every row)")
    ap.add_argument("--seeds", type=int, default=1, help="attacker seeds 0..N-1")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if any(d not in ROWS for d in datasets) or args.seeds < 1:
        ap.error(f"datasets are {list(ROWS)} and --seeds is >= 1")
    only = [m.strip() for m in args.models.split(",")] if args.models else None
    rows = stored(OUT)
    cmd = "python benchmarks/perf/nc_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for ds in datasets:
        tr = D.load(ds, args.data_dir, "train")
        for name, budget in ROWS[ds]:
            for seed in range(args.seeds) if not only or name in only else ():
                sha = model_digest(ROOT / "models" / ds / name)
                if any((r["dataset"], r["name"], r["seed"], r["model_sha256"]) == (ds, name, seed, sha) for r in rows):
                    continue
                rows.append(check(ds, name, budget, seed, tr, cmd))
                write(OUT, rows)
                r = rows[-1]
                print(f"{ds}/{name} seed {seed}: {_used_pair(r)}, Spearman {r['spearman']:.2f}", flush=True)
    write("table2-nc-check.md", markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
