"""Benchmark: the paper's Table 2 — one round of laundering per watermarked model.

    python benchmarks/table2.py --datasets mnist              # ~15 min on 2 CPU cores
    python benchmarks/table2.py --datasets mnist --timing     # + batched vs per-class NC timing

Needs the models and thresholds written by benchmarks/embed.py. Writes
benchmarks/results/table2.json + table2.md (our chosen attack, one row per paper row),
table2-variants.json (every configuration tried, including the paper-faithful variant) and
triggers-<dataset>-<scheme>.png (the recovered triggers).

Attack hyper-parameters are chosen per dataset and architecture from attacker-side signals only
(a fair protocol: never the owner's verification set): the attacker holds out 20% of its clean set,
launders with each candidate (DT, CT, retraining epochs) and keeps the most aggressive one
(lowest thresholds, then fewest epochs) whose held-out accuracy is within 1 point of the best
candidate's, averaged over the models of that architecture. The owner's verification set is
measured only for the report.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch
from common import joint_choice, most_aggressive_within, row_label

from nnlaunder import data as D
from nnlaunder.attacks.laundering import launder, launder_config, reset_and_retrain, split_holdout, used_triggers
from nnlaunder.attacks.neural_cleanse import nc_config, neural_cleanse, stamp
from nnlaunder.attacks.units import discover_units, select_units
from nnlaunder.checkpoint import atomic_write_bytes, atomic_write_json, load_model, model_digest
from nnlaunder.errors import UserError
from nnlaunder.experiments.evaluate import evaluator
from nnlaunder.report.plots import trigger_grid
from nnlaunder.train import accuracy, predict
from nnlaunder.watermarks.schemes import make_watermark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Aiken et al. Table 2, "Ours" rows.
PAPER = {
    ("mnist", "zhang-content"): dict(orig_test_acc=99.90, test_acc=98.34, orig_wm_acc=100, wm_acc=0.01, threshold=1.5),
    ("mnist", "zhang-noise"): dict(orig_test_acc=99.86, test_acc=97.45, orig_wm_acc=99.99, wm_acc=0.07, threshold=6.0),
    ("mnist", "zhang-unrelated"): dict(orig_test_acc=99.92, test_acc=98.33, orig_wm_acc=99.71, wm_acc=15,
                                       threshold=20),
    ("cifar10", "zhang-content"): dict(orig_test_acc=90.24, test_acc=87.65, orig_wm_acc=100, wm_acc=1.4, threshold=5),
    ("cifar10", "zhang-noise"): dict(orig_test_acc=89.01, test_acc=84.14, orig_wm_acc=100, wm_acc=0.5, threshold=4),
    ("cifar10", "zhang-unrelated"): dict(orig_test_acc=89.77, test_acc=85.34, orig_wm_acc=99.94, wm_acc=16,
                                         threshold=52),
    ("cifar10", "adi-pt"): dict(orig_test_acc=91.55, test_acc=88.25, orig_wm_acc=100, wm_acc=7.0, threshold=12),
    ("cifar10", "adi-fs"): dict(orig_test_acc=91.85, test_acc=84.73, orig_wm_acc=100, wm_acc=7.0, threshold=12),
}
# Rows that were run but have no JSON row, with what happened (shown under the table).
MISSING_NOTES: dict[str, str] = {}
# Notes shown under the table when the row exists.
ROW_NOTES = {
    "cifar10/adi-pt": (
        "Run on 2 CPU cores with Neural Cleanse's fast preset (docs/methods.md). Its options are the joint choice "
        "for ResNet-20 (`--fixed joint`: DT 0.5, CT 2.0, 5 epochs): the rule applied to both Adi models' "
        "calibration records, adi-PT's read from the log of its H100 run "
        "(benchmarks/results/logs/table2-cifar10-adi-pt-h100.log, imported with `python benchmarks/table2.py "
        "--datasets cifar10 --models adi-pt --import-calibration-log <log>`). Calibrated alone, adi-PT's records "
        "choose CT 1.0; with that choice the same CPU setup gives test 91.18 → 87.48%, WM 100 → 59% (faithful "
        "Neural Cleanse on the H100: 88.24%, 60%): not removed either. The paper's steps, each alone and all "
        "together, do not remove it either on seed 0 (table2-ablation.md); the three smallest triggers (+topk) "
        "lower WM most, to 53% (adi-FS: 60%), still above the 30.92% threshold. Adi's watermark has random labels "
        "over every class, so no single recovered trigger stands for it (a class is flagged in none of adi-PT's 5 "
        "seeds and in 2 of adi-FS's: table2-seeds.json). Neural "
        "Cleanse's presets disagree here: on seed 0 the smallest mask is class 3 with the fast preset and "
        "class 2 with the faithful one (table2-nc-check.md). The outcome does not hang on that choice: on the same "
        "seed +topk acts on classes 2, 3 and 5 together and the watermark stays (53%, table2-ablation.md). "
        "Given the owner's 100 trigger images instead of "
        "recovered triggers (the oracle of docs/cifar10.md), retraining removes the watermark at 1.1-1.5 points "
        "with no reset at all: for Adi the bottleneck is Neural Cleanse, whose mask-and-pattern trigger cannot "
        "express an abstract image."),
    "cifar10/adi-fs": (
        "Options as adi-PT's (the joint choice for ResNet-20). Not removed by any ablation variant on seed 0 "
        "(table2-ablation.md: +topk lowers WM most, 83 → 60%)."),
    "cifar10/zhang-noise": (
        "Removed in 0/5 attacker seeds with the row's options (the joint choice for the Table 7 CNN: DT 0.5 / "
        "CT 2.0 / 20 epochs), on 2 CPU cores (table2-seeds.md). It is not the class Neural Cleanse hands over "
        "that decides this row: given the owner's true noised images instead of any recovered trigger (the "
        "oracle of docs/cifar10.md), Algorithm 1 resets 48 channels and the model falls to 76-79% test while "
        "1.9-4.1% of the noised images still go to airplane, far above the 0.05% that converged clean models "
        "reach. Every arm that brings the watermark under the threshold (CT 1.0 or 2.0, one, three or all ten "
        "recovered triggers) costs 5-10 points of test accuracy: destroyed, not removed (cifar10-decided.md). "
        "No attacker-side rule would choose a different default from these results: none removes the row."),
    "cifar10/zhang-content": (
        "The owner model was topped up to reach the 98% watermark bar (benchmarks/results/topup.md; "
        "WM 97.78 → 98.51%). This model's attacker-side calibration was redone on it (`--fixed joint "
        "--recalibrate`), because its records had been made on the earlier model (models/cifar10/zhang-content-v1). "
        "The rule over the three Table 7 CNN models then chose DT 0.5 / CT 2.0 / 20 epochs instead of CT 1.0, "
        "and the noise and unrelated rows were re-run with that choice. To be plain about it: with the "
        "earlier choice (CT 1.0) this row gave test 84.63%, WM 2.07%, 0.02 points short of the 3-point bar, and "
        "that shortfall is why the stale records were looked at; the new choice came from the "
        "attacker's held-out accuracy alone (calibration table below), and no seed was re-tried. "
        "Faithful Neural Cleanse took 246 s on a 2-core AVX-512 CPU (369 s on another 2-core CPU). "
        "The decomposition of docs/cifar10.md: with the owner's true trigger images (the oracle) the result is "
        "the same (WM 1.4-2.0%, 85.5-86.0% test), so trigger recovery is not what limits this row; retraining on "
        "300 images costs about 3 points whatever the triggers. The faithful variant loses 21-25 points at lr "
        "1e-3 and still 9-10 at lr 1e-4: its cost is not the learning rate alone."),
    "cifar10/zhang-unrelated": (
        "Removed in 0/5 seeds. Given the owner's own trigger images (the oracle of docs/cifar10.md) Algorithm 1 "
        "and retraining take the watermark to 3.3-3.8% but the model to 84.2-85.1% (3.8-4.7 points lost): "
        "destroyed; so do the paper's recovered masks as retraining images (WM 0% at 63-81% test). The limit is "
        "reset-and-retrain at 300 images, not trigger recovery (cifar10-decided.md)."),
}
ROWS = {
    "mnist": [("zhang-content", 0.006), ("zhang-noise", 0.006), ("zhang-unrelated", 0.006)],
    "cifar10": [("zhang-content", 0.006), ("zhang-noise", 0.006), ("zhang-unrelated", 0.006),
                ("adi-pt", 0.108), ("adi-fs", 0.108)],
}
# Candidates: thresholds relative to the layer's mean clean activation × retraining epochs.
GRID = [(dt, ct, ep) for dt in (0.5, 1.0, 2.0) for ct in (1.0, 2.0) for ep in (5, 20)]


CALIBRATION_LINE = re.compile(r"calibration (\S+) dt ([\d.]+) ct ([\d.]+) epochs (\d+): attacker held-out acc "
                              r"([\d.]+)%, residual trigger flips ([\d.]+)%")


def calibration_from_log(text: str, ds: str, name: str, scheme: str, log: str) -> list[dict]:
    """Calibration records printed by an earlier run whose JSON was lost (attacker-side columns only)."""
    out = []
    for m in CALIBRATION_LINE.finditer(text):
        arch, dt, ct, ep, acc, flip = m.groups()
        out.append({"dataset": ds, "arch": arch, "scheme": scheme, "name": name, "stage": "calibration",
                    "dt": float(dt), "ct": float(ct), "epochs": int(ep), "attacker_acc": float(acc),
                    "residual_flip": float(flip), "test_acc": None, "wm_acc": None, "from_log": log})
    return out


def residual_flip(model, held, nc, used) -> float:
    """Attacker-side: how often the recovered triggers still send held-out images to their class (%)."""
    rates = []
    for t in used:
        keep = held.y != t
        if keep.any():
            xs = stamp(held.x[keep], nc.masks[t], nc.patterns[t])
            rates.append(100.0 * float((predict(model, xs) == t).float().mean()))
    return sum(rates) / max(len(rates), 1)


def calibrate(group: list[dict], arch: str, ds: str, args) -> tuple[list[dict], dict]:
    """The attacker-side calibration of one architecture over the models in `group`: every GRID
    candidate on 80% of each attacker set, scored on the 20% held out. Returns (records, scores)."""
    scores = {}
    variants: list[dict] = []
    for dt, ct, ep in GRID:
        base = launder_config("strong")
        cfg = launder_config("strong", dt=dt, ct=ct, holdout=0.2, seed=args.seed,
                             retrain=dataclasses.replace(base.retrain, epochs=ep),
                             layers="second-half" if arch == "resnet20" else "all")
        accs, flips = [], []
        for it in group:
            m = copy.deepcopy(it["model"])
            part, held = split_holdout(it["clean"], cfg.holdout, cfg.seed)
            units = select_units(discover_units(m, part.x[:2])[0], cfg.layers)
            _, resets, _ = reset_and_retrain(m, part, it["nc"], cfg, units, {})
            accs.append(accuracy(m, held.x, held.y))
            flips.append(residual_flip(m, held, it["nc"], used_triggers(it["nc"], cfg.triggers, cfg.top_k)))
            variants.append({"dataset": ds, "arch": arch, "scheme": it["meta"]["scheme"], "name": it["name"],
                             "stage": "calibration", "dt": dt, "ct": ct, "epochs": ep, "attacker_acc": accs[-1],
                             "residual_flip": flips[-1], "resets": resets, **it["ev"](1, m)})
        scores[(dt, ct, ep)] = (sum(accs) / len(accs), sum(flips) / len(flips))
        print(f"    calibration {arch} dt {dt} ct {ct} epochs {ep}: attacker held-out acc "
              f"{scores[(dt, ct, ep)][0]:.2f}%, residual trigger flips {scores[(dt, ct, ep)][1]:.2f}%", flush=True)
    return variants, scores


def run_dataset(ds: str, args) -> tuple[list[dict], list[dict]]:
    tr, te = D.load(ds, args.data_dir, "train"), D.load(ds, args.data_dir, "test")
    th_path = RESULTS / f"thresholds-{ds}.json"
    if not th_path.is_file():
        raise SystemExit(f"{th_path} is missing: run benchmarks/embed.py --datasets {ds} first")
    thresholds = json.loads(th_path.read_text())["thresholds"]
    cmd = f"python benchmarks/table2.py --datasets {ds}" + (" --timing" if args.timing else "")
    if args.models:
        cmd += f" --models {','.join(args.models)}"
    if args.fixed:
        cmd += " --fixed " + (args.fixed if isinstance(args.fixed, str) else ",".join(str(v) for v in args.fixed))
    if args.recalibrate:
        cmd += " --recalibrate"
    if args.nc_preset != "faithful":
        cmd += f" --nc-preset {args.nc_preset}"
    if not args.faithful:
        cmd += " --no-faithful"
    nc_cfg = nc_config(args.nc_preset)
    items = []
    for name, budget in ROWS[ds]:
        if args.models and name not in args.models:
            continue
        path = ROOT / "models" / ds / name
        if not path.with_suffix(".safetensors").is_file():
            print(f"  {name}: no model at {path.relative_to(ROOT)}.safetensors; row skipped")
            continue
        model, meta = load_model(path)
        wm = make_watermark(meta["scheme"], tr, te, args.data_dir, meta.get("scheme_params") or {})
        clean = D.stratified_subset(tr, fraction=budget, seed=args.seed)
        ev = evaluator(te, wm)
        before = ev(0, model)
        print(f"  {name}: {len(clean)} clean images; Neural Cleanse over {tr.num_classes} classes ...", flush=True)
        nc = neural_cleanse(model, clean.x, nc_cfg, num_classes=tr.num_classes)
        print(f"    {nc.seconds:.0f} s, flagged {nc.flagged}, most likely {nc.most_likely}, "
              f"anomaly {[round(a, 2) for a in nc.anomaly.tolist()]}", flush=True)
        trigger_grid(nc.masks, nc.patterns, nc.l1.tolist(), nc.anomaly.tolist(), nc.flagged, tr.classes,
                     RESULTS / f"triggers-{ds}-{name}.png", title=f"{ds} {name}: Neural Cleanse (round 1)",
                     example=clean.x[0])
        items.append(dict(name=name, budget=budget, model=model, meta=meta, wm=wm, clean=clean, ev=ev,
                          before=before, nc=nc, threshold=thresholds[name],
                          file={"model": f"models/{ds}/{name}.safetensors", "model_sha256": model_digest(path)}))

    # Attacker-side calibration per architecture.
    variants: list[dict] = []
    chosen: dict[str, tuple[float, float]] = {}
    for arch in sorted({it["meta"]["arch"] for it in items}):
        group = [it for it in items if it["meta"]["arch"] == arch]
        if args.fixed == "joint":             # the rule over every model's calibration records
            if args.recalibrate:              # ... after calibrating the models of this run afresh
                names = {it["name"] for it in group}
                args.variants[:] = [v for v in args.variants if not (
                    v.get("stage") == "calibration" and v["dataset"] == ds and v["name"] in names)]
                new, _ = calibrate(group, arch, ds, args)
                args.variants += new          # main()'s list: the records are written with the rest
            try:
                chosen[arch], names = joint_choice(args.variants, ds, arch)  # one choice per architecture
            except UserError as e:
                raise SystemExit(f"table2.py: error: {e} in table2-variants.json") from None
            print(f"    joint choice for {arch} over {names}: dt {chosen[arch][0]}, ct {chosen[arch][1]}, "
                  f"{chosen[arch][2]} epochs", flush=True)
            continue
        if args.fixed:                        # a choice made earlier by this same rule (see --fixed)
            chosen[arch] = args.fixed
            print(f"    fixed for {arch}: dt {args.fixed[0]}, ct {args.fixed[1]}, {args.fixed[2]} epochs", flush=True)
            continue
        new, scores = calibrate(group, arch, ds, args)
        variants += new
        chosen[arch] = most_aggressive_within({k: a for k, (a, _) in scores.items()})
        print(f"    chosen for {arch}: dt {chosen[arch][0]}, ct {chosen[arch][1]} (relative), "
              f"{chosen[arch][2]} retraining epochs", flush=True)

    rows = []
    for it in items:
        arch = it["meta"]["arch"]
        dt, ct, ep = chosen[arch]
        layers = "second-half" if arch == "resnet20" else "all"
        strong = {"dt": dt, "ct": ct, "retrain": dataclasses.replace(launder_config("strong").retrain, epochs=ep)}
        for variant, over in (("strong", strong), ("faithful", {}))[:2 if args.faithful else 1]:
            cfg = launder_config(variant, seed=args.seed, layers=layers, nc=nc_cfg, **over)
            t0 = time.perf_counter()
            res = launder(it["model"], it["clean"], cfg, on_round=it["ev"], first_nc=it["nc"])
            seconds = time.perf_counter() - t0 + it["nc"].seconds
            rnd = res.rounds[-1]
            row = {"dataset": ds, "arch": arch, "scheme": it["meta"]["scheme"], "name": it["name"],
                   "attack": "launder",
                   "variant": variant, "budget": it["budget"], "n_clean": len(it["clean"]), "rounds": len(res.rounds),
                   "orig_test_acc": it["before"]["test_acc"], "orig_wm_acc": it["before"]["wm_acc"],
                   "test_acc": rnd.metrics["test_acc"], "wm_acc": rnd.metrics["wm_acc"],
                   "threshold": it["threshold"], "removed": rnd.metrics["wm_acc"] < it["threshold"],
                   "seconds": seconds, "nc_seconds": it["nc"].seconds, "retrain_seconds": rnd.retrain_seconds,
                   "nc_epochs": rnd.nc_epochs, "flagged": rnd.flagged, "used_triggers": rnd.used_triggers,
                   "anomaly": rnd.anomaly, "resets": rnd.resets, "nc_preset": args.nc_preset,
                   "config": {"dt": cfg.dt, "ct": cfg.ct, "threshold_mode": cfg.threshold_mode,
                              "triggers": cfg.triggers, "add_masks": cfg.add_masks, "layers": cfg.layers,
                              "retrain": dataclasses.asdict(cfg.retrain)},
                   "paper": PAPER.get((ds, it["name"])), "command": cmd, **it["file"]}
            if it["meta"]["scheme"] == "adi":
                row["mode"] = it["meta"]["scheme_params"]["mode"]
            (rows if variant == "strong" else variants).append(row)
            print(f"  {it['name']} [{variant}]: test {row['orig_test_acc']:.2f} -> {row['test_acc']:.2f}%, "
                  f"WM {row['orig_wm_acc']:.2f} -> {row['wm_acc']:.2f}% (threshold {row['threshold']:.2f}%), "
                  f"{seconds:.0f} s", flush=True)
    if args.timing and items:
        rows_t = timing(items[0], args)
        for r in rows:
            if r["scheme"] == items[0]["meta"]["scheme"]:
                r["timing"] = rows_t
    return rows, variants


def timing(it: dict, args) -> dict:
    """Neural Cleanse over all classes and one laundering round, batched vs the per-class loop."""
    out = {"model": it["name"], "threads": torch.get_num_threads()}
    cfg = launder_config("strong")
    for mode in ("batched", "per_class"):
        t0 = time.perf_counter()
        nc = neural_cleanse(it["model"], it["clean"].x, cfg.nc, num_classes=it["clean"].num_classes,
                            per_class=(mode == "per_class"))
        out[f"nc_{mode}_seconds"] = time.perf_counter() - t0
        out[f"nc_{mode}_l1"] = nc.l1.tolist()
        print(f"    timing: Neural Cleanse {mode}: {out[f'nc_{mode}_seconds']:.0f} s", flush=True)
    out["nc_speedup"] = out["nc_per_class_seconds"] / out["nc_batched_seconds"]
    return out


def fmt(v, d=2):
    return "–" if v is None else f"{v:.{d}f}"


def _outcome_cell(r: dict) -> str:
    """The row's outcome: over its seeds where it stands for the seeds protocol, else its own."""
    s = r.get("seeds")
    if not s:
        return r.get("outcome", "removed" if r["removed"] else "kept")
    n = s["n"]
    cell = f"removed {s['removed']}/{n}" if s["removed"] else f"**removed 0/{n}**"
    return cell + (f", destroyed {s['destroyed']}/{n}" if s.get("destroyed") else "")


def write_markdown(rows: list[dict], variants: list[dict]) -> str:
    lines = ["# Table 2: one round of laundering", "",
             "Ours beside the paper's (Aiken et al. Table 2, \"Ours\" rows) in parentheses. WM accuracy is on the",
             "owner's held-out verification triggers. Threshold: the default `converged` rule (verdicts.md), then",
             "the paper's rule (the maximum over every clean epoch) and the paper's own figure in parentheses.",
             "Outcome (docs/methods.md#verification-and-verdicts): removed = the verdict of `nnlaunder verify` (the",
             "threshold test and the base-rate check) no longer shows ownership and the model lost at most 3 points",
             "of test accuracy; destroyed = it lost more; kept = ownership still shown.", "",
             "| dataset | scheme | budget | test acc % before → after (paper after) | WM acc % before → after "
             "(paper after) | threshold % (paper's rule; paper) | outcome | resets | NC s | total s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {(ds, n): i for i, (ds, n) in enumerate((d, n) for d in ROWS for n, _ in ROWS[d])}
    rows = sorted(rows, key=lambda r: order.get(
        (r["dataset"], r.get("name") or r["scheme"] + (f"-{r['mode']}" if r.get("mode") else "")), len(order)))
    for r in rows:
        p, scheme = r.get("paper") or {}, row_label(r)
        lines.append(
            f"| {r['dataset']} | {scheme} | {r['budget']:.1%} ({r['n_clean']}) | {fmt(r['orig_test_acc'])} → "
            f"**{fmt(r['test_acc'])}** ({fmt(p.get('test_acc'))}) | {fmt(r['orig_wm_acc'])} → **{fmt(r['wm_acc'])}** "
            f"({fmt(p.get('wm_acc'))}) | {fmt(r['threshold'])} ({fmt(r.get('threshold_paper'))}; "
            f"{fmt(p.get('threshold'), 1)}) | {_outcome_cell(r)}"
            f" | {sum(r['resets'].values())} | {r['nc_seconds']:.0f}"
            f"{'' if r.get('nc_preset', 'faithful') == 'faithful' else ' (' + r['nc_preset'] + ' NC)'} "
            f"| {r['seconds']:.0f} |")
    if any(r.get("seeds") for r in rows):
        lines += ["", "Rows with a seed count are the median-WM seed of the seeds protocol (table2-seeds.md: removal "
                  "rate with its interval, test accuracy mean ± sd, over 5 attacker seeds, the fast Neural Cleanse "
                  "preset); the others are one run with seed 0."]
    missing = sorted(f"{d}/{s}" for d, s in PAPER if not any(
        r["dataset"] == d and (r["scheme"] + (f"-{r['mode']}" if r.get("mode") else "")) == s for r in rows))
    for m in missing:
        lines += ["", f"**{m}: no row.** " + MISSING_NOTES.get(m, "Not run yet (no owner model).")]
    for r in rows:
        key = f"{r['dataset']}/{r['scheme']}" + (f"-{r['mode']}" if r.get("mode") else "")
        if key in ROW_NOTES:
            lines += ["", f"**{key}:** " + ROW_NOTES[key]]
    if rows:
        c = rows[0]["config"]
        lines += ["", "Attack (\"strong\" variant): Neural Cleanse as Wang et al.; Algorithm 1 on the flagged trigger "
                  "(smallest-mask class when none is flagged), thresholds relative to each layer's mean clean "
                  f"activation, chosen per architecture by the attacker-side rule in the script's docstring; "
                  f"retraining for the chosen epochs (table below), batch {c['retrain']['batch_size']}, "
                  f"{c['retrain']['optimizer']} lr {c['retrain']['lr']} on the clean set + stamped images with true "
                  "labels."]
        lines += ["", "| dataset | arch | chosen DT | chosen CT | retraining epochs |", "|---|---|---|---|---|"]
        for key in sorted({(r["dataset"], r["arch"], r["config"]["dt"], r["config"]["ct"],
                            r["config"]["retrain"]["epochs"]) for r in rows}):
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} |")
    faithful = [v for v in variants if v.get("variant") == "faithful"]
    if faithful:
        lines += ["", "## The paper-faithful variant", "",
                  "All K recovered triggers, masks as images, absolute DT = CT = 0.5, 20 retraining epochs.", "",
                  "| dataset | scheme | test acc % | WM acc % | threshold % | removed |", "|---|---|---|---|---|---|"]
        for r in faithful:
            lines.append(f"| {r['dataset']} | {r['scheme']} | {fmt(r['test_acc'])} | {fmt(r['wm_acc'])} | "
                         f"{fmt(r['threshold'])} | {'yes' if r['removed'] else 'no'} |")
    cal = [v for v in variants if v.get("stage") == "calibration"]
    if cal:
        lines += ["", "## Attacker-side calibration (20% of the attacker's set held out)", "",
                  "WM accuracy here is shown for transparency only; the choice used the attacker's columns.", "",
                  "| dataset | model | DT | CT | epochs | attacker held-out acc % | residual trigger flips % "
                  "| test acc % | WM acc % |", "|---|---|---|---|---|---|---|---|---|"]
        for v in cal:
            lines.append(f"| {v['dataset']} | {v['name']} | {v['dt']} | {v['ct']} | {v['epochs']} | "
                         f"{fmt(v['attacker_acc'])} | "
                         f"{fmt(v['residual_flip'])} | {fmt(v['test_acc'])} | {fmt(v['wm_acc'])} |")
    timing_rows = [r["timing"] for r in rows if r.get("timing")]
    if timing_rows:
        t = timing_rows[0]
        lines += ["", "## Timing (MNIST, this machine)", "",
                  f"Neural Cleanse over all 10 classes on {t['model']}: batched {t['nc_batched_seconds']:.0f} s, "
                  f"per-class loop {t['nc_per_class_seconds']:.0f} s (×{t['nc_speedup']:.2f}); "
                  f"{t['threads']} threads. One whole laundering round (Neural Cleanse + Algorithm 1 + retraining) "
                  "is the `total s` column above. On 2 CPU cores one class's 32 images already keep both cores "
                  "busy, and every image's activations (32 channels at 24×24) pass through memory once per step "
                  "whether the classes are batched or not, so batching saves only Python and dispatch overhead "
                  "(perf.md: the per-class loop runs at 17% of the measured conv throughput); the batched form "
                  "pays off on accelerators and with many classes."]
    if any(not r["removed"] for r in rows):
        lines += ["", "Variants of Algorithm 1 tried on the rows not removed (union of every class's resets, "
                  "distillation, augmentation), with their costs: explore-reset-variants.md."]
    cmds = sorted({r["command"] for r in rows})
    lines += ["", "Commands:", *[f"    {c}" for c in cmds], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--models", default=None,
                    help="comma list of owner models to run (default: every row of the dataset); calibration is "
                         "per architecture over the models run together, so run all models of one architecture "
                         "in one call")
    ap.add_argument("--fixed", default=None, metavar="DT,CT,EPOCHS|joint",
                    help="skip the attacker-side calibration and use this (relative DT, CT, retraining epochs), "
                         "e.g. the choice a previous run of the calibration printed; 'joint': apply the rule to "
                         "the calibration records of all models of the architecture in table2-variants.json "
                         "(models calibrated in separate runs); recorded in the row")
    ap.add_argument("--recalibrate", action="store_true",
                    help="with --fixed joint: first redo the calibration of the models named by --models (their "
                         "old records are replaced), then apply the rule to every model's records")
    ap.add_argument("--import-calibration-log", default=None, metavar="LOG",
                    help="add the calibration lines of an earlier run's log (whose JSON was lost) to "
                         "table2-variants.json for the one model named by --models, then rewrite table2.md")
    ap.add_argument("--nc-preset", choices=("faithful", "fast"), default="faithful",
                    help="Neural Cleanse settings (docs/methods.md); recorded in each row")
    ap.add_argument("--no-faithful", dest="faithful", action="store_false",
                    help="skip the paper-faithful variant (saves its 20 retraining epochs)")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite table2.md from the JSON files")
    args = ap.parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    if args.recalibrate and args.fixed != "joint":
        print("table2.py: error: --recalibrate goes with --fixed joint", file=sys.stderr)
        return 2
    if args.fixed and args.fixed != "joint":
        try:
            dt, ct, ep = args.fixed.split(",")
            args.fixed = (float(dt), float(ct), int(ep))
        except ValueError:
            print(f"table2.py: error: --fixed wants DT,CT,EPOCHS (e.g. 0.5,1.0,5), got {args.fixed!r}", file=sys.stderr)
            return 2
    bad = [d for d in datasets if d not in ROWS]
    if bad:
        print(f"table2.py: error: unknown dataset(s) {bad}; choose from {sorted(ROWS)}", file=sys.stderr)
        return 2
    path, vpath = RESULTS / "table2.json", RESULTS / "table2-variants.json"
    if args.markdown_only:
        rows, variants = json.loads(path.read_text()), json.loads(vpath.read_text())
        atomic_write_bytes(RESULTS / "table2.md", write_markdown(rows, variants).encode())
        return 0
    def kept(r: dict) -> bool:            # rows this run does not replace
        name = r.get("name") or (r["scheme"] + (f"-{r['mode']}" if r.get("mode") else ""))
        if args.fixed and r.get("stage") == "calibration":
            return True                   # a run without calibration keeps the records its choice rests on
        return r["dataset"] not in datasets or (args.models is not None and name not in args.models)

    if args.import_calibration_log:
        if len(datasets) != 1 or not args.models or len(args.models) != 1:
            print("table2.py: error: --import-calibration-log needs one --datasets and one --models", file=sys.stderr)
            return 2
        log = Path(args.import_calibration_log)
        if not log.is_file():
            print(f"table2.py: error: no such log {log}", file=sys.stderr)
            return 2
        name = args.models[0]
        if name not in {n for n, _ in ROWS[datasets[0]]}:
            print(f"table2.py: error: {name!r} is not a {datasets[0]} row", file=sys.stderr)
            return 2
        try:
            shown = str(log.resolve().relative_to(ROOT))
        except ValueError:
            shown = str(log)
        scheme = "adi" if name.startswith("adi-") else name
        new = calibration_from_log(log.read_text(errors="replace"), datasets[0], name, scheme, shown)
        if not new:
            print(f"table2.py: error: no calibration lines in {log}", file=sys.stderr)
            return 2
        variants = [v for v in (json.loads(vpath.read_text()) if vpath.is_file() else [])
                    if not (v.get("stage") == "calibration" and v["dataset"] == datasets[0] and v["name"] == name)]
        variants += new
        rows = json.loads(path.read_text()) if path.is_file() else []
        atomic_write_json(vpath, variants)
        atomic_write_bytes(RESULTS / "table2.md", write_markdown(rows, variants).encode())
        print(f"added {len(new)} calibration records of {name} from {shown}")
        return 0

    rows = [r for r in (json.loads(path.read_text()) if path.is_file() else []) if kept(r)]
    variants = [r for r in (json.loads(vpath.read_text()) if vpath.is_file() else []) if kept(r)]
    args.variants = variants
    for ds in datasets:
        r, v = run_dataset(ds, args)
        rows += r
        variants += v
    atomic_write_json(path, rows)
    atomic_write_json(vpath, variants)
    atomic_write_bytes(RESULTS / "table2.md", write_markdown(rows, variants).encode())
    print(f"wrote {path}, {vpath.name}, table2.md")
    return 0


if __name__ == "__main__":

    sys.exit(main())
