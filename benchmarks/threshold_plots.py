"""Where each vanilla threshold comes from: clean models' watermark accuracy over epochs and seeds.

    python benchmarks/threshold_plots.py

Reads benchmarks/results/thresholds-<dataset>.json (written by benchmarks/embed.py) and writes
thresholds-<dataset>-<arch>.png (one panel per scheme, the maximum starred) and thresholds.md.
"""

from __future__ import annotations

import json
import sys

from common import RESULTS, write

from nnlaunder.plots import threshold_provenance


def main() -> int:
    lines = ["# Vanilla thresholds: where each comes from", "",
             "The paper's definition: the highest watermark accuracy a clean model of the task (never watermarked) "
             "reaches over its training epochs, maximised over the clean seeds. Each panel shows every clean seed's "
             "curve; the star marks the epoch and seed the threshold comes from. Written by "
             "`python benchmarks/threshold_plots.py`.", ""]
    header = ["| dataset | arch | scheme | threshold % | from | clean seeds × epochs | median over epochs, seeds % |",
              "|---|---|---|---|---|---|---|"]
    for f in sorted(RESULTS.glob("thresholds-*.json")):
        d = json.loads(f.read_text())
        for arch, v in sorted(d["by_arch"].items()):
            curves: dict[str, list[list[float]]] = {}
            for seed_hist in v["curves"]:
                for k in seed_hist[0]:
                    if k.startswith("wm:") and k.endswith("_acc"):
                        curves.setdefault(k[3:-4], []).append([row[k] for row in seed_hist])
            ths = {s: d["thresholds"][s] for s in curves if s in d["thresholds"]}
            png = threshold_provenance(curves, ths, RESULTS / f"thresholds-{d['dataset']}-{arch}.png",
                                       title=f"{d['dataset']} {arch}: clean models' watermark accuracy")
            lines += header
            for s, per_seed in sorted(curves.items()):
                flat = sorted(x for c in per_seed for x in c)
                best = max((x, e + 1, i) for i, c in enumerate(per_seed) for e, x in enumerate(c))
                lines.append(f"| {d['dataset']} | {arch} | {s} | {ths.get(s, best[0]):.2f} | seed {best[2]}, epoch "
                             f"{best[1]} | {len(per_seed)} × {len(per_seed[0])} | {flat[len(flat) // 2]:.2f} |")
            lines += ["", f"![{d['dataset']} {arch}]({png.name})", ""]
    print(f"wrote {write('thresholds.md', lines)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
