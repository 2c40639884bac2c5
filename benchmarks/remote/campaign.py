"""Run the remaining GPU benchmark campaign as a small dependency-ordered job queue.

    setsid python3 benchmarks/remote/campaign.py --max 9 > /tmp/logs/campaign.log 2>&1 &

Every job runs in its own copy of the repository under /tmp/w/<job> (so parallel jobs never write
the same results file), with its log in /tmp/logs/<job>.log and /tmp/logs/<job>.done on success.
A job starts when its dependencies are done, in list order, at most --max at a time; a job that
needs trained models gets them copied from the job that trained them. Afterwards
benchmarks/remote/merge.py folds each copy's rows into benchmarks/results.
Dev tooling only: the library never needs it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[2]
W, L = Path("/tmp/w"), Path("/tmp/logs")
ZHANG = ["zhang-content", "zhang-noise", "zhang-unrelated"]
CIFAR_P = "--ft-epochs 10 --restore-epochs 5"
MNIST_P = "--ft-epochs 20 --restore-epochs 10"


def jobs() -> list[tuple[str, list[str], str]]:
    """(name, dependencies, command), in priority order. Table 2's attacker-side calibration runs per
    model here (each attacker holds one model), so each Adi row starts as soon as its model exists."""
    e = "python3 benchmarks/embed.py --datasets cifar10 --seeds 0 --threads 1 --only"
    t2 = "python3 benchmarks/table2.py --datasets cifar10 --models"
    b = "python3 benchmarks/baselines.py --datasets cifar10 --models"
    p = "python3 benchmarks/persistence.py --datasets cifar10 --models"
    js = [("tr-pt", [], f"{e} adi-pt"), ("tr-fs", [], f"{e} adi-fs"),
          ("t2z", [], f"{t2} {','.join(ZHANG)}"),
          ("t2-adi-fs", ["tr-fs"], f"{t2} adi-fs"), ("t2-adi-pt", ["tr-pt"], f"{t2} adi-pt")]
    js += [(f"b-{m}", [], f"{b} {m}") for m in ZHANG]
    js += [("b-adi-fs", ["tr-fs"], f"{b} adi-fs"), ("p-adi-fs", ["tr-fs"], f"{p} adi-fs {CIFAR_P}"),
           ("b-adi-pt", ["tr-pt"], f"{b} adi-pt"), ("p-adi-pt", ["tr-pt"], f"{p} adi-pt {CIFAR_P}")]
    js += [(f"p-{m}", [], f"{p} {m} {CIFAR_P}") for m in ZHANG]
    # MNIST work, last: it also runs on a CPU in reasonable time
    js += [("fig3", [], "python3 -m nnlaunder.cli run experiments/paper/fig3-mnist.toml --workspace runs/fig3 "
                        "--jobs 3 --quiet && python3 -m nnlaunder.cli report --workspace runs/fig3 "
                        "--out benchmarks/results/fig3")]
    js += [(f"pm-{m}", [], f"python3 benchmarks/persistence.py --datasets mnist --models {m} {MNIST_P}")
           for m in ZHANG]
    js += [(f"cl-s{s}", [], f"{e.replace('--seeds 0', f'--seeds {s}')} clean-resnet20-s{s}") for s in (1, 2)]
    return js


def prepare(name: str, deps: list[str]) -> Path:
    d = W / name
    if not d.is_dir():
        shutil.copytree(SRC, d, ignore=shutil.ignore_patterns(".remote", ".git", ".venv", "runs", "logs"))
    for dep in deps:                          # trained models of the jobs it depends on
        for f in (W / dep / "models" / "cifar10").glob("adi-*"):
            if f.is_file():
                (d / "models" / "cifar10").mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, d / "models" / "cifar10" / f.name)
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max", type=int, default=9)
    ap.add_argument("--skip", default="", help="comma list of jobs to leave out")
    a = ap.parse_args()
    W.mkdir(parents=True, exist_ok=True)
    L.mkdir(parents=True, exist_ok=True)
    if not (W / ".stamp").exists():
        (W / ".stamp").touch()
    skip = {s for s in a.skip.split(",") if s}
    pending = [j for j in jobs() if j[0] not in skip and not (L / f"{j[0]}.done").exists()]
    running: dict[str, subprocess.Popen] = {}
    failed: set[str] = set()
    while pending or running:
        for name, p in list(running.items()):
            if p.poll() is not None:
                del running[name]
                ok = p.returncode == 0
                if ok:
                    (L / f"{name}.done").touch()
                else:
                    failed.add(name)
                print(f"{time.strftime('%T')} {name} {'done' if ok else f'FAILED rc={p.returncode}'}", flush=True)
        done = {p.stem for p in L.glob("*.done")}
        for j in list(pending):
            name, deps, cmd = j
            if any(d in failed for d in deps):
                pending.remove(j)
                failed.add(name)
                print(f"{time.strftime('%T')} {name} skipped: a dependency failed", flush=True)
            elif len(running) < a.max and all(d in done for d in deps):
                pending.remove(j)
                d = prepare(name, deps)
                env = dict(os.environ, PYTHONPATH=str(d / "src"))
                log = open(L / f"{name}.log", "w")
                running[name] = subprocess.Popen(cmd, shell=True, cwd=d, env=env, stdout=log,
                                                 stderr=subprocess.STDOUT)
                print(f"{time.strftime('%T')} {name} started: {cmd}", flush=True)
        time.sleep(2)
    print(f"{time.strftime('%T')} all finished; failed: {sorted(failed) or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
