"""The report's "Every attack on each watermark" section: the cells of every selected experiment that hit
the same watermark (laundering, the seed paper's battery, NAD, ANP, I-BAU, ...), side by side.

- a test-vs-watermark accuracy plot per watermark, one marker per attack configuration;
- the cheapest attack configuration that removes it, under a rule fixed before any cell was read: a
  configuration (every setting but the seed) removes a watermark when most of its cells end "removed"
  (no ownership shown, the model still usable); the cheapest is the one with the fewest clean images,
  then the fewest attack seconds per cell;
- how many watermarks each attack removes (what `nnlaunder audit --quick` chose its attacks by);
- Gan et al.'s residual watermark accuracies beside ours, for the attacks both ran on CIFAR-10.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import safe_name
from ..models import DEFAULT_ARCH
from ..plots import pareto_plot
from ..watermarks.verify import wilson

# Gan et al. (CVPR 2023), CIFAR-10 ResNet-18, attacker with 20% of the training set: residual WM %.
GAN_ET_AL = {"zhang-content": {"ft": 56.8, "fine-prune": 74.6, "anp": 25.3, "nad": 48.1, "mcr": 16.6, "launder": 21.0},
             "zhang-noise": {"ft": 28.4, "fine-prune": 28.2, "anp": 14.5, "nad": 3.9, "mcr": 11.0, "launder": 1.0},
             "zhang-unrelated": {"ft": 18.8, "fine-prune": 24.6, "anp": 22.3, "nad": 2.8, "mcr": 10.9,
                                 "launder": 67.4}}
# This project's attack for each of their columns (FT: fine-tune all layers; MCR is not in the registry).
GAN_OURS = {"ft": "ftal", "fine-prune": "fine-prune", "anp": "anp", "nad": "nad", "mcr": None, "launder": "launder"}


def scheme_name(cfg: dict) -> str:
    """The watermark a cell attacks: the scheme, with Adi et al.'s mode (adi-pt, adi-fs)."""
    mode = (cfg.get("scheme_params") or {}).get("mode")
    return f"{cfg['scheme']}-{mode}" if cfg["scheme"] == "adi" and mode else cfg["scheme"]


def flat_rows(cells: list[dict]) -> list[dict[str, Any]]:
    """One row per finished cell, as results files keep them: what the cell is (dataset, architecture (the
    dataset's default where the cell names none), scheme with Adi's mode, attack, budget, seed), its summary
    (accuracies, threshold, outcome, machine, commit, date), its seconds, its attack's `work_seconds` and its whole
    config."""
    out = []
    for c in cells:
        cfg = c["config"]
        row = {"experiment": c["experiment"], "cell_id": c["cell_id"], "dataset": cfg["dataset"],
               "arch": cfg.get("arch") or DEFAULT_ARCH.get(cfg["dataset"]), "scheme": cfg["scheme"],
               "name": scheme_name(cfg), "attack": cfg["attack"], "budget": cfg["budget"], "seed": cfg["seed"],
               "rounds": cfg["rounds"]}
        if (cfg.get("scheme_params") or {}).get("mode"):
            row["mode"] = cfg["scheme_params"]["mode"]
        out.append({**row, **c["summary"], "seconds": c["seconds"], "work_seconds": work_seconds(c), "config": cfg})
    return out


@dataclass(frozen=True)
class OverSeeds:
    """One configuration's outcomes over its seeds: every result table's summary of a rate."""

    n: int
    removed: int
    destroyed: int
    wilson95: tuple[float, float]          # the removal rate's 95% Wilson interval
    test_mean: float
    test_sd: float
    wm_median: float
    wm_range: tuple[float, float]

    def rate(self) -> str:
        """"k/n [lo-hi%]": removed over the seeds, with its interval."""
        lo, hi = self.wilson95
        return f"{self.removed}/{self.n} [{100 * lo:.0f}-{100 * hi:.0f}%]"

    def test(self) -> str:
        return f"{self.test_mean:.2f} ± {self.test_sd:.2f}"

    def wm(self) -> str:
        return f"{self.wm_median:.2f} [{self.wm_range[0]:.2f}-{self.wm_range[1]:.2f}]"


def over_seeds(rows: Sequence[Mapping[str, Any]]) -> OverSeeds:
    """Rows (a cell's summary or a result row: `outcome`, `test_acc`, `wm_acc`) of one configuration, summed up:
    removed k/n with its 95% Wilson interval, destroyed, test accuracy mean ± sd, WM accuracy median [range]."""
    if not rows:
        raise ValueError("over_seeds needs at least one row")
    outs = [r.get("outcome") or ("removed" if r.get("removed") else "kept") for r in rows]
    tests, wms = [float(r["test_acc"]) for r in rows], [float(r["wm_acc"]) for r in rows]
    k, n = outs.count("removed"), len(rows)
    return OverSeeds(n=n, removed=k, destroyed=outs.count("destroyed"), wilson95=wilson(k, n),
                     test_mean=statistics.mean(tests), test_sd=statistics.stdev(tests) if n > 1 else 0.0,
                     wm_median=statistics.median(wms), wm_range=(min(wms), max(wms)))


def budget_label(b: Any) -> str:
    return b if isinstance(b, str) else f"{100 * b:.3g}%"


def configurations(cells: list[dict]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """(dataset, watermark) -> label -> the cells of one configuration (all settings but the seed). A label
    is "attack @ budget"; where two configurations share one, it adds their experiment (when theirs
    differ) and the attack settings that tell them apart (an ablation's variants), then a number."""
    by_config: dict[str, list[dict]] = defaultdict(list)
    for c in cells:
        by_config[config_key({**c["config"], "experiment": c["experiment"]})].append(c)
    labelled: dict[tuple[str, str], dict[str, list[list[dict]]]] = defaultdict(lambda: defaultdict(list))
    for cs in by_config.values():
        cfg = cs[0]["config"]
        labelled[(cfg["dataset"], scheme_name(cfg))][f"{cfg['attack']} @ {budget_label(cfg['budget'])}"].append(cs)
    out: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for key, by_label in labelled.items():
        out[key] = {}
        for base, groups in by_label.items():
            for cs in groups:
                label = base if len(groups) == 1 else f"{base} {_told_apart(cs, groups)}".rstrip()
                n, unique = 2, label
                while unique in out[key]:
                    unique, n = f"{label} #{n}", n + 1
                out[key][unique] = cs
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested settings table as one level, nested keys dotted ("retrain.epochs")."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_key(cfg: dict) -> str:
    """A cell config with its seed left out, as text: cells with the same key differ only in their seed."""
    return json.dumps({**cfg, "seed": None}, sort_keys=True, default=str)


def _told_apart(cs: list[dict], groups: list[list[dict]]) -> str:
    """What sets one configuration apart from the others of its label: "(experiment)" where the
    experiments differ, then, among those of its own experiment, "[key=value ...]" for the settings that
    are not the same in all (an ablation's attack options, `calibrate`, ...)."""
    exps = {g[0]["experiment"] for g in groups}
    same = [g for g in groups if g[0]["experiment"] == cs[0]["experiment"]]      # told apart by their settings
    flat = [flatten({k: v for k, v in g[0]["config"].items() if k not in ("seed", "name")}) for g in same]
    mine = flatten({k: v for k, v in cs[0]["config"].items() if k not in ("seed", "name")})
    varying = sorted(k for k in set().union(*flat) if len({json.dumps(f.get(k), default=str) for f in flat}) > 1)
    parts = [f"({cs[0]['experiment']})"] if len(exps) > 1 else []
    shown = [f"{k.removeprefix('attack_params.')}={mine[k]}" for k in varying if k in mine]
    return " ".join(parts + ([f"[{' '.join(shown)}]"] if shown else []))


def reused_nc_seconds(cell: dict) -> float:
    """The seconds of the Neural Cleanse a cell reused from an earlier cell of its workspace (0 if it ran its own)."""
    rounds = cell.get("rounds") or []
    return (rounds[1].get("nc_seconds") or 0.0) if cell["summary"].get("nc_reused") and len(rounds) > 1 else 0.0


def work_seconds(cell: dict) -> float:
    """The seconds a cell's attack costs on its own: its attack's (the whole cell's where those are not kept),
    plus the Neural Cleanse it reused (`reused_nc_seconds`)."""
    sm = cell["summary"]
    return (sm["attack_seconds"] if "attack_seconds" in sm else cell["seconds"]) + reused_nc_seconds(cell)


def _seconds(cs: list[dict]) -> float:
    """A configuration's mean attack seconds per cell (`work_seconds`)."""
    return statistics.mean(work_seconds(c) for c in cs)


def _removes(cs: list[dict]) -> bool:
    return 2 * sum(c["summary"].get("outcome") == "removed" for c in cs) > len(cs)


def cheapest_remover(groups: dict[str, list[dict]]) -> tuple[str, list[dict]] | None:
    """The fixed rule: among the configurations most of whose cells end removed, the one with the fewest
    clean images, then the fewest attack seconds per cell. None: no configuration removes it."""
    ok = [(label, cs) for label, cs in groups.items() if _removes(cs)]
    if not ok:
        return None
    return min(ok, key=lambda t: (t[1][0]["summary"].get("n_clean", math.inf), _seconds(t[1])))


def battery_table(cells: list[dict]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """`configurations` of the watermarks that at least two attacks hit."""
    return {key: groups for key, groups in configurations(cells).items()
            if len({cs[0]["config"]["attack"] for cs in groups.values()}) >= 2}


def remover_lines(table: dict[tuple[str, str], dict[str, list[dict]]]) -> list[str]:
    """The cheapest remover of each watermark (or "none"), with the rule, and how many each attack removes."""
    md = ["Every experiment's cells on the same watermark. An attack configuration (every setting but the seed) "
          "removes a watermark when most of its cells end removed (no ownership shown, at most the tolerance of "
          "test accuracy lost); the cheapest is the one with the fewest clean images, then the fewest attack "
          "seconds per cell (seconds from each cell's own machine).", "",
          "| watermark | configurations | cheapest remover | clean images | removed | test acc % | s / cell |",
          "|---|---|---|---|---|---|---|"]
    for (ds, wm), groups in sorted(table.items()):
        best = cheapest_remover(groups)
        if best is None:
            md.append(f"| {ds}/{wm} | {len(groups)} | none | – | – | – | – |")
            continue
        label, cs = best
        sms = [c["summary"] for c in cs]
        md.append(f"| {ds}/{wm} | {len(groups)} | {label} | {sms[0].get('n_clean', '–')} | "
                  f"{sum(s.get('outcome') == 'removed' for s in sms)}/{len(sms)} | "
                  f"{statistics.mean(s['test_acc'] for s in sms):.2f} | {_seconds(cs):.0f} |")
    return md + _wins_line(table)


def battery_section(cells: list[dict], out: Path, images: list[Path]) -> list[str]:
    """The section, for each watermark that at least two attacks hit; empty when none is."""
    table = battery_table(cells)
    if not table:
        return []
    md = ["## Every attack on each watermark", "", *remover_lines(table), ""]
    for (ds, wm), groups in sorted(table.items()):
        rows = [{"attack": label, "points": [(c["summary"]["test_acc"], c["summary"]["wm_acc"]) for c in cs],
                 "n": len(cs), "removed": sum(c["summary"].get("outcome") == "removed" for c in cs),
                 "threshold": cs[0]["summary"]["threshold"], "orig_test_acc": cs[0]["summary"]["orig_test_acc"],
                 "orig_wm_acc": cs[0]["summary"]["orig_wm_acc"]} for label, cs in sorted(groups.items())]
        png = pareto_plot(rows, "", out / safe_name(f"attacks-{ds}-{wm}.png"), f"{ds}/{wm}: every attack")
        images.append(png)
        md += [f"![{ds}/{wm}: every attack]({png.name})", ""]
    return md + gan_lines(table)


def _wins_line(table: dict[tuple[str, str], dict[str, list[dict]]]) -> list[str]:
    """How many watermarks each attack removes (in any of its configurations)."""
    wins: dict[str, set] = defaultdict(set)
    for key, groups in table.items():
        for cs in groups.values():
            wins[cs[0]["config"]["attack"]].update([key] if _removes(cs) else [])
    ranked = sorted(wins, key=lambda a: (-len(wins[a]), a))
    return ["", "Watermarks each attack removes (of those it ran on, in any configuration): "
            + ", ".join(f"{a} {len(wins[a])}" for a in ranked) + "."]


def gan_lines(table: dict[tuple[str, str], dict[str, list[dict]]]) -> list[str]:
    """Gan et al.'s residual WM % beside ours (the median over an attack's cells at their budget, 20%, and at
    Table 2's 0.6%) where this report holds CIFAR-10 Zhang et al. watermarks."""
    if not any(("cifar10", s) in table for s in GAN_ET_AL):
        return []
    lines = ["## Beside Gan et al. (CVPR 2023)", "",
             "Their figures: CIFAR-10 ResNet-18, attacker with 20% of the training set, residual WM %. Ours: the "
             "median residual WM % over an attack's cells with 20% of the training set, then with 0.6% (– where "
             "none ran).", "",
             "| watermark | " + " | ".join(f"{c} (theirs / ours 20% / ours 0.6%)" for c in GAN_OURS) + " |",
             "|---|" + "---|" * len(GAN_OURS)]
    for scheme, theirs in GAN_ET_AL.items():
        groups = table.get(("cifar10", scheme), {})
        cells = []
        for col, ours in GAN_OURS.items():
            medians = []
            for budget in (0.2, 0.006):
                wms = [c["summary"]["wm_acc"] for cs in groups.values() for c in cs
                       if ours and c["config"]["attack"] == ours and c["config"]["budget"] == budget]
                medians.append(f"{statistics.median(wms):.1f}" if wms else "–")
            cells.append(f"{theirs[col]:.1f} / " + " / ".join(medians))
        lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return lines + [""]
