"""Benchmark: CIFAR-10, where laundering fails and why: the oracle decomposition and the decisive arms.

    python benchmarks/cifar_decided.py --arms oracle --seeds 3          # the oracle on every CIFAR-10 row
    python benchmarks/cifar_decided.py --rows zhang-noise --seeds 3     # every arm of one row
    python benchmarks/cifar_decided.py --markdown-only                  # rewrite cifar10-decided.md

Every run is one laundering round on the owner model of models/cifar10/ at the row's Table 2 budget
(0.6% of the training set; 10.8% for Adi); an attacker seed s draws the clean subset and seeds Neural
Cleanse and the retraining, as the engine's Table 2 cells do. Each finished (row, arm, seed) is written at once to
benchmarks/results/cifar10-decided.json, so an interrupted run continues where it stopped. Neural
Cleanse runs once per (row, seed) with the library's fast preset and is kept under runs/cifar-decided/.

Arms (LaunderConfig options over the row's headline attack, the one table2.json records):
  oracle        DIAGNOSTIC, never an attack: Algorithm 1 and the retraining get the owner's true trigger
                images in place of the recovered ones (content / noise: the attacker's clean images with
                the owner's stamp; unrelated / Adi: the owner's trigger images, one per clean image,
                labelled with that clean image's class, as a full-image mask would stamp them). Everything
                else is the headline attack. Only this script builds these images, from the owner's
                watermark; the library's attack code never receives them.
  the rest      see ARMS below; "reinit-half-only" is the control: no Neural Cleanse and no Algorithm 1.
Arms the Table 2 experiments run (strong: the headline attack; every variant of the ablation) are
carried into the table from table2-seeds.json / table2-ablation.json with their own commits.

Each run ends kept / hidden / removed / destroyed under the project's verdict rules (the default
`converged` threshold of verdicts.json, the base-rate check, 3 points of tolerance). A row's verdict
(fixed here before any arm ran):
  reproduced      an arm within the paper's method (one round of Neural Cleanse + Algorithm 1 +
                  retraining, any thresholds, triggers, masks, learning rate, <= 20 epochs) removes it
                  on more than half of its seeds;
  costlier        only an arm that adds a step the paper does not have (batch norms re-initialised,
                  the second half re-initialised) removes it on more than half of its seeds;
  not-reproduced  no arm does. The oracle and the control never decide a verdict.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time

import torch
from common import PAPER, ROOT, ROWS, default_thresholds, provenance, stored, write

from nnlaunder import data as D
from nnlaunder.attacks.laundering import launder_config, mask_images, reset_and_retrain_on, stamped_sets, used_triggers
from nnlaunder.attacks.neural_cleanse import nc_config
from nnlaunder.attacks.units import discover_units, select_units
from nnlaunder.checkpoint import load_model, model_digest
from nnlaunder.experiments.evaluate import evaluator
from nnlaunder.experiments.nc_memo import kept_nc
from nnlaunder.report.battery import over_seeds
from nnlaunder.watermarks.schemes import Watermark, make_watermark
from nnlaunder.watermarks.verify import DEFAULT_TOLERANCE, outcome

OUT = "cifar10-decided.json"
CACHE = ROOT / "runs" / "cifar-decided"
DS = "cifar10"
NC_PRESET = "fast"

_CT = {"triggers": "top-k", "top_k": 3, "diff": "per-trigger"}
_ABS = {"threshold_mode": "absolute", "dt": 0.5, "ct": 0.5, "add_masks": True}
_HALF = {"reinit": "second-half", "retrain_epochs": 20, "retrain_lr": 1e-3}
ARMS: dict[str, dict[str, dict]] = {
    "zhang-content": {
        "faithful": {"variant": "faithful"},
        "faithful-lr1e-4": {"variant": "faithful", "retrain_lr": 1e-4},
    },
    "zhang-noise": {
        "ct1-flagged": {"ct": 1.0},
        "ct1-top3": {"ct": 1.0, **_CT},
        "ct1-all": {"ct": 1.0, "triggers": "all"},
        "ct2-top3": {"ct": 2.0, **_CT},
        "ct2-all": {"ct": 2.0, "triggers": "all"},
        "faithful": {"variant": "faithful"},
        "faithful-lr1e-4": {"variant": "faithful", "retrain_lr": 1e-4},
    },
    "zhang-unrelated": {
        "abs-all-masks-lr1e-3": {**_ABS, "triggers": "all", "retrain_lr": 1e-3},
        "abs-all-masks-lr1e-4": {**_ABS, "triggers": "all", "retrain_lr": 1e-4},
        "abs-flagged-masks-lr1e-3": {**_ABS, "retrain_lr": 1e-3},
        "abs-flagged-masks-lr1e-4": {**_ABS, "retrain_lr": 1e-4},
        "faithful-random": {"variant": "faithful", "stamping": "random"},
        "faithful-lr1e-4": {"variant": "faithful", "retrain_lr": 1e-4},
    },
    **{adi: {
        "reinit-half": dict(_HALF),
        "reinit-half-only": {**_HALF, "no_nc": True},
        "bn-reinit-all": {"bn_stats": "reinit", "triggers": "all"},
    } for adi in ("adi-pt", "adi-fs")},
}
for _arms in ARMS.values():
    _arms["oracle"] = {"oracle": True}
# Arms that add a step the paper does not describe (a verdict built on them is "costlier").
BEYOND_PAPER = {"reinit-half", "bn-reinit-all", "+bn-reinit"}
DIAGNOSTIC = {"oracle", "reinit-half-only"}
# Arms the Table 2 experiments run (result file, its variant name -> the arm's name here): the headline
# attack and every variant of the ablation (experiments/paper/table2-ablation-cifar10.toml).
CARRIED = {("table2-seeds.json", "strong"): "strong",
           **{("table2-ablation.json", v): v for v in ("+bn", "+branch", "+masks", "+topk", "+all", "+bn-reinit",
                                                       "preset", "calibrated")}}


def headline_config(name: str) -> dict:
    """The strong attack table2.json records for the row: its DT, CT, layers and retraining epochs (an engine
    cell's settings, or a stored row's options), the strong variant's defaults for what it does not set."""
    strong = launder_config("strong")
    for r in stored("table2.json"):
        if (r["dataset"], r["name"]) == (DS, name):
            ap = r.get("options") or r["config"]["attack_params"]
            return {"dt": ap["dt"], "ct": ap["ct"], "layers": ap["layers"],
                    "retrain_epochs": ap["retrain_epochs"] if "options" in r else ap["retrain"]["epochs"],
                    **{k: ap.get(k, getattr(strong, k)) for k in ("threshold_mode", "triggers", "add_masks")}}
    raise SystemExit(f"cifar_decided.py: error: table2.json has no {DS}/{name} row to take the attack from")


def oracle_images(wm: Watermark, clean: D.Dataset) -> list[torch.Tensor]:
    """The owner's true trigger images, aligned with the clean set (the oracle's stand-in for the
    recovered triggers' stamped images)."""
    if wm.stamp is not None:
        return [wm.stamp(clean.x)]
    idx = torch.arange(len(clean)) % len(wm.embed_x)
    return [wm.embed_x[idx]]


def arm_config(head: dict, spec: dict, seed: int, nc_cfg):
    spec = {k: v for k, v in spec.items() if k not in ("oracle", "no_nc")}
    variant = spec.pop("variant", "strong")
    base = launder_config(variant).retrain
    retrain = dataclasses.replace(base, epochs=spec.pop("retrain_epochs", head["retrain_epochs"] if variant == "strong"
                                                         else base.epochs),
                                  lr=spec.pop("retrain_lr", base.lr), seed=seed)
    opts = {k: head[k] for k in ("dt", "ct", "layers", "threshold_mode", "triggers", "add_masks")}
    if variant != "strong":
        opts = {"layers": head["layers"]}   # the paper's deep-ResNet layer choice; the rest is the variant's
    return launder_config(variant, retrain=retrain, nc=nc_cfg, seed=seed, **{**opts, **spec})


def run_arm(model, clean, wm, nc, cfg, spec) -> tuple[object, dict]:
    """One round: Algorithm 1 + retraining on the images the arm says. Returns (model, facts)."""
    m = copy.deepcopy(model)
    units = select_units(discover_units(m, clean.x[:2])[0], cfg.layers)
    extra, used = None, []
    if spec.get("oracle"):
        stamped = oracle_images(wm, clean)
    elif spec.get("no_nc"):
        stamped = []
    else:
        used = used_triggers(nc, cfg.triggers, cfg.top_k)
        stamped = stamped_sets(clean, nc, used)
        extra = mask_images(clean, nc, used) if cfg.add_masks else None
    _, resets, secs = reset_and_retrain_on(m, clean, stamped, cfg, units, {}, 1, None, extra)
    m.eval()
    return m, {"used_triggers": used, "resets": resets, "retrain_seconds": secs}


def landing(model, wm: Watermark) -> dict[str, float]:
    """Where the verification images land: share of each class, percent."""
    with torch.no_grad():
        pred = torch.cat([model(wm.verify_x[i:i + 1000]).argmax(1) for i in range(0, len(wm.verify_x), 1000)])
    return {str(c): round(100.0 * float((pred == c).float().mean()), 2) for c in range(10)}


def _options(cfg) -> dict:
    keys = ("dt", "ct", "threshold_mode", "layers", "triggers", "top_k", "add_masks", "diff", "bn_stats",
            "stamping", "reinit")
    return {**{k: getattr(cfg, k) for k in keys}, "retrain_epochs": cfg.retrain.epochs, "retrain_lr": cfg.retrain.lr}


def run(args) -> None:
    cmd = "python benchmarks/cifar_decided.py " + " ".join(sys.argv[1:])
    rows = stored(OUT, {"rows": []})["rows"]
    done = {(r["row"], r["arm"], r["seed"]) for r in rows if r.get("source") is None}
    tr, te = D.load(DS, args.data_dir, "train"), D.load(DS, args.data_dir, "test")
    th = default_thresholds(DS)
    budgets = dict(ROWS[DS])
    for name in args.rows:
        arms = [a for a in ARMS[name] if not args.arms or a in args.arms]
        path = ROOT / "models" / DS / name
        model, meta = load_model(path)
        sha = model_digest(path)
        wm = make_watermark(meta["scheme"], tr, te, args.data_dir, meta.get("scheme_params") or {})
        ev = evaluator(te, wm, th[name])
        head = headline_config(name)
        before = None
        for seed in args.seeds:
            for arm in arms:
                if (name, arm, seed) in done:
                    continue
                spec = ARMS[name][arm]
                before = before or ev(0, model)
                clean = D.stratified_subset(tr, fraction=budgets[name], seed=seed)
                nc_cfg = dataclasses.replace(nc_config(NC_PRESET), seed=seed)
                nc = None
                if not (spec.get("oracle") or spec.get("no_nc")):
                    nc = kept_nc(CACHE, model, clean, nc_cfg)
                cfg = arm_config(head, spec, seed, nc_cfg)
                t0 = time.perf_counter()
                m, facts = run_arm(model, clean, wm, nc, cfg, spec)
                after = ev(1, m)
                drop = before["test_acc"] - after["test_acc"]
                out = outcome(bool(after.get("owned")), drop, None, DEFAULT_TOLERANCE)
                row = {"row": name, "arm": arm, "seed": seed, "dataset": DS, "arch": meta["arch"],
                       "budget": budgets[name], "n_clean": len(clean), "orig_test_acc": before["test_acc"],
                       "orig_wm_acc": before["wm_acc"], "test_acc": after["test_acc"], "wm_acc": after["wm_acc"],
                       "test_drop": drop, "owned": bool(after.get("owned")), "status": after.get("status"),
                       "base_rate": after.get("base_rate"), "threshold": th[name], "threshold_rule": "converged",
                       "tolerance": DEFAULT_TOLERANCE, "outcome": out, "oracle": bool(spec.get("oracle")),
                       "options": _options(cfg), "nc_preset": None if nc is None else NC_PRESET,
                       "flagged": None if nc is None else nc.flagged,
                       "smallest": None if nc is None else nc.most_likely,
                       "nc_seconds": None if nc is None else nc.seconds, **facts,
                       "seconds": time.perf_counter() - t0 + (nc.seconds if nc is not None else 0.0),
                       "landing": landing(m, wm) if name == "zhang-unrelated" else None,
                       **provenance(cmd), "model": f"models/{DS}/{name}.safetensors", "model_sha256": sha}
                rows.append(row)
                done.add((name, arm, seed))
                write_rows(rows)
                print(f"{name} [{arm}] seed {seed}: test {before['test_acc']:.2f} -> {after['test_acc']:.2f}%, WM "
                      f"{before['wm_acc']:.2f} -> {after['wm_acc']:.2f}% (threshold {th[name]:.2f}%) {out}, "
                      f"resets {sum(facts['resets'].values())}, {row['seconds']:.0f} s", flush=True)


# ---- the carried arms, the verdicts and the table
def carried() -> list[dict]:
    out = []
    for (fname, variant), arm in CARRIED.items():
        for r in stored(fname):
            if r["dataset"] == DS and r["variant"] == variant and r.get("nc_preset") != "faithful":
                name = f"adi-{r['mode']}" if r["scheme"] == "adi" else r["name"]
                out.append({**{k: r.get(k) for k in ("seed", "dataset", "arch", "budget", "n_clean", "orig_test_acc",
                                                     "orig_wm_acc", "test_acc", "wm_acc", "test_drop", "owned",
                                                     "threshold", "threshold_rule", "tolerance", "outcome",
                                                     "options", "flagged", "used_triggers", "resets", "seconds",
                                                     "machine", "date", "commit", "command", "model_sha256")},
                            "row": name, "arm": arm, "oracle": False, "source": f"{fname} ({variant})"})
    return out


def decide(rows: list[dict], name: str) -> tuple[str, list[str]]:
    """The row's verdict under the rule in this file's docstring, and the arms that decided it."""
    arms: dict[str, list[dict]] = {}
    for r in rows:
        if r["row"] == name:
            arms.setdefault(r["arm"], []).append(r)
    wins = [a for a, rs in arms.items() if a not in DIAGNOSTIC and 2 * sum(r["outcome"] == "removed" for r in rs)
            > len(rs)]
    within = [a for a in wins if a not in BEYOND_PAPER]
    if within:
        return "reproduced", within
    return ("costlier", wins) if wins else ("not-reproduced", [])


def write_rows(rows: list[dict]) -> None:
    own = [r for r in rows if r.get("source") is None]
    every = own + carried()
    verdicts = {name: decide(every, name)[0] for name in ARMS}
    write(OUT, {"rows": every, "verdicts": verdicts})


def write_markdown() -> None:
    data = stored(OUT)
    rows = data["rows"]
    lines = ["# CIFAR-10: the oracle decomposition and the decisive arms", "",
             "Written by `benchmarks/cifar_decided.py` (each JSON row names its command, machine, date and commit). "
             "One laundering round per seed at the row's Table 2 budget; outcomes under the default `converged` "
             "threshold, the base-rate check and 3 points of tolerance. Removed k/n with its 95% Wilson interval; "
             "test accuracy mean ± sd; WM accuracy median [min-max]. The oracle is a diagnostic (the owner's true "
             "trigger images given to Algorithm 1 and the retraining), never an attack. The verdict rule is in the "
             "script's docstring and docs/cifar10.md.", ""]
    for name in ARMS:
        verdict, by = decide(rows, name)
        paper = PAPER[(DS, name)]
        cost = paper["orig_test_acc"] - paper["test_acc"]
        lines += [f"## {name}: {verdict}" + (f" (by {', '.join(sorted(by))})" if by else ""), "",
                  f"The paper's own laundered model lost {cost:.2f} points ({paper['orig_test_acc']} → "
                  f"{paper['test_acc']}%). *At the paper's cost*: runs with no ownership shown that lost at most "
                  "that much (a fact beside the verdict, not a rule of it).", "",
                  "| arm | seeds | removed | destroyed | at the paper's cost | test acc % | WM acc % | options "
                  "| from |",
                  "|---|---|---|---|---|---|---|---|---|"]
        arms: dict[str, list[dict]] = {}
        for r in rows:
            if r["row"] == name:
                arms.setdefault(r["arm"], []).append(r)
        for arm, rs in arms.items():
            s = over_seeds(rs)
            o = rs[0].get("options") or {}
            opt = ", ".join(f"{k} {o[k]}" for k in ("ct", "threshold_mode", "triggers", "add_masks", "bn_stats",
                                                     "stamping", "reinit", "retrain_epochs", "retrain_lr") if k in o)
            at_cost = sum(not r["owned"] and r["test_drop"] <= cost for r in rs)
            lines.append(f"| {arm} | {','.join(str(r['seed']) for r in rs)} | {s.rate()} | {s.destroyed}/{s.n} | "
                         f"{at_cost}/{s.n} | {s.test()} | {s.wm()} | {opt} | {rs[0].get('source') or 'this script'} |")
        lines.append("")
    land = [r for r in rows if r["row"] == "zhang-unrelated" and r.get("landing")]
    if land:
        lines += ["## Where the unrelated images land after laundering", "",
                  "Share of the verification images (MNIST \"1\") per class, median over the arm's seeds; the paper's "
                  "§7.2 reports 23% airplane (0), 52% ship (8), 21% truck (9).", "",
                  "| arm | " + " | ".join(D.CIFAR10_CLASSES)
                  + " |", "|---|" + "---|" * 10]
        arms = {}
        for r in land:
            arms.setdefault(r["arm"], []).append(r["landing"])
        for arm, ls in arms.items():
            lines.append(f"| {arm} | " + " | ".join(f"{statistics.median(x[str(c)] for x in ls):.1f}"
                                                    for c in range(10)) + " |")
        lines.append("")
    write("cifar10-decided.md", lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ARMS), help="comma-separated CIFAR-10 rows")
    ap.add_argument("--arms", default=None, help="comma-separated arm names (default: every arm of the row)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated attacker seeds")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--markdown-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.markdown_only:
        args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        bad = [r for r in args.rows if r not in ARMS]
        if bad:
            ap.error(f"unknown row(s) {bad}; choose from {list(ARMS)}")
        args.arms = [a.strip() for a in args.arms.split(",")] if args.arms else None
        try:
            args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            ap.error("--seeds takes comma-separated integers")
        run(args)
    write_rows(stored(OUT, {"rows": []})["rows"])
    write_markdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
