"""`nnlaunder demo`: the whole story in a few minutes on a laptop CPU.

1. Train a clean MNIST model (Table 5) and record how often it calls the "TEST"-stamped
   verification images "0" after every epoch: the threshold (the converged rule, on one seed).
2. Embed a zhang-content watermark into a second model; verify: ownership shown.
3. Launder it as an attacker holding 0.6% of the training set (360 images) and nothing else:
   Neural Cleanse, Algorithm 1, retraining. Verify again: no ownership proof.
"""

from __future__ import annotations

from pathlib import Path

from . import clock
from . import data as D
from .attacks.laundering import launder_config
from .attacks.pipeline import run_launder
from .checkpoint import atomic_write_json, model_meta, save_model
from .experiments.evaluate import evaluator
from .models import build
from .plots import before_after, trigger_grid
from .progress import LaunderBars
from .recipes import owner_config
from .train import accuracy
from .watermarks.embed import clean_wm_curve, embed
from .watermarks.schemes import make_watermark
from .watermarks.verify import CleanPoint, format_p, threshold_rule, verify


def run_demo(data_dir: str | None, out_dir: Path, epochs: int = 3, progress: bool = True,
             budget: float = 0.006) -> dict:
    t0 = clock.now()
    tr, te = D.load("mnist", data_dir, "train"), D.load("mnist", data_dir, "test")
    wm = make_watermark("zhang-content", tr, te, data_dir)
    cfg = owner_config("mnist-cnn", epochs=epochs)
    print(f"[1/4] clean model, {epochs} epochs: threshold on {len(wm.verify_y)} held-out 'TEST' images",
          flush=True)
    clean, curve = clean_wm_curve("mnist-cnn", tr, {"zhang-content": wm}, cfg, test=te, seed=1,
                                  progress="clean" if progress else False)
    n = len(wm.verify_y)
    points = [CleanPoint(1, int(h["epoch"]), round(h["wm:zhang-content_acc"] * n / 100), n, h["test_acc"],
                         curve[-1]["test_acc"]) for h in curve]
    threshold = threshold_rule("converged", points).threshold
    print(f"[2/4] owner embeds zhang-content ({len(wm.embed_y)} stamped training images -> class 0)", flush=True)
    model = build("mnist-cnn", 10, seed=0)
    embed(model, tr, wm, cfg, test=te, progress="embed" if progress else False)
    attacker = D.stratified_subset(tr, fraction=budget, seed=0)
    print(f"[3/4] attacker launders it with {len(attacker)} clean images (Neural Cleanse over 10 classes, "
          "Algorithm 1, retraining)", flush=True)
    lcfg = launder_config("strong")
    bars = LaunderBars(progress)
    try:
        res = run_launder(model, attacker, lcfg, evaluate=evaluator(te, wm), on_progress=bars).result
    finally:
        bars.close()
    print("[4/4] verifying", flush=True)
    rows = []
    for name, m in (("clean", clean), ("watermarked", model), ("laundered", res.model)):
        v = verify(m, wm, threshold, test=(te.x, te.y), num_classes=te.num_classes)
        rows.append({"stage": name, "test_acc": accuracy(m, te.x, te.y), **v.as_dict(), "word": v.word,
                     "p_text": format_p(v.p_value, v.p_log10)})
    out_dir.mkdir(parents=True, exist_ok=True)
    base_meta = model_meta("mnist-cnn", "mnist", 10, seed=0, config=cfg, scheme="zhang-content",
                           scheme_params=wm.params)
    save_model(out_dir / "watermarked", model, base_meta)
    save_model(out_dir / "laundered", res.model, {**base_meta, "launder": res.report()})
    nc = res.nc[0]
    trigger_grid(nc.masks, nc.patterns, nc.l1.tolist(), nc.anomaly.tolist(), nc.flagged, tr.classes,
                 out_dir / "triggers.png", title="Neural Cleanse on the watermarked model", example=attacker.x[0])
    before_after(rows, threshold, out_dir / "before_after.png",
                 title="zhang-content on MNIST: embed, verify, launder (0.6% of the data), verify")
    result = {"threshold": threshold, "rows": rows, "launder": res.report(), "seconds": clock.now() - t0}
    atomic_write_json(out_dir / "demo.json", result)
    print()
    print(f"{'model':<12} {'test acc':>9} {'WM acc':>8} {'threshold':>10} {'p-value':>9}  verdict")
    for r in rows:
        print(f"{r['stage']:<12} {r['test_acc']:>8.2f}% {r['wm_acc']:>7.2f}% {r['threshold']:>9.2f}% "
              f"{r['p_text']:>9}  {r['word']}")
    print(f"\n{result['seconds']:.0f} s; models, demo.json, before_after.png and triggers.png in {out_dir}/")
    return result
