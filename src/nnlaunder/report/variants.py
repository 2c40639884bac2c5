"""The ablation layout: variants of an attack against a control on the same seeds.

A variant is a configuration that departs from the control's (same dataset, watermark and attack) in its
settings: `departure` names how. Each variant is compared with the control's runs on the seeds the variant ran
on, on the same machine (a run's outcome can move across processors, so a pairing across them would compare
machines). `nnlaunder report --control EXPERIMENT` renders it for every other experiment in the report.

Rows are result rows (`build.flat_rows`): `dataset`, `name` (the watermark), `seed`, `machine`, `outcome`,
`test_acc`, `wm_acc`, `threshold`, `commit`, and here `variant`, the label the table shows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .battery import config_key, flat_rows, flatten, over_seeds, scheme_name


@functools.cache
def _defaults() -> dict[str, Any]:
    """A cell config's settings at their defaults: a cell stored before a setting existed ran at its default."""
    from ..experiments.config import CellConfig

    return {f.name: f.default for f in dataclasses.fields(CellConfig)
            if f.default is not dataclasses.MISSING and f.name not in ("seed", "name")}


def departure(cfg: dict, control: dict) -> str:
    """How cell config `cfg` departs from `control`: each setting that differs, the seed and the experiment's
    name aside ("bn_stats=reestimate"; an attack setting by its own name, a nested one dotted:
    "retrain.epochs=5"; any other by its config key: "budget=0.2"). "" where it does not depart."""
    def flat(c: dict) -> dict[str, Any]:
        out = flatten({**_defaults(), **{k: v for k, v in c.items() if k not in ("seed", "name")}})
        return {k.removeprefix("attack_params."): v for k, v in out.items()}

    mine, theirs = flat(cfg), flat(control)
    return ", ".join(f"{k}={json.dumps(mine.get(k))}" for k in sorted(set(mine) | set(theirs))
                     if mine.get(k) != theirs.get(k))


def _same_model(a: dict, b: dict) -> bool:
    """Two cell configs that attack the same watermark of the same dataset with the same attack."""
    return (a["dataset"], scheme_name(a), a["attack"]) == (b["dataset"], scheme_name(b), b["attack"])


def control_cells(control: list[dict]) -> list[dict]:
    """The control's reference configuration per model (its first cell's, seed aside) and the cells that run it:
    a control experiment that holds several configurations of one model is compared through the first only."""
    refs: list[dict] = []
    for c in control:
        if not any(_same_model(r["config"], c["config"]) for r in refs):
            refs.append(c)
    keep = {config_key(r["config"]) for r in refs}
    return [c for c in control if config_key(c["config"]) in keep]


def label_cells(cells: list[dict], control: list[dict]) -> list[tuple[dict, str]]:
    """Each of `cells` with its label: how it departs from the control cell of the same model (the first of
    `control`'s cells on it); cells whose model no control cell attacks are left out."""
    out = []
    for c in cells:
        ref = next((k["config"] for k in control if _same_model(k["config"], c["config"])), None)
        if ref is not None:
            out.append((c, departure(c["config"], ref) or "as the control"))
    return out


def paired(control: list[dict], rs: list[dict]) -> list[dict]:
    """The control's rows that variant rows `rs` are compared with: the same seed, run on the same machine."""
    keys = {(r["seed"], r["machine"]) for r in rs}
    return sorted((c for c in control if (c["seed"], c["machine"]) in keys), key=lambda c: (c["seed"], c["machine"]))


def _model(r: dict) -> tuple[str, str, str]:
    """What a row attacks: (dataset, watermark, attack; "" where a stored row names none)."""
    return r["dataset"], r["name"], r.get("attack", "")


def _of(rows: list[dict], model: tuple, variant: str) -> list[dict]:
    return sorted((r for r in rows if _model(r) == model and r["variant"] == variant), key=lambda r: r["seed"])


def _closest(model: tuple, base: list[dict], rs_all: list[dict], control: str) -> list[str]:
    """Where no variant removes the watermark, the one that lowers its median WM accuracy most against the
    control on the same seeds."""
    if any(r["outcome"] == "removed" for r in rs_all):
        return []
    best = None
    for v in sorted({r["variant"] for r in rs_all}):
        rs = [r for r in rs_all if r["variant"] == v]
        same = paired(base, rs)
        if same:
            drop = statistics.median(r["wm_acc"] for r in same) - statistics.median(r["wm_acc"] for r in rs)
            if best is None or drop > best[0]:
                best = (drop, v, rs, same)
    if best is None or best[0] <= 0:
        return []
    _, v, rs, same = best
    outcomes = ", ".join(f"{o} {sum(r['outcome'] == o for r in rs)}" for o in sorted({r["outcome"] for r in rs}))
    return [f"- {'/'.join(model[:2])}: no variant removes it from a usable model; {v} lowers the median WM accuracy "
            f"most, {statistics.median(r['wm_acc'] for r in same):.2f}% → "
            f"{statistics.median(r['wm_acc'] for r in rs):.2f}% on seeds {','.join(str(r['seed']) for r in rs)} "
            f"(threshold {rs[0]['threshold']:.2f}%; outcomes {outcomes}), at a test accuracy of "
            f"{statistics.mean(r['test_acc'] for r in rs):.2f}% ({control}: "
            f"{statistics.mean(r['test_acc'] for r in same):.2f}%)."]


def _row(label: str, v: str, rs: list[dict], same: list[dict]) -> str:
    s = over_seeds(rs)
    ref = ""
    if same:
        b = over_seeds(same)
        ref = f"{b.removed}/{b.n}, {b.test_mean:.2f}"
    return (f"| {label} | {v} | {','.join(str(x['seed']) for x in rs)} | {s.rate()} | {s.test()} | {s.wm()} | {ref} "
            f"| {', '.join(sorted({r['commit'] for r in rs}))} |")


def variants_lines(rows: list[dict], control: list[dict], order: Sequence[str] = (),
                   control_name: str = "control") -> list[str]:
    """The table (per model the control, then each variant in `order`, then the rest by name) and what each
    variant does: where it removes more often than the control on the same seeds, and, for a model no variant
    removes, the variant that lowers the median WM accuracy most."""
    lines = [f"| row | variant | seeds | removed | test acc % | WM acc % | {control_name} on the same seeds: "
             "removed, test % | commit |", "|---|---|---|---|---|---|---|---|"]
    findings: list[str] = []
    for model in dict.fromkeys(_model(r) for r in rows):
        rs_all = [r for r in rows if _model(r) == model]
        base = paired([r for r in control if _model(r) == model], rs_all)
        findings += _closest(model, base, rs_all, control_name)
        names = sorted({r["variant"] for r in rs_all}, key=lambda v: (order.index(v) if v in order else len(order), v))
        if base:
            lines.append(_row("/".join(model[:2]), control_name, base, []))
        for i, v in enumerate(names):
            rs = _of(rows, model, v)
            same = paired(base, rs)
            lines.append(_row("" if base or i else "/".join(model[:2]), v, rs, same))
            sv, sb = over_seeds(rs), over_seeds(same) if same else None
            if sb and sv.removed > sb.removed:
                findings.append(f"- {'/'.join(model[:2])}: {v} removes the watermark in {sv.removed}/{sv.n} seeds "
                                f"against {sb.removed}/{sb.n} for {control_name} on the same seeds, at a test "
                                f"accuracy of {statistics.mean(r['test_acc'] for r in rs):.2f}% ({control_name}: "
                                f"{statistics.mean(r['test_acc'] for r in same):.2f}%).")
    return [*lines, "", "### What each variant does", "",
            *(findings or [f"- No variant removes a watermark more often than the {control_name} on the same seeds."]),
            "", f"A model or variant not listed above removes no more often than the {control_name} on the seeds run."]


_OUTCOME_COLORS = {"removed": "tab:green", "destroyed": "tab:gray", "hidden": "tab:orange", "kept": "tab:red"}


def variants_plot(rows: list[dict], control: list[dict], path: Path, control_name: str = "control") -> Path | None:
    """One panel per model: each seed's WM accuracy per configuration (the control's paired seeds first), coloured
    by its outcome, the threshold dashed. None when there is no row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(_model(r) for r in rows))
    if not models:
        return None
    sizes = [len({r["variant"] for r in rows if _model(r) == m}) + 1 for m in models]     # rows per panel
    fig, axes = plt.subplots(len(models), 1, figsize=(7.5, sum(0.9 + 0.32 * n for n in sizes)), squeeze=False,
                             height_ratios=sizes)
    for ax, model in zip(axes[:, 0], models, strict=True):
        rs_all = [r for r in rows if _model(r) == model]
        groups = [(control_name, paired([r for r in control if _model(r) == model], rs_all))]
        groups += [(v, _of(rows, model, v)) for v in sorted({r["variant"] for r in rs_all})]
        groups = [(v, rs) for v, rs in groups if rs]
        for y, (_, rs) in enumerate(groups):
            ax.scatter([r["wm_acc"] for r in rs], [y] * len(rs), s=18, zorder=3,
                       c=[_OUTCOME_COLORS.get(r.get("outcome") or "", "black") for r in rs])
        ax.axvline(rs_all[0]["threshold"], color="black", lw=1, ls="--")
        ax.set_yticks(range(len(groups)))
        ax.set_yticklabels([v if len(v) <= 40 else v[:37] + "..." for v, _ in groups], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(-2, 102)
        ax.set_title("/".join(model[:2]), fontsize=8)
    axes[-1, 0].set_xlabel("watermark accuracy % per seed (dashed: threshold)")
    for outcome, color in _OUTCOME_COLORS.items():
        axes[0, 0].scatter([], [], c=color, s=18, label=outcome)
    fig.legend(loc="lower center", ncol=len(_OUTCOME_COLORS), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def variants_section(cells: list[dict], control: str, out: Path | None = None,
                     images: list[Path] | None = None) -> list[str]:
    """The report's section: every cell outside experiment `control` against `control`'s cells of the same model
    on the same seeds, and its plot in `out` (added to `images`); empty when no cell departs from one of
    `control`'s."""
    ctl = control_cells([c for c in cells if c["experiment"] == control])
    labelled = label_cells([c for c in cells if c["experiment"] != control], ctl)
    if not labelled:
        return []
    rows = [{**r, "variant": label} for r, (_, label) in zip(flat_rows([c for c, _ in labelled]), labelled,
                                                              strict=True)]
    md = ["", f"## Variants against {control} on the same seeds (ablation layout)", "",
          f"Each variant is named by how its settings depart from {control}'s on the same model, and compared with "
          f"{control}'s cells on the seeds it ran, on the same machine. Removed (95% Wilson interval), test "
          "accuracy mean ± sd, WM accuracy median [range].", "",
          *variants_lines(rows, flat_rows(ctl), control_name=control)]
    png = variants_plot(rows, flat_rows(ctl), out / "variants.png", control) if out is not None else None
    if png is not None and images is not None:
        images.append(png)
        md += ["", f"![variants against {control}]({png.name})"]
    return md
