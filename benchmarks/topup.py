"""Owner-side top-up: fine-tune a stored Zhang et al. owner model with its embedding triggers
oversampled (repeated R times per epoch, never augmented), choosing R on held-out stamped
*training* images, never on the verification set.

    python benchmarks/topup.py --dataset cifar10 --name zhang-content     # ~12 CPU-min per candidate

Why: the CIFAR-10 content model verified at 97.78% after the paper's recipe (docs/recipes.md,
"Why the CIFAR-10 content watermark stops at 97.8%"). Steps:
1. The model as embed.py made it is kept as models/<dataset>/<name>-v1 (results computed on it
   name that file); every candidate starts from it, so a rerun gives the same models.
2. Held-out validation: `--holdout` stamped non-target training images outside the embedding set
   (`held_out_triggers`). Each candidate R fine-tunes with the owner's recipe at `--lr`, one-cycle,
   `--epochs` epochs, and records only the held-out watermark accuracy per epoch.
3. The candidate with the highest held-out accuracy after its last epoch wins (ties: smaller R).
   Only then are its test accuracy and verification-set watermark accuracy measured, once; it is
   saved as models/<dataset>/<name>. Candidates checkpoint every epoch under runs/topup/ (resumable).
Writes benchmarks/results/topup.json + topup.md. Then `python benchmarks/embed.py --datasets
<dataset> --no-train` refreshes embed.json with the new model.
"""

from __future__ import annotations

import argparse
import shutil
import sys

import torch
from common import ROOT, stored, write
from embed import PLAN

from nnlaunder import data as D
from nnlaunder.checkpoint import load_model, save_model
from nnlaunder.device import compute_device
from nnlaunder.errors import UserError
from nnlaunder.recipes import owner_config
from nnlaunder.train import accuracy
from nnlaunder.watermarks.embed import embed
from nnlaunder.watermarks.schemes import Watermark, make_watermark


def held_out_triggers(wm: Watermark, train: D.Dataset, n: int, seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` stamped non-target *training* images that are not in the embedding set, labelled with
    the target: the owner's own validation set for choosing an embedding recipe, so that the
    verification set (stamped test images) is never looked at while choosing."""
    if wm.stamp is None or wm.embed_index is None or wm.target is None:
        raise UserError(f"{wm.scheme} has no stamping function: held-out triggers exist only for "
                        "zhang-content and zhang-noise")
    free = torch.ones(len(train), dtype=torch.bool)
    free[wm.embed_index] = False
    free &= train.y != wm.target
    idx = torch.nonzero(free).flatten()
    if not 1 <= n <= len(idx):
        raise UserError(f"n must be in [1, {len(idx)}] (non-target training images outside the "
                        f"embedding set), got {n}")
    g = torch.Generator().manual_seed(seed)
    pick = idx[torch.sort(torch.randperm(len(idx), generator=g)[:n]).values]
    return wm.stamp(train.x[pick]), torch.full((n,), wm.target)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except UserError as e:                  # a user mistake (data folder, settings): one line, no traceback
        print(f"topup.py: error: {e}", file=sys.stderr)
        return 2


def run(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10", choices=sorted(PLAN))
    ap.add_argument("--name", default="zhang-content", help="owner model name (zhang-content or zhang-noise)")
    ap.add_argument("--repeats", default="4,8", help="comma list of candidate trigger repeats")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--holdout", type=int, default=5000, help="held-out stamped training images")
    ap.add_argument("--holdout-seed", type=int, default=1234)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        repeats = sorted({int(r) for r in args.repeats.split(",") if r.strip()})
    except ValueError:
        print(f"topup.py: error: --repeats must be integers, got {args.repeats!r}", file=sys.stderr)
        return 2
    plan = {n: (a, s, p) for n, a, s, p in PLAN[args.dataset]}
    if args.name not in plan or plan[args.name][1] not in ("zhang-content", "zhang-noise"):
        print(f"topup.py: error: --name must be a zhang-content or zhang-noise model of {args.dataset}",
              file=sys.stderr)
        return 2
    if not repeats or min(repeats) < 1 or args.epochs < 1:
        print("topup.py: error: --repeats and --epochs must be >= 1", file=sys.stderr)
        return 2
    arch, scheme, params = plan[args.name]
    mdir = ROOT / "models" / args.dataset
    cur, v1 = mdir / args.name, mdir / f"{args.name}-v1"
    if not v1.with_suffix(".safetensors").is_file():
        if not cur.with_suffix(".safetensors").is_file():
            print(f"topup.py: error: {cur}.safetensors is missing (run benchmarks/embed.py first)", file=sys.stderr)
            return 2
        for ext in (".safetensors", ".json"):
            shutil.copyfile(cur.with_suffix(ext), v1.with_suffix(ext))
        print(f"kept the embedded model as {v1.relative_to(ROOT)}")
    _, base_meta = load_model(v1)
    tr, te = D.load(args.dataset, args.data_dir, "train"), D.load(args.dataset, args.data_dir, "test")
    wm = make_watermark(scheme, tr, te, args.data_dir, params)
    hx, hy = held_out_triggers(wm, tr, args.holdout, args.holdout_seed)
    cfg = owner_config(arch, epochs=args.epochs, lr=args.lr, seed=0)
    cmd = (f"python benchmarks/topup.py --dataset {args.dataset} --name {args.name} --repeats "
           f"{','.join(map(str, repeats))} --epochs {args.epochs} --lr {args.lr} --holdout {args.holdout} "
           f"--holdout-seed {args.holdout_seed}")
    work = ROOT / "runs" / "topup" / f"{args.dataset}-{args.name}"
    work.mkdir(parents=True, exist_ok=True)
    candidates = []
    for r in repeats:
        out = work / f"r{r}-e{args.epochs}-lr{args.lr}"
        if out.with_suffix(".safetensors").is_file():
            model, meta = load_model(out)
            print(f"  R={r}: reusing {out.relative_to(ROOT)}")
        else:
            model, _ = load_model(v1)
            res = embed(model, tr, wm, cfg, augment_triggers=False, trigger_repeat=r, eval_wm=False,
                        eval_sets={"heldout": (hx, hy)}, progress=f"top-up R={r}", resume=True,
                        checkpoint_dir=out.with_suffix(".ckpt"))
            meta = {"arch": arch, "num_classes": tr.num_classes, "repeat": r, "history": res.history,
                    "device": str(compute_device())}
            save_model(out, model, meta)
            shutil.rmtree(out.with_suffix(".ckpt"), ignore_errors=True)
        held = [h["heldout_acc"] for h in meta["history"]]
        print(f"  R={r}: held-out WM per epoch {', '.join(f'{a:.2f}' for a in held)}")
        candidates.append({"repeat": r, "heldout_acc": held,
                           "seconds": sum(h["seconds"] for h in meta["history"]),   # resumed runs too
                           "device": meta["device"], "model": model, "history": meta["history"]})
    best = max(candidates, key=lambda c: (c["heldout_acc"][-1], -c["repeat"]))
    model = best["model"]
    v1_held = accuracy(load_model(v1)[0], hx, hy)
    test_acc, wm_acc = accuracy(model, te.x, te.y), accuracy(model, wm.verify_x, wm.verify_y)
    print(f"chose R={best['repeat']} (held-out {best['heldout_acc'][-1]:.2f}%; before top-up {v1_held:.2f}%): "
          f"test {test_acc:.2f}%  WM {wm_acc:.2f}%")
    meta = dict(base_meta)
    meta["history"] = base_meta["history"] + [{**h, "topup": True} for h in best["history"]]
    meta["command"] = f"{base_meta['command']} ; {cmd}"
    meta["metrics"] = {"test_acc": test_acc, "wm_acc": wm_acc}
    meta["topup"] = {"repeat": best["repeat"], "epochs": args.epochs, "lr": args.lr, "config": cfg.__dict__,
                     "seconds": best["seconds"], "device": best["device"], "from": f"{v1.name}.safetensors",
                     "holdout": args.holdout, "holdout_seed": args.holdout_seed, "command": cmd}
    save_model(cur, model, meta)
    row = {"dataset": args.dataset, "name": args.name, "scheme": scheme, "arch": arch,
           "from": f"models/{args.dataset}/{v1.name}.safetensors",
           "model": f"models/{args.dataset}/{args.name}.safetensors",
           "epochs": args.epochs, "lr": args.lr, "holdout": args.holdout, "holdout_before": v1_held,
           "candidates": [{k: c[k] for k in ("repeat", "heldout_acc", "seconds", "device")} for c in candidates],
           "chosen_repeat": best["repeat"], "test_acc_before": base_meta["metrics"]["test_acc"],
           "wm_acc_before": base_meta["metrics"]["wm_acc"], "test_acc": test_acc, "wm_acc": wm_acc,
           "command": cmd}
    rows = [r for r in stored("topup.json") if (r["dataset"], r["name"]) != (args.dataset, args.name)] + [row]
    write("topup.json", rows)
    write("topup.md", markdown(rows))
    print(f"saved {cur.relative_to(ROOT)}.safetensors; wrote benchmarks/results/topup.json and topup.md")
    return 0


def markdown(rows: list[dict]) -> str:
    lines = ["# Owner-side top-up: oversampled, un-augmented triggers", "",
             "Each candidate fine-tunes the embedded model (one-cycle, the owner's recipe otherwise) with the",
             "embedding triggers repeated R times per epoch. The choice uses only held-out stamped *training*",
             "images (non-target, outside the embedding set); test and verification accuracy are measured once,",
             "on the chosen model. Verification = stamped test images, as in embed.md.", "",
             "| dataset | model | held-out WM before % | candidates: R → held-out WM per epoch % | chosen R "
             "| test % before → after | verification WM % before → after | CPU min (chosen) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cands = "; ".join(f"R={c['repeat']} → {' / '.join(f'{a:.2f}' for a in c['heldout_acc'])}"
                          for c in r["candidates"])
        chosen = next(c for c in r["candidates"] if c["repeat"] == r["chosen_repeat"])
        lines.append(f"| {r['dataset']} | {r['name']} | {r['holdout_before']:.2f} | {cands} | {r['chosen_repeat']} "
                     f"| {r['test_acc_before']:.2f} → {r['test_acc']:.2f} | {r['wm_acc_before']:.2f} → "
                     f"{r['wm_acc']:.2f} | {chosen['seconds'] / 60:.1f} ({chosen['device']}) |")
    lines += ["", "Commands:", *sorted({f"    {r['command']}" for r in rows}), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
