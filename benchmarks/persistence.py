"""Benchmark: do watermarks persist under fine-tuning, can the owner restore them, and does
laundering remove a watermark or only hide it? (Ngo et al. arXiv:2501.02704; issue "persistence".)

    python benchmarks/persistence.py --datasets mnist --ft-epochs 20 --restore-epochs 10

For every watermarked model of benchmarks/embed.py:
  embedded         the owner model as trained
  finetuned        all layers fine-tuned on a disjoint 30% split (Adam 1e-4)
  finetuned-mixed  the same, with one step on an owner-data batch every 2nd batch
  restored         the fine-tuned model trained further on the owner's data only (the other 70%)
  laundered        laundering's strong preset (one round, 0.6% budget, the library's defaults)
  laundered-restored  the laundered model trained further on the owner's data only
Every phase is judged as `nnlaunder verify` judges (the default `converged` threshold of verdicts.json,
the base-rate check); each attack phase (finetuned, finetuned-mixed, laundered) ends kept, hidden (no
ownership shown, but the owner's restoration brings it back), removed or destroyed (more than 3 points
of test accuracy lost). Writes benchmarks/results/persistence.json (a row per model × phase, written as
it goes: a stopped run resumes) and persistence.md, and persistence-<dataset>.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import (  # noqa: E402
    add_common_flags,
    comma_list,
    commit,
    default_thresholds,
    made_from_current,
    owner_models,
    provenance,
)

from nnlaunder import data as D  # noqa: E402
from nnlaunder.attacks.laundering import launder, launder_config  # noqa: E402
from nnlaunder.checkpoint import atomic_write_bytes, atomic_write_json  # noqa: E402
from nnlaunder.experiments.evaluate import evaluator  # noqa: E402
from nnlaunder.restore import finetune_threat, param_shift, restore  # noqa: E402
from nnlaunder.train import TrainConfig  # noqa: E402
from nnlaunder.watermarks.verify import DEFAULT_TOLERANCE, outcome  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"mnist": ["zhang-content", "zhang-noise", "zhang-unrelated"],
          "cifar10": ["zhang-content", "zhang-noise", "zhang-unrelated", "adi-pt", "adi-fs"]}
PHASES = ["embedded", "finetuned", "finetuned-mixed", "restored", "laundered", "laundered-restored"]


def run(args) -> list[dict]:
    path = RESULTS / "persistence.json"
    rows: list[dict] = json.loads(path.read_text()) if path.is_file() else []
    done = {(r["dataset"], r["name"], r["phase"]) for r in rows if r.get("threshold_rule") == "converged"}
    rev = commit()      # the code this process runs, whatever is edited while it runs
    for ds in args.datasets:
        tr, te = D.load(ds, args.data_dir, "train"), D.load(ds, args.data_dir, "test")
        paper = json.loads((RESULTS / f"thresholds-{ds}.json").read_text())["thresholds"]
        thresholds = default_thresholds(ds)
        split, owner = D.disjoint_split(tr, 0.3, seed=args.seed)
        ft = TrainConfig(epochs=args.ft_epochs, batch_size=128, optimizer="adam", lr=1e-4, seed=args.seed)
        rs = TrainConfig(epochs=args.restore_epochs, batch_size=128, optimizer="adam", lr=1e-4, seed=args.seed)
        for name, _, model, meta, sha, wm in owner_models(ds, [(n, None) for n in MODELS[ds]], args.models, tr, te,
                                                           args.data_dir):
            file = {"model": f"models/{ds}/{name}.safetensors", "model_sha256": sha}
            if all((ds, name, ph) in done for ph in PHASES) and all(
                    made_from_current(r, file) for r in rows if (r["dataset"], r["name"]) == (ds, name)):
                continue
            meta = {**meta, "file": file}
            evals = {"test": (te.x, te.y), "wm": (wm.verify_x, wm.verify_y)}

            ctx = {"ds": ds, "name": name, "meta": meta, "model": model, "rev": rev,
                   "threshold": thresholds[name], "threshold_paper": paper[name], "path": path, "args": args,
                   "ev": evaluator(te, wm, thresholds[name])}

            def emit(phase, m, seconds, history=None, source=None, ctx=ctx):
                _emit(rows, ctx, phase, m, seconds, history, source)

            emit("embedded", model, 0.0)
            for phase, mixed in (("finetuned", None), ("finetuned-mixed", owner)):
                m = copy.deepcopy(model)
                t0 = time.perf_counter()
                res = finetune_threat(m, split, ft, mixed_with=mixed, eval_sets=evals, progress=False)
                emit(phase, m, time.perf_counter() - t0, res.history)
                if phase == "finetuned":
                    r = copy.deepcopy(m)
                    t0 = time.perf_counter()
                    res = restore(r, owner, rs, eval_sets=evals, progress=False)
                    emit("restored", r, time.perf_counter() - t0, res.history, source=m)
            clean = D.stratified_subset(tr, fraction=0.006, seed=args.seed)
            t0 = time.perf_counter()
            lm = launder(model, clean, launder_config("strong", seed=args.seed)).model
            emit("laundered", lm, time.perf_counter() - t0)
            r = copy.deepcopy(lm)
            t0 = time.perf_counter()
            res = restore(r, owner, rs, eval_sets=evals, progress=False)
            emit("laundered-restored", r, time.perf_counter() - t0, res.history, source=lm)
    return rows


def _emit(rows: list[dict], ctx: dict, phase: str, m, seconds: float, history=None, source=None) -> None:
    """Measure `m`, replace the row of (dataset, model, phase) and write the JSON at once."""
    ds, name, meta, args = ctx["ds"], ctx["name"], ctx["meta"], ctx["args"]
    source = ctx["model"] if source is None else source
    m.eval()
    v = ctx["ev"](0, m)
    row = {"dataset": ds, "arch": meta["arch"], "scheme": meta["scheme"], "name": name, "phase": phase,
           "test_acc": v["test_acc"], "wm_acc": v["wm_acc"], "owned": bool(v.get("owned")), "status": v.get("status"),
           "base_rate": v.get("base_rate"), "threshold": ctx["threshold"], "threshold_rule": "converged",
           "threshold_paper": ctx["threshold_paper"], "param_shift": param_shift(source, m)["total"],
           "shift_from_embedded": param_shift(ctx["model"], m)["total"], "seconds": seconds,
           "history": history or [], "paper": None,
           **provenance(f"python benchmarks/persistence.py --datasets {ds} --ft-epochs {args.ft_epochs} "
                        f"--restore-epochs {args.restore_epochs}", ctx["rev"]), **meta["file"]}
    if meta["scheme"] == "adi":
        row["mode"] = meta["scheme_params"]["mode"]
    rows[:] = [r for r in rows if (r["dataset"], r["name"], r["phase"]) != (ds, name, phase)] + [row]
    atomic_write_json(ctx["path"], rows)
    print(f"{ds}/{name} {phase}: test {row['test_acc']:.2f}%  WM {row['wm_acc']:.2f}% "
          f"(threshold {row['threshold']:.2f}%)  shift {row['param_shift']:.3f}  {seconds:.0f} s", flush=True)


# Each attack phase, and the owner's restoration of it (None: none was run).
ATTACK_PHASES = {"finetuned": "restored", "finetuned-mixed": None, "laundered": "laundered-restored"}


def with_outcomes(rows: list[dict]) -> list[dict]:
    """Each attack phase's outcome: kept (ownership still shown), destroyed (not shown, more than the tolerance
    of test accuracy lost), hidden (not shown, but shown again after the owner's restoration) or removed."""
    by = {(r["dataset"], r["name"], r["phase"]): r for r in rows}
    for (ds, name, phase), r in by.items():
        base, fix = by.get((ds, name, "embedded")), ATTACK_PHASES.get(phase, "")
        if fix == "" or base is None or "owned" not in r:
            continue
        restored = by.get((ds, name, fix)) if fix else None
        r["test_drop"] = base["test_acc"] - r["test_acc"]
        r["tolerance"] = DEFAULT_TOLERANCE
        back = restored.get("owned") if restored else None       # None: no restoration was run (or judged)
        r["outcome"] = outcome(r["owned"], r["test_drop"], back, DEFAULT_TOLERANCE)
    return rows


def plot(rows: list[dict], ds: str) -> None:
    rs = [r for r in rows if r["dataset"] == ds]
    names = [n for n in MODELS[ds] if any(r["name"] == n for r in rs)]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.3 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        by = {r["phase"]: r for r in rs if r["name"] == name}
        phases = [p for p in PHASES if p in by]
        bars = ax.bar(range(len(phases)), [by[p]["wm_acc"] for p in phases], color="tab:red")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.axhline(by[phases[0]]["threshold"], color="black", lw=1, ls="--",
                   label=f"threshold ({by[phases[0]].get('threshold_rule', 'paper')} rule)")
        ax.set_xticks(range(len(phases)))
        ax.set_xticklabels(phases, rotation=35, ha="right", fontsize=7)
        ax.set_ylim(0, 110)
        ax.set_ylabel("watermark accuracy %")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{ds}: watermark accuracy after fine-tuning, restoration and laundering", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / f"persistence-{ds}.png", dpi=110)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    lines = ["# Persistence, restoration, and whether laundering removes or hides", "",
             "Every phase judged as `nnlaunder verify` judges it: the default `converged` threshold (verdicts.json; "
             "the paper's rule in brackets) and the base-rate check. Outcome of each attack phase "
             "(docs/methods.md#verification-and-verdicts): kept = ownership still shown; destroyed = not shown, "
             f"more than {DEFAULT_TOLERANCE:g} points of test accuracy lost; hidden = not shown, but the owner's "
             "restoration on clean data alone (no triggers) shows it again; removed = not shown, even after "
             "restoration where one ran.", "",
             "| dataset | model | phase | test acc % | WM acc % | threshold % (paper's rule) | ownership shown "
             "| outcome | parameter shift (from its input) | shift from embedded | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["name"], PHASES.index(r["phase"]))):
        paper = f" ({r['threshold_paper']:.2f})" if "threshold_paper" in r else ""
        shown = {True: "yes", False: "no"}.get(r.get("owned"), "–")
        lines.append(f"| {r['dataset']} | {r['name']} | {r['phase']} | {r['test_acc']:.2f} | {r['wm_acc']:.2f} | "
                     f"{r['threshold']:.2f}{paper} | {shown} | {r.get('outcome', '')} | {r['param_shift']:.3f} | "
                     f"{r['shift_from_embedded']:.3f} | {r['seconds']:.0f} |")
    stale = sorted({(r["dataset"], r["name"], r["model"]) for r in rows
                    if r.get("model") not in (None, f"models/{r['dataset']}/{r['name']}.safetensors")})
    if stale:
        lines += ["", "Rows computed on an earlier version of the owner model (the file named; not yet re-run on "
                  "the current one): " + "; ".join(f"{d}/{n}: `{m}`" for d, n, m in stale) + "."]
    lines += ["", "## Verdicts", "",
              "Fine-tuning fade: WM accuracy lost by fine-tuning (plain / mixed), and the outcome of each; "
              "restoration: WM accuracy of the fine-tuned model after training on the owner's data alone; "
              "laundering: WM accuracy after laundering and after the owner's restoration, and its outcome.", "",
              "| dataset | model | fade plain / mixed (points) | fine-tuning outcome plain / mixed | restored WM % "
              "| laundered → restored WM % | threshold % | laundering |", "|---|---|---|---|---|---|---|---|"]
    for ds, name in sorted({(r["dataset"], r["name"]) for r in rows}):
        by = {r["phase"]: r for r in rows if (r["dataset"], r["name"]) == (ds, name)}
        if not all(p in by for p in PHASES):
            continue
        e = by["embedded"]["wm_acc"]
        fade = f"{e - by['finetuned']['wm_acc']:.2f} / {e - by['finetuned-mixed']['wm_acc']:.2f}"
        ft = f"{by['finetuned'].get('outcome', '–')} / {by['finetuned-mixed'].get('outcome', '–')}"
        out = by["laundered"].get("outcome", "–")
        lines.append(f"| {ds} | {name} | {fade} | {ft} | {by['restored']['wm_acc']:.2f} | "
                     f"{by['laundered']['wm_acc']:.2f} → {by['laundered-restored']['wm_acc']:.2f} | "
                     f"{by['embedded']['threshold']:.2f} | {'**hidden**' if out == 'hidden' else out} |")
    where = sorted({f"{r['machine']}, commit {r['commit']}" for r in rows if "commit" in r})
    old = sorted({f"{r['dataset']}/{r['name']}" for r in rows if "commit" not in r})
    lines += ["", "Ran on: " + ("; ".join(where) or "–") + "." + (
        f" Rows of {', '.join(old)} are from a run before the verdict rules: they name no machine or commit and "
        "have no ownership or outcome column; the thresholds they show are the paper's rule." if old else ""),
        "", "Commands:",
              *[f"    {c}" for c in sorted({r['command'] for r in rows})], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--ft-epochs", type=int, default=50)
    ap.add_argument("--restore-epochs", type=int, default=30)
    add_common_flags(ap)
    args = ap.parse_args(argv)
    args.models = comma_list(args.models)
    args.datasets = comma_list(args.datasets) or []
    if any(d not in MODELS for d in args.datasets):
        print(f"persistence.py: error: datasets must be among {sorted(MODELS)}", file=sys.stderr)
        return 2
    if args.markdown_only:
        rows = json.loads((RESULTS / "persistence.json").read_text())
    else:
        rows = run(args)
    with_outcomes(rows)
    atomic_write_json(RESULTS / "persistence.json", rows)
    for ds in sorted({r["dataset"] for r in rows}):
        plot(rows, ds)
    atomic_write_bytes(RESULTS / "persistence.md", markdown(rows).encode())
    print("wrote persistence.json, persistence.md and plots")
    return 0


if __name__ == "__main__":

    sys.exit(main())
