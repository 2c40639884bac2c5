"""Command line: a thin layer over the library. Every user mistake is one line, exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from . import clock
from . import data as D
from .checkpoint import atomic_write_json, derived_meta, load_model, save_model, stem
from .cli_flags import (
    KEPT,
    budget_of,
    calibrate_options,
    code_allowance,
    launder_cfg,
    make_parser,
    param_table,
    train_config,
)
from .device import deterministic, set_device
from .errors import Inconclusive, UserError, one_line_warnings, os_error_line
from .models import DEFAULT_ARCH, check_data, check_fits
from .train import NonFiniteLoss
from .watermarks.schemes import SCHEMES, make_watermark
from .watermarks.verify import check_alpha, read_threshold, verify


def _arch(args: argparse.Namespace) -> str:
    arch = args.arch or DEFAULT_ARCH.get(args.dataset)
    if arch is None:
        raise UserError(f"no default architecture for {args.dataset!r}; pass --arch")
    check_fits(arch, args.dataset)
    return arch


def _task(args: argparse.Namespace) -> tuple[str, D.Dataset, D.Dataset]:
    arch = _arch(args)
    tr, te = D.load(args.dataset, args.data_dir, "train"), D.load(args.dataset, args.data_dir, "test")
    check_data(arch, args.dataset, tr, te)
    return arch, tr, te


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
    from .api import train_clean

    arch, out = _arch(args), _out(args.out)
    model, meta = train_clean(arch, args.dataset, seed=args.seed, config=train_config(args, arch),
                              data_dir=args.data_dir, checkpoint_dir=out.with_suffix(".ckpt"), resume=args.resume,
                              progress=not args.quiet)
    save_model(out, model, meta)
    shutil.rmtree(out.with_suffix(".ckpt"), ignore_errors=True)     # the finished model replaces the resume point
    print(f"saved {out}.safetensors: test accuracy {meta['metrics']['test_acc']:.2f}% after "
          f"{meta['metrics']['epochs_run']} epochs")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from .api import embed

    arch, out, base = _arch(args), _out(args.out), None
    if args.base:
        base, base_meta = load_model(args.base, allow_torch_load=args.allow_torch_load)
        if base_meta.get("arch") != arch or base_meta.get("dataset") != args.dataset:
            raise UserError(f"--base {args.base} is a {base_meta.get('arch')}/{base_meta.get('dataset')} model, "
                            f"not {arch}/{args.dataset}")
    cfg = train_config(args, arch)
    model, meta = embed(arch, args.dataset, args.scheme, param_table(args.param), seed=args.seed, config=cfg,
                        base=base, base_name=args.base, data_dir=args.data_dir, checkpoint_dir=out.with_suffix(".ckpt"),
                        resume=args.resume, progress=not args.quiet)
    save_model(out, model, meta)
    shutil.rmtree(out.with_suffix(".ckpt"), ignore_errors=True)
    if cfg.epochs == 0:
        print(f"note: --epochs 0 trained nothing; the saved model is the {'base' if args.base else 'untrained'} "
              "model as it was")
    m = meta["metrics"]
    print(f"saved {out}.safetensors ({args.scheme}): test accuracy {m['test_acc']:.2f}%, "
          f"watermark accuracy {m['wm_acc']:.2f}% on {m['n_verify']} held-out triggers")
    return 0


def _threshold_value(args: argparse.Namespace, scheme: str, expect: dict[str, Any] | None = None) -> float:
    if args.threshold is not None:
        return args.threshold
    if args.threshold_file:
        return read_threshold(args.threshold_file, scheme, expect)
    raise UserError("pass --threshold PERCENT or --threshold-file FILE (from `nnlaunder threshold`)")


def _registered(args: argparse.Namespace, path: str) -> tuple[Any, dict, str, D.Dataset, D.Dataset]:
    """(model, meta, dataset, train, test) for a model of this project."""
    model, meta = load_model(path, allow_torch_load=args.allow_torch_load)
    dataset = meta.get("dataset")
    if dataset not in D.DATASETS:
        raise UserError(f"{path} records dataset {dataset!r}, which is not registered")
    tr, te = D.load(dataset, args.data_dir, "train"), D.load(dataset, args.data_dir, "test")
    check_data(meta["arch"], dataset, tr, te)      # images the model takes, before any forward pass
    return model, meta, dataset, tr, te


def _watermark(args: argparse.Namespace, meta: dict, scheme: str, tr: D.Dataset, te: D.Dataset):
    """The scheme's watermark with the model's recorded parameters (when it is the model's scheme)
    and --param on top."""
    params = dict(meta.get("scheme_params") or {}) if scheme == meta.get("scheme") else {}
    params.update(param_table(args.param))
    return make_watermark(scheme, tr, te, args.data_dir, params)


def cmd_verify(args: argparse.Namespace) -> int:
    model, meta, dataset, tr, te = _registered(args, args.model)
    scheme = args.scheme or meta.get("scheme")
    if not scheme:
        raise UserError(f"{args.model} records no scheme; pass --scheme")
    wm = _watermark(args, meta, scheme, tr, te)
    th = _threshold_value(args, scheme, {"dataset": dataset, "arch": meta.get("arch")})
    v = verify(model, wm, th, check_alpha(args.alpha), test=(te.x, te.y), num_classes=tr.num_classes)
    if args.json:
        print(json.dumps({"model": args.model, "scheme": scheme, **v.as_dict()}))
    else:
        print(_table([("model", str(args.model)), ("scheme", scheme), ("test accuracy", f"{v.test_acc:.2f}%"),
                      *v.rows()]))
    return 0


def _fpr(doc: dict[str, Any], scheme: str) -> str:
    """", false positives k/n on held-out seeds [...]" for the default rule, where they were measured."""
    held = (doc.get("heldout") or {}).get(scheme)
    if not held:
        return ""
    got = held["by_threshold"][doc["rule"]]
    if got["fpr_pct"] is None:
        return f", no converged epoch on held-out seeds {held['seeds']}"
    return (f", false positives {got['false_positives']}/{held['epochs']} = {got['fpr_pct']:.1f}% on held-out "
            f"seeds {held['seeds']}")


def cmd_threshold(args: argparse.Namespace) -> int:
    from .experiments.clean import measure_thresholds
    from .plots import threshold_figure

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the JSON file to write (e.g. {out / 'thresholds.json'})")
    arch, tr, te = _task(args)
    _out(str(out.with_suffix("")))
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    wms = {s: make_watermark(s, tr, te, args.data_dir, param_table(args.param)) for s in schemes}
    t0 = clock.now()
    doc = measure_thresholds(args.dataset, arch, train_config(args, arch), args.seeds, wms, tr, te,
                             progress=not args.quiet, heldout=args.heldout_seeds)
    atomic_write_json(out, {**doc, "seconds": clock.now() - t0})
    threshold_figure(doc, out.with_suffix(".png"))
    print(_table([(s, f"{v:.2f}% ({doc['rule']}; paper rule {doc['rules'][s]['paper']['threshold']:.2f}%)"
                   + _fpr(doc, s)) for s, v in doc["thresholds"].items()]))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def cmd_launder(args: argparse.Namespace) -> int:
    from .attacks.pipeline import run_launder
    from .experiments.evaluate import evaluator
    from .progress import LaunderBars

    if args.model_factory:
        return _launder_external(args)
    if not args.model:
        raise UserError("launder needs a MODEL (a model of this project) or --model-factory with --weights and --data")
    _no_byo_flags(args)
    cfg, calibrate = launder_cfg(args), calibrate_options(args)      # a bad setting stops before any data loads
    budget = budget_of(args, 0.006)
    out_dir = Path(args.out)
    _out(str(out_dir / "laundered"))
    model, meta, dataset, tr, te = _registered(args, args.model)
    clean = D.stratified_subset(tr, seed=args.seed, **D.Budget.parse(str(budget), dataset).kwargs())
    wm, threshold = None, None
    if args.verify_scheme:
        wm = _watermark(args, meta, args.verify_scheme, tr, te)
        if args.threshold is not None or args.threshold_file:
            threshold = _threshold_value(args, args.verify_scheme)
    ev = evaluator(te, wm)
    before = ev(0, model)
    print(f"attacker's clean set: {len(clean)} images ({len(clean) / len(tr):.2%} of {dataset} train); "
          f"before: " + ", ".join(f"{k} {v:.2f}%" for k, v in before.items()))
    bars = LaunderBars(not args.quiet)
    try:
        run = run_launder(model, clean, cfg, evaluate=ev, calibrate=calibrate,
                          state_file=out_dir / "partial.safetensors", resume=args.resume, out_dir=out_dir,
                          classes=tr.classes, log=_say, on_progress=bars,
                          report={"model": str(args.model), "dataset": dataset, "budget": len(clean) / len(tr),
                                  "threshold": threshold, "verify_scheme": args.verify_scheme, "before": before})
    finally:
        bars.close()
    save_model(out_dir / "laundered", run.result.model,
               derived_meta(meta, laundered_from=str(args.model), launder=run.report))
    if wm is not None and threshold is not None:
        print(verify(run.result.model, wm, threshold).summary())
    print(f"wrote {out_dir}/laundered.safetensors, {', '.join(run.files)} ({run.result.seconds:.0f} s)")
    return 0


def _say(msg: str) -> None:
    print(msg, flush=True)


def _no_byo_flags(args: argparse.Namespace, more: tuple[str, ...] = ()) -> None:
    for flag in ("weights", "data", "test_data", "verify_npz", "model_kwargs", "input_range", "mean", "std", *more):
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag.replace('_', '-')} goes with --model-factory (your own model)")


def _external_spec(args: argparse.Namespace):
    from .byo import ExternalModel

    return ExternalModel(factory=args.model_factory, kwargs=args.model_kwargs, weights=args.weights, data=args.data,
                         test_data=args.test_data, verify_npz=args.verify_npz, input_range=args.input_range,
                         mean=args.mean, std=args.std, allow_torch_load=args.allow_torch_load)


def _launder_external(args: argparse.Namespace) -> int:
    from .byo import run_external

    if args.resume:
        raise UserError("--resume works with a MODEL of this project, not with --model-factory")
    if args.model:
        raise UserError("give either a MODEL of this project or --model-factory with --weights, not both")
    if args.verify_scheme:
        raise UserError("--verify-scheme needs a model of this project; for your own model give --verify-npz")
    out_dir = _out(str(Path(args.out) / "laundered")).parent
    budget = budget_of(args, 1.0)
    return run_external(_external_spec(args), launder_cfg(args), out_dir, budget=budget, seed=args.seed,
                        calibrate=calibrate_options(args), progress=not args.quiet)


def cmd_run(args: argparse.Namespace) -> int:
    from .experiments.config import load_experiment, select_cells
    from .experiments.runner import cell_lines, run_experiment

    cells = load_experiment(args.file, allow := code_allowance(args))
    if args.only:
        cells = select_cells(cells, args.only)
    ws = Path(args.workspace)
    _out(str(ws / "results"))
    if args.dry_run:
        print("\n".join(cell_lines(cells, ws)))
        return 0

    def show(cell, summary):
        mode = cell.scheme_params.get("mode") if cell.scheme == "adi" else None
        print(f"{cell.dataset}/{cell.scheme}{f'-{mode}' if mode else ''} {cell.attack} @ {cell.budget} "
              f"seed {cell.seed}: test {summary['test_acc']:.2f}%, WM {summary['wm_acc']:.2f}% "
              f"(threshold {summary['threshold']:.2f}%) {summary['outcome']}", flush=True)

    out = run_experiment(cells, ws, args.data_dir, progress=not args.quiet, on_cell=show, executor=args.executor,
                         address=args.address, jobs=args.jobs, allow=allow, export=args.export)
    print(f"{out['ran']} cells run, {out['skipped']} already in {ws / 'results.sqlite'}")
    return 0


def _owner_view(args: argparse.Namespace):
    """(model, meta, train, test, watermark) for the persistence commands (the owner's view)."""
    model, meta, _, tr, te = _registered(args, args.model)
    if not meta.get("scheme"):
        raise UserError(f"{args.model} records no watermark scheme; persistence needs a watermarked model")
    wm = make_watermark(meta["scheme"], tr, te, args.data_dir, meta.get("scheme_params") or {})
    return model, meta, tr, te, wm


def _persistence_run(args: argparse.Namespace, phase: str) -> int:
    from .experiments.persistence import run_phase

    model, meta, tr, te, wm = _owner_view(args)
    out = Path(args.out)
    _out(str(out / "model"))
    rep = run_phase(model, meta, tr, te, wm, phase, out, split=args.split, seed=args.seed, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, source=str(args.model), progress=not args.quiet)
    before, last = rep["before"], (rep["history"][-1] if rep["history"] else rep["before"])
    print(f"{phase}: test {before['test_acc']:.2f} -> {last.get('test_acc', before['test_acc']):.2f}%, "
          f"WM {before['wm_acc']:.2f} -> {last.get('wm_acc', before['wm_acc']):.2f}%, "
          f"parameter shift {rep['param_shift']['total']:.3f}; wrote {out}/")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    return _persistence_run(args, "finetuned-mixed" if args.mixed else "finetuned")


def cmd_restore(args: argparse.Namespace) -> int:
    return _persistence_run(args, "restored")


def cmd_landscape(args: argparse.Namespace) -> int:
    from .experiments.persistence import landscape_files, trajectory_files

    files = trajectory_files(Path(args.checkpoints))
    args.model = str(files[-1])
    _, meta, tr, _, wm = _owner_view(args)
    out = Path(args.out)
    _out(str(out.with_suffix("")))
    landscape_files(files, wm, tr, out, on=args.on, images=args.images, grid=args.grid, margin=args.margin,
                    allow_torch_load=args.allow_torch_load, title=str(meta.get("scheme")))
    print(f"wrote {out.with_suffix('.png')} and .json")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report.build import build_report

    names = [e.strip() for e in (args.experiments or "").split(",") if e.strip()]
    out = build_report(args.workspace, args.out or Path(args.workspace) / "report", names or None, args.rows,
                       control=args.control)
    print(f"wrote {out}/index.md and {out}/index.html" + (f", and {args.rows}" if args.rows else ""))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .experiments.store import merge_workspace

    copied, here, files = merge_workspace(args.other, args.workspace)
    print(f"merged {copied} cell(s) from {args.other} into {args.workspace}; {here} were already there"
          + (f"; {files} file(s) of triggers and unfinished cells copied" if files else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .experiments.store import export_workspace

    names = [e.strip() for e in (args.experiments or "").split(",") if e.strip()] or None
    cells, files = export_workspace(args.workspace, args.out, names, args.triggers)
    print(f"wrote {cells} cell(s) to {args.out}/<experiment>.jsonl" + (f" and {files} file(s)" if files else ""))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .experiments.audit import ExternalAudit, run_audit

    ext = None
    if args.model_factory:
        ext = ExternalAudit(_external_spec(args), args.threshold,
                            tuple(w for w in (args.clean_weights or "").split(",") if w.strip()))
    else:
        _no_byo_flags(args, ("threshold", "clean_weights"))
    run_audit(args.model, args.scheme, param_table(args.param), profile="quick" if args.quick else "full",
              seeds=args.seeds, workspace=args.workspace, out=args.out, data_dir=args.data_dir,
              executor=args.executor, address=args.address, jobs=args.jobs, progress=not args.quiet, log=_say,
              external=ext)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data.fetch import check_lines, fetch_all

    root = Path(args.data_dir).expanduser() if args.data_dir else D.default_data_dir()   # fetch creates it
    if args.action == "check":
        print("\n".join(check_lines(args.names, root)))
    else:
        fetch_all(args.names, root, mirror=args.mirror, mirror_only=args.mirror_only, progress=not args.quiet,
                  log=_say)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .data.fetch import check, fetch
    from .demo import run_demo

    root = D.resolve_data_dir(args.data_dir)
    if check("mnist", root).state == "missing":
        print(f"MNIST is not in {root}: fetching it first (nnlaunder data fetch mnist)", flush=True)
        fetch("mnist", root, progress=not args.quiet, log=_say)

    run_demo(str(root), Path(args.out_dir), epochs=args.epochs, progress=not args.quiet)
    return 0


COMMANDS = {"train": cmd_train, "embed": cmd_embed, "verify": cmd_verify, "threshold": cmd_threshold,
            "launder": cmd_launder, "run": cmd_run, "finetune": cmd_finetune, "restore": cmd_restore,
            "landscape": cmd_landscape, "report": cmd_report, "demo": cmd_demo, "data": cmd_data,
            "audit": cmd_audit, "merge": cmd_merge, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        deterministic()
        clock.watch_stops()               # seconds recorded leave out the time the process is stopped (Ctrl-Z)
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        if getattr(args, "device", None):
            set_device(args.device)
        if getattr(args, "command", "") == "threshold":
            for s in args.schemes.split(","):
                if s.strip() and s.strip() not in SCHEMES:
                    raise UserError(f"unknown scheme {s.strip()!r}; choose from {', '.join(SCHEMES)}")
        with one_line_warnings():
            return COMMANDS[args.command](args)
    except Inconclusive as e:
        print(f"nnlaunder: {e}", file=sys.stderr)
        return 3
    except (UserError, OSError) as e:     # an OSError here is the machine's answer to a path the user gave
        print(f"nnlaunder: error: {e if isinstance(e, UserError) else os_error_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"nnlaunder: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nnlaunder: interrupted; {KEPT.get(getattr(args, 'command', ''), 'nothing was kept')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
