"""Removal baselines with the attacker interface `attack(model, clean, cfg) -> AttackResult`.

- `prune`: magnitude pruning of a fraction of every Conv2d / Linear weight tensor (per layer),
  as in Zhang et al.'s robustness claim; optional fine-tuning with the pruned weights held at 0.
- `ftll`, `ftal`, `rtll`, `rtal`: Adi et al.'s fine-tuning family: fine-tune the last layer / all
  layers, after re-initialising the last layer or not; with `mix_split`, Ngo et al.'s mixed
  fine-tuning (a part of the set trained on, the rest replayed one batch every `mix_every` batches).
- `fine-prune` (Liu et al. 2018): prune the last conv layer's channels in increasing order of mean
  activation on the clean set until clean accuracy (on the attacker's own set) falls by more than
  `max_drop` points, then fine-tune with those channels held at zero.
- `nc-unlearn` (Wang et al.'s mitigation): Neural Cleanse, then retrain on the clean set plus
  clean images stamped with the flagged trigger(s), labelled with their true class; no reset.

Like laundering, no function here can see the watermark.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import clock
from ..config import int_in
from ..data import Dataset, disjoint_split
from ..errors import UserError
from ..train import TrainConfig, accuracy, apply_masks, train
from .base import AttackResult, attack_copy, output_layer
from .laundering import used_triggers
from .neural_cleanse import NCConfig, NCResult, neural_cleanse, stamp
from .units import discover_units, mean_activations

ATTACKER_FINETUNE = TrainConfig(epochs=20, batch_size=64, optimizer="sgd", lr=0.01, momentum=0.9)


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PruneConfig:
    fraction: float = 0.9
    finetune: TrainConfig | None = None      # None: prune only

    def __post_init__(self) -> None:
        if not 0 <= self.fraction < 1:
            raise UserError(f"prune fraction must be in [0, 1), got {self.fraction}")


def magnitude_masks(model: nn.Module, fraction: float) -> dict[str, torch.Tensor]:
    """Per layer: mask out the `fraction` smallest-magnitude weights of every Conv2d / Linear."""
    masks = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d | nn.Linear):
            w = mod.weight.detach().abs().flatten()
            k = int(fraction * w.numel())
            m = torch.ones_like(w)
            if k > 0:
                m[torch.argsort(w, stable=True)[:k]] = 0
            masks[f"{name}.weight"] = m.view_as(mod.weight)
    return masks


def prune(model: nn.Module, clean: Dataset, cfg: PruneConfig) -> AttackResult:
    t0 = clock.now()
    model = attack_copy(model, clean)
    masks = magnitude_masks(model, cfg.fraction)
    apply_masks(model, masks)
    if cfg.finetune is not None:
        train(model, clean.x, clean.y, cfg.finetune, masks=masks, progress=False)
    model.eval()
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    return AttackResult(model, {"pruned_weights": zeros, "fraction": cfg.fraction}, clock.now() - t0)


# --------------------------------------------------------------------------------------------
FT_MODES = ("ftll", "ftal", "rtll", "rtal")      # Adi et al.'s fine-tuning family


@dataclass(frozen=True)
class FinetuneConfig:
    mode: str = "ftal"                # ftll | ftal | rtll | rtal
    train: TrainConfig = ATTACKER_FINETUNE
    seed: int = 0
    # Ngo et al.'s mixed fine-tuning: train on this stratified fraction of the clean set, and take one extra
    # step on a batch of the rest after every `mix_every`-th batch (None: train on all of it)
    mix_split: float | None = None
    mix_every: int = 2

    def __post_init__(self) -> None:
        if self.mode not in FT_MODES:
            raise UserError(f"fine-tuning mode must be ftll, ftal, rtll or rtal, got {self.mode!r}")
        if self.mix_split is not None and not 0 < self.mix_split < 1:
            raise UserError(f"mix_split must be a fraction in (0, 1), got {self.mix_split}")
        ok, msg = int_in("mix_every", self.mix_every, 1, 1_000_000)
        if not ok:
            raise UserError(msg)


def finetune(model: nn.Module, clean: Dataset, cfg: FinetuneConfig) -> AttackResult:
    """Adi et al.: FTLL / FTAL fine-tune the last / all layers; RTLL / RTAL first re-initialise
    the last layer."""
    t0 = clock.now()
    model = attack_copy(model, clean)
    name, last = output_layer(model)
    if cfg.mode.startswith("rt"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            last.reset_parameters()
    only_last = cfg.mode.endswith("ll")
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(not only_last or n.startswith(f"{name}."))
    tune, rest = (clean, None) if cfg.mix_split is None else disjoint_split(clean, cfg.mix_split, cfg.seed)
    try:
        # with only the last layer trained, batch-norm statistics must not move either
        train(model, tune.x, tune.y, cfg.train, progress=False, freeze_bn=only_last,
              interleave=None if rest is None else (rest.x, rest.y, cfg.mix_every))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    model.eval()
    return AttackResult(model, {"mode": cfg.mode, "layer": name}, clock.now() - t0)


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinePruneConfig:
    max_drop: float = 4.0             # points of clean accuracy (on the attacker's set) allowed to fall
    finetune: TrainConfig = ATTACKER_FINETUNE


def fine_prune(model: nn.Module, clean: Dataset, cfg: FinePruneConfig) -> AttackResult:
    t0 = clock.now()
    model = attack_copy(model, clean)
    units, skipped = discover_units(model, clean.x[:2])
    convs = [u for u in units if u.kind == "conv"]
    if not convs:
        why = f" (skipped: {'; '.join(f'{n}: {r}' for n, r in skipped[:3])})" if skipped else ""
        raise UserError(f"fine-pruning needs a hidden Conv2d with an activation after it, and the model has none{why}")
    last = convs[-1]
    acts = mean_activations(model, [last], clean.x)[last.name]
    order = torch.argsort(acts, stable=True)
    base = accuracy(model, clean.x, clean.y)
    from .laundering import apply_reset, reset_masks

    masks: dict[str, torch.Tensor] = {}
    pruned = 0
    for k in range(1, last.width):
        trial = reset_masks(model, [last], {last.name: order[:k]})
        probe = copy.deepcopy(model)
        apply_reset(probe, trial)
        if base - accuracy(probe, clean.x, clean.y) > cfg.max_drop:
            break
        masks, pruned = trial, k
    apply_reset(model, masks)
    train(model, clean.x, clean.y, cfg.finetune, masks=masks, progress=False)
    model.eval()
    return AttackResult(model, {"layer": last.name, "pruned_channels": pruned, "of": last.width},
                        clock.now() - t0)


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnlearnConfig:
    nc: NCConfig = NCConfig()
    triggers: str = "flagged"
    retrain: TrainConfig = TrainConfig(epochs=5, batch_size=32, optimizer="adam", lr=1e-4)


def nc_unlearn(model: nn.Module, clean: Dataset, cfg: UnlearnConfig, nc: NCResult | None = None,
               keep: Callable[[NCResult], None] | None = None) -> AttackResult:
    """Wang et al.'s unlearning: the recovered triggers stamped on the clean images with their true labels.
    `nc`: Neural Cleanse already run on this model and these images with `cfg.nc` (a workspace's kept
    result); else it runs here and `keep` receives it."""
    t0 = clock.now()
    model = attack_copy(model, clean)
    if nc is None:
        nc = neural_cleanse(model, clean.x, cfg.nc, num_classes=clean.num_classes)
        if keep is not None:
            keep(nc)
    used = used_triggers(nc, cfg.triggers, getattr(cfg, "top_k", 3))
    xs = torch.cat([clean.x] + [stamp(clean.x, nc.masks[t], nc.patterns[t]) for t in used])
    ys = torch.cat([clean.y] * (1 + len(used)))
    train(model, xs, ys, cfg.retrain, progress=False)
    model.eval()
    return AttackResult(model, {"flagged": nc.flagged, "used_triggers": used, "nc_seconds": nc.seconds},
                        clock.now() - t0)
