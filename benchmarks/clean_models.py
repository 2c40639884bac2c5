"""Train the clean trajectories the threshold rules and their false-positive rates are measured on.

Each (dataset, architecture, owner recipe, seed) is trained once into the clean-model cache
(`experiments/clean.py`, every epoch kept) and skipped when it is already there; an interrupted
training resumes from its last epoch. One heavy job: run it alone.

    python benchmarks/clean_models.py --plan cifar10:cifar-cnn:3 cifar10:resnet20:3 mnist:mnist-cnn:0-9
"""

from __future__ import annotations

import argparse
import sys
import time

from nnlaunder import data as D
from nnlaunder.experiments.clean import clean_root, clean_trajectory
from nnlaunder.recipes import owner_config


def seeds(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", nargs="+", required=True, help="DATASET:ARCH:SEEDS (seeds like 0-4 or 3,5)")
    ap.add_argument("--data-dir")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    print(f"clean-model cache: {clean_root()}", flush=True)
    for item in args.plan:
        dataset, arch, spec = item.split(":")
        tr, te = D.load(dataset, args.data_dir, "train"), D.load(dataset, args.data_dir, "test")
        for s in seeds(spec):
            t0 = time.perf_counter()
            traj = clean_trajectory(dataset, arch, owner_config(arch), s, tr, te, progress=not args.quiet)
            print(f"{dataset} {arch} seed {s}: final test {traj.test_accs[-1]:.2f}% "
                  f"({time.perf_counter() - t0:.0f} s here) in {traj.folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
