"""Benchmark: does the fast Neural Cleanse preset hand laundering the class the faithful one would, and does a
Table 2 outcome depend on which preset ran?

    nnlaunder run experiments/paper/table2-cifar10.toml --workspace runs/paper               # the fast preset
    nnlaunder run experiments/paper/table2-nc-faithful-cifar10.toml --workspace runs/paper   # Wang et al.'s own
    python benchmarks/perf/nc_check.py                                                       # pairs them

Both experiment files run the same Table 2 cells (owner model, attacker seed, subset, laundering settings) and
differ only in the Neural Cleanse preset. Laundering's strong variant acts on the flagged class(es), else the
smallest-mask one, so that choice is what must agree: per row, on how many seeds the smallest class and the
flagged set are the same (the bar: at least 4 of 5), the Spearman correlation of the ten mask sizes (from the
round-1 triggers the runner keeps in the workspace), Neural Cleanse's seconds, and each cell's outcome. Writes
benchmarks/results/table2-nc-check.json (one row per pair) and .md. Rows stored before for a pair the store does
not hold yet stay, with their own preset, command and commit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, engine_cells, stored, write  # noqa: E402

from nnlaunder.report.battery import scheme_name  # noqa: E402

OUT = "table2-nc-check.json"
PRESETS = {"fast": "table2-cifar10", "faithful": "table2-nc-faithful-cifar10"}
ORDER = ["zhang-content", "zhang-noise", "zhang-unrelated", "adi-pt", "adi-fs"]


def _l1(ws: Path, cell_id: str) -> list[float] | None:
    f = ws / "triggers" / f"{cell_id}-round01.safetensors"
    if not f.is_file():
        return None
    with safe_open(str(f), "pt") as st:
        return st.get_tensor("l1").tolist()


def _side(ws: Path, c: dict) -> dict:
    r1, l1 = c["rounds"][1], _l1(ws, c["cell_id"])
    smallest = min(range(len(l1)), key=l1.__getitem__) if l1 else None
    s = c["summary"]
    return {"cell_id": c["cell_id"], "smallest": smallest, "flagged": r1.get("flagged"), "used": r1.get("used"),
            "l1": l1, "nc_seconds": r1.get("nc_seconds"), "outcome": s.get("outcome"), "test_acc": s.get("test_acc"),
            "wm_acc": s.get("wm_acc"), "machine": s.get("machine"), "commit": s.get("commit"), "date": s.get("date")}


def _spearman(a: list[float] | None, b: list[float] | None) -> float | None:
    if not a or not b:
        return None
    ra, rb = (torch.argsort(torch.argsort(torch.tensor(v))).double() for v in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def pairs(ws: Path) -> list[dict]:
    """One row per (watermark, seed) that both experiments finished."""
    cells, _ = engine_cells(ws, list(PRESETS.values()))
    by = {(c["experiment"], scheme_name(c["config"]), c["config"]["seed"]): c for c in cells}
    rows = []
    for (exp, name, seed), faithful in sorted(by.items()):
        fast = by.get((PRESETS["fast"], name, seed))
        if exp != PRESETS["faithful"] or fast is None:
            continue
        a, b = _side(ws, fast), _side(ws, faithful)
        rows.append({"dataset": "cifar10", "name": name, "seed": seed, "fast": a, "faithful": b,
                     "same_smallest": a["smallest"] == b["smallest"], "same_flagged": a["flagged"] == b["flagged"],
                     "same_used": a["used"] == b["used"], "same_outcome": a["outcome"] == b["outcome"],
                     "spearman": _spearman(a["l1"], b["l1"]), "preset": "fast",
                     "command": " && ".join(f"nnlaunder run experiments/paper/{e}.toml --workspace runs/paper"
                                            for e in PRESETS.values()) + " && python benchmarks/perf/nc_check.py"})
    return rows


def merged(new: list[dict]) -> list[dict]:
    """The pairs from the store, and each row stored before for a (watermark, seed) they do not cover."""
    have = {(r["name"], r["seed"]) for r in new}
    return new + [r for r in stored(OUT) if (r["name"], r["seed"]) not in have]


def _named(r: dict) -> str:
    return f"{r['name']} seed {r['seed']}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def markdown(rows: list[dict]) -> str:
    lines = ["# Neural Cleanse: does the fast preset rank classes as the faithful one does?", "",
             "Each Table 2 CIFAR-10 cell (experiments/paper/table2-cifar10.toml, the fast preset) against its twin "
             "with Wang et al.'s own Neural Cleanse (table2-nc-faithful-cifar10.toml): same owner model, attacker "
             "seed, subset and laundering settings. The strong attack acts on the flagged class(es), else the "
             "smallest-mask one, so that is what must agree (the bar: the same smallest class and flagged set on at "
             "least 4 of 5 seeds). `python benchmarks/perf/nc_check.py`.", "",
             "| row | seeds | same smallest class | same flagged set | class(es) the attack used, fast / faithful | "
             "Spearman of mask sizes (median) | NC seconds fast / faithful (mean) | same outcome |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ORDER:
        rs = sorted((r for r in rows if r["name"] == name and r.get("preset") == "fast"), key=lambda r: r["seed"])
        if not rs:
            continue
        rho = [r["spearman"] for r in rs if r["spearman"] is not None]
        used = "; ".join(f"{r['seed']}: {r['fast']['used']} / {r['faithful']['used']}" for r in rs)
        lines.append(f"| cifar10/{name} | {len(rs)} | {sum(r['same_smallest'] for r in rs)}/{len(rs)} | "
                     f"{sum(r['same_flagged'] for r in rs)}/{len(rs)} | {used} | "
                     f"{statistics.median(rho) if rho else float('nan'):.2f} | "
                     f"{statistics.mean(r['fast']['nc_seconds'] for r in rs):.0f} / "
                     f"{statistics.mean(r['faithful']['nc_seconds'] for r in rs):.0f} | "
                     f"{sum(r['same_outcome'] for r in rs)}/{len(rs)} |")
    lines += ["", "Each pair's outcomes (kept / hidden / removed / destroyed, WM %), fast / faithful:", ""]
    lines += [f"- cifar10/{r['name']} seed {r['seed']}: {r['fast']['outcome']} ({_pct(r['fast']['wm_acc'])}) / "
              f"{r['faithful']['outcome']} ({_pct(r['faithful']['wm_acc'])})"
              for n in ORDER for r in sorted(rows, key=lambda r: r["seed"]) if r["name"] == n and "fast" in r
              and isinstance(r["fast"], dict)]
    old = [r for r in rows if r.get("preset") != "fast"]
    if old:
        lines += ["", "Stored before, for pairs the store does not hold yet: Neural Cleanse alone (no laundering) with "
                  "the `fast-bf16` preset of the time (bf16, no plan tuning, masks not confirmed) against the faithful "
                  "one, by `python benchmarks/perf/nc_check.py` of its commit:", "",
                  "| row, seed | smallest class fast / faithful | flagged fast / faithful | Spearman | seconds "
                  "| commit |",
                  "|---|---|---|---|---|---|",
                  *[f"| cifar10/{_named(r)} | {r['smallest']['fast']} / {r['smallest']['faithful']} | "
                    f"{r['flagged']['fast']} / {r['flagged']['faithful']} | {r['spearman']:.2f} | "
                    f"{r['seconds']['fast']:.0f} / {r['seconds']['faithful']:.0f} | {r['commit']} |" for r in old]]
    machines = sorted({s["machine"] for r in rows if isinstance(r.get("fast"), dict)
                       for s in (r["fast"], r["faithful"]) if s.get("machine")})
    return "\n".join([*lines, "", f"Machines: {'; '.join(machines) or '–'}. The watermark's class is 0 (airplane) in "
                      "every Zhang row.", ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default=str(ROOT / "runs" / "paper"), help="the engine's workspace")
    args = ap.parse_args(argv)
    rows = merged(pairs(Path(args.workspace)))
    write(OUT, rows)
    write("table2-nc-check.md", markdown(rows))
    print(f"table2-nc-check: {sum(r.get('preset') == 'fast' for r in rows)} pairs from the store")
    return 0


if __name__ == "__main__":
    sys.exit(main())
