"""Benchmark: launder a backdoor that someone else planted, through the bring-your-own-model path.

    python benchmarks/byo.py                   # ~5 min on 2 CPU cores
    python benchmarks/byo.py --model rescnn    # the same with a network written with functional activations

1. `plant()` is the "someone else": plain PyTorch, none of this project's training or embedding
   code. It trains a network of examples/byo/ (`--model`: table5.py, Aiken et al.'s Table 5 with ReLU
   modules; rescnn.py, a residual CNN with batch norm whose activations are all `F.relu`) on MNIST with
   10% of the training images poisoned BadNets-style (a 4×4 white square in the bottom-right corner,
   relabelled to class 0), and saves the weights as safetensors.
2. The attacker runs `nnlaunder launder --model-factory table5:table5 --data mnist-train.npz
   --budget 0.006` (0.6% of MNIST's training set), measuring test accuracy on MNIST's test set and
   attack success on triggered test images of every other class (`--verify-npz`).
3. Reference: the attack success of a clean model of the same task on the same triggered images
   (our committed clean MNIST model, seed 0) plays the part of the vanilla threshold.
Writes benchmarks/results/byo.json and byo.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, ROOT, provenance, stored, write
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(ROOT / "examples" / "byo"))      # the user's model code of the examples
from rescnn import rescnn  # noqa: E402
from table5 import table5  # noqa: E402

from nnlaunder import data as D  # noqa: E402
from nnlaunder.checkpoint import atomic_write_bytes, load_model  # noqa: E402
from nnlaunder.cli import main as cli  # noqa: E402

TARGET = 0
MEAN, STD = 0.1307, 0.3081
MODELS = {"table5": (table5, "table5 (examples/byo/table5.py, plain PyTorch)"),
          "rescnn": (rescnn, "rescnn (examples/byo/rescnn.py, plain PyTorch, functional activations)")}


def stamp(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[:, :, -5:-1, -5:-1] = 1.0
    return out


def plant(tr: D.Dataset, seed: int, epochs: int, model: str = "table5") -> nn.Module:
    """Someone else's code: a BadNets backdoor in plain PyTorch."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    poison = torch.randperm(len(tr), generator=g)[: len(tr) // 10]
    x, y = tr.x.clone(), tr.y.clone()
    x[poison], y[poison] = stamp(x[poison]), TARGET
    net = MODELS[model][0]()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for ep in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net((x[idx] - MEAN) / STD), y[idx]).backward()
            opt.step()
        print(f"  planting: epoch {ep + 1}/{epochs}", flush=True)
    return net.eval()


def u8(x: torch.Tensor) -> np.ndarray:
    return (x.squeeze(1) * 255).round().to(torch.uint8).numpy()


def write_files(d: Path, net: nn.Module, tr: D.Dataset, te: D.Dataset, victims: D.Dataset) -> None:
    d.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(d / "backdoored.safetensors"))
    np.savez(d / "train.npz", x=u8(tr.x), y=tr.y.numpy())
    np.savez(d / "test.npz", x=u8(te.x), y=te.y.numpy())
    np.savez(d / "verify.npz", x=u8(stamp(victims.x)), y=np.full(len(victims), TARGET))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.006)
    ap.add_argument("--model", default="table5", choices=sorted(MODELS), help="the network of examples/byo/")
    ap.add_argument("--pool", default="mean", choices=["mean", "max"],
                    help="Algorithm 1's conv channel over positions: its mean (the paper's) or its peak")
    ap.add_argument("--prepare-only", metavar="DIR",
                    help="only plant the backdoor and write the model and data files into DIR (docs/byo.md)")
    args = ap.parse_args(argv)
    tr, te = D.load("mnist", args.data_dir, "train"), D.load("mnist", args.data_dir, "test")
    victims = te.subset(torch.nonzero(te.y != TARGET).flatten())
    t0 = time.perf_counter()
    net = plant(tr, args.seed, args.epochs, args.model)
    plant_s = time.perf_counter() - t0
    clean_model, _ = load_model(ROOT / "models" / "mnist" / "clean-mnist-cnn-s0")
    with torch.no_grad():
        clean_asr = 100 * float((clean_model(stamp(victims.x)).argmax(1) == TARGET).float().mean())
    if args.prepare_only:
        write_files(Path(args.prepare_only), net, tr, te, victims)
        print(f"wrote {args.prepare_only}/backdoored.safetensors, train.npz, test.npz, verify.npz")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_files(d, net, tr, te, victims)
        cmd = ["launder", "--model-factory", f"{args.model}:{args.model}",
               "--weights", str(d / "backdoored.safetensors"),
               "--mean", str(MEAN), "--std", str(STD), "--data", str(d / "train.npz"), "--budget", str(args.budget),
               "--test-data", str(d / "test.npz"), "--verify-npz", str(d / "verify.npz"),
               "--out", str(d / "out"), "--seed", str(args.seed), "--quiet"] + (
                   ["--pool", args.pool] if args.pool != "mean" else [])
        t1 = time.perf_counter()
        rc = cli(cmd)
        if rc != 0:
            return rc
        launder_s = time.perf_counter() - t1
        rep = json.loads((d / "out" / "report.json").read_text())
        png = (d / "out" / "triggers.png").read_bytes()
    png_name = "triggers-byo-backdoor.png" if args.model == "table5" else f"triggers-byo-backdoor-{args.model}.png"
    pool = args.pool
    atomic_write_bytes(RESULTS / png_name, png)
    r1 = rep["rounds"][-1]
    row = {"dataset": "mnist", "model": args.model, "pool": pool, "arch": MODELS[args.model][1], "scheme": "backdoor",
           "attack": "launder", "budget": args.budget, "n_clean": rep["n_clean"], "rounds": len(rep["rounds"]),
           "orig_test_acc": rep["before"]["test_acc"], "orig_wm_acc": rep["before"]["attack_success"],
           "test_acc": rep["after"]["test_acc"], "wm_acc": rep["after"]["attack_success"],
           "threshold": clean_asr, "removed": rep["after"]["attack_success"] < clean_asr,
           "attack_success_before": rep["before"]["attack_success"],
           "attack_success_after": rep["after"]["attack_success"],
           "flagged": r1["flagged"], "used_triggers": r1["used_triggers"], "anomaly": r1["anomaly"],
           "resets": r1["resets"], "skipped_layers": rep["skipped_layers"], "plant_seconds": plant_s,
           "seconds": launder_s, "nc_seconds": r1["nc_seconds"], "seed": args.seed, "triggers": png_name,
           "launder_command": "nnlaunder " + " ".join(c if "/" not in c else Path(c).name for c in cmd),
           **provenance("python benchmarks/byo.py" + "".join(f" --{k} {v}" for k, v, default in (
               ("model", args.model, "table5"), ("pool", pool, "mean"), ("seed", args.seed, 0)) if v != default))}
    key = (args.model, pool)
    rows = [r for r in stored("byo.json") if (r.get("model", "table5"), r.get("pool", "mean")) != key] + [row]
    rows.sort(key=lambda r: (list(MODELS).index(r.get("model", "table5")), r.get("pool", "mean") != "mean"))
    write("byo.json", rows)
    md = markdown(rows)
    write("byo.md", md)
    print(md)
    return 0


def markdown(rows: list[dict]) -> str:
    md = ["# Bring your own model: a BadNets backdoor planted by someone else's code", "",
          "Each backdoored network is defined and trained in plain PyTorch (examples/byo/; `plant()` in",
          "benchmarks/byo.py: 10% of MNIST's training images get a 4×4 white corner square and label",
          f"{TARGET}): Aiken et al.'s Table 5 network with ReLU modules, and a residual CNN with batch norm whose",
          "activations are all functions (`F.relu`), as much published backdoor code writes them. The attacker",
          "launders each through `--model-factory` with 0.6% of the training set. Attack success: triggered test",
          f"images of the other classes classified as {TARGET}. Reference: a clean model's rate on the same images.",
          "Algorithm 1 reads a conv channel by its mean over positions (pool mean, the paper's) or by its peak per "
          "image (pool max, `--pool max`).",
          "", "| model | pool | budget | test acc % before → after | attack success % before → after | clean model's "
          "rate % | removed | flagged | resets | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r.get('model', 'table5')} (backdoor → {TARGET}) | {r.get('pool', 'mean')} | "
                  f"{r['budget']:.1%} ({r['n_clean']}) | "
                  f"{r['orig_test_acc']:.2f} → **{r['test_acc']:.2f}** | {r['orig_wm_acc']:.2f} → "
                  f"**{r['wm_acc']:.2f}** | {r['threshold']:.2f} | {'yes' if r['removed'] else '**no**'} | "
                  f"{r['flagged']} | {sum(r['resets'].values())} | {r['seconds']:.0f} |")
    md += ["", "Recovered triggers: " + ", ".join(dict.fromkeys(r.get("triggers", "triggers-byo-backdoor.png")
                                                                for r in rows)), "",
           "Commands:", *[f"    {c}" for r in rows for c in (r["command"], r["launder_command"])], ""]
    return "\n".join(md)


if __name__ == "__main__":

    sys.exit(main())
