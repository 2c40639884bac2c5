"""The public Python API: `import nnlaunder as nl`.

    model, meta = nl.load_model("models/mnist/zhang-content")
    train, test = nl.load_data("mnist", "train"), nl.load_data("mnist", "test")
    wm = nl.watermark(meta["scheme"], "mnist", meta["scheme_params"])
    clean = nl.attacker_subset(train, fraction=0.006, seed=0)
    laundered = nl.launder(model, clean).model
    print(nl.verify(laundered, wm, threshold=0.49, test=test).summary())

Every function takes tensors, datasets and plain values, and returns the library's result objects;
the command line (`nnlaunder ...`) calls these functions. docs/api.md walks through them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data as D
from .attacks.base import AttackResult
from .attacks.laundering import LaunderResult, launder_config
from .attacks.neural_cleanse import NCResult, nc_config
from .attacks.neural_cleanse import neural_cleanse as _neural_cleanse
from .attacks.registry import ATTACKS, run_attack
from .checkpoint import load_model as _load_model
from .checkpoint import model_meta, save_model
from .config import with_seed
from .errors import UserError
from .models import build, check_data
from .recipes import owner_config
from .train import TrainConfig, accuracy
from .train import train as _train
from .watermarks.embed import embed as _embed
from .watermarks.schemes import Watermark, make_watermark
from .watermarks.verify import Verdict
from .watermarks.verify import verify as _verify

__all__ = ["load_model", "save_model", "load_data", "attacker_subset", "watermark", "model_meta", "train_clean",
           "embed", "verify", "threshold", "neural_cleanse", "launder", "attack", "audit"]


def load_model(path: str | Path, *, allow_torch_load: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A model of this project (`<path>.safetensors` + `<path>.json`): (model in eval mode, its metadata).
    Only safetensors are read unless `allow_torch_load` (which can run code from the file)."""
    return _load_model(path, allow_torch_load=allow_torch_load)


def load_data(dataset: str, split: str = "train", data_dir: str | Path | None = None) -> D.Dataset:
    """A registered dataset split ("train" or "test") as tensors in memory, pixels in [0, 1]."""
    return D.load(dataset, data_dir, split)


def attacker_subset(train: D.Dataset, *, fraction: float | None = None, per_class: int | None = None,
                    seed: int = 0) -> D.Dataset:
    """The attacker's clean labelled set: a class-stratified draw of `fraction` of `train` (the paper's
    budgets: 0.006, 0.108 for Adi) or `per_class` images of each class."""
    return D.stratified_subset(train, fraction=fraction, per_class=per_class, seed=seed)


def watermark(scheme: str, dataset: str, params: dict[str, Any] | None = None,
              data_dir: str | Path | None = None) -> Watermark:
    """A scheme's watermark for a dataset: embedding set, held-out verification set, target."""
    tr, te = D.load(dataset, data_dir, "train"), D.load(dataset, data_dir, "test")
    return make_watermark(scheme, tr, te, data_dir, params or {})


def train_clean(arch: str, dataset: str, *, seed: int = 0, config: TrainConfig | None = None,
                data_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
                progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Train a model without a watermark (the architecture's owner recipe unless `config`); with
    `checkpoint_dir` every finished epoch is kept there, and `resume` continues from the last one.
    Returns (model, metadata for `save_model`); the metadata's metrics hold test accuracy and epochs run."""
    tr, te = D.load(dataset, data_dir, "train"), D.load(dataset, data_dir, "test")
    check_data(arch, dataset, tr, te)
    model, cfg = build(arch, tr.num_classes, seed=seed), config or owner_config(arch)
    res = _train(model, tr.x, tr.y, cfg, eval_sets={"test": (te.x, te.y)}, checkpoint_dir=checkpoint_dir,
                 resume=resume, progress=progress)
    return model, model_meta(arch, dataset, tr.num_classes, seed=seed, config=cfg, history=res.history,
                             metrics={"test_acc": accuracy(model, te.x, te.y), "epochs_run": res.epochs_run})


def embed(arch: str, dataset: str, scheme: str, params: dict[str, Any] | None = None, *, seed: int = 0,
          config: TrainConfig | None = None, base: nn.Module | None = None, base_name: str | None = None,
          data_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
          progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Train an owner model with a watermark (the architecture's owner recipe unless `config`), or
    fine-tune `base` with it (Adi et al.'s "pt" mode; `base_name` is recorded as its source). With
    `checkpoint_dir` every finished epoch is kept there, and `resume` continues from the last one.
    Returns (model, metadata for `save_model`); the metadata's metrics hold test and WM accuracy and the
    size of the verification set."""
    tr, te = D.load(dataset, data_dir, "train"), D.load(dataset, data_dir, "test")
    check_data(arch, dataset, tr, te)
    wm = make_watermark(scheme, tr, te, data_dir, params or {})
    if base is None and wm.params.get("mode") == "pt":
        raise UserError("adi mode=pt fine-tunes a clean pre-trained model: pass one (`--base MODEL`, or `base=`)")
    model = base if base is not None else build(arch, tr.num_classes, seed=seed)
    cfg = config or owner_config(arch)
    res = _embed(model, tr, wm, cfg, test=te, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    metrics = {"test_acc": accuracy(model, te.x, te.y), "wm_acc": accuracy(model, wm.verify_x, wm.verify_y),
               "n_verify": len(wm.verify_y)}
    return model, model_meta(arch, dataset, tr.num_classes, seed=seed, config=cfg, scheme=scheme,
                             scheme_params=wm.params, base=base_name, metrics=metrics, history=res.history)


def verify(model: nn.Module, wm: Watermark, threshold: float, *, test: D.Dataset | None = None,
           alpha: float = 0.01) -> Verdict:
    """The ownership verdict: hits on the verification set against `threshold` (percent) and, given the
    task's `test` set (always pass it where it exists), the model's own base rate and task accuracy."""
    t = (test.x, test.y) if test is not None else None
    return _verify(model, wm, threshold, alpha, test=t, num_classes=test.num_classes if test is not None else None)


def threshold(dataset: str, arch: str, schemes: dict[str, dict[str, Any]], *, seeds: Sequence[int] | None = None,
              config: TrainConfig | None = None, data_dir: str | Path | None = None,
              progress: bool = False, heldout: Sequence[int] = ()) -> dict[str, Any]:
    """Thresholds for each watermark ({scheme: params}) from clean models of the architecture (trained
    once per seed and cached; every rule, the default `converged` one first). `seeds` default: the
    dataset's (5 on MNIST and Fashion-MNIST, 3 elsewhere). `heldout`: more clean seeds on which each rule's
    false-positive rate is measured (the result's `heldout`)."""
    from .experiments.clean import measure_thresholds

    tr, te = D.load(dataset, data_dir, "train"), D.load(dataset, data_dir, "test")
    wms = {s: make_watermark(s, tr, te, data_dir, p) for s, p in schemes.items()}
    return measure_thresholds(dataset, arch, config or owner_config(arch), seeds, wms, tr, te,
                              progress=progress, heldout=heldout)


def neural_cleanse(model: nn.Module, clean_x: torch.Tensor, *, preset: str = "fast", num_classes: int | None = None,
                   **overrides: Any) -> NCResult:
    """Neural Cleanse trigger recovery for every class ("fast" or "faithful" preset, any field overridden)."""
    cfg = dataclasses.replace(nc_config(preset), **overrides) if overrides else nc_config(preset)
    return _neural_cleanse(model, clean_x, cfg, num_classes=num_classes)


def launder(model: nn.Module, clean: D.Dataset, *, variant: str = "strong", nc_preset: str = "fast", seed: int = 0,
            **overrides: Any) -> LaunderResult:
    """Neural Network Laundering with the attacker's clean set: the "strong" or "faithful" variant with a
    Neural Cleanse preset ("fast" or "faithful"), any `LaunderConfig` field overridden. The input model
    is not changed."""
    from .attacks.laundering import launder as _launder

    overrides.setdefault("nc", nc_config(nc_preset))
    return _launder(model, clean, with_seed(launder_config(variant, **overrides), seed))


def attack(name: str, model: nn.Module, clean: D.Dataset, *, seed: int = 0, **overrides: Any) -> AttackResult:
    """Any registered removal attack (`nnlaunder.attacks.registry.ATTACKS`) with its defaults, fields
    overridden, every draw seeded by `seed`. The input model is not changed."""
    cfg = with_seed(ATTACKS[name].default() if name in ATTACKS else None, seed)
    return run_attack(name, model, clean, cfg, **overrides)


def audit(model: str | Path, scheme: str | None = None, params: dict[str, Any] | None = None, *,
          profile: str = "quick", out: str | Path | None = None, **options: Any) -> Any:
    """The owner's audit of a model: its threshold, the attack battery over seeds, restoration, outcomes
    (`nnlaunder audit`). Returns the audit's summary."""
    from .experiments.audit import run_audit

    return run_audit(str(model), scheme, params or {}, profile=profile, out=None if out is None else str(out),
                     progress=options.pop("progress", False), **options)
