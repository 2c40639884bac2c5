"""Merge result rows produced in separate working copies (one process per model on a remote machine)
into benchmarks/results, later files replacing earlier rows with the same key.

    python benchmarks/remote/merge.py baselines /tmp/w/b-*/benchmarks/results/baselines.json --dataset cifar10

Only rows of --dataset are taken from the given files; the canonical file's other rows stay.
Dev tooling only: afterwards rewrite the Markdown with the benchmark's --markdown-only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
from nnlaunder.checkpoint import atomic_write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
KEYS = {
    "table2": ("dataset", "scheme", "mode"),
    "table2-variants": ("dataset", "scheme", "mode", "stage", "variant", "dt", "ct", "epochs"),
    "baselines": ("dataset", "name", "attack", "budget"),
    "persistence": ("dataset", "name", "phase"),
}


def merge(kind: str, files: list[Path], dataset: str) -> int:
    target = RESULTS / f"{kind}.json"
    rows = json.loads(target.read_text()) if target.is_file() else []
    index = {tuple(r.get(k) for k in KEYS[kind]): i for i, r in enumerate(rows)}
    n = 0
    for f in files:
        for r in json.loads(f.read_text()):
            if r["dataset"] != dataset:
                continue
            k = tuple(r.get(k) for k in KEYS[kind])
            if k in index:
                rows[index[k]] = r
            else:
                index[k] = len(rows)
                rows.append(r)
            n += 1
    atomic_write_json(target, rows)
    return n


def rethreshold(dataset: str) -> int:
    """Refresh `threshold` (and `removed`) of every result row of `dataset` from
    thresholds-<dataset>.json, after more clean seeds have moved a vanilla threshold."""
    th = json.loads((RESULTS / f"thresholds-{dataset}.json").read_text())["thresholds"]
    n = 0
    for kind in KEYS:
        target = RESULTS / f"{kind}.json"
        rows = json.loads(target.read_text()) if target.is_file() else []
        for r in rows:
            name = r.get("name") or (r["scheme"] + (f"-{r['mode']}" if r.get("mode") else ""))
            if r["dataset"] == dataset and name in th and "threshold" in r and r["threshold"] != th[name]:
                r["threshold"] = th[name]
                if "removed" in r:
                    r["removed"] = r["wm_acc"] < th[name]
                n += 1
        atomic_write_json(target, rows)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=sorted(KEYS) + ["rethreshold"])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--dataset", required=True)
    args = ap.parse_args(argv)
    if args.kind == "rethreshold":
        print(f"rethreshold: {rethreshold(args.dataset)} rows updated")
        return 0
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"merge.py: error: missing {missing}", file=sys.stderr)
        return 2
    print(f"{args.kind}: merged {merge(args.kind, args.files, args.dataset)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
