"""Exploration, not a benchmark: which Algorithm 1 reset sets and retraining objectives could
remove the watermarks that one round of the strong variant leaves (CIFAR-10 zhang-unrelated at
0.6%, Adi PT / FS at 10.8%; benchmarks/results/table2.md), and at what cost in accuracy.

    python benchmarks/explore/reset_variants.py --out runs/explore.jsonl \
        --models zhang-unrelated:0.006 --configs '[["union", 0.5, 1.0, 20, 1e-4, "hard", "crop-flip"]]'

Each config is [mode, DT, CT, epochs, lr, target, augment]:
  mode    "flagged": Algorithm 1 on the flagged (or smallest-mask) class's trigger (the strong variant);
          "pooled": one activation difference over all K classes' stamped images (the paper's reading);
          "union": a unit is reset when the difference for ANY one class's trigger exceeds the threshold.
  DT, CT  thresholds relative to the layer's mean clean activation.
  target  "hard": true labels; "distill": the clean images' labels are the un-laundered model's softmax
          (the attacker has that model), stamped images keep their true labels.
  augment "none" | "crop-flip".
The attacker holds out 20% of its set (`held`, with `base_held` for the model before laundering);
test and watermark accuracy are printed for the write-up only. One JSON line per config.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time

import torch
import torch.nn.functional as F

from nnlaunder import data as D
from nnlaunder.attacks.laundering import (
    activation_differences,
    apply_reset,
    launder_config,
    reset_masks,
    select_resets,
    split_holdout,
)
from nnlaunder.attacks.neural_cleanse import nc_config, neural_cleanse, stamp
from nnlaunder.attacks.units import discover_units, select_units
from nnlaunder.checkpoint import load_model
from nnlaunder.device import model_device
from nnlaunder.errors import UserError
from nnlaunder.experiments.evaluate import evaluator
from nnlaunder.train import accuracy, train
from nnlaunder.watermarks.schemes import make_watermark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", required=True, help="comma list of NAME:BUDGET (CIFAR-10 models)")
    ap.add_argument("--configs", required=True, help="JSON list of configs (see above)")
    ap.add_argument("--data-dir", default=None)
    a = ap.parse_args()
    try:
        models = [(n, float(b)) for n, b in (spec.split(":") for spec in a.models.split(","))]
        configs = json.loads(a.configs)
        if not all(isinstance(c, list) and len(c) == 7 and c[0] in ("flagged", "pooled", "union") for c in configs):
            raise ValueError("each config is [mode, DT, CT, epochs, lr, target, augment]")
    except ValueError as e:
        ap.error(f"--models wants NAME:BUDGET,... and --configs a JSON list of configs ({e})")
    tr, te = D.load("cifar10", a.data_dir, "train"), D.load("cifar10", a.data_dir, "test")
    for name, budget in models:
        model, meta = load_model(f"models/cifar10/{name}")
        wm = make_watermark(meta["scheme"], tr, te, a.data_dir, meta.get("scheme_params") or {})
        ev = evaluator(te, wm)
        clean = D.stratified_subset(tr, fraction=float(budget), seed=0)
        part, held = split_holdout(clean, 0.2, 0)
        base_held = accuracy(model, held.x, held.y)
        nc = neural_cleanse(model, clean.x, nc_config("fast"), num_classes=10)   # on the whole set
        layers = "second-half" if meta["arch"] == "resnet20" else "all"
        for mode, dt, ct, epochs, lr, target, aug in configs:
            m = copy.deepcopy(model)
            units = select_units(discover_units(m, part.x[:2])[0], layers)
            used = list(range(10)) if mode != "flagged" else (nc.flagged or [nc.most_likely])
            stamped = [stamp(part.x, nc.masks[t], nc.patterns[t]) for t in used]
            if mode == "union":
                chosen = {u.name: torch.zeros(0, dtype=torch.long) for u in units}
                for xs in stamped:
                    diff, an = activation_differences(m, units, part.x, xs)
                    sel = select_resets(units, diff, an, dt, ct, "relative")
                    chosen = {k: torch.unique(torch.cat([v, sel[k].cpu()])) for k, v in chosen.items()}
            else:
                diff, an = activation_differences(m, units, part.x, torch.cat(stamped))
                chosen = select_resets(units, diff, an, dt, ct, "relative")
            with torch.no_grad():
                soft = F.softmax(torch.cat([m(part.x[i:i + 1000].to(model_device(m))).cpu()
                                            for i in range(0, len(part.x), 1000)]), 1)
            masks = reset_masks(m, units, chosen, {})
            apply_reset(m, masks)
            hard = F.one_hot(part.y, 10).float()
            ys = torch.cat([soft if target == "distill" else hard] + [hard] * len(used))
            cfg = dataclasses.replace(launder_config("strong").retrain, epochs=epochs, lr=lr, seed=1, augment=aug)
            t0 = time.perf_counter()
            train(m, torch.cat([part.x, *stamped]), ys, cfg, masks=masks, progress=False)
            r = dict(name=name, budget=float(budget), flagged=nc.flagged, mode=mode, dt=dt, ct=ct, epochs=epochs,
                     lr=lr, target=target, augment=aug, resets=sum(len(v) for v in chosen.values()),
                     base_held=base_held, held=accuracy(m, held.x, held.y), retrain_seconds=time.perf_counter() - t0,
                     **ev(1, m))
            print(json.dumps(r), flush=True)
            with open(a.out, "a") as fh:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    from nnlaunder.device import keep_freed_memory

    keep_freed_memory()       # process-wide allocator setting: entry points only
    try:
        main()
    except UserError as e:
        sys.exit(f"reset_variants.py: error: {e}")
