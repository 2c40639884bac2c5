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
destroyed. The layout (one row per model and phase, the plots) is the report's (`report/persistence.py`),
as `nnlaunder report` renders it. A dataset whose experiment file the store does not hold in full keeps the
rows stored before (named by their command and commit).
"""

from __future__ import annotations

import argparse
import sys

from common import RESULTS, ROOT, counts_line, engine_cells, stored, with_paper_rule, write

from nnlaunder.report.persistence import phase_rows, phases_plot, phases_table, verdicts_table

EXPERIMENTS = {"mnist": "persistence-mnist", "cifar10": "persistence-cifar10"}


def markdown(rows: list[dict]) -> str:
    lines = ["# Persistence, restoration, and whether laundering removes or hides", "", *phases_table(rows)]
    stale = sorted({(r["dataset"], r["name"], r["model"]) for r in rows
                    if r.get("model") not in (None, f"models/{r['dataset']}/{r['name']}.safetensors")})
    if stale:
        lines += ["", "Rows computed on an earlier version of the owner model (the file named; not yet re-run on "
                  "the current one): " + "; ".join(f"{d}/{n}: `{m}`" for d, n, m in stale) + "."]
    lines += ["", "## Verdicts", "", *verdicts_table(rows), ""]
    for ds in sorted({r["dataset"] for r in rows}):
        lines += [f"![{ds}: WM accuracy per phase](persistence-{ds}.png)", ""]
    where = sorted({f"{r['machine']}, commit {r['commit']}" for r in rows if "commit" in r})
    old = sorted({f"{r['dataset']}/{r['name']}" for r in rows if "commit" not in r})
    lines += ["", "Ran on: " + ("; ".join(where) or "–") + "." + (
        f" Rows of {', '.join(old)} are from a run before the verdict rules: they name no machine or commit and "
        "have no ownership or outcome column; the thresholds they show are the paper's rule." if old else ""),
        "", "Commands:", *[f"    {c}" for c in sorted({r['command'] for r in rows})], ""]
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
        rows += with_paper_rule(phase_rows(cells)) if have == total else [r for r in before if r["dataset"] == ds]
        print(f"{ds}: {'the engine' if have == total else 'the rows stored before'} ({counts_line(counts)})")
    write("persistence.json", rows)
    for ds in sorted({r["dataset"] for r in rows}):
        phases_plot(rows, ds, RESULTS / f"persistence-{ds}.png")
    write("persistence.md", markdown(rows))
    print("wrote persistence.json, persistence.md and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
