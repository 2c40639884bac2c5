"""`nnlaunder demo`: the story in a few minutes on a laptop CPU.

1. Train a clean MNIST model (Table 5) and record how often it calls the "TEST"-stamped
   verification images "0" after every epoch: the vanilla threshold.
2. Embed a zhang-content watermark into a second model.
3. Verify both: the watermarked one proves ownership, the clean one does not.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import data as D
from .checkpoint import atomic_write_json, save_model
from .models import build
from .recipes import owner_config
from .train import accuracy
from .watermarks.embed import clean_wm_curve, embed, thresholds_from_curves
from .watermarks.schemes import make_watermark
from .watermarks.verify import verify


def run_demo(data_dir: str | None, out_dir: Path, epochs: int = 3, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    tr, te = D.load("mnist", data_dir, "train"), D.load("mnist", data_dir, "test")
    wm = make_watermark("zhang-content", tr, te, data_dir)
    cfg = owner_config("mnist-cnn", epochs=epochs)
    print(f"[1/3] clean model, {epochs} epochs: measuring the vanilla threshold on "
          f"{len(wm.verify_y)} held-out 'TEST' images")
    clean, curve = clean_wm_curve("mnist-cnn", tr, {"zhang-content": wm}, cfg, test=te, seed=1,
                                  progress="clean" if progress else False)
    threshold = thresholds_from_curves([curve], ["zhang-content"])["zhang-content"]
    print(f"[2/3] embedding zhang-content ({len(wm.embed_y)} stamped training images -> class 0)")
    model = build("mnist-cnn", 10, seed=0)
    embed(model, tr, wm, cfg, test=te, progress="embed" if progress else False)
    print("[3/3] verifying")
    rows = []
    for name, m in (("clean", clean), ("watermarked", model)):
        v = verify(m, wm, threshold)
        rows.append({"model": name, "test_acc": accuracy(m, te.x, te.y), **v.as_dict()})
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(out_dir / "watermarked", model, {"arch": "mnist-cnn", "num_classes": 10, "dataset": "mnist",
                                                "scheme": "zhang-content", "scheme_params": wm.params,
                                                "seed": 0, "config": cfg.__dict__})
    result = {"threshold": threshold, "rows": rows, "seconds": time.perf_counter() - t0}
    atomic_write_json(out_dir / "demo.json", result)
    print()
    print(f"{'model':<12} {'test acc':>9} {'WM acc':>8} {'threshold':>10} {'p-value':>9}  verdict")
    for r in rows:
        print(f"{r['model']:<12} {r['test_acc']:>8.2f}% {r['wm_acc']:>7.2f}% {r['threshold']:>9.2f}% "
              f"{r['p_value']:>9.2g}  {'OWNERSHIP SHOWN' if r['owned'] else 'no proof'}")
    print(f"\n{result['seconds']:.0f} s; model and demo.json in {out_dir}/")
    return result
