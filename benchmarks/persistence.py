"""Benchmark: do watermarks persist under fine-tuning, can the owner restore them, and does laundering
remove a watermark or only hide it? (Ngo et al. arXiv:2501.02704.)

    nnlaunder run experiments/paper/persistence-mnist.toml --workspace runs/paper
    nnlaunder run experiments/paper/persistence-cifar10.toml --workspace runs/paper
    python benchmarks/persistence.py          # persistence.json / .md and plots from the engine's store

The experiment files run, on every Table 2 owner model, Ngo et al.'s fine-tuning on a stratified 30% of the
training set (then the owner's restoration on the other 70%), the mixed fine-tuning (one extra step on a
batch of the other 70% every 2nd batch) and laundering's strong preset (one round, 0.6%; then the owner's
restoration on the images the attacker's set does not hold). Each cell is judged as `nnlaunder verify`
judges (the default `converged` threshold, the base-rate check) and ends kept, hidden, removed or
destroyed. This script lays the cells out as phases:
  embedded         the owner model as trained (any cell's model before its attack)
  finetuned        the fine-tuned model;  restored: the owner's restoration of it
  finetuned-mixed  the mixed fine-tuning's model
  laundered        the laundered model;   laundered-restored: the owner's restoration of it
A dataset whose experiment file the store does not hold in full keeps the rows stored before (named by
their command and commit).
"""

from __future__ import annotations

import argparse
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS, ROOT, counts_line, engine_cells, stored, with_paper_rule, write  # noqa: E402

from nnlaunder.report.battery import scheme_name, work_seconds  # noqa: E402
from nnlaunder.watermarks.verify import DEFAULT_TOLERANCE  # noqa: E402

MODELS = {"mnist": ["zhang-content", "zhang-noise", "zhang-unrelated"],
          "cifar10": ["zhang-content", "zhang-noise", "zhang-unrelated", "adi-pt", "adi-fs"]}
PHASES = ["embedded", "finetuned", "finetuned-mixed", "restored", "laundered", "laundered-restored"]


EXPERIMENTS = {"mnist": "persistence-mnist", "cifar10": "persistence-cifar10"}


def _phases(cfg: dict) -> tuple[str, str | None]:
    """(the attack's phase, its restoration's phase) for a cell of the experiment files."""
    if cfg["attack"] == "launder":
        return "laundered", "laundered-restored"
    return ("finetuned-mixed", None) if (cfg.get("attack_params") or {}).get("mix_split") else ("finetuned", "restored")


def phase_rows(cells: list[dict]) -> list[dict]:
    """The cells as one row per (model, phase)."""
    rows: dict[tuple, dict] = {}
    for c in cells:
        cfg, sm = c["config"], c["summary"]
        base = {"dataset": cfg["dataset"], "arch": cfg.get("arch"), "scheme": cfg["scheme"], "name": scheme_name(cfg),
                "threshold": sm["threshold"], "threshold_rule": sm["threshold_rule"], "tolerance": sm["tolerance"],
                "model": f"{cfg['owner_path']}.safetensors", "machine": sm["machine"], "commit": sm["commit"],
                "date": sm["date"], "command": f"nnlaunder run experiments/paper/{c['experiment']}.toml"}
        if "threshold_paper" in sm:
            base["threshold_paper"] = sm["threshold_paper"]
        if (cfg.get("scheme_params") or {}).get("mode"):
            base["mode"] = cfg["scheme_params"]["mode"]
        first = c["rounds"][0]
        rows[(base["dataset"], base["name"], "embedded")] = {
            **base, "phase": "embedded", "test_acc": sm["orig_test_acc"], "wm_acc": sm["orig_wm_acc"],
            "owned": bool(first.get("owned")), "status": first.get("status"), "seconds": 0.0}
        attack, restored = _phases(cfg)
        rows[(base["dataset"], base["name"], attack)] = {
            **base, "phase": attack, **{k: sm.get(k) for k in ("test_acc", "wm_acc", "owned", "status", "base_rate",
                                                                "outcome", "test_drop", "param_shift", "n_clean")},
            "seconds": work_seconds(c)}
        if restored and "restored_wm_acc" in sm:
            rows[(base["dataset"], base["name"], restored)] = {
                **base, "phase": restored, "test_acc": sm["restored_test_acc"], "wm_acc": sm["restored_wm_acc"],
                "owned": sm["restored"], "n_owner": sm["n_owner"], "seconds": sm["restore_seconds"]}
    return with_paper_rule(list(rows.values()))


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
             "| outcome | parameter shift (L2, from the owner's model) | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["name"], PHASES.index(r["phase"]))):
        paper = f" ({r['threshold_paper']:.2f})" if "threshold_paper" in r else ""
        shown = {True: "yes", False: "no"}.get(r.get("owned"), "–")
        shift = r.get("shift_from_embedded", r.get("param_shift"))
        lines.append(f"| {r['dataset']} | {r['name']} | {r['phase']} | {r['test_acc']:.2f} | {r['wm_acc']:.2f} | "
                     f"{r['threshold']:.2f}{paper} | {shown} | {r.get('outcome', '')} | "
                     f"{'–' if shift is None else format(shift, '.3f')} | {r['seconds']:.0f} |")
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
    ap.add_argument("--workspace", default=str(ROOT / "runs" / "paper"), help="the engine's workspace")
    args = ap.parse_args(argv)
    before = stored("persistence.json")
    rows: list[dict] = []
    for ds, exp in EXPERIMENTS.items():
        cells, counts = engine_cells(args.workspace, [exp])
        have, total = counts[exp]
        rows += phase_rows(cells) if have == total else [r for r in before if r["dataset"] == ds]
        print(f"{ds}: {'the engine' if have == total else 'the rows stored before'} ({counts_line(counts)})")
    write("persistence.json", rows)
    for ds in sorted({r["dataset"] for r in rows}):
        plot(rows, ds)
    write("persistence.md", markdown(rows))
    print("wrote persistence.json, persistence.md and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
