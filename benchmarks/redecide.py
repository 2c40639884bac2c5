"""What changed under the project's verdict rules: the stored rows, re-decided, against the engine's re-runs.

    python benchmarks/redecide.py            # writes what-changed.md (reads only)

The rows stored before the verdict rules (table2-seeds-previous.json: the strong attack over attacker seeds;
table2-ablation-previous.json; baselines-previous.json) were re-decided in place once, from their stored
accuracies (the migration: `--apply` of `git show 6468277:benchmarks/redecide.py`): each gained the default
rule's threshold (`threshold`, `threshold_rule` "converged", the paper's in `threshold_paper`), the threshold
test (`p_value`, `owned`: hits from wm_acc x n; the base-rate check needs the attacked model, which these rows
did not keep, so a row kept here may be removed when re-run, never the reverse), `test_drop`, `tolerance`
3.0, `outcome` (kept / removed / destroyed; no restoration ran, so nothing is "hidden"), and `removed_paper`,
the stored verdict under the paper's rule. what-changed.md lists, per Table 2 row, the old and new verdicts and
why; then what the re-runs through the engine (table2-seeds.json, baselines.json: decided with the base-rate
check on the attacked model, and the owner's restoration for the battery) changed against those stored rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict

from common import stored, write

PREVIOUS = "table2-seeds-previous.json"


def row_name(r: dict) -> str:
    if r.get("scheme") == "adi":
        return f"adi-{r['mode']}" if r.get("mode") else str(r["name"])
    return str(r.get("name") or r["scheme"])


def why_changed(r: dict) -> str:
    """Why a stored row's outcome under the new rules differs from its verdict under the paper's rule."""
    why = []
    if (r["wm_acc"] < r["threshold_paper"]) != (r["wm_acc"] < r["threshold"]):
        why.append(f"threshold {r['threshold_paper']:.2f}% (paper) -> {r['threshold']:.2f}% (converged); "
                   f"WM {r['wm_acc']:.2f}%")
    if r["outcome"] == "destroyed":
        why.append(f"test accuracy fell {r['test_drop']:.2f} points (> {r['tolerance']})")
    if not r["owned"] and r["wm_acc"] >= r["threshold"]:
        why.append(f"above the threshold but not significantly (p {r['p_value']:.3g})")
    return "; ".join(why)


def rule_section(rows: list[dict]) -> list[str]:
    md = ["| row | threshold % paper -> converged | old verdict (paper's rule) | new outcomes "
          "| changed seeds and why |", "|---|---|---|---|---|"]
    for k in sorted({(r["dataset"], row_name(r)) for r in rows}):
        rs = [r for r in rows if (r["dataset"], row_name(r)) == k]
        news: dict[str, int] = defaultdict(int)
        for r in rs:
            news[r["outcome"]] += 1
        changed = [f"seed {r['seed']}: {'removed' if r['removed_paper'] else 'kept'} -> {r['outcome']} "
                   f"({why_changed(r)})" for r in rs if ("removed" if r["removed_paper"] else "kept") != r["outcome"]]
        md.append(f"| {k[0]}/{k[1]} | {rs[0]['threshold_paper']:.2f} -> {rs[0]['threshold']:.2f} | removed "
                  f"{sum(bool(r['removed_paper']) for r in rs)}/{len(rs)} | "
                  f"{', '.join(f'{o} {c}' for o, c in sorted(news.items()))} | {'; '.join(changed) or 'none'} |")
    return md


def _counts(rs: list[dict]) -> str:
    c: dict[str, int] = defaultdict(int)
    for r in rs:
        c[r["outcome"]] += 1
    return ", ".join(f"{o} {k}" for o, k in sorted(c.items()))


def _seed_change(old: dict, new: dict) -> str:
    """One seed whose outcome moved between the stored row and the re-run, and what moved with it."""
    bits = [f"WM {old['wm_acc']:.2f} -> {new['wm_acc']:.2f}% (threshold {new['threshold']:.2f}%)",
            f"test drop {old['test_drop']:.2f} -> {new['test_drop']:.2f} points"]
    if old.get("used_triggers") != new.get("used_triggers"):
        bits.append(f"triggers used {old.get('used_triggers')} -> {new.get('used_triggers')}")
    if new.get("status") == "no evidence":
        bits.append("no evidence beyond the model's base rate")
    return (f"seed {new['seed']}: {old['outcome']} -> {new['outcome']} ({'; '.join(bits)})")


def rerun_section(previous: list[dict], rerun: list[dict]) -> list[str]:
    """The re-run against the stored rows, seed by seed (the stored rows' fast-bf16 runs)."""
    md = ["| row | stored: commits | stored outcomes | re-run outcomes | WM % median, stored -> re-run "
          "| test % mean, stored -> re-run | seeds whose outcome moved |", "|---|---|---|---|---|---|---|"]
    for k in sorted({(r["dataset"], row_name(r)) for r in rerun}):
        new = sorted((r for r in rerun if (r["dataset"], row_name(r)) == k), key=lambda r: r["seed"])
        seeds = {r["seed"] for r in new}
        old = {r["seed"]: r for r in previous if (r["dataset"], row_name(r)) == k and r["seed"] in seeds
               and r["nc_preset"] == "fast-bf16"}
        olds = [old[s] for s in sorted(old)]
        moved = [_seed_change(old[r["seed"]], r) for r in new if r["seed"] in old
                 and old[r["seed"]]["outcome"] != r["outcome"]]
        wm = [statistics.median(r["wm_acc"] for r in rs) for rs in (olds, new)]
        test = [statistics.mean(r["test_acc"] for r in rs) for rs in (olds, new)]
        md.append(f"| {k[0]}/{k[1]} | {len({r['commit'] for r in olds})} | {_counts(olds)} | {_counts(new)} | "
                  f"{wm[0]:.2f} -> {wm[1]:.2f} | {test[0]:.2f} -> {test[1]:.2f} | {'; '.join(moved) or 'none'} |")
    commits = sorted({r["commit"] for r in rerun})
    return md + ["", f"Re-run commit(s): {', '.join(commits)}; machine(s): "
                     f"{'; '.join(sorted({r['machine'] for r in rerun}))}."]


def others_section() -> list[str]:
    md = ["| file | changes | unchanged |", "|---|---|---|"]
    for f in ("table2-ablation-previous.json", "baselines-previous.json"):
        moves: dict[tuple[str, str], int] = defaultdict(int)
        for r in stored(f):
            moves[("removed" if r["removed_paper"] else "kept", r["outcome"])] += 1
        changed = ", ".join(f"{a} -> {b}: {k}" for (a, b), k in sorted(moves.items()) if a != b) or "none"
        same = ", ".join(f"{a}: {k}" for (a, b), k in sorted(moves.items()) if a == b) or "none"
        md.append(f"| {f} | {changed} | {same} |")
    return md


def _why_moved(r: dict) -> str:
    """What the re-run's verdict saw that the stored row could not."""
    if r["outcome"] == "hidden":
        return f"the owner's restoration brings it back ({r['restored_wm_acc']:.2f}%)"
    if not r["owned"] and r["wm_acc"] >= r["threshold"]:
        return "above the threshold, but no evidence beyond the model's base rate (it answers the target class anyway)"
    return ""


def baselines_section() -> list[str]:
    """The seed paper's battery as stored (baselines-previous.json, re-decided from its accuracies) against
    its re-run through the engine (baselines.json: the base-rate check and the owner's restoration)."""
    def key(r: dict) -> tuple:
        return (r["dataset"], r["name"], r["attack"], float(r["budget"]))

    old = {key(r): r for r in stored("baselines-previous.json")}
    new = [r for r in stored("baselines.json") if r.get("commit")]
    if not new:
        return ["baselines.json holds no re-run row yet."]
    md = ["| dataset | model | attack | budget | stored | re-run | WM %, stored -> re-run | test %, stored -> re-run "
          "| why |", "|---|---|---|---|---|---|---|---|---|"]
    same = 0
    for r in sorted(new, key=key):
        o = old.get(key(r))
        if o is None or o["outcome"] == r["outcome"]:
            same += o is not None
            continue
        md.append(f"| {r['dataset']} | {r['name']} | {r['attack']} | {float(r['budget']):.1%} | {o['outcome']} | "
                  f"{r['outcome']} | {o['wm_acc']:.2f} -> {r['wm_acc']:.2f} | "
                  f"{o['test_acc']:.2f} -> {r['test_acc']:.2f} | {_why_moved(r)} |")
    return [f"{len(new)} cells re-run at {', '.join(sorted({r['commit'] for r in new}))}; {same} ended as the stored "
            f"row was re-decided, {len(md) - 2} moved:", "", *md]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    previous, rerun = stored(PREVIOUS), stored("table2-seeds.json")
    md = ["# What changed under the verdict rules", "",
          "`python benchmarks/redecide.py`. First, the stored Table 2 rows (table2-seeds-previous.json: the strong "
          "attack over attacker seeds, run at the commits each row names) re-decided with the default `converged` "
          "threshold (verdicts.json) in place of the paper's rule, and with the 3-point tolerance of test accuracy "
          "(a model that lost more is destroyed, not removed). These rows are decided by the threshold test on "
          "their stored watermark accuracy; the base-rate check needs the attacked models, which they did not keep.",
          "", *rule_section(previous), ""]
    if rerun:
        md += ["## The re-run", "",
               "table2-seeds.json: every row and seed run again (the engine's cells of "
               "experiments/paper/table2-*.toml, whose attack code is the same at the commits they name) with the "
               "library's fast Neural Cleanse "
               "preset (masks confirmed on all the attacker's images; the stored rows used fast-bf16, whose masks "
               "were not confirmed) and decided as `nnlaunder verify` decides: the threshold test and the base-rate "
               "check on the attacked model, then the 3-point tolerance. Against the stored rows of the same seeds:",
               "", *rerun_section(previous, rerun), ""]
    md += ["## Other stored rows", "",
           "Re-decided the same way (old verdict under the paper's rule -> new outcome: rows):", "",
           *others_section(), "", "## The seed paper's battery, re-run", "",
           "Each cell of baselines-previous.json (one attacker seed; decided from its stored accuracies) against "
           "the same cell run again through the engine (`experiments/paper/baselines-*.toml`: decided as "
           "`nnlaunder verify` decides, base-rate check included, then the owner's restoration). Cells whose "
           "outcome moved:", "", *baselines_section()]
    write("what-changed.md", md)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
