"""Re-decide stored Table 2 rows under the project's verdict rules, and say what changed.

Every row of table2-seeds.json (the strong attack over attacker seeds), table2-ablation.json and
baselines.json gets:
  threshold          the default rule's threshold for its (dataset, watermark) (verdicts.json)
  threshold_rule     "converged"
  threshold_paper    the paper's rule, as the row was decided before
  p_value            the threshold test against the new threshold
  owned              the verdict's threshold test (hits from wm_acc x n); the base-rate check needs the
                     attacked model, which these rows did not keep: it can only turn "owned" into "no
                     evidence", so a row kept here may be removed when re-run, never the reverse
  test_drop          owner's test accuracy minus the attacked model's, points
  tolerance          3.0
  outcome            kept / removed / destroyed (no restoration ran: nothing can be "hidden")
  removed            outcome == "removed";  removed_paper: the stored verdict (paper's rule, no utility)
and benchmarks/results/what-changed.md lists, per row, the old and new verdicts and why.

    python benchmarks/redecide.py && python benchmarks/table2_seeds.py --markdown-only \
        && python benchmarks/baselines.py --markdown-only
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from nnlaunder.checkpoint import atomic_write_json
from nnlaunder.watermarks.verify import DEFAULT_TOLERANCE, outcome, verdict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def row_name(r: dict) -> str:
    if r.get("scheme") == "adi":
        return f"adi-{r['mode']}" if r.get("mode") else str(r["name"])
    return str(r.get("name") or r["scheme"])


def redecide_row(r: dict, t: dict) -> tuple[str, object, float]:
    """Add the new rule's fields to a stored row; returns (outcome, verdict, test drop)."""
    old_removed = r.get("removed_paper", r["removed"])
    old_th = r.get("threshold_paper", r["threshold"])
    n = int(t["n_verify"])
    v = verdict(round(r["wm_acc"] * n / 100), n, t["threshold"])
    drop = r["orig_test_acc"] - r["test_acc"]
    out = outcome(v.owned, drop, None, DEFAULT_TOLERANCE)
    r.update(threshold=t["threshold"], threshold_rule="converged", threshold_paper=old_th, p_value=v.p_value,
             p_log10=v.p_log10, owned=v.owned, test_drop=drop, tolerance=DEFAULT_TOLERANCE, outcome=out,
             removed=out == "removed", removed_paper=old_removed, n_verify=n)
    return out, v, drop


def main() -> int:
    th = {(t["dataset"], t["row"]): t for t in json.loads((RESULTS / "verdicts.json").read_text())["thresholds"]
          if t["default"]}
    others: dict[str, dict[tuple[str, str], int]] = {}
    for extra in ("table2-ablation.json", "baselines.json"):   # the same rules; their tables show the outcomes
        more = json.loads((RESULTS / extra).read_text())
        moves: dict[tuple[str, str], int] = defaultdict(int)
        for r in more:
            out, _, _ = redecide_row(r, th[(r["dataset"], row_name(r))])
            moves[("removed" if r["removed_paper"] else "kept", out)] += 1
        atomic_write_json(RESULTS / extra, more)
        others[extra] = moves
    path = RESULTS / "table2-seeds.json"
    rows = json.loads(path.read_text())
    changes: dict[tuple, list[tuple[str, str, str]]] = defaultdict(list)
    for r in rows:
        k = (r["dataset"], row_name(r))
        t = th[k]
        old = "removed" if r.get("removed_paper", r["removed"]) else "kept"
        old_th = r.get("threshold_paper", r["threshold"])
        out, v, drop = redecide_row(r, t)
        if old != out:
            why = []
            if (r["wm_acc"] < old_th) != (r["wm_acc"] < t["threshold"]):
                why.append(f"threshold {old_th:.2f}% (paper) -> {t['threshold']:.2f}% (converged); "
                           f"WM {r['wm_acc']:.2f}%")
            if out == "destroyed":
                why.append(f"test accuracy fell {drop:.2f} points (> {DEFAULT_TOLERANCE})")
            if not v.owned and r["wm_acc"] >= t["threshold"]:
                why.append(f"above the threshold but not significantly (p {v.p_value:.3g})")
            changes[k].append((f"seed {r['seed']}", f"{old} -> {out}", "; ".join(why)))
        else:
            changes[k].append((f"seed {r['seed']}", "unchanged", out))
    atomic_write_json(path, rows)
    md = ["# What changed under the verdict rules", "",
          "`python benchmarks/redecide.py`: the stored Table 2 rows (table2-seeds.json, strong attack) re-decided "
          "with the default `converged` threshold (verdicts.json) in place of the paper's rule, and with the "
          "3-point tolerance of test accuracy (a model that lost more is destroyed, not removed). Rows are "
          "decided by the threshold test on their stored watermark accuracy; the base-rate check needs the "
          "attacked models, which these rows did not keep.", "",
          "| row | threshold % paper -> converged | old verdict (paper's rule) | new outcomes "
          "| changed seeds and why |",
          "|---|---|---|---|---|"]
    for k in sorted(changes):
        rs = [r for r in rows if (r["dataset"], row_name(r)) == k]
        olds = sum(bool(r["removed_paper"]) for r in rs)
        news = defaultdict(int)
        for r in rs:
            news[r["outcome"]] += 1
        changed = [f"{s}: {c} ({w})" for s, c, w in changes[k] if c != "unchanged"]
        md.append(f"| {k[0]}/{k[1]} | {rs[0]['threshold_paper']:.2f} -> {rs[0]['threshold']:.2f} | removed {olds}/"
                  f"{len(rs)} | {', '.join(f'{o} {c}' for o, c in sorted(news.items()))} | "
                  f"{'; '.join(changed) or 'none'} |")
    md += ["", "Other stored rows, re-decided the same way (old verdict under the paper's rule -> new outcome: rows):",
           "", "| file | changes | unchanged |", "|---|---|---|"]
    for f, moves in others.items():
        changed = ", ".join(f"{a} -> {b}: {k}" for (a, b), k in sorted(moves.items()) if a != b) or "none"
        same = ", ".join(f"{a}: {k}" for (a, b), k in sorted(moves.items()) if a == b) or "none"
        md.append(f"| {f} | {changed} | {same} |")
    (RESULTS / "what-changed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
