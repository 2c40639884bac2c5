"""Benchmark: every removal attack on every watermarked model, at the same data budgets.

    python benchmarks/baselines.py --datasets mnist          # ~40 min on 2 CPU cores

Needs the models and thresholds of benchmarks/embed.py. Each cell ends kept, removed or destroyed as
`nnlaunder verify` decides (the default `converged` threshold of verdicts.json, the base-rate check, 3
points of tolerance); the paper's rule is kept beside it. Writes benchmarks/results/baselines.json
(one row per model × attack × budget, written after every cell: a stopped run resumes where it
stopped; rows from before the verdict rules, which name no commit, are kept in baselines-previous.json
and run again), baselines.md, and baselines-<dataset>.png (test vs watermark accuracy per attack, with
the vanilla threshold). Attacks use their registry defaults (nnlaunder.attacks.registry.ATTACKS).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import add_common_flags, comma_list, commit, default_thresholds, made_from_current, owner_models, provenance  # noqa: E402, E501

from nnlaunder import data as D  # noqa: E402
from nnlaunder.attacks.registry import ATTACKS, run_attack  # noqa: E402
from nnlaunder.checkpoint import atomic_write_bytes, atomic_write_json  # noqa: E402
from nnlaunder.experiments.evaluate import evaluator  # noqa: E402
from nnlaunder.watermarks.verify import DEFAULT_TOLERANCE, outcome  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"mnist": ["zhang-content", "zhang-noise", "zhang-unrelated"],
          "cifar10": ["zhang-content", "zhang-noise", "zhang-unrelated", "adi-pt", "adi-fs"]}
BUDGETS = (0.006, 0.108)
# Quoted baselines from Aiken et al. Table 2: Zhang et al.'s 90% pruning (16.6% / 20% of the data)
# and Adi et al.'s RTAL.
PAPER = {
    ("mnist", "zhang-content", "prune-ft"): {"test_acc": 97.03, "wm_acc": 99.95, "budget": 0.166},
    ("mnist", "zhang-noise", "prune-ft"): {"test_acc": 95.19, "wm_acc": 99.55, "budget": 0.166},
    ("mnist", "zhang-unrelated", "prune-ft"): {"test_acc": 93.55, "wm_acc": 99.9, "budget": 0.166},
    ("cifar10", "zhang-content", "prune-ft"): {"test_acc": 64.9, "wm_acc": 99.47, "budget": 0.2},
    ("cifar10", "zhang-noise", "prune-ft"): {"test_acc": 59.29, "wm_acc": 65.13, "budget": 0.2},
    ("cifar10", "zhang-unrelated", "prune-ft"): {"test_acc": 62.15, "wm_acc": 10.93, "budget": 0.2},
    ("cifar10", "adi-pt", "rtal"): {"test_acc": 90.0, "wm_acc": 100.0, "budget": None},
    ("cifar10", "adi-fs", "rtal"): {"test_acc": 90.0, "wm_acc": 80.0, "budget": None},
}


def key(r: dict) -> tuple:
    return (r["dataset"], r["name"], r["attack"], r["budget"])


def run(args) -> list[dict]:
    path = RESULTS / "baselines.json"
    rows: list[dict] = json.loads(path.read_text()) if path.is_file() else []
    before = [r for r in rows if "commit" not in r]     # rows from before the verdict rules: run again
    if before and not (RESULTS / "baselines-previous.json").is_file():
        atomic_write_json(RESULTS / "baselines-previous.json", before)
    done = {key(r) for r in rows if "commit" in r}
    attacks = [a.strip() for a in args.attacks.split(",")] if args.attacks else list(ATTACKS)
    rev = commit()      # the code this process runs, whatever is edited while it runs
    for ds in args.datasets:
        tr, te = D.load(ds, args.data_dir, "train"), D.load(ds, args.data_dir, "test")
        paper = json.loads((RESULTS / f"thresholds-{ds}.json").read_text())["thresholds"]
        thresholds = default_thresholds(ds)
        owners = {}
        for name, _, model, meta, sha, wm in owner_models(ds, [(n, None) for n in MODELS[ds]], args.models, tr, te,
                                                           args.data_dir):
            ev = evaluator(te, wm, thresholds[name])     # the verdict of `nnlaunder verify`, base rate included
            file = {"model": f"models/{ds}/{name}.safetensors", "model_sha256": sha}
            meta = {**meta, "file": file}
            stale = [r for r in rows if (r["dataset"], r["name"]) == (ds, name) and r["attack"] in attacks
                     and not made_from_current(r, file)]
            if stale:                               # the model file changed since: redo its cells
                print(f"{ds}/{name}: {len(stale)} rows were computed on {stale[0].get('model')}; re-running them")
                rows[:] = [r for r in rows if not any(r is x for x in stale)]
                done = {key(r) for r in rows if "commit" in r}
            owners[name] = (model, meta, ev, ev(0, model))
        for budget in BUDGETS:                      # the small budget first: its cells are quick
            clean = D.stratified_subset(tr, fraction=budget, seed=args.seed)
            for name, (model, meta, ev, before) in owners.items():
                for attack in attacks:
                    if (ds, name, attack, budget) in done:
                        continue
                    res = run_attack(attack, model, clean)
                    after = ev(1, res.model)
                    drop = before["test_acc"] - after["test_acc"]
                    out = outcome(bool(after.get("owned")), drop, None, DEFAULT_TOLERANCE)
                    row = {"dataset": ds, "arch": meta["arch"], "scheme": meta["scheme"], "name": name,
                           "attack": attack, "budget": budget, "n_clean": len(clean),
                           "orig_test_acc": before["test_acc"], "orig_wm_acc": before["wm_acc"],
                           "test_acc": after["test_acc"], "wm_acc": after["wm_acc"], "threshold": thresholds[name],
                           "threshold_rule": "converged", "threshold_paper": paper[name],
                           "owned": bool(after.get("owned")), "status": after.get("status"), "test_drop": drop,
                           "tolerance": DEFAULT_TOLERANCE, "outcome": out, "removed": out == "removed",
                           "removed_paper": after["wm_acc"] < paper[name], "seconds": res.seconds,
                           "info": {k: v for k, v in res.info.items() if k != "rounds"},
                           "paper": PAPER.get((ds, name, attack)),
                           **provenance(f"python benchmarks/baselines.py --datasets {ds}", rev), **meta["file"]}
                    if meta["scheme"] == "adi":
                        row["mode"] = meta["scheme_params"]["mode"]
                    rows[:] = [r for r in rows if key(r) != key(row)] + [row]
                    done.add(key(row))
                    atomic_write_json(path, rows)
                    print(f"{ds}/{name} {attack} @ {budget:.1%}: test {row['test_acc']:.2f}%  WM {row['wm_acc']:.2f}% "
                          f"(threshold {row['threshold']:.2f}%)  {out}  "
                          f"{row['seconds']:.0f} s", flush=True)
    return rows


def plot(rows: list[dict], ds: str) -> Path | None:
    rs = [r for r in rows if r["dataset"] == ds]
    if not rs:
        return None
    names = sorted({r["name"] for r in rs}, key=MODELS[ds].index)
    attacks = [a for a in ATTACKS if any(r["attack"] == a for r in rs)]
    cmap = plt.get_cmap("tab10")
    width = 4.2 * len(names) + 2.4
    fig, axes = plt.subplots(1, len(names), figsize=(width, 4.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        sub = [r for r in rs if r["name"] == name]
        for i, a in enumerate(attacks):
            for budget, marker in zip(BUDGETS, ("o", "s"), strict=True):
                pts = [r for r in sub if r["attack"] == a and r["budget"] == budget]
                if pts:
                    ax.scatter([p["test_acc"] for p in pts], [max(p["wm_acc"], 0.01) for p in pts], color=cmap(i),
                               marker=marker, s=40, label=f"{a} ({budget:.1%})")
        ax.scatter([sub[0]["orig_test_acc"]], [sub[0]["orig_wm_acc"]], color="black", marker="*", s=120,
                   label="before")
        rule = sub[0].get("threshold_rule", "paper's")
        ax.axhline(sub[0]["threshold"], color="black", lw=1, ls="--", label=f"threshold ({rule} rule)")
        if "tolerance" in sub[0]:      # left of it a removal is "destroyed": the model lost too much
            ax.axvline(sub[0]["orig_test_acc"] - sub[0]["tolerance"], color="grey", lw=1, ls=":",
                       label=f"owner's test − {sub[0]['tolerance']:g} (left: destroyed)")
        ax.set_yscale("log")
        ax.set_xlabel("test accuracy %")
        ax.set_ylabel("watermark accuracy % (log)")
        ax.set_title(name, fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle(f"{ds}: removal attacks\n(circle: 0.6%, square: 10.8% of the training set)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / width, 1))
    out = RESULTS / f"baselines-{ds}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _paper_rule(r: dict) -> str:
    return f"({r['threshold_paper']:.2f}) " if "threshold_paper" in r else ""


def markdown(rows: list[dict]) -> str:
    lines = ["# Removal attacks side by side", "",
             "Same models, same attacker data budgets (stratified samples of the training set). Outcome "
             "(docs/methods.md#verification-and-verdicts): the verdict against the default `converged` threshold "
             "(verdicts.json; the paper's rule in brackets), with the 3-point tolerance: removed from a usable "
             "model, destroyed with it, or kept (`python benchmarks/redecide.py` re-decided the stored rows).",
             "Paper rows are quoted from Aiken et al. Table 2 (Zhang et al.'s 90% pruning with 16.6% / 20% of the "
             "data; Adi et al.'s RTAL).", "",
             "| dataset | model | attack | budget | test acc % (before) | WM acc % (before) | threshold % (paper's "
             "rule) | outcome | seconds | paper (test / WM) |", "|---|---|---|---|---|---|---|---|---|---|"]
    ds_order = {d: i for i, d in enumerate(MODELS)}
    at_order = {a: i for i, a in enumerate(ATTACKS)}

    def order(r: dict) -> tuple:
        names = MODELS.get(r["dataset"], [])
        return (ds_order.get(r["dataset"], 99), names.index(r["name"]) if r["name"] in names else 99,
                r["budget"], at_order.get(r["attack"], 99))

    for r in sorted(rows, key=order):
        p = r.get("paper")
        paper = f"{p['test_acc']:.2f} / {p['wm_acc']:.2f}" if p else ""
        lines.append(f"| {r['dataset']} | {r['name']} | {r['attack']} | {r['budget']:.1%} | {r['test_acc']:.2f} "
                     f"({r['orig_test_acc']:.2f}) | {r['wm_acc']:.2f} ({r['orig_wm_acc']:.2f}) | {r['threshold']:.2f} "
                     f"{_paper_rule(r)}| {r.get('outcome') or ('removed' if r['removed'] else 'kept')} | "
                     f"{'~' if r.get('seconds_note') else ''}"
                     f"{r['seconds']:.0f} | {paper} |")
    for r in rows:
        if r.get("seconds_note"):
            lines += ["", f"~ {r['dataset']}/{r['name']} {r['attack']} @ {r['budget']:.1%}: {r['seconds_note']}"]
    stale = sorted({(r["dataset"], r["name"], r["budget"], r["attack"], r["model"]) for r in rows
                    if r.get("model") not in (None, f"models/{r['dataset']}/{r['name']}.safetensors")})
    if stale:
        lines += ["", "Rows computed on an earlier version of the owner model (not yet re-run on the current one): "
                  + "; ".join(f"{d}/{n} {a} @ {b:.1%} (`{m}`)" for d, n, b, a, m in stale) + "."]
    lines += ["", "Plots: " + ", ".join(f"baselines-{d}.png" for d in sorted({r['dataset'] for r in rows})), "",
              "Commands:", *[f"    {c}" for c in sorted({r['command'] for r in rows})], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist")
    ap.add_argument("--attacks", default=None, help="comma list (default: all registered)")
    ap.add_argument("--data-dir", default=None)
    add_common_flags(ap)
    args = ap.parse_args(argv)
    args.models = comma_list(args.models)
    args.datasets = comma_list(args.datasets) or []
    bad = [d for d in args.datasets if d not in MODELS]
    if bad:
        print(f"baselines.py: error: unknown dataset(s) {bad}", file=sys.stderr)
        return 2
    if args.markdown_only:
        rows = json.loads((RESULTS / "baselines.json").read_text())
    else:
        rows = run(args)
    for ds in sorted({r["dataset"] for r in rows}):
        plot(rows, ds)
    atomic_write_bytes(RESULTS / "baselines.md", markdown(rows).encode())
    print("wrote baselines.json, baselines.md and plots")
    return 0


if __name__ == "__main__":

    sys.exit(main())
