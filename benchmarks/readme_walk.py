"""Benchmark: the README's commands, run as written, in order, with their wall times on this machine.

    python benchmarks/readme_walk.py                  # every command but the long ones below
    python benchmarks/readme_walk.py --only audit      # commands whose text contains "audit"

Each command runs in a scratch folder (`--workdir`, default runs/readme-walk) that links the
repository's models/, experiments/ and examples/, so `runs/...` paths land there and the README's
paths resolve. Commands that train CIFAR-10 models or whole paper grids on a CPU take hours; they are
listed as not run, with the reason, unless `--all` is given. A command that exits with a code other
than the README says (0, or 2 for the Ray line without a cluster) is a failure. Writes
benchmarks/results/readme-walk.{json,md}, the machine, date and commit in each row; reruns skip
commands that already passed on this commit (delete the JSON to start over).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

EXPECTED_RC = {"--executor ray": 2}          # no Ray cluster here: one line, exit 2


def readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", README.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    cmds = []
    for line in text.splitlines():
        line = line.split("  #")[0].split(" # ")[0].strip()
        if line.startswith("nnlaunder "):
            cmds.append(re.sub(r"\s+", " ", line.replace("[--mixed]", "")).strip())
    return cmds


def long_reason(cmd: str) -> str | None:
    if "--dataset cifar10 --arch resnet20 --out runs/clean-r20" in cmd:
        return "trains ResNet-20 on CIFAR-10 from scratch (hours on a CPU)"
    if "--scheme adi --param mode=pt" in cmd:
        return "needs runs/clean-r20 (the line above) and trains ResNet-20 further"
    if "fig3-mnist.toml" in cmd and "--executor" not in cmd:
        return "the whole Figure 3 grid (3 schemes x 4 budgets x 10 rounds: hours on a CPU)"
    return None


def workdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in ("models", "experiments", "examples"):
        link = path / name
        if not link.exists():
            link.symlink_to(ROOT / name)
    return path


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # a sibling module; imported here so tests can load this file
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "readme-walk"), help="scratch folder for runs/")
    ap.add_argument("--only", help="run only the commands containing this text")
    ap.add_argument("--skip", action="append", default=[], help="skip the commands containing this text (repeatable)")
    ap.add_argument("--all", action="store_true", help="also the commands that take hours on a CPU")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per command (default 3600)")
    args = ap.parse_args(argv)
    wd = workdir(Path(args.workdir))
    rows = common.stored("readme-walk.json")
    here = common.commit()
    passed = {r["command"] for r in rows if r["ok"] and r["commit"] == here}
    env = {**os.environ}
    env.setdefault("NNLAUNDER_DATA", str((ROOT.parent / "shared" / "data").resolve()))
    nnl = str(Path(sys.executable).with_name("nnlaunder"))
    for i, cmd in enumerate(readme_commands(), 1):
        if (args.only and args.only not in cmd) or any(k in cmd for k in args.skip):
            continue
        reason = None if args.all else long_reason(cmd)
        if cmd in passed:
            continue
        row = {"n": i, "command": cmd, "machine": common.machine(), "date": datetime.date.today().isoformat(),
               "commit": here}
        if reason:
            row.update(ok=True, ran=False, seconds=None, note=f"not run: {reason}")
        else:
            print(f"[{i}] {cmd}", flush=True)
            t0 = time.perf_counter()
            try:
                p = subprocess.run([nnl, *shlex.split(cmd)[1:], "--quiet"] if "report" not in cmd.split()[1:2]
                                   else [nnl, *shlex.split(cmd)[1:]], cwd=wd, env=env, capture_output=True,
                                   text=True, timeout=args.timeout)
                rc, tail = p.returncode, (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:]
            except subprocess.TimeoutExpired:
                rc, tail = None, [f"timed out after {args.timeout} s"]
            secs = time.perf_counter() - t0
            want = next((c for k, c in EXPECTED_RC.items() if k in cmd), 0)
            if cmd.startswith("nnlaunder report") and not args.all:
                want = 2          # its workspace's only cells are the Figure 3 grid's, not run: it says so
            row.update(ok=rc == want, ran=True, seconds=round(secs, 1), rc=rc, note=" ".join(tail)[:300])
            print(f"    rc {rc} (want {want}), {secs:.0f} s: {row['note']}", flush=True)
        rows = [r for r in rows if r["command"] != cmd] + [row]
        rows.sort(key=lambda r: r["n"])
        common.write("readme-walk.json", rows)
    common.write("readme-walk.md", markdown(rows, readme_commands()))
    return 0 if all(r["ok"] for r in rows) else 1


def markdown(rows: list[dict], commands: list[str]) -> list[str]:
    lines = ["# The README's commands, as written, in order", "",
             "Wall time of each command of the README on the machine named (`python benchmarks/readme_walk.py`; "
             "each ran in a scratch folder after the ones above it). The commands that need hours on a CPU "
             "are listed as not run.", "",
             "| # | command | wall time | outcome | machine | date | commit |", "|---|---|---|---|---|---|---|"]
    got = {r["command"]: r for r in rows}
    rows = [got.get(c, {"n": i, "command": c, "ok": True, "ran": False, "note": "not run yet", "machine": "-",
                        "date": "-", "commit": "-"}) for i, c in enumerate(commands, 1)]
    for r in rows:
        t = f"{r['seconds']:.0f} s" if r.get("seconds") is not None else "-"
        outcome = ("ok" if r["ok"] else f"**failed** (rc {r.get('rc')})") if r.get("ran") else r["note"]
        if r.get("ran") and r.get("note"):
            outcome += f": {r['note'][:120]}"
        lines.append(f"| {r['n']} | `{r['command']}` | {t} | {outcome.replace('|', '/')} | {r['machine']} | "
                     f"{r['date']} | {r['commit']} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
