"""The persistence layout (Ngo et al.): what each attack leaves of a watermark, and what the owner's restoration
on its own clean data brings back, as one row per (model, phase) with a bar plot per dataset.

Phases, from the cells of an experiment whose restoration runs whatever the attack left (`restore_if =
"always"`, as experiments/paper/persistence-*.toml set it):
  embedded         the owner's model before any attack (every cell holds it)
  finetuned        a fine-tuning attack's model; restored: the owner's restoration of it
  finetuned-mixed  the same with the owner's data mixed in (`mix_split`)
  laundered        the laundered model; laundered-restored: the owner's restoration of it
  <attack>         any other attack's model; <attack>-restored: the owner's restoration of it
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..attacks.baselines import FT_MODES  # noqa: E402
from ..watermarks.verify import DEFAULT_TOLERANCE  # noqa: E402
from .battery import scheme_name, work_seconds  # noqa: E402

PHASES = ["embedded", "finetuned", "finetuned-mixed", "restored", "laundered", "laundered-restored"]
_ATTACK_FIELDS = ("test_acc", "wm_acc", "owned", "status", "base_rate", "outcome", "test_drop", "param_shift",
                  "n_clean")


def persistence_cells(cells: list[dict]) -> list[dict]:
    """The cells this layout is for: those whose owner's restoration ran whatever the attack left."""
    return [c for c in cells if c["config"].get("restore_if") == "always"]


def phases(cfg: dict) -> tuple[str, str]:
    """(the attack's phase, its restoration's phase) for a cell's config."""
    attack = cfg["attack"]
    if attack == "launder":
        return "laundered", "laundered-restored"
    if attack in FT_MODES:
        return ("finetuned-mixed", "finetuned-mixed-restored") if (cfg.get("attack_params") or {}).get(
            "mix_split") else ("finetuned", "restored")
    return attack, f"{attack}-restored"


def phase_rows(cells: list[dict], command: str = "") -> list[dict[str, Any]]:
    """One row per (dataset, watermark, phase): its test and WM accuracy, threshold, ownership, outcome (attack
    phases), seconds, machine, commit and date. A restoration phase appears where the cell ran one. `command`:
    what the rows name as made them (default: `nnlaunder run experiments/paper/<experiment>.toml`)."""
    rows: dict[tuple, dict] = {}
    for c in cells:
        cfg, sm = c["config"], c["summary"]
        base = {"dataset": cfg["dataset"], "arch": cfg.get("arch"), "scheme": cfg["scheme"], "name": scheme_name(cfg),
                "threshold": sm["threshold"], "model": f"{cfg.get('owner_path')}.safetensors",
                **{k: sm.get(k) for k in ("threshold_rule", "tolerance", "machine", "commit", "date")},
                "command": command or f"nnlaunder run experiments/paper/{c['experiment']}.toml"}
        if isinstance(sm.get("threshold_paper"), int | float):
            base["threshold_paper"] = sm["threshold_paper"]
        if (cfg.get("scheme_params") or {}).get("mode"):
            base["mode"] = cfg["scheme_params"]["mode"]
        first = c["rounds"][0]
        rows[(base["dataset"], base["name"], "embedded")] = {
            **base, "phase": "embedded", "test_acc": sm["orig_test_acc"], "wm_acc": sm["orig_wm_acc"],
            "owned": bool(first.get("owned")), "status": first.get("status"), "seconds": 0.0}
        attack, restored = phases(cfg)
        rows[(base["dataset"], base["name"], attack)] = {
            **base, "phase": attack, **{k: sm.get(k) for k in _ATTACK_FIELDS}, "seconds": work_seconds(c)}
        if isinstance(sm.get("restored_wm_acc"), int | float):
            rows[(base["dataset"], base["name"], restored)] = {
                **base, "phase": restored, "test_acc": sm.get("restored_test_acc", math.nan),
                "wm_acc": sm["restored_wm_acc"], "owned": sm.get("restored"), "n_owner": sm.get("n_owner"),
                "seconds": sm.get("restore_seconds", math.nan)}
    return list(rows.values())


_COLORS = {"the owner's model": "tab:gray", "after an attack": "tab:red", "after the owner's restoration": "tab:blue"}


def _kind(phase: str) -> str:
    if phase == "embedded":
        return "the owner's model"
    return "after the owner's restoration" if phase.endswith("restored") else "after an attack"


def _order(phase: str) -> tuple[int, str]:
    return (PHASES.index(phase), "") if phase in PHASES else (len(PHASES), phase)


def phases_plot(rows: list[dict], ds: str, path: Path) -> Path | None:
    """One panel per watermark of `ds`: WM accuracy per phase, the threshold dashed. None when `ds` has no row."""
    rs = [r for r in rows if r["dataset"] == ds]
    names = list(dict.fromkeys(r["name"] for r in rs))
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(4.3 * len(names), 4.1), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        by = {r["phase"]: r for r in rs if r["name"] == name}
        order = sorted(by, key=_order)
        colors = [_COLORS[_kind(p)] for p in order]
        bars = ax.bar(range(len(order)), [by[p]["wm_acc"] for p in order], color=colors)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.axhline(by[order[0]]["threshold"], color="black", lw=1, ls="--",
                   label="threshold")
        for kind in dict.fromkeys(_kind(p) for p in order):
            ax.bar([0], [0], color=_COLORS[kind], label=kind)          # legend entries only
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=35, ha="right", fontsize=7)
        ax.set_ylim(0, 110)
        ax.set_ylabel("watermark accuracy %")
        ax.set_title(name, fontsize=9)
    handles = {lb: h for ax in axes[0] for h, lb in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"{ds}: watermark accuracy after fine-tuning, restoration and laundering", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def phases_table(rows: list[dict]) -> list[str]:
    """Every phase judged as `nnlaunder verify` judges it, one Markdown row per (model, phase)."""
    lines = ["Every phase judged as `nnlaunder verify` judges it: the cells' threshold (the paper's rule in "
             "brackets, where known) and the base-rate check. Outcome of each attack phase "
             "(docs/methods.md#verification-and-verdicts): kept = ownership still shown; destroyed = not shown, "
             f"more than {DEFAULT_TOLERANCE:g} points of test accuracy lost; hidden = not shown, but the owner's "
             "restoration on clean data alone (no triggers) shows it again; removed = not shown, even after "
             "restoration where one ran.", "",
             "| dataset | model | phase | test acc % | WM acc % | threshold % (paper's rule) | ownership shown "
             "| outcome | parameter shift (L2, from the owner's model) | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["name"], _order(r["phase"]))):
        paper = f" ({r['threshold_paper']:.2f})" if "threshold_paper" in r else ""
        shown = {True: "yes", False: "no"}.get(r.get("owned"), "–")
        shift = r.get("shift_from_embedded", r.get("param_shift"))
        lines.append(f"| {r['dataset']} | {r['name']} | {r['phase']} | {r['test_acc']:.2f} | {r['wm_acc']:.2f} | "
                     f"{r['threshold']:.2f}{paper} | {shown} | {r.get('outcome', '')} | "
                     f"{'–' if shift is None else format(shift, '.3f')} | {r['seconds']:.0f} |")
    return lines


def verdicts_table(rows: list[dict]) -> list[str]:
    """Per model that went through every paper phase: the fade, the restoration, and laundering's outcome."""
    lines = ["Fine-tuning fade: WM accuracy lost by fine-tuning (plain / mixed), and the outcome of each; "
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
    return lines


def persistence_section(cells: list[dict], out: Path, images: list[Path]) -> list[str]:
    """The report's section over the persistence cells among `cells` (their plots drawn into `out`); empty when
    there are none."""
    rows = phase_rows(persistence_cells(cells))
    if not rows:
        return []
    md = ["## Persistence and the owner's restoration (Ngo et al. layout)", "", *phases_table(rows), "",
          "### Verdicts", "", *verdicts_table(rows), ""]
    for ds in sorted({r["dataset"] for r in rows}):
        png = phases_plot(rows, ds, out / f"persistence-{ds}.png")
        if png is not None:
            images.append(png)
            md += [f"![{ds}: persistence]({png.name})", ""]
    return md
