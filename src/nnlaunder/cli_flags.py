"""The command line's flags: every subcommand's options, their types and help, and the typed
options they stand for (`train_config`, `launder_cfg`, `calibrate_options`). The commands
themselves are in `cli.py`; `make_parser()` records the chosen one in `args.command`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, NoReturn

from . import __version__
from . import data as D
from .attacks import laundering as L
from .attacks.neural_cleanse import NC_PRESETS
from .attacks.units import MEASURE_POINTS, POOLS
from .errors import UserError
from .models import ARCHS
from .recipes import owner_config
from .restore import PERSISTENCE_FINETUNE, RESTORE
from .train import AUGMENTS, OPTIMIZERS, SCHEDULES, TrainConfig
from .watermarks.schemes import SCHEMES

DESCRIPTION = "Test whether backdoor-based watermarks survive Neural Network Laundering."


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


def budget_of(args: argparse.Namespace, default: float) -> D.Budget:
    """The attacker's budget `--budget` asks for (a fraction, or N/class), else `default`."""
    try:
        return D.Budget.parse(default if args.budget is None else args.budget)
    except UserError as e:
        raise UserError(f"--budget: {str(e).removeprefix('budget: ')}") from None


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



def param_table(items: list[str] | None) -> dict[str, Any]:
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


def train_config(args: argparse.Namespace, arch: str) -> TrainConfig:
    return owner_config(arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        optimizer=args.optimizer, schedule=args.schedule, augment=args.augment,
                        label_smoothing=args.label_smoothing, l2=args.l2, seed=args.seed, amp=args.amp)


def launder_cfg(args: argparse.Namespace):
    """The LaunderConfig the `launder` flags ask for (both the registered and the external path)."""
    from .attacks.laundering import launder_config
    from .attacks.neural_cleanse import nc_config

    overrides = {k: v for k, v in (("rounds", args.rounds), ("dt", args.dt), ("ct", args.ct),
                                    ("threshold_mode", args.threshold_mode), ("layers", args.layers),
                                    ("triggers", args.triggers), ("add_masks", args.add_masks),
                                    ("top_k", args.top_k), ("diff", args.diff), ("measure", args.measure),
                                    ("pool", args.pool), ("bn_stats", args.bn_stats), ("stamping", args.stamping),
                                    ("reinit", args.reinit), ("early_stop", args.early_stop),
                                    ("holdout", args.holdout)) if v is not None}
    nc = nc_config(args.nc_preset, seed=args.seed, **({"max_epochs": args.nc_epochs} if args.nc_epochs else {}))
    base = launder_config(args.variant).retrain
    retrain = dataclasses.replace(base, seed=args.seed, **{k: v for k, v in (("epochs", args.retrain_epochs),
                                                                           ("lr", args.retrain_lr)) if v is not None})
    return launder_config(args.variant, nc=nc, seed=args.seed, retrain=retrain, **overrides)


def calibrate_options(args: argparse.Namespace):
    """--calibrate, --calibrate-folds and --calibrate-grid as CalibrateOptions (None: no calibration)."""
    from .attacks.pipeline import CalibrateOptions

    if not args.calibrate:
        if args.calibrate_grid is not None:
            raise UserError("--calibrate-grid goes with --calibrate")
        return None
    grid = None
    if args.calibrate_grid is not None:
        try:
            grid = json.loads(args.calibrate_grid)
        except (ValueError, RecursionError) as e:      # also nested too deeply, or a 5000-digit number
            raise UserError(f"--calibrate-grid: not JSON ({type(e).__name__}: {str(e)[:100]})") from None
        if not isinstance(grid, list) or not grid or not all(isinstance(c, dict) for c in grid):
            raise UserError("--calibrate-grid: expected a non-empty JSON list of tables of options")
        if len(grid) > MAX_GRID:
            raise UserError(f"--calibrate-grid: {len(grid)} candidates; at most {MAX_GRID} (each is a laundering "
                            "per fold)")
    return CalibrateOptions(folds=args.calibrate_folds, grid=grid)


MAX_GRID = 64


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="dataset folder (default: $NNLAUNDER_DATA, else ../shared/data where it "
                                      "exists, else ~/.cache/nnlaunder/data)")
    p.add_argument("--threads", type=_threads, help=f"torch threads, 1-{MAX_THREADS} (default: all cores)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:N or auto (default: $NNLAUNDER_DEVICE or cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--allow-torch-load", action="store_true",
                   help="accept a .pt/.pth state_dict as a model's weights, read with "
                        "torch.load(weights_only=True) (default: safetensors only)")


def _model_scheme_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", help="model of this project: stem or .safetensors (with its .json beside it)")
    s.add_argument("--scheme", choices=sorted(SCHEMES), help="default: the one recorded in the model")
    s.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="scheme parameter over the model's recorded ones (repeatable; lists as [22,16])")


def _task_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--dataset", required=True, choices=sorted(D.DATASETS), help="registered dataset")
    s.add_argument("--arch", choices=sorted(ARCHS), help="architecture (default: the dataset's, as in the paper)")


def _out_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", required=True, help="output stem: writes OUT.safetensors + OUT.json")
    s.add_argument("--resume", action="store_true", help="continue from OUT.ckpt/ (last finished epoch)")


def _train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults: the architecture's recipe)")
    g.add_argument("--epochs", type=_positive_int, help="training epochs (>= 1)")
    g.add_argument("--batch-size", type=_positive_int, help="images per step")
    g.add_argument("--lr", type=_float, help="peak learning rate")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer")
    g.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule")
    g.add_argument("--augment", choices=AUGMENTS,
                   help="data augmentation (crop-flip: 4-pixel padded random crop and horizontal flip)")
    g.add_argument("--label-smoothing", type=_float, help="label smoothing in [0, 1)")
    g.add_argument("--l2", type=_float, help="weight decay (L2)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order (default 0)")
    g.add_argument("--amp", action="store_true", default=None,
                   help="bfloat16 autocast where the hardware runs it natively (about 2x on a CPU with AMX; "
                        "rounds differently, so it names another model): off by default")



def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nnlaunder", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"nnlaunder {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_embed(sub)
    _add_verify(sub)
    _add_threshold(sub)
    _add_launder(sub)
    _add_run(sub)
    _add_persistence(sub)
    _add_landscape(sub)
    _add_report(sub)
    _add_merge(sub)
    _add_export(sub)
    _add_demo(sub)
    _add_data(sub)
    _add_audit(sub)
    return p


def _add_train(sub: Any, name: str = "train", help: str = "train a clean model") -> Any:
    s = sub.add_parser(name, help=help)
    for add in (_common, _task_flags, _out_flags, _train_flags):
        add(s)
    return s


def _add_embed(sub: Any) -> None:
    s = _add_train(sub, "embed", "train a watermarked model")
    s.add_argument("--scheme", required=True, choices=sorted(SCHEMES), help="watermark scheme to embed")
    s.add_argument("--param", action="append", metavar="KEY=VALUE", help="scheme parameter (repeatable)")
    s.add_argument("--base", help="start from this model (required for adi mode=pt)")


def _add_verify(sub: Any) -> None:
    s = sub.add_parser("verify", help="ownership verdict for a model")
    _common(s)
    _model_scheme_flags(s)
    s.add_argument("--threshold", type=_float, help="vanilla threshold in percent")
    s.add_argument("--threshold-file", help="JSON written by `nnlaunder threshold`")
    s.add_argument("--alpha", type=_float, default=0.01,
                   help="significance level of the binomial test (default 0.01)")
    s.add_argument("--json", action="store_true", help="print the verdict as one JSON object")


def _add_threshold(sub: Any) -> None:
    s = sub.add_parser("threshold", help="thresholds under every rule from clean models (cached per architecture)")
    _common(s)
    _task_flags(s)
    s.add_argument("--schemes", default="zhang-content,zhang-noise,zhang-unrelated",
                   help="comma-separated schemes to measure (default: the three Zhang schemes)")
    s.add_argument("--seeds", type=_int_list, default=None,
                   help="clean models' seeds, comma-separated (default 0-4 on MNIST and Fashion-MNIST, 0-2 "
                        "elsewhere); each is trained once per architecture and recipe and cached, so another "
                        "watermark's threshold costs only evaluation")
    s.add_argument("--heldout-seeds", type=_int_list, default=(),
                   help="more clean seeds, none of --seeds: every rule's false-positive rate on their converged "
                        "epochs (how often `verify` would show ownership on a model that never saw the watermark)")
    s.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="scheme parameter, for a watermark other than the published one (repeatable)")
    s.add_argument("--out", required=True, help="JSON file")
    _train_flags(s)


def _add_launder(sub: Any) -> None:
    s = sub.add_parser("launder", help="launder a model with a small clean set (Aiken et al.)")
    _common(s)
    s.add_argument("model", nargs="?", help="model stem or .safetensors (with its .json beside it); "
                                            "or leave out and give --model-factory")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--budget", default=None,
                   help="the attacker's clean data: a fraction of the training set, e.g. 0.006 (the default; with "
                        "--data: 1, all of it), or N images per class, e.g. 5/class")
    s.add_argument("--rounds", type=_positive_int,
                   help="laundering rounds, each Neural Cleanse + Algorithm 1 + retraining (default 1)")
    s.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=None,
                   help="stop when round 1's most likely class becomes the least likely (default on)")
    s.add_argument("--holdout", type=_float,
                   help="fraction of the clean set the attacker keeps aside to check its own model (default 0)")
    s.add_argument("--variant", choices=tuple(L.VARIANTS), default="strong",
                   help="laundering settings to start from: the paper's text (faithful) or this project's "
                        "stronger defaults (strong, the default); docs/methods.md")
    s.add_argument("--dt", type=_float, help="dense-layer threshold")
    s.add_argument("--ct", type=_float, help="conv-layer threshold")
    s.add_argument("--threshold-mode", choices=L.THRESHOLD_MODES,
                   help="DT/CT as activation values (absolute) or multiples of the unit's mean clean activation")
    s.add_argument("--layers", choices=L.LAYER_CHOICES, help="which resettable layers Algorithm 1 may reset")
    s.add_argument("--triggers", choices=L.TRIGGER_CHOICES,
                   help="recovered triggers used: every class, the flagged ones (else the smallest mask), or the "
                        "--top-k smallest masks (default: the variant's)")
    s.add_argument("--top-k", type=_positive_int, help="with --triggers top-k: how many (default 3)")
    s.add_argument("--add-masks", action=argparse.BooleanOptionalAction, default=None,
                   help="retrain on the recovered masks labelled as the least likely class (the paper's step 3)")
    s.add_argument("--diff", choices=L.DIFF_MODES,
                   help="Algorithm 1's activation difference over all used triggers pooled, or per trigger with "
                        "the resets united")
    s.add_argument("--measure", choices=MEASURE_POINTS,
                   help="read a unit at its activation, or at its own output before a residual add")
    s.add_argument("--pool", choices=POOLS,
                   help="a conv channel over positions: its mean (Algorithm 1, default) or its peak per image")
    s.add_argument("--bn-stats", choices=L.BN_STATS,
                   help="batch norms before retraining: statistics kept, reset (faithful), re-estimated on the "
                        "clean set, or every batch norm re-initialised (reinit)")
    s.add_argument("--reinit", choices=L.REINIT,
                   help="after Algorithm 1, re-initialise every layer of the network's second half (default none)")
    s.add_argument("--stamping", choices=L.STAMPING,
                   help="retraining images stamped with each used trigger, or one drawn at random per image")
    s.add_argument("--nc-epochs", type=_positive_int,
                   help="cap on Neural Cleanse epochs (default: the preset's, 1000 faithful, 100 fast)")
    s.add_argument("--nc-preset", choices=tuple(NC_PRESETS), default="faithful",
                   help="Neural Cleanse settings: Wang et al.'s (default) or this project's fast preset "
                        "(8-minibatch schedule epochs, exact ReLU/pool reorder, bf16 only where it times faster "
                        "on this machine, masks confirmed on all images; fast-bf16: bf16 wherever the hardware "
                        "has it, unconfirmed; docs/methods.md)")
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
    s.add_argument("--seed", type=int, default=0,
                   help="attacker seed: its clean subset, Neural Cleanse's initialisation, retraining order")
    s.add_argument("--verify-scheme", choices=sorted(SCHEMES), help="evaluator: the owner's scheme to measure")
    s.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="scheme parameter over the model's recorded ones (repeatable; lists as [22,16])")
    s.add_argument("--threshold", type=_float, help="with --verify-scheme: vanilla threshold in percent")
    s.add_argument("--threshold-file", help="with --verify-scheme: JSON written by `nnlaunder threshold`")
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT/partial.safetensors (its last finished round)")
    _byo_flags(s, "the attacker's labelled images: a folder of class sub-folders or an .npz (x, y)")


def _byo_flags(s: argparse.ArgumentParser, data_help: str) -> Any:
    g = s.add_argument_group("bring your own model and data (docs/byo.md)")
    g.add_argument("--model-factory", metavar="PKG.MODULE:FUNCTION", help="builds your nn.Module")
    g.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for the factory")
    g.add_argument("--weights", help="your weights: .safetensors, or a .pt/.pth state_dict with --allow-torch-load")
    g.add_argument("--data", help=data_help)
    g.add_argument("--test-data", help="labelled test images (folder or .npz) for test accuracy")
    g.add_argument("--verify-npz", help=".npz of triggered inputs x and the target labels y: attack success rate")
    g.add_argument("--input-range", metavar="LO,HI", help="pixel range your model expects (default 0,1)")
    g.add_argument("--mean", metavar="M1[,M2,M3]", help="per-channel mean your model subtracts after scaling")
    g.add_argument("--std", metavar="S1[,S2,S3]", help="per-channel std your model divides by")
    return g


def _add_run(sub: Any) -> None:
    s = sub.add_parser("run", help="run an experiment file (TOML), a single cell or a sweep")
    _common(s)
    s.add_argument("file", help="experiment file (TOML; docs/experiments.md)")
    s.add_argument("--workspace", default="runs/workspace", help="models and results.sqlite live here")
    s.add_argument("--dry-run", action="store_true", help="validate and list the cells, run nothing")
    s.add_argument("--export", metavar="DIR", help="after every finished cell, and when the run stops, write the "
                   "workspace's cells and the state of unfinished ones to DIR as text (`nnlaunder export`)")
    s.add_argument("--only", action="append", default=[], metavar="KEY=V1,V2",
                   help="run only the cells whose setting KEY has one of these values (repeatable: all must "
                        "match; a dotted KEY reads into a table), e.g. --only attack=nad,i-bau --only seed=0 "
                        "--only attack_params.ct=1.0")
    s.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local (this machine) or ray (an existing Ray cluster at --address)")
    s.add_argument("--address", help="Ray cluster address HOST:PORT (with --executor ray)")
    s.add_argument("--jobs", type=_positive_int, default=1,
                   help="local executor: cells run in this many worker processes (default 1)")
    s.add_argument("--allow-factory", action="append", default=[], metavar="PKG.MODULE:FUNCTION",
                   help="let the file's [external] factory run: it is imported and called (repeatable); a file "
                        "that names code is refused without this or --allow-code")
    s.add_argument("--allow-code", action="store_true",
                   help="let any factory the file names run (you trust the file as you would a Python script)")


def code_allowance(args: argparse.Namespace) -> Any:
    """What `run`'s command line allows an experiment file to import (`--allow-factory`, `--allow-code`,
    `--allow-torch-load`)."""
    from .external.models import CodeAllowance, check_factory_spec

    named = frozenset(check_factory_spec(f, "--allow-factory") for f in args.allow_factory)
    return CodeAllowance(named, bool(args.allow_code), bool(args.allow_torch_load))


def _add_persistence(sub: Any) -> None:
    for name, helptext, base in (("finetune", "the owner's threat: fine-tune all layers on a disjoint split",
                                  PERSISTENCE_FINETUNE),
                                 ("restore", "restoration: keep training on the owner's clean data only", RESTORE)):
        s = sub.add_parser(name, help=helptext)
        _common(s)
        s.add_argument("model", help="the watermarked model (stem or .safetensors)")
        s.add_argument("--out", required=True, help="folder: epoch-NNN checkpoints, model, history.json")
        s.add_argument("--split", type=_float, default=0.3,
                       help="fraction of the training set fine-tuned on; the owner's data is the rest"
                       if name == "finetune" else
                       "the fine-tuning split's fraction, as given to finetune; restoration trains on the rest "
                       "(the owner's own data)")
        s.add_argument("--epochs", type=_nonneg_int, default=base.epochs, help=f"default {base.epochs}")
        s.add_argument("--lr", type=_float, default=base.lr, help=f"Adam learning rate (default {base.lr:g})")
        s.add_argument("--batch-size", type=_positive_int, default=base.batch_size,
                       help=f"default {base.batch_size}")
        s.add_argument("--seed", type=int, default=0, help="seed of the split and the training order (default 0)")
        if name == "finetune":
            s.add_argument("--mixed", action="store_true", help="one owner-data step every 2nd batch")


def _add_landscape(sub: Any) -> None:
    s = sub.add_parser("landscape", help="2-D loss surface along the PCA plane of a checkpoint trajectory")
    _common(s)
    s.add_argument("checkpoints", help="folder of epoch-NNN checkpoints (from finetune / restore)")
    s.add_argument("--on", choices=("trigger", "train"), default="trigger",
                   help="loss on the watermark's verification images (default) or on training images")
    s.add_argument("--grid", type=_int_at_least(3), default=15, help="grid points per axis (default 15)")
    s.add_argument("--images", type=_positive_int, default=1000,
                   help="images the loss is measured on (default 1000)")
    s.add_argument("--margin", type=_float, default=1.3,
                   help="plane extent as a multiple of the trajectory's span (default 1.3)")
    s.add_argument("--out", required=True, help="PNG path (a .json with the grid is written beside it)")


def _add_report(sub: Any) -> None:
    s = sub.add_parser("report", help="Markdown + HTML + plots from a workspace's results store")
    _common(s)
    s.add_argument("--workspace", default="runs/workspace",
                   help="workspace of `nnlaunder run` (default runs/workspace)")
    s.add_argument("--out", default=None, help="output folder (default: WORKSPACE/report)")
    s.add_argument("--experiments", default=None, metavar="NAME[,NAME...]",
                   help="only the cells of these experiments (default: every cell in the store)")
    s.add_argument("--rows", default=None, metavar="FILE.json",
                   help="also write one JSON row per cell there (what the cell is, its summary, machine, commit)")
    s.add_argument("--control", default=None, metavar="NAME",
                   help="an ablation: compare every other experiment's cells with this experiment's on the same "
                        "model and seeds, each named by how its settings depart")


def _add_merge(sub: Any) -> None:
    s = sub.add_parser("merge", help="copy the finished cells of another workspace (or an export) into this one")
    s.add_argument("other", help="the other workspace (a folder with results.sqlite), e.g. a run on another machine, "
                   "or a folder that `nnlaunder export` wrote")
    s.add_argument("--workspace", default="runs/workspace", help="the workspace to merge into (default runs/workspace)")


def _add_export(sub: Any) -> None:
    s = sub.add_parser("export", help="write a workspace's cells as text (one JSON line per cell), with the state "
                       "of unfinished cells, to commit or carry to another machine (`nnlaunder merge` reads it)")
    s.add_argument("--workspace", default="runs/workspace", help="the workspace to export (default runs/workspace)")
    s.add_argument("--out", required=True, help="the folder to write <experiment>.jsonl files into")
    s.add_argument("--experiments", help="comma-separated experiment names (default: all)")
    s.add_argument("--triggers", action="store_true", help="also copy the finished cells' trigger files (the "
                   "report's Figure 6/8 panels; large for CIFAR-10 grids)")


def _add_demo(sub: Any) -> None:
    s = sub.add_parser("demo", help="embed, verify, launder and verify again (MNIST, a few minutes)")
    _common(s)
    s.add_argument("--out-dir", default="runs/demo", help="where models, plots and the table go (default runs/demo)")
    s.add_argument("--epochs", type=_positive_int, default=3, help="owner training epochs (default 3)")


def _add_audit(sub: Any) -> None:
    s = sub.add_parser("audit", help="does this watermark survive? threshold, attacks x budgets x seeds, restoration")
    _common(s)
    s.add_argument("model", nargs="?", help="model of this project: stem or .safetensors (with its .json beside it); "
                                            "or leave out and give --model-factory")
    s.add_argument("--scheme", choices=sorted(SCHEMES), help="default: the one recorded in the model")
    s.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="scheme parameter over the model's recorded ones (repeatable; lists as [22,16])")
    s.add_argument("--quick", action="store_true",
                   help="the quick profile (fast Neural Cleanse, 2 budgets, 2 seeds; MNIST in minutes on a CPU); "
                        "default: the full profile")
    s.add_argument("--seeds", type=_positive_int, help="attacker seeds per cell (default: the profile's)")
    s.add_argument("--workspace", default="runs/audit", help="the experiment store and models (default runs/audit)")
    s.add_argument("--out", help="report folder (default: WORKSPACE/audit/<name>)")
    s.add_argument("--executor", choices=("local", "ray"), default="local", help="local or ray (with --address)")
    s.add_argument("--address", help="Ray cluster address HOST:PORT (with --executor ray)")
    s.add_argument("--jobs", type=_positive_int, default=1, help="local executor: worker processes (default 1)")
    g = _byo_flags(s, "your labelled training images (folder or .npz): the attackers' subsets and your restoration "
                      "set are drawn from it")
    g.add_argument("--threshold", type=_float, help="with --model-factory: the vanilla threshold in percent")
    g.add_argument("--clean-weights", metavar="W[,W...]",
                   help="with --model-factory: clean models of the same factory; the threshold is their highest "
                        "accuracy on --verify-npz")


def _add_data(sub: Any) -> None:
    s = sub.add_parser("data", help="fetch the datasets from their public sources, or check what is there")
    _common(s)
    s.add_argument("action", choices=("fetch", "check"),
                   help="fetch: download, verify (pinned SHA-256) and unpack; check: list present, verified, missing")
    s.add_argument("names", nargs="*", metavar="NAME",
                   help="mnist, fashion-mnist, cifar10, adi-trigger-set, or all (default: all)")
    s.add_argument("--mirror", metavar="URL", help="tried first: serves URL/<dataset>/<file> "
                                                   "(default: $NNLAUNDER_DATA_MIRROR, else only the canonical URLs)")
    s.add_argument("--mirror-only", action="store_true",
                   help="ask only the mirror, never the canonical URLs (default: $NNLAUNDER_DATA_MIRROR_ONLY=1)")


KEPT = {  # what an interrupted command leaves to continue from
    "train": "finished epochs are kept in OUT.ckpt/ (rerun with --resume)",
    "embed": "finished epochs are kept in OUT.ckpt/ (rerun with --resume)",
    "launder": "finished laundering rounds of a model of this project are kept in OUT/partial.safetensors (rerun "
               "with --resume); a --model-factory run keeps nothing",
    "run": "finished cells are in the workspace's store (rerun the same command to continue)",
    "finetune": "the epoch-NNN checkpoints written so far are kept; a rerun starts over",
    "audit": "finished cells are in the workspace's store (rerun the same command to continue)",
    "merge": "each cell is copied whole or not at all (rerun the same command to continue)",
    "export": "each file is written whole or not at all (rerun the same command)",
    "restore": "the epoch-NNN checkpoints written so far are kept; a rerun starts over",
}
