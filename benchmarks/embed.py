"""Benchmark: embed the paper's watermarks and measure them against the vanilla threshold.

    python benchmarks/embed.py --datasets mnist            # ~10 min on 2 CPU cores

Writes benchmarks/results/embed.json + embed.md (rows for the datasets run replace earlier rows
for those datasets) and benchmarks/results/thresholds-<dataset>.json (the clean models' per-epoch
watermark accuracy: Figure 5's data). Models go to models/<dataset>/<name>.safetensors (+ .json);
an existing model is loaded, not retrained, unless --retrain; a training that was stopped part-way
continues from its last finished epoch (models/<dataset>/<name>.ckpt/): the run is resumable.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from common import PAPER, ROOT, row_label, stored, write

from nnlaunder import data as D
from nnlaunder.checkpoint import load_model, save_model
from nnlaunder.device import compute_device
from nnlaunder.models import build
from nnlaunder.recipes import owner_config
from nnlaunder.train import accuracy
from nnlaunder.watermarks.embed import clean_wm_curve, embed
from nnlaunder.watermarks.schemes import make_watermark
from nnlaunder.watermarks.verify import vanilla_threshold, verify

DEVICE = str(compute_device())


def _paper(ds: str, name: str) -> dict | None:
    """The paper's owner model (Table 2, "Ours"): test and WM accuracy before laundering, and its threshold."""
    p = PAPER.get((ds, name))
    return p and {"test_acc": p["orig_test_acc"], "wm_acc": p["orig_wm_acc"], "threshold": p["threshold"]}


# (dataset) -> list of (row name, arch, scheme, scheme params)
PLAN = {
    "mnist": [("zhang-content", "mnist-cnn", "zhang-content", {}),
              ("zhang-noise", "mnist-cnn", "zhang-noise", {}),
              ("zhang-unrelated", "mnist-cnn", "zhang-unrelated", {})],
    "cifar10": [("zhang-content", "cifar-cnn", "zhang-content", {}),
                ("zhang-noise", "cifar-cnn", "zhang-noise", {}),
                ("zhang-unrelated", "cifar-cnn", "zhang-unrelated", {}),
                ("adi-fs", "resnet20", "adi", {"mode": "fs"}),
                ("adi-pt", "resnet20", "adi", {"mode": "pt"})],
}


def _get_or_train(path: Path, retrain: bool, make, no_train: bool = False):
    if path.with_suffix(".safetensors").is_file() and not retrain:
        print(f"  reusing {path.relative_to(ROOT)}.safetensors")
        return load_model(path)
    if no_train:
        print(f"  {path.relative_to(ROOT)}.safetensors missing; skipped (--no-train)")
        return None, None
    model, meta = make()
    save_model(path, model, meta)
    shutil.rmtree(path.with_suffix(".ckpt"), ignore_errors=True)   # finished: the epoch checkpoint is spent
    return model, meta


def _cpu_minutes(meta: dict, clean_meta: dict) -> tuple[float, bool]:
    """(CPU minutes for this model's epochs, measured?). Epochs trained on this 2-core CPU are
    summed as measured; models trained on a GPU get their epoch count × the median CPU epoch of
    the architecture's seed-0 clean model (its epochs over 60 s: the ones that ran on this CPU)."""
    hist = [r for r in meta["history"] if not r.get("topup")]
    top = meta.get("topup")      # benchmarks/topup.py's fine-tuning, measured where it ran
    extra, extra_ok = (0.0, True) if top is None else (top["seconds"] / 60, top["device"] == "cpu")
    if meta.get("device", "cpu") == "cpu":
        return sum(r["seconds"] for r in hist) / 60 + extra, extra_ok
    cpu = sorted(r["seconds"] for r in clean_meta["history"] if r["seconds"] > 60)
    if not cpu:
        return float("nan"), False
    return len(hist) * cpu[len(cpu) // 2] / 60 + extra, False


def run_dataset(ds: str, args: argparse.Namespace) -> list[dict]:
    tr, te = D.load(ds, args.data_dir, "train"), D.load(ds, args.data_dir, "test")
    mdir = ROOT / "models" / ds
    plan = PLAN[ds]
    wms = {name: make_watermark(scheme, tr, te, args.data_dir, params) for name, _, scheme, params in plan}
    cmd = f"python benchmarks/embed.py --datasets {ds} --seeds {','.join(map(str, args.seeds))}"
    rows: list[dict] = []
    arches = sorted({arch for _, arch, _, _ in plan})

    # 1. Clean models per architecture and seed: the vanilla threshold (Aiken et al. §7.1).
    thresholds: dict[str, float] = {}
    clean: dict[str, tuple[torch.nn.Module, dict]] = {}
    curves_out = {}
    for arch in arches:
        names = [n for n, a, _, _ in plan if a == arch]
        curves, metas = [], []
        for seed in args.seeds:
            cfg = owner_config(arch, seed=seed, **({"epochs": args.epochs} if args.epochs else {}))
            if args.only and f"clean-{arch}-s{seed}" not in args.only:
                continue

            def make(cfg=cfg, seed=seed, arch=arch, names=names):
                t0 = time.perf_counter()
                m, hist = clean_wm_curve(arch, tr, {n: wms[n] for n in names}, cfg, test=te, seed=seed,
                                         progress=f"clean {arch} s{seed}", resume=True,
                                         checkpoint_dir=mdir / f"clean-{arch}-s{seed}.ckpt")
                return m, {"arch": arch, "num_classes": tr.num_classes, "dataset": ds, "scheme": None,
                           "seed": seed, "config": cfg.__dict__, "history": hist, "command": cmd,
                           "device": DEVICE,
                           "seconds": time.perf_counter() - t0,
                           "metrics": {"test_acc": accuracy(m, te.x, te.y)}}

            model, meta = _get_or_train(mdir / f"clean-{arch}-s{seed}", args.retrain, make, args.no_train)
            if model is None:
                continue
            curves.append(meta["history"])
            metas.append(meta)
            if arch not in clean:
                clean[arch] = (model, meta)
        if args.only:
            continue
        # the paper's rule per scheme: the maximum over every epoch of every clean run
        thresholds.update({s: vanilla_threshold([[r[f"wm:{s}_acc"] for r in c] for c in curves]) for s in names})
        curves_out[arch] = {"seeds": [m["seed"] for m in metas], "curves": curves}
        rows.append({"dataset": ds, "arch": arch, "scheme": "clean", "test_acc": metas[0]["metrics"]["test_acc"],
                     "wm_acc": None, "threshold": None, "seconds": metas[0]["seconds"],
                     "device": metas[0].get("device", "cpu"), "cpu_minutes": _cpu_minutes(metas[0], metas[0]),
                     "epochs": len(metas[0]["history"]), "clean_test_acc": metas[0]["metrics"]["test_acc"],
                     "clean_test_acc_seeds": [m["metrics"]["test_acc"] for m in metas], "paper": None,
                     "command": cmd})
    if not args.only:
        write(f"thresholds-{ds}.json", {"dataset": ds, "thresholds": thresholds, "by_arch": curves_out,
                                        "command": cmd})

    # 2. Watermarked models.
    for name, arch, scheme, _params in plan:
        if args.only and name not in args.only:
            continue
        wm = wms[name]
        cfg = owner_config(arch, seed=0, **({"epochs": args.epochs} if args.epochs else {}))

        def make(wm=wm, cfg=cfg, arch=arch, scheme=scheme, name=name):
            t0 = time.perf_counter()
            if wm.params.get("mode") == "pt":   # Adi PT: fine-tune the clean pre-trained model
                model, _ = load_model(mdir / f"clean-{arch}-s{args.seeds[0]}")
            else:
                model = build(arch, tr.num_classes, seed=0)
            res = embed(model, tr, wm, cfg, test=te, progress=f"{name}", resume=True,
                        checkpoint_dir=mdir / f"{name}.ckpt")
            return model, {"arch": arch, "num_classes": tr.num_classes, "dataset": ds, "scheme": scheme,
                           "scheme_params": wm.params, "seed": 0, "config": cfg.__dict__, "history": res.history,
                           "command": cmd, "seconds": time.perf_counter() - t0, "device": DEVICE,
                           "metrics": {"test_acc": accuracy(model, te.x, te.y),
                                       "wm_acc": accuracy(model, wm.verify_x, wm.verify_y)}}

        model, meta = _get_or_train(mdir / name, args.retrain, make, args.no_train)
        if args.only or model is None:
            continue
        v = verify(model, wm, thresholds[name])
        row = {"dataset": ds, "arch": arch, "scheme": scheme, "test_acc": accuracy(model, te.x, te.y),
               "wm_acc": v.wm_acc, "threshold": thresholds[name], "p_value": v.p_value, "owned": v.owned,
               "n_verify": v.n, "n_embed": len(wm.embed_y),
               "seconds": meta["seconds"] + (meta["topup"]["seconds"] if "topup" in meta else 0.0),
               "device": meta.get("device", "cpu") + (f" + top-up {meta['topup']['device']}"
                                                      if "topup" in meta else ""),
               "cpu_minutes": _cpu_minutes(meta, clean[arch][1]),
               "epochs": len(meta["history"]), "clean_test_acc": clean[arch][1]["metrics"]["test_acc"],
               "paper": _paper(ds, name), "model": f"models/{ds}/{name}.safetensors",
               "command": meta.get("command", cmd)}
        if scheme == "adi":
            row["mode"] = wm.params["mode"]
        rows.append(row)
        print(f"  {name}: test {row['test_acc']:.2f}%  WM {row['wm_acc']:.2f}%  threshold {row['threshold']:.2f}%")
    return rows


def write_markdown(rows: list[dict]) -> str:
    def f(v, d=2):
        return "–" if v is None else f"{v:.{d}f}"

    def cpu_min(r):
        c = r.get("cpu_minutes")
        if c is None:
            return f"{r['seconds'] / 60:.1f}"
        return f"{'' if c[1] else '~'}{c[0]:.0f}"

    lines = ["# Embedding the watermarks", "",
             "Watermark accuracy is measured on held-out trigger inputs never used in training; the vanilla",
             "threshold is the highest watermark accuracy any clean model of the same task reached over any of",
             "its training epochs (Aiken et al. §7.1), over the seeds listed in thresholds-<dataset>.json.",
             "Paper figures: Aiken et al. Table 2 (\"Ours\" rows). \"wall min\" is the training's wall time on the",
             "device it ran on (cpu = this 2-core machine; cuda = an NVIDIA H100 shared by 7 trainings at once).",
             "\"CPU min\" is measured for CPU trainings and estimated (~) for GPU ones: epochs × the median",
             "CPU epoch of the same architecture measured here. Not speed claims (shared machines).", "",
             "| dataset | arch | scheme | test acc % (paper) | clean test acc % | WM acc % (paper) "
             "| vanilla threshold % (paper) | p-value | epochs | device | wall min | CPU min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.get("paper") or {}
        cells = [r["dataset"], r["arch"], row_label(r), f"{f(r['test_acc'])} ({f(p.get('test_acc'))})",
                 f(r["clean_test_acc"]), f"{f(r['wm_acc'])} ({f(p.get('wm_acc'))})",
                 f"{f(r['threshold'])} ({f(p.get('threshold'), 1)})",
                 "–" if r.get("p_value") is None else format(r["p_value"], ".2g"), str(r["epochs"]),
                 r.get("device", "cpu"), f"{r['seconds'] / 60:.1f}", cpu_min(r)]
        lines.append("| " + " | ".join(cells) + " |")
    cmds = sorted({r["command"] for r in rows})
    lines += ["", "Commands:", *[f"    {c}" for c in cmds], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist", help="comma list from: mnist, cifar10")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", default="0,1,2", help="clean-model seeds for the vanilla threshold")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (testing only)")
    ap.add_argument("--retrain", action="store_true", help="retrain models that already exist")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-train", action="store_true",
                    help="use the models that exist, skip missing ones (thresholds from the clean seeds found)")
    ap.add_argument("--only", default=None,
                    help="comma list of model names (clean-<arch>-s<seed>, zhang-content, adi-fs, ...): train "
                         "just these and write no tables (to train models in parallel processes)")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.only = {s.strip() for s in args.only.split(",") if s.strip()} if args.only else None
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in datasets if d not in PLAN]
    if bad:
        print(f"embed.py: error: unknown dataset(s) {bad}; choose from {sorted(PLAN)}", file=sys.stderr)
        return 2
    rows = [r for r in stored("embed.json") if r["dataset"] not in datasets]
    for ds in datasets:
        rows += run_dataset(ds, args)
    if args.only:
        print(f"trained/checked {sorted(args.only)}; tables not written (run without --only)")
        return 0
    order = {d: i for i, d in enumerate(PLAN)}
    rows.sort(key=lambda r: order.get(r["dataset"], 99))
    write("embed.json", rows)
    write("embed.md", write_markdown(rows))
    print("wrote benchmarks/results/embed.json and embed.md")
    return 0


if __name__ == "__main__":

    sys.exit(main())
