"""Command line: a thin layer over the library. Every user mistake is one line, exit code 2."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import __version__
from . import data as D
from .checkpoint import (
    atomic_write_json,
    load_launder_state,
    load_model,
    save_launder_state,
    save_model,
    stem,
    weights_digest,
)
from .device import deterministic, keep_freed_memory, set_device
from .errors import Inconclusive, UserError
from .models import ARCHS, DEFAULT_ARCH, build, check_fits
from .recipes import owner_config
from .train import NonFiniteLoss, TrainConfig, accuracy
from .watermarks.embed import clean_wm_curve, embed, thresholds_from_curves
from .watermarks.schemes import SCHEMES, make_watermark
from .watermarks.verify import verify


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(low: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
MAX_THREADS = 1024


def _threads(s: str) -> int:
    v = _positive_int(s)
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_THREADS} threads, got {v}")
    return v
_nonneg_int = _int_at_least(0)


def _float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _int_list(s: str) -> list[int]:
    try:
        out = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def _params(items: list[str] | None) -> dict[str, Any]:
    """--param key=value (value parsed as JSON when it can be: 3, 0.4, [20,6], "TEST")."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--param expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


# --------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="dataset folder (default: $NNLAUNDER_DATA)")
    p.add_argument("--threads", type=_threads, help=f"torch threads, 1-{MAX_THREADS} (default: all cores)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:N or auto (default: $NNLAUNDER_DEVICE or cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--allow-torch-load", action="store_true",
                   help="accept a .pt/.pth state_dict as a model's weights, read with "
                        "torch.load(weights_only=True) (default: safetensors only)")


def _train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults: the architecture's recipe)")
    g.add_argument("--epochs", type=_nonneg_int)
    g.add_argument("--batch-size", type=_positive_int)
    g.add_argument("--lr", type=_float)
    g.add_argument("--optimizer", choices=("sgd", "adam"))
    g.add_argument("--schedule", choices=("constant", "cosine", "onecycle", "step"))
    g.add_argument("--augment", choices=("none", "crop-flip"))
    g.add_argument("--label-smoothing", type=_float)
    g.add_argument("--l2", type=_float)
    g.add_argument("--seed", type=int, default=0)


def _train_cfg(args: argparse.Namespace, arch: str) -> TrainConfig:
    return owner_config(arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        optimizer=args.optimizer, schedule=args.schedule, augment=args.augment,
                        label_smoothing=args.label_smoothing, l2=args.l2, seed=args.seed)


def _task(args: argparse.Namespace) -> tuple[str, D.Dataset, D.Dataset]:
    arch = args.arch or DEFAULT_ARCH.get(args.dataset)
    if arch is None:
        raise UserError(f"no default architecture for {args.dataset!r}; pass --arch")
    check_fits(arch, args.dataset)
    return arch, D.load(args.dataset, args.data_dir, "train"), D.load(args.dataset, args.data_dir, "test")


def _out(path: str) -> Path:
    s = stem(path)
    try:
        s.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {s.parent}: {e.strerror}") from e
    if not os.access(s.parent, os.W_OK):
        raise UserError(f"output folder {s.parent} is not writable")
    return s


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


# --------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    arch, tr, te = _task(args)
    out = _out(args.out)
    cfg = _train_cfg(args, arch)
    model = build(arch, tr.num_classes, seed=args.seed)
    from .train import train

    res = train(model, tr.x, tr.y, cfg, eval_sets={"test": (te.x, te.y)},
                checkpoint_dir=out.with_suffix(".ckpt"), resume=args.resume, progress=not args.quiet)
    test_acc = accuracy(model, te.x, te.y)
    save_model(out, model, {"arch": arch, "num_classes": tr.num_classes, "dataset": args.dataset,
                            "scheme": None, "seed": args.seed, "config": cfg.__dict__,
                            "metrics": {"test_acc": test_acc}, "history": res.history})
    shutil.rmtree(out.with_suffix(".ckpt"), ignore_errors=True)     # the finished model replaces the resume point
    print(f"saved {out}.safetensors: test accuracy {test_acc:.2f}% after {res.epochs_run} epochs")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    arch, tr, te = _task(args)
    out = _out(args.out)
    params = _params(args.param)
    wm = make_watermark(args.scheme, tr, te, args.data_dir, params)
    if args.base:
        model, base_meta = load_model(args.base, allow_torch_load=args.allow_torch_load)
        if base_meta.get("arch") != arch or base_meta.get("dataset") != args.dataset:
            raise UserError(f"--base {args.base} is a {base_meta.get('arch')}/{base_meta.get('dataset')} model, "
                            f"not {arch}/{args.dataset}")
    else:
        if wm.params.get("mode") == "pt":
            raise UserError("adi mode=pt fine-tunes a clean pre-trained model: pass --base MODEL")
        model = build(arch, tr.num_classes, seed=args.seed)
    cfg = _train_cfg(args, arch)
    res = embed(model, tr, wm, cfg, test=te, checkpoint_dir=out.with_suffix(".ckpt"), resume=args.resume,
                progress=not args.quiet)
    test_acc, wm_acc = accuracy(model, te.x, te.y), accuracy(model, wm.verify_x, wm.verify_y)
    save_model(out, model, {"arch": arch, "num_classes": tr.num_classes, "dataset": args.dataset,
                            "scheme": args.scheme, "scheme_params": wm.params, "seed": args.seed,
                            "base": args.base, "config": cfg.__dict__,
                            "metrics": {"test_acc": test_acc, "wm_acc": wm_acc}, "history": res.history})
    shutil.rmtree(out.with_suffix(".ckpt"), ignore_errors=True)
    if cfg.epochs == 0:
        print(f"note: --epochs 0 trained nothing; the saved model is the {'base' if args.base else 'untrained'} "
              "model as it was")
    print(f"saved {out}.safetensors ({args.scheme}): test accuracy {test_acc:.2f}%, "
          f"watermark accuracy {wm_acc:.2f}% on {len(wm.verify_y)} held-out triggers")
    return 0


def _threshold_value(args: argparse.Namespace, scheme: str) -> float:
    if args.threshold is not None:
        return args.threshold
    if args.threshold_file:
        p = Path(args.threshold_file)
        if not p.is_file():
            raise UserError(f"missing threshold file {p} (make one with `nnlaunder threshold`)")
        try:
            t = json.loads(p.read_text(encoding="utf-8"))["thresholds"][scheme]
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
            raise UserError(f"{p}: no threshold for {scheme!r} in it") from e
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 100:
            raise UserError(f"{p}: the threshold for {scheme!r} must be a percentage in [0, 100], got {t!r:.80}")
        return float(t)
    raise UserError("pass --threshold PERCENT or --threshold-file FILE (from `nnlaunder threshold`)")


def cmd_verify(args: argparse.Namespace) -> int:
    model, meta = load_model(args.model, allow_torch_load=args.allow_torch_load)
    scheme = args.scheme or meta.get("scheme")
    if not scheme:
        raise UserError(f"{args.model} records no scheme; pass --scheme")
    params = dict(meta.get("scheme_params") or {}) if scheme == meta.get("scheme") else {}
    params.update(_params(args.param))
    dataset = meta.get("dataset")
    if dataset not in D.DATASETS:
        raise UserError(f"{args.model} records dataset {dataset!r}, which is not registered")
    tr, te = D.load(dataset, args.data_dir, "train"), D.load(dataset, args.data_dir, "test")
    wm = make_watermark(scheme, tr, te, args.data_dir, params)
    v = verify(model, wm, _threshold_value(args, scheme), args.alpha)
    if args.json:
        print(json.dumps({"model": args.model, "scheme": scheme, **v.as_dict()}))
    else:
        print(_table([("model", str(args.model)), ("scheme", scheme),
                      ("test accuracy", f"{accuracy(model, te.x, te.y):.2f}%"),
                      ("watermark accuracy", f"{v.wm_acc:.2f}% ({v.hits}/{v.n})"),
                      ("vanilla threshold", f"{v.threshold:.2f}%"), ("p-value", f"{v.p_value:.3g}"),
                      ("verdict", "OWNERSHIP SHOWN" if v.owned else "no ownership proof")]))
    return 0


def cmd_threshold(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the JSON file to write (e.g. {out / 'thresholds.json'})")
    arch, tr, te = _task(args)
    _out(str(out.with_suffix("")))
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    wms = {s: make_watermark(s, tr, te, args.data_dir) for s in schemes}
    cfg = _train_cfg(args, arch)
    curves = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        cfg_s = owner_config(arch, **{**cfg.__dict__, "seed": seed})
        _, hist = clean_wm_curve(arch, tr, wms, cfg_s, test=te, seed=seed, progress=not args.quiet)
        curves.append(hist)
    th = thresholds_from_curves(curves, schemes)
    atomic_write_json(out, {"dataset": args.dataset, "arch": arch, "seeds": args.seeds, "config": cfg.__dict__,
                            "thresholds": th, "curves": curves, "seconds": time.perf_counter() - t0})
    print(_table([(s, f"{v:.2f}%") for s, v in th.items()]))
    print(f"wrote {out}")
    return 0


def launder_cfg(args: argparse.Namespace):
    """The LaunderConfig the `launder` flags ask for (both the registered and the external path)."""
    from .attacks.laundering import launder_config
    from .attacks.neural_cleanse import nc_config

    overrides = {k: v for k, v in (("rounds", args.rounds), ("dt", args.dt), ("ct", args.ct),
                                    ("threshold_mode", args.threshold_mode), ("layers", args.layers),
                                    ("triggers", args.triggers), ("add_masks", args.add_masks),
                                    ("top_k", args.top_k), ("diff", args.diff), ("measure", args.measure),
                                    ("bn_stats", args.bn_stats), ("stamping", args.stamping)) if v is not None}
    nc = nc_config(args.nc_preset, seed=args.seed, **({"max_epochs": args.nc_epochs} if args.nc_epochs else {}))
    base = launder_config(args.variant).retrain
    retrain = dataclasses.replace(base, **{k: v for k, v in (("epochs", args.retrain_epochs), ("lr", args.retrain_lr))
                                           if v is not None})
    return launder_config(args.variant, nc=nc, seed=args.seed, retrain=retrain, **overrides)


def cmd_launder(args: argparse.Namespace) -> int:
    from .attacks.laundering import launder
    from .experiments.evaluate import evaluator
    from .report.plots import trigger_grid

    if args.model_factory:
        from .byo import run_external

        if args.resume:
            raise UserError("--resume works with a MODEL of this project, not with --model-factory")

        return run_external(args, _out(str(Path(args.out) / "laundered")).parent)
    if not args.model:
        raise UserError("launder needs a MODEL (a model of this project) or --model-factory with --weights and --data")
    for flag in ("weights", "data", "test_data", "verify_npz", "model_kwargs", "input_range", "mean", "std"):
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag.replace('_', '-')} goes with --model-factory (your own model)")
    if args.budget is None:
        args.budget = 0.006
    model, meta = load_model(args.model, allow_torch_load=args.allow_torch_load)
    dataset = meta.get("dataset")
    if dataset not in D.DATASETS:
        raise UserError(f"{args.model} records dataset {dataset!r}, which is not registered")
    if not 0 < args.budget <= 1:
        raise UserError(f"--budget is a fraction of the training set in (0, 1], got {args.budget}")
    out_dir = Path(args.out)
    _out(str(out_dir / "laundered"))
    tr, te = D.load(dataset, args.data_dir, "train"), D.load(dataset, args.data_dir, "test")
    if args.per_class:
        clean = D.stratified_subset(tr, per_class=args.per_class, seed=args.seed)
    else:
        clean = D.stratified_subset(tr, fraction=args.budget, seed=args.seed)
    cfg = launder_cfg(args)
    wm = None
    threshold = None
    if args.verify_scheme:
        params = dict(meta.get("scheme_params") or {}) if args.verify_scheme == meta.get("scheme") else {}
        params.update(_params(args.param))
        wm = make_watermark(args.verify_scheme, tr, te, args.data_dir, params)
        if args.threshold is not None or args.threshold_file:
            threshold = _threshold_value(args, args.verify_scheme)
    on_round = evaluator(te, wm)
    before = on_round(0, model)
    print(f"attacker's clean set: {len(clean)} images ({len(clean) / len(tr):.2%} of {dataset} train); "
          f"before: " + ", ".join(f"{k} {v:.2f}%" for k, v in before.items()))

    def show(r, m, info):
        metrics = on_round(r, m, info)
        if info.stopped:
            print(f"round {r}: early stop (class {info.least_likely} was the most likely infected in round 1)")
        else:
            print(f"round {r}: flagged {info.flagged or 'none'} (used {info.used_triggers}), reset "
                  f"{sum(info.resets.values())} units {info.resets}; " +
                  ", ".join(f"{k} {v:.2f}%" for k, v in metrics.items()) + f"; {info.seconds:.0f} s")
        return metrics

    state_file = out_dir / "partial.safetensors"
    owner = weights_digest(model)
    first_nc, calibration = None, None
    if args.calibrate:
        prior = load_launder_state(state_file, owner) if args.resume else None
        if prior is not None and isinstance(prior[1].get("calibration"), dict):
            calibration = prior[1]["calibration"]
            print(f"calibration: the interrupted run's choice {calibration['chosen']}")
        else:
            first_nc, calibration = calibrate_cli(model, clean, cfg, args)
        from .attacks.calibrate import apply_candidate

        cfg = apply_candidate(cfg, calibration["chosen"])
    config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    resume = load_launder_state(state_file, owner) if args.resume else None
    if resume is not None:
        if resume[1].get("config") != config or resume[1].get("n_clean") != len(clean):
            raise UserError(f"{state_file} was written with other laundering settings or another clean set; "
                            "rerun with the same options, or without --resume to start over")
        print(f"resuming after round {len(resume[0].rounds)} ({state_file})")
    elif args.resume:
        print(f"nothing to resume in {out_dir} for this model; starting at round 1")
    elif state_file.is_file():
        print(f"note: {state_file} (an interrupted run) is replaced; --resume would have continued it")

    def keep(state, nc) -> None:
        if len(state.rounds) < cfg.rounds and not state.rounds[-1].stopped:   # a round is left to do
            save_launder_state(state_file, state, owner, {"config": config, "n_clean": len(clean),
                                                          "calibration": calibration})

    res = launder(model, clean, cfg, on_round=show, progress=not args.quiet, on_state=keep,
                  resume=None if resume is None else resume[0], first_nc=first_nc if resume is None else None)
    report = {"model": str(args.model), "dataset": dataset, "budget": len(clean) / len(tr), "n_clean": len(clean),
              "config": dataclasses.asdict(cfg), "before": before, "threshold": threshold,
              "verify_scheme": args.verify_scheme, "rounds": res.report(), "seconds": res.seconds,
              "calibration": calibration}
    new_meta = {**{k: meta[k] for k in ("arch", "num_classes", "dataset")}, "scheme": meta.get("scheme"),
                "scheme_params": meta.get("scheme_params"), "laundered_from": str(args.model), "launder": report}
    save_model(out_dir / "laundered", res.model, new_meta)
    atomic_write_json(out_dir / "report.json", report)
    if res.nc:                                # empty when a resumed run had no round left to do
        last = res.nc[-1]
        trigger_grid(last.masks, last.patterns, last.l1.tolist(), last.anomaly.tolist(), last.flagged, tr.classes,
                     out_dir / "triggers.png", title=f"Neural Cleanse, round {len(res.rounds)}", example=clean.x[0])
    state_file.unlink(missing_ok=True)
    if wm is not None and threshold is not None:
        v = verify(res.model, wm, threshold)
        print(v.summary())
    print(f"wrote {out_dir}/laundered.safetensors, report.json, triggers.png ({res.seconds:.0f} s)")
    return 0


def calibrate_cli(model, clean: D.Dataset, cfg, args: argparse.Namespace):
    """Round 1's Neural Cleanse, then the attacker-side calibration (k-fold over the clean set)."""
    from .attacks.calibrate import calibrate
    from .attacks.neural_cleanse import neural_cleanse

    if cfg.holdout:
        raise UserError("--calibrate scores candidates by k-fold over the whole clean set; it takes no holdout")
    print(f"calibration: Neural Cleanse on the {len(clean)} clean images ...", flush=True)
    nc = neural_cleanse(model, clean.x, cfg.nc, num_classes=clean.num_classes)
    print(f"calibration: {args.calibrate_folds}-fold over the clean set; per candidate: held-out accuracy ± se, "
          "residual trigger flips, units reset", flush=True)

    def show(sc) -> None:
        print(f"  {json.dumps(sc.candidate)}: {sc.acc:.2f} ± {sc.se:.2f}%, flips {sc.flips:.2f}%, "
              f"{sc.resets:.0f} units", flush=True)
    grid = None
    if args.calibrate_grid is not None:
        try:
            grid = json.loads(args.calibrate_grid)
        except json.JSONDecodeError as e:
            raise UserError(f"--calibrate-grid: not JSON ({e})") from e
        if not isinstance(grid, list) or not grid or not all(isinstance(c, dict) for c in grid):
            raise UserError("--calibrate-grid: expected a non-empty JSON list of tables of options")
    cal = calibrate(model, clean, nc, cfg, grid=grid, folds=args.calibrate_folds, on_candidate=show)
    print(f"calibration: chose {json.dumps(cal.chosen)} (acceptable: within {cal.margin:.2f} points of the best; "
          "then fewest residual flips, then most aggressive)")
    return nc, cal.as_dict()


def cmd_run(args: argparse.Namespace) -> int:
    from .experiments.config import load_experiment
    from .experiments.runner import run_experiment

    cells = load_experiment(args.file)
    ws = Path(args.workspace)
    _out(str(ws / "results"))
    if args.dry_run:
        for c in cells:
            print(f"{c.cell_id()}  {c.dataset}/{c.scheme} {c.attack} budget {c.budget} rounds {c.rounds} seed {c.seed}")
        print(f"{len(cells)} cells")
        return 0

    def show(cell, summary):
        print(f"{cell.dataset}/{cell.scheme} {cell.attack} @ {cell.budget}: test {summary['test_acc']:.2f}%, "
              f"WM {summary['wm_acc']:.2f}% (threshold {summary['threshold']:.2f}%)"
              f"{' removed' if summary['removed'] else ''}", flush=True)

    out = run_experiment(cells, ws, args.data_dir, progress=not args.quiet, on_cell=show,
                         executor=args.executor, address=args.address, jobs=args.jobs)
    print(f"{out['ran']} cells run, {out['skipped']} already in {ws / 'results.sqlite'}")
    return 0


def _owner_view(args: argparse.Namespace):
    """(model, meta, train, test, watermark) for the persistence commands (the owner's view)."""
    model, meta = load_model(args.model, allow_torch_load=args.allow_torch_load)
    dataset = meta.get("dataset")
    if dataset not in D.DATASETS:
        raise UserError(f"{args.model} records dataset {dataset!r}, which is not registered")
    if not meta.get("scheme"):
        raise UserError(f"{args.model} records no watermark scheme; persistence needs a watermarked model")
    tr, te = D.load(dataset, args.data_dir, "train"), D.load(dataset, args.data_dir, "test")
    wm = make_watermark(meta["scheme"], tr, te, args.data_dir, meta.get("scheme_params") or {})
    return model, meta, tr, te, wm


def _persistence_run(args: argparse.Namespace, phase: str) -> int:
    from .restore import finetune_threat, param_shift, restore

    model, meta, tr, te, wm = _owner_view(args)
    original = copy.deepcopy(model)
    if not 0 < args.split < 1:
        raise UserError(f"--split must be a fraction in (0, 1), got {args.split}")
    split, owner = D.disjoint_split(tr, args.split, args.seed)   # (fine-tuning split, the owner's data)
    out = Path(args.out)
    _out(str(out / "model"))
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer="adam", lr=args.lr, seed=args.seed)
    base_meta = {k: meta[k] for k in ("arch", "num_classes", "dataset", "scheme", "scheme_params") if k in meta}

    def keep(epoch, m):
        save_model(out / f"epoch-{epoch:03d}", m, {**base_meta, "epoch": epoch, "phase": phase})
        return {"param_shift": param_shift(original, m)["total"]}

    evals = {"test": (te.x, te.y), "wm": (wm.verify_x, wm.verify_y)}
    keep(0, model)                                  # the trajectory starts at the given model
    before = {"test_acc": accuracy(model, te.x, te.y), "wm_acc": accuracy(model, wm.verify_x, wm.verify_y)}
    if phase == "restored":
        res = restore(model, owner, cfg, eval_sets=evals, callbacks=[keep], progress=not args.quiet)
    else:
        res = finetune_threat(model, split, cfg, mixed_with=owner if args.mixed else None, eval_sets=evals,
                              callbacks=[keep], progress=not args.quiet)
    shift = param_shift(original, model)
    save_model(out / "model", model, {**base_meta, "phase": phase, "from": str(args.model)})
    report = {"model": str(args.model), "phase": phase, "split": args.split, "n_split": len(split),
              "n_owner": len(owner), "config": cfg.__dict__, "before": before, "history": res.history,
              "param_shift": shift}
    atomic_write_json(out / "history.json", report)
    last = res.history[-1] if res.history else before
    print(f"{phase}: test {before['test_acc']:.2f} -> {last.get('test_acc', before['test_acc']):.2f}%, "
          f"WM {before['wm_acc']:.2f} -> {last.get('wm_acc', before['wm_acc']):.2f}%, "
          f"parameter shift {shift['total']:.3f}; wrote {out}/")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    return _persistence_run(args, "finetuned-mixed" if args.mixed else "finetuned")


def cmd_restore(args: argparse.Namespace) -> int:
    return _persistence_run(args, "restored")


def cmd_landscape(args: argparse.Namespace) -> int:
    from .report.plots import landscape
    from .restore import flat_params, loss_surface, pca_directions

    folder = Path(args.checkpoints)
    files = sorted(folder.glob("epoch-*.safetensors"))
    if len(files) < 3:
        raise UserError(f"{folder}: need at least 3 epoch-NNN.safetensors checkpoints (from `nnlaunder finetune` "
                        "or `restore`)")
    models = [load_model(f, allow_torch_load=args.allow_torch_load) for f in files]
    model, meta = models[-1]
    plane = pca_directions([flat_params(m) for m, _ in models])
    args.model = str(files[-1])
    _, _, tr, te, wm = _owner_view(args)
    if args.on == "trigger":
        x, y = wm.verify_x[:args.images], wm.verify_y[:args.images]
    else:
        sub = D.stratified_subset(tr, fraction=min(1.0, args.images / len(tr)), seed=0)
        x, y = sub.x, sub.y
    span = float(plane.coords.abs().max()) * args.margin or 1.0
    grid = torch.linspace(-span, span, args.grid)
    loss, acc = loss_surface(model, plane, grid, grid, x, y)
    out = Path(args.out)
    _out(str(out.with_suffix("")))
    landscape(grid, grid, loss, acc, plane.coords, out.with_suffix(".png"),
              title=f"{meta.get('scheme')} {args.on} loss along the trajectory's PCA plane "
                    f"({100 * float(plane.explained.sum()):.0f}% of its variance)")
    atomic_write_json(out.with_suffix(".json"), {"grid": grid.tolist(), "loss": loss.tolist(), "acc": acc.tolist(),
                                                 "coords": plane.coords.tolist(), "explained": plane.explained.tolist(),
                                                 "checkpoints": [str(f) for f in files], "on": args.on})
    print(f"wrote {out.with_suffix('.png')} and .json")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report.build import build_report

    out = build_report(args.workspace, args.out or Path(args.workspace) / "report")
    print(f"wrote {out}/index.md and {out}/index.html")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.data_dir, Path(args.out_dir), epochs=args.epochs, progress=not args.quiet)
    return 0


# --------------------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nnlaunder", description=__doc__)
    p.add_argument("--version", action="version", version=f"nnlaunder {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("train", help="train a clean model")
    _common(s)
    s.add_argument("--dataset", required=True, choices=sorted(D.DATASETS))
    s.add_argument("--arch", choices=sorted(ARCHS))
    s.add_argument("--out", required=True, help="output stem: writes OUT.safetensors + OUT.json")
    s.add_argument("--resume", action="store_true", help="continue from OUT.ckpt/ (last finished epoch)")
    _train_flags(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("embed", help="train a watermarked model")
    _common(s)
    s.add_argument("--dataset", required=True, choices=sorted(D.DATASETS))
    s.add_argument("--arch", choices=sorted(ARCHS))
    s.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    s.add_argument("--param", action="append", metavar="KEY=VALUE", help="scheme parameter (repeatable)")
    s.add_argument("--base", help="start from this model (required for adi mode=pt)")
    s.add_argument("--out", required=True)
    s.add_argument("--resume", action="store_true")
    _train_flags(s)
    s.set_defaults(func=cmd_embed)

    s = sub.add_parser("verify", help="ownership verdict for a model")
    _common(s)
    s.add_argument("model", help="model stem or .safetensors (with its .json beside it)")
    s.add_argument("--scheme", choices=sorted(SCHEMES), help="default: the one recorded in the model")
    s.add_argument("--param", action="append", metavar="KEY=VALUE")
    s.add_argument("--threshold", type=_float, help="vanilla threshold in percent")
    s.add_argument("--threshold-file", help="JSON written by `nnlaunder threshold`")
    s.add_argument("--alpha", type=_float, default=0.01,
                   help="significance level of the binomial test (default 0.01)")
    s.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("threshold", help="vanilla threshold: max watermark accuracy of clean models")
    _common(s)
    s.add_argument("--dataset", required=True, choices=sorted(D.DATASETS))
    s.add_argument("--arch", choices=sorted(ARCHS))
    s.add_argument("--schemes", default="zhang-content,zhang-noise,zhang-unrelated",
                   help="comma-separated schemes to measure (default: the three Zhang schemes)")
    s.add_argument("--seeds", type=_int_list, default=[0],
                   help="clean models' seeds, comma-separated; the threshold is the max over all (default 0)")
    s.add_argument("--out", required=True, help="JSON file")
    _train_flags(s)
    s.set_defaults(func=cmd_threshold)

    s = sub.add_parser("launder", help="launder a model with a small clean set (Aiken et al.)")
    _common(s)
    s.add_argument("model", nargs="?", help="model stem or .safetensors (with its .json beside it); "
                                            "or leave out and give --model-factory")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--budget", type=_float, default=None,
                   help="fraction of the training set the attacker holds (default 0.006; with --data: 1, all of it)")
    s.add_argument("--per-class", type=_positive_int, help="instead of --budget: images per class")
    s.add_argument("--rounds", type=_positive_int,
                   help="laundering rounds, each Neural Cleanse + Algorithm 1 + retraining (default 1)")
    s.add_argument("--variant", choices=("strong", "faithful"), default="strong")
    s.add_argument("--dt", type=_float, help="dense-layer threshold")
    s.add_argument("--ct", type=_float, help="conv-layer threshold")
    s.add_argument("--threshold-mode", choices=("absolute", "relative"))
    s.add_argument("--layers", choices=("all", "second-half"))
    s.add_argument("--triggers", choices=("all", "flagged", "top-k"),
                   help="recovered triggers used: every class, the flagged ones (else the smallest mask), or the "
                        "--top-k smallest masks (default: the variant's)")
    s.add_argument("--top-k", type=_positive_int, help="with --triggers top-k: how many (default 3)")
    s.add_argument("--add-masks", action=argparse.BooleanOptionalAction, default=None,
                   help="retrain on the recovered masks labelled as the least likely class (the paper's step 3)")
    s.add_argument("--diff", choices=("pooled", "per-trigger"),
                   help="Algorithm 1's activation difference over all used triggers pooled, or per trigger with "
                        "the resets united")
    s.add_argument("--measure", choices=("relu", "branch"),
                   help="read a unit at the first ReLU after it, or at its own output before a residual add")
    s.add_argument("--bn-stats", choices=("keep", "reset", "reestimate"),
                   help="batch-norm running statistics before retraining (faithful: reset)")
    s.add_argument("--stamping", choices=("each", "random"),
                   help="retraining images stamped with each used trigger, or one drawn at random per image")
    s.add_argument("--nc-epochs", type=_positive_int,
                   help="cap on Neural Cleanse epochs (default: the preset's, 1000 faithful, 100 fast)")
    s.add_argument("--nc-preset", choices=("faithful", "fast"), default="faithful",
                   help="Neural Cleanse settings: Wang et al.'s (default) or this project's fast preset "
                        "(8-minibatch schedule epochs, bf16 where the hardware has it, exact ReLU/pool reorder; "
                        "docs/methods.md)")
    s.add_argument("--retrain-epochs", type=_positive_int, help="retraining epochs per round (default: the variant's)")
    s.add_argument("--retrain-lr", type=_float, help="retraining learning rate (default: the variant's)")
    s.add_argument("--calibrate", action="store_true",
                   help="choose thresholds, retraining epochs and triggers from the attacker's own data (k-fold "
                        "held-out accuracy and residual trigger flips; never the owner's verification set)")
    s.add_argument("--calibrate-folds", type=_int_at_least(2), default=3, help="folds for --calibrate (default 3)")
    s.add_argument("--calibrate-grid", metavar="JSON",
                   help='candidates for --calibrate as a JSON list of option tables, e.g. '
                        '\'[{"ct": 1, "retrain_epochs": 5}, {"ct": 2, "triggers": "top-k"}]\' (default: a grid of '
                        'CT, DT where a hidden dense layer exists, retraining epochs and triggers)')
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--verify-scheme", choices=sorted(SCHEMES), help="evaluator: the owner's scheme to measure")
    s.add_argument("--param", action="append", metavar="KEY=VALUE")
    s.add_argument("--threshold", type=_float)
    s.add_argument("--threshold-file")
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT/partial.safetensors (its last finished round)")
    g = s.add_argument_group("bring your own model and data (docs/byo.md)")
    g.add_argument("--model-factory", metavar="PKG.MODULE:FUNCTION", help="builds your nn.Module")
    g.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for the factory")
    g.add_argument("--weights", help="your weights: .safetensors, or a .pt/.pth state_dict with --allow-torch-load")
    g.add_argument("--data", help="the attacker's labelled images: a folder of class sub-folders or an .npz (x, y)")
    g.add_argument("--test-data", help="labelled test images (folder or .npz) for test accuracy")
    g.add_argument("--verify-npz", help=".npz of triggered inputs x and the target labels y: attack success rate")
    g.add_argument("--input-range", metavar="LO,HI", help="pixel range your model expects (default 0,1)")
    g.add_argument("--mean", metavar="M1[,M2,M3]", help="per-channel mean your model subtracts after scaling")
    g.add_argument("--std", metavar="S1[,S2,S3]", help="per-channel std your model divides by")
    s.set_defaults(func=cmd_launder)

    s = sub.add_parser("run", help="run an experiment file (TOML), a single cell or a sweep")
    _common(s)
    s.add_argument("file")
    s.add_argument("--workspace", default="runs/workspace", help="models and results.sqlite live here")
    s.add_argument("--dry-run", action="store_true", help="validate and list the cells, run nothing")
    s.add_argument("--executor", choices=("local", "ray"), default="local")
    s.add_argument("--address", help="Ray cluster address HOST:PORT (with --executor ray)")
    s.add_argument("--jobs", type=_positive_int, default=1,
                   help="local executor: cells run in this many worker processes (default 1)")
    s.set_defaults(func=cmd_run)

    for name, helptext, epochs in (("finetune", "the owner's threat: fine-tune all layers on a disjoint split", 50),
                                   ("restore", "restoration: keep training on the owner's clean data only", 30)):
        s = sub.add_parser(name, help=helptext)
        _common(s)
        s.add_argument("model")
        s.add_argument("--out", required=True, help="folder: epoch-NNN checkpoints, model, history.json")
        s.add_argument("--split", type=_float, default=0.3,
                       help="fraction of the training set fine-tuned on; the owner's data is the rest"
                       if name == "finetune" else
                       "the fine-tuning split's fraction, as given to finetune; restoration trains on the rest "
                       "(the owner's own data)")
        s.add_argument("--epochs", type=_nonneg_int, default=epochs)
        s.add_argument("--lr", type=_float, default=1e-4)
        s.add_argument("--batch-size", type=_positive_int, default=128)
        s.add_argument("--seed", type=int, default=0)
        if name == "finetune":
            s.add_argument("--mixed", action="store_true", help="one owner-data step every 2nd batch")
            s.set_defaults(func=cmd_finetune)
        else:
            s.set_defaults(func=cmd_restore)

    s = sub.add_parser("landscape", help="2-D loss surface along the PCA plane of a checkpoint trajectory")
    _common(s)
    s.add_argument("checkpoints", help="folder of epoch-NNN checkpoints (from finetune / restore)")
    s.add_argument("--on", choices=("trigger", "train"), default="trigger")
    s.add_argument("--grid", type=_int_at_least(3), default=15, help="grid points per axis (default 15)")
    s.add_argument("--images", type=_positive_int, default=1000,
                   help="images the loss is measured on (default 1000)")
    s.add_argument("--margin", type=_float, default=1.3,
                   help="plane extent as a multiple of the trajectory's span (default 1.3)")
    s.add_argument("--out", required=True, help="PNG path (a .json with the grid is written beside it)")
    s.set_defaults(func=cmd_landscape)

    s = sub.add_parser("report", help="Markdown + HTML + plots from a workspace's results store")
    _common(s)
    s.add_argument("--workspace", default="runs/workspace")
    s.add_argument("--out", default=None, help="output folder (default: WORKSPACE/report)")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("demo", help="embed, verify, launder and verify again (MNIST, a few minutes)")
    _common(s)
    s.add_argument("--out-dir", default="runs/demo", help="where models, plots and the table go (default runs/demo)")
    s.add_argument("--epochs", type=_positive_int, default=3, help="owner training epochs (default 3)")
    s.set_defaults(func=cmd_demo)
    return p


_KEPT = {  # what an interrupted command leaves to continue from
    "train": "finished epochs are kept in OUT.ckpt/ (rerun with --resume)",
    "embed": "finished epochs are kept in OUT.ckpt/ (rerun with --resume)",
    "launder": "finished laundering rounds are kept in OUT/partial.safetensors (rerun with --resume)",
    "run": "finished cells are in the workspace's store (rerun the same command to continue)",
    "finetune": "the epoch-NNN checkpoints written so far are kept; a rerun starts over",
    "restore": "the epoch-NNN checkpoints written so far are kept; a rerun starts over",
}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        deterministic()
        keep_freed_memory()
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        if getattr(args, "device", None):
            set_device(args.device)
        if getattr(args, "command", "") == "threshold":
            for s in args.schemes.split(","):
                if s.strip() and s.strip() not in SCHEMES:
                    raise UserError(f"unknown scheme {s.strip()!r}; choose from {', '.join(SCHEMES)}")
        return args.func(args)
    except Inconclusive as e:
        print(f"nnlaunder: {e}", file=sys.stderr)
        return 3
    except UserError as e:
        print(f"nnlaunder: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"nnlaunder: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nnlaunder: interrupted; {_KEPT.get(getattr(args, 'command', ''), 'nothing was kept')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
