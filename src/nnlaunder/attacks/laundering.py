"""Neural Network Laundering (Aiken, Kim, Woo 2020): recovery, Algorithm 1, retraining, rounds.

The attacker holds the model and a small clean labelled set, nothing else: `launder(model,
clean, cfg)` admits no scheme, target class or trigger. Watermark accuracy is measured only by
the experiment, through the `on_round` callback; laundering never sees what it returns.

One round:
1. Neural Cleanse on the clean set, every class a candidate (`neural_cleanse.py`).
2. Algorithm 1: per hidden layer, mean activation on clean images stamped with the recovered
   trigger(s) minus mean activation on the clean images (the text's rule, not the listing's
   `AN > DT`); reset dense neurons whose difference exceeds DT and conv channels above CT.
   Reset = zero the incoming weights and bias (and the channel's batch-norm scale and shift),
   kept at zero through retraining by the trainer's weight masks.
3. Retrain on the clean set + clean images stamped with the triggers, labelled with their true
   class, + (optionally) the recovered masks themselves labelled as the least likely infected
   class. The next round starts from the retrained model; rounds stop early when the first
   round's most-likely-infected class has become the least likely one.

Variants (`variant` presets, every field can be set):
- "faithful": the paper as written: all K recovered triggers, masks added as images,
  absolute thresholds.
- "strong" (ours): only the flagged trigger (the smallest-mask class when none is flagged —
  the attacker must assume a watermark, §7.6), no masks, thresholds relative to the layer's
  mean clean activation. See docs/methods.md for the measurements behind it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import clock
from ..config import from_dict, with_seed
from ..data import Dataset
from ..errors import UserError
from ..train import TrainConfig, accuracy, apply_masks, train
from .base import check_inputs, trainable
from .neural_cleanse import NC_PRESETS, NCConfig, NCResult, nc_params, neural_cleanse, stamp
from .records import LaunderState, RoundInfo
from .units import MEASURE_POINTS, POOLS, Unit, discover_units, mean_activations, select_units

TRIGGER_CHOICES = ("all", "flagged", "top-k")
THRESHOLD_MODES = ("absolute", "relative")
LAYER_CHOICES = ("all", "second-half")
BN_STATS = ("keep", "reset", "reestimate", "reinit")
STAMPING = ("each", "random")
REINIT = ("none", "second-half")
DIFF_MODES = ("pooled", "per-trigger")


@dataclass(frozen=True)
class LaunderConfig:
    rounds: int = 1
    dt: float = 0.5                      # dense threshold
    ct: float = 0.5                      # conv threshold
    threshold_mode: str = "absolute"     # "absolute": diff > t; "relative": diff > t · mean clean act of layer
    layers: str = "all"                  # "all" | "second-half" (deep ResNets, as in the paper)
    triggers: str = "all"                # which recovered triggers: "all" | "flagged" | "top-k" smallest masks
    top_k: int = 3                       # with triggers = "top-k"
    add_masks: bool = True               # recovered masks as images labelled the least likely class
    diff: str = "pooled"                 # "pooled": one A_diff over every used trigger's stamped images
    #                                      (Algorithm 1); "per-trigger": one A_diff per trigger, resets united
    measure: str = "relu"                # where a unit is read: "relu" (its activation) | "branch"
    #                                      (its own output after its own batch norm, before a residual add)
    pool: str = "mean"                   # a conv channel over positions: "mean" (Algorithm 1's average) | "max"
    #                                      (its peak per image, then averaged over images)
    bn_stats: str = "keep"               # batch-norm running statistics before retraining: "keep" |
    #                                      "reset" (mean 0, var 1: the paper's "reset the batch normalization")
    #                                      | "reestimate" (recomputed on the attacker's clean set) | "reinit"
    #                                      (every BN re-initialised: scale 1, shift 0, mean 0, var 1)
    stamping: str = "each"               # retraining set: every clean image stamped with "each" used
    #                                      trigger, or with one trigger drawn at "random" per image
    reinit: str = "none"                 # "second-half": after Algorithm 1, every layer of the network's
    #                                      second half (weights, biases, batch norms) re-initialised
    early_stop: bool = True              # stop when round 1's most likely class becomes least likely
    holdout: float = 0.0                 # fraction of the clean set kept aside for the attacker's own check
    nc: NCConfig = NCConfig()
    retrain: TrainConfig = TrainConfig(epochs=20, batch_size=32, optimizer="adam", lr=1e-3)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.dt >= 0 and self.ct >= 0, f"dt and ct must be >= 0, got {self.dt}, {self.ct}"),
            (self.threshold_mode in THRESHOLD_MODES, f"threshold_mode must be one of {THRESHOLD_MODES}"),
            (self.layers in LAYER_CHOICES, f"layers must be one of {LAYER_CHOICES}"),
            (self.triggers in TRIGGER_CHOICES, f"triggers must be one of {TRIGGER_CHOICES}"),
            (isinstance(self.top_k, int) and self.top_k >= 1, f"top_k must be an integer >= 1, got {self.top_k}"),
            (self.diff in DIFF_MODES, f"diff must be one of {DIFF_MODES}"),
            (self.measure in MEASURE_POINTS, f"measure must be one of {MEASURE_POINTS}"),
            (self.pool in POOLS, f"pool must be one of {POOLS}"),
            (self.bn_stats in BN_STATS, f"bn_stats must be one of {BN_STATS}"),
            (self.stamping in STAMPING, f"stamping must be one of {STAMPING}"),
            (self.reinit in REINIT, f"reinit must be one of {REINIT}"),
            (math.isfinite(self.dt) and math.isfinite(self.ct), f"dt and ct must be finite, got {self.dt}, {self.ct}"),
            (0 <= self.holdout < 1, f"holdout must be in [0, 1), got {self.holdout}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)


VARIANTS: dict[str, dict[str, Any]] = {
    # DT = CT = 0.5 (absolute): the paper gives no values; 0.5 is its authors' prototype setting.
    # "Before retraining, we also reset the batch normalization" (§5, Adi et al.'s models).
    "faithful": {"triggers": "all", "add_masks": True, "threshold_mode": "absolute", "dt": 0.5, "ct": 0.5,
                 "bn_stats": "reset",
                 "retrain": TrainConfig(epochs=20, batch_size=32, optimizer="adam", lr=1e-3)},
    # Thresholds are multiples of the layer's mean clean activation; short, gentle retraining
    # (held-out accuracy plateaus within 5 epochs; longer retraining regrows the watermark).
    "strong": {"triggers": "flagged", "add_masks": False, "threshold_mode": "relative", "dt": 0.5, "ct": 1.0,
               "retrain": TrainConfig(epochs=5, batch_size=32, optimizer="adam", lr=1e-4)},
}


def launder_config(variant: str = "strong", **overrides: Any) -> LaunderConfig:
    if variant not in VARIANTS:
        raise UserError(f"unknown laundering variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return LaunderConfig(**{**VARIANTS[variant], **overrides})


def config_from_params(params: dict[str, Any], variant: str = "strong", rounds: int = 1, seed: int = 0
                       ) -> LaunderConfig:
    """An experiment file's `attack_params` table over the variant's settings: a partial `nc` or
    `retrain` table overrides only the keys it names; `nc = {preset = "fast", ...}` starts from a
    Neural Cleanse preset. `seed` seeds everything the attack draws (its retraining set, Neural
    Cleanse's initialisation, the retraining order) unless the table names a seed. Unknown keys are
    errors."""
    if variant not in VARIANTS:
        raise UserError(f"variant: unknown laundering variant {variant!r}; choose from {sorted(VARIANTS)}")
    base = LaunderConfig(**VARIANTS[variant])
    given = copy.deepcopy(dict(params))            # what the table names, before the merges below
    params = dict(params)
    if isinstance(params.get("nc"), dict) and "preset" in params["nc"]:
        nc = dict(params["nc"])
        preset = nc.pop("preset")
        if preset not in NC_PRESETS:
            raise UserError(f"attack_params.nc.preset: unknown preset {preset!r}; choose from {', '.join(NC_PRESETS)}")
        params["nc"] = nc_params(preset, **nc)
    for nested in ("nc", "retrain"):
        if isinstance(params.get(nested), dict):
            params[nested] = {**dataclasses.asdict(getattr(base, nested)), **params[nested]}
    cfg = from_dict(LaunderConfig, {**VARIANTS[variant], "rounds": rounds, **params}, "attack_params")
    return with_seed(cfg, seed, given)


@dataclass
class LaunderResult:
    model: nn.Module
    rounds: list[RoundInfo]
    masks: dict[str, torch.Tensor]
    nc: list[NCResult]
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)   # layers Algorithm 1 could not handle

    def report(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.rounds]


OnRound = Callable[[int, nn.Module, RoundInfo], "dict[str, Any] | None"]


OnState = Callable[[LaunderState, NCResult], None]
# (stage, round, step, count): ("nc", r, epoch, classes still optimised) after every Neural Cleanse
# epoch, ("retrain", r, epoch, epochs in all) after every retraining epoch. Drawn by the caller.
OnProgress = Callable[[str, int, int, int], None]


# --------------------------------------------------------------------------------------------
def activation_differences(model: nn.Module, units: list[Unit], clean_x: torch.Tensor,
                           stamped_x: torch.Tensor, point: str = "relu", pool: str = "mean"
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Algorithm 1, lines 3-10: (A_diff = AW_avg - AN_avg, AN_avg) per unit."""
    an = mean_activations(model, units, clean_x, point=point, pool=pool)
    aw = mean_activations(model, units, stamped_x, point=point, pool=pool)
    return {k: aw[k] - an[k] for k in an}, an


def select_resets(units: list[Unit], diff: dict[str, torch.Tensor], an: dict[str, torch.Tensor],
                  dt: float, ct: float, mode: str) -> dict[str, torch.Tensor]:
    """Algorithm 1, lines 11-19 (the text's rule: the difference above DT / CT)."""
    out = {}
    for u in units:
        t = dt if u.kind == "dense" else ct
        if mode == "relative":
            t = t * float(an[u.name].mean().clamp_min(1e-12))
        out[u.name] = torch.nonzero(diff[u.name] > t).flatten()
    return out


def reset_masks(model: nn.Module, units: list[Unit], chosen: dict[str, torch.Tensor],
                masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Weight masks (1 keep, 0 reset) for the chosen channels/neurons, merged into `masks`."""
    masks = dict(masks or {})
    params = dict(model.named_parameters())
    for u in units:
        idx = chosen.get(u.name)
        if idx is None or len(idx) == 0:
            continue
        names = [f"{u.name}.weight", f"{u.name}.bias"]
        if u.bn:
            names += [f"{u.bn}.weight", f"{u.bn}.bias"]
        for n in names:
            if n not in params:
                continue
            m = masks.get(n, torch.ones_like(params[n]))
            m = m.clone()
            m[idx.to(m.device)] = 0
            masks[n] = m
    return masks


def apply_reset(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the reset weights (Algorithm 1's masks, weight name -> 0/1 tensor)."""
    apply_masks(model, masks)


def stamped_sets(clean: Dataset, nc: NCResult, used: list[int]) -> list[torch.Tensor]:
    """The clean images stamped with each used recovered trigger: one tensor per trigger, aligned with
    the clean set."""
    return [stamp(clean.x, nc.masks[t], nc.patterns[t]) for t in used]


def mask_images(clean: Dataset, nc: NCResult, used: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The used triggers' masks as images, labelled the least likely infected class (the paper's step 3)."""
    c = clean.x.shape[1]
    return (nc.masks[used].expand(-1, c, -1, -1).contiguous(),
            torch.full((len(used),), nc.least_likely, dtype=torch.long))


def retrain_set(clean: Dataset, stamped: list[torch.Tensor], stamping: str = "each", seed: int = 0,
                extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3's set: the clean images; the clean images stamped with the triggers (`stamped`, one tensor
    per trigger aligned with the clean set), labelled with their true class (every image with "each"
    trigger, or with one trigger drawn per image at "random"); and `extra` images with their labels."""
    xs, ys = [clean.x], [clean.y]
    if stamping == "each":
        for sx in stamped:
            xs.append(sx)
            ys.append(clean.y)
    elif stamped:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randint(len(stamped), (len(clean),), generator=g)
        out = stamped[0].clone()
        for i, sx in enumerate(stamped[1:], start=1):
            out[pick == i] = sx[pick == i]
        xs.append(out)
        ys.append(clean.y)
    if extra is not None:
        xs.append(extra[0])
        ys.append(extra[1])
    return torch.cat(xs), torch.cat(ys)


def _retrain_set(clean: Dataset, nc: NCResult, used: list[int], add_masks: bool, stamping: str = "each",
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3's set from Neural Cleanse's triggers: `retrain_set` over the used triggers' stamped
    images, with the masks as images when `add_masks`."""
    return retrain_set(clean, stamped_sets(clean, nc, used), stamping, seed,
                       mask_images(clean, nc, used) if add_masks else None)


def used_triggers(nc: NCResult, which: str, top_k: int = 3) -> list[int]:
    """The recovered triggers a round works with: every class, the flagged ones (the
    smallest-mask class when nothing is flagged: the attacker must assume a watermark, §7.6), or
    the `top_k` classes with the smallest masks.
    A class whose mask never passed the confirmation (`found` False) is not a recovered trigger: it is
    passed over unless no class has one."""
    if which == "all":
        return list(range(len(nc.l1)))
    l1 = torch.as_tensor(nc.l1)
    found = [i for i in range(len(l1)) if bool(nc.found[i])] or list(range(len(l1)))
    ranked = sorted(found, key=lambda i: (float(l1[i]), i))
    if which == "top-k":
        return sorted(ranked[:top_k])
    flagged = [c for c in nc.flagged if c in found]
    return flagged or ([nc.most_likely] if nc.most_likely in found else ranked[:1])


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> None:
    """Recompute every batch norm's running mean and variance on `x`: a forward pass with the batch
    norms in training mode (cumulative average over batches, as torch's SWA `update_bn`), every
    other layer (dropout) in eval mode; weights are untouched."""
    bns = batch_norms(model)
    if not bns:
        return
    was = model.training
    model.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        dev = next(model.parameters()).device
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(dev))
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        model.train(was)


def reinit_second_half(model: nn.Module, seed: int = 0) -> list[str]:
    """Re-initialise, in place, every Conv2d / Linear from the middle one on (module order) and every
    layer with parameters after the first of them (batch norms included). Returns their names."""
    mods = [(n, m) for n, m in model.named_modules() if hasattr(m, "reset_parameters") and not list(m.children())]
    weighted = [i for i, (_, m) in enumerate(mods) if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not weighted:
        return []
    start = weighted[len(weighted) // 2]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for _, m in mods[start:]:
            m.reset_parameters()
    finally:
        torch.random.set_rng_state(state)
    return [n for n, _ in mods[start:]]


def choose_resets(model: nn.Module, units: list[Unit], clean: Dataset, stamped: list[torch.Tensor],
                  cfg: LaunderConfig) -> dict[str, torch.Tensor]:
    """Algorithm 1's choice of units to reset: over the pooled stamped images of every trigger, or per
    trigger with the resets united (`cfg.diff`). No trigger images: no resets."""
    if not stamped:
        return {u.name: torch.empty(0, dtype=torch.long) for u in units}
    if cfg.diff == "pooled":
        diff, an = activation_differences(model, units, clean.x, torch.cat(stamped), cfg.measure, cfg.pool)
        return select_resets(units, diff, an, cfg.dt, cfg.ct, cfg.threshold_mode)
    an = mean_activations(model, units, clean.x, point=cfg.measure, pool=cfg.pool)
    chosen: dict[str, torch.Tensor] = {u.name: torch.empty(0, dtype=torch.long) for u in units}
    for sx in stamped:
        aw = mean_activations(model, units, sx, point=cfg.measure, pool=cfg.pool)
        one = select_resets(units, {k: aw[k] - an[k] for k in an}, an, cfg.dt, cfg.ct, cfg.threshold_mode)
        chosen = {k: torch.unique(torch.cat([chosen[k], one[k]])) for k in chosen}
    return chosen


def reset_and_retrain_on(model: nn.Module, clean: Dataset, stamped: list[torch.Tensor], cfg: LaunderConfig,
                         units: list[Unit], masks: dict[str, torch.Tensor], round_idx: int = 1,
                         on_progress: OnProgress | None = None,
                         extra: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
    """Steps 2 and 3 of one round over given trigger images, in place: Algorithm 1's resets from the
    clean images against `stamped` (one tensor per trigger, aligned with the clean set), the batch
    norms as `cfg.bn_stats` says, then retraining on the clean set, the stamped images with their true
    labels and `extra`, the reset weights held at zero. Returns (all masks so far, resets per layer,
    retraining seconds)."""
    chosen = choose_resets(model, units, clean, stamped, cfg)
    masks = reset_masks(model, units, chosen, masks)
    apply_reset(model, masks)
    if cfg.bn_stats == "reset":
        for m in batch_norms(model):
            m.reset_running_stats()
    elif cfg.bn_stats == "reestimate":
        reestimate_bn(model, clean.x)
    elif cfg.bn_stats == "reinit":
        with torch.no_grad():
            for m in batch_norms(model):
                m.reset_parameters()
        apply_reset(model, masks)            # reset channels stay at zero
    if cfg.reinit == "second-half":
        reinit_second_half(model, cfg.seed + round_idx)
        apply_reset(model, masks)
    rx, ry = retrain_set(clean, stamped, cfg.stamping, cfg.seed + round_idx, extra)
    t1 = clock.now()
    rcfg = dataclasses.replace(cfg.retrain, seed=cfg.retrain.seed + round_idx)
    ticks = [] if on_progress is None else [lambda e, m: on_progress("retrain", round_idx, e, rcfg.epochs)]
    train(model, rx, ry, rcfg, masks=masks, progress=False, callbacks=ticks)
    return masks, {u.name: int(len(chosen[u.name])) for u in units}, clock.now() - t1


def reset_and_retrain(model: nn.Module, clean: Dataset, nc: NCResult, cfg: LaunderConfig, units: list[Unit],
                      masks: dict[str, torch.Tensor], round_idx: int = 1,
                      on_progress: OnProgress | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
    """Steps 2 and 3 of one round with Neural Cleanse's recovered triggers (`cfg.triggers` of them)."""
    used = used_triggers(nc, cfg.triggers, cfg.top_k)
    return reset_and_retrain_on(model, clean, stamped_sets(clean, nc, used), cfg, units, masks, round_idx,
                                on_progress, mask_images(clean, nc, used) if cfg.add_masks else None)


def split_holdout(clean: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(the part the attack trains on, the attacker's own held-out slice or None)."""
    if fraction <= 0:
        return clean, None
    perm = torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, round(fraction * len(clean)))
    return clean.subset(torch.sort(perm[n_hold:]).values), clean.subset(perm[:n_hold])


def _resettable_units(model: nn.Module, clean: Dataset, cfg: LaunderConfig) -> tuple[list, list]:
    """(the units Algorithm 1 may reset in `cfg.layers`, the layers it skips and why): an error where
    there is none, a warning for the skipped."""
    units, skipped = discover_units(model, clean.x[:2])
    if not units:
        raise UserError("Algorithm 1 found no layer it can reset (a hidden Conv2d/Linear with an activation after it); "
                        f"skipped: {skipped or 'none'}")
    if skipped:
        warnings.warn("Algorithm 1 skips these layers (never reset): "
                      + "; ".join(f"{n}: {why}" for n, why in skipped), stacklevel=3)
    return select_units(units, cfg.layers), skipped


def _resumed(model: nn.Module, resume: LaunderState | None, cfg: LaunderConfig
             ) -> tuple[dict[str, torch.Tensor], list[RoundInfo], int | None]:
    """(reset masks, finished rounds, round 1's most likely class): empty for a fresh run; from
    `resume`, whose weights are loaded into `model`, for a continued one."""
    if resume is None:
        return {}, [], None
    if len(resume.rounds) > cfg.rounds:
        raise UserError(f"the state to resume has {len(resume.rounds)} rounds, more than the {cfg.rounds} asked for")
    try:
        model.load_state_dict(resume.model_state)
    except RuntimeError as e:
        raise UserError(f"the laundering state to resume does not fit this model ({str(e).splitlines()[0]})") from e
    return dict(resume.masks), list(resume.rounds), resume.first_most


def launder(model: nn.Module, clean: Dataset, cfg: LaunderConfig, *, on_round: OnRound | None = None,
            on_progress: OnProgress | None = None, inplace: bool = False, first_nc: NCResult | None = None,
            on_state: OnState | None = None, resume: LaunderState | None = None) -> LaunderResult:
    """Launder `model` with the attacker's clean labelled set `clean`. Returns a new model
    (unless `inplace`), per-round records and the weight masks of the reset neurons.
    `first_nc` reuses a Neural Cleanse result for round 1 (it must come from this model and set).
    `on_state(state, nc)` is called after every finished round (after `on_round`) with what it
    takes to continue from there, and that round's Neural Cleanse result; `resume` continues from
    such a state (same model, clean set and config), so an interrupted run loses at most one round.
    The result's `nc` then holds the resumed rounds' recoveries only."""
    if resume is not None and first_nc is not None:
        raise UserError("first_nc applies to round 1 and cannot be combined with resume")
    check_inputs(model, clean)
    if not torch.isfinite(clean.x).all():
        raise UserError("the clean set contains NaN or Inf")
    model = trainable(model if inplace else copy.deepcopy(model))
    t_all = clock.now()
    clean, held = split_holdout(clean, cfg.holdout, cfg.seed)
    units, skipped = _resettable_units(model, clean, cfg)
    ncs: list[NCResult] = []
    masks, rounds, first_most = _resumed(model, resume, cfg)
    start = len(rounds) + 1 if not (rounds and rounds[-1].stopped) else cfg.rounds + 1
    for r in range(start, cfg.rounds + 1):
        t0 = clock.now()
        if r == 1 and first_nc is not None:
            nc = first_nc
        else:
            def tick(epoch: int, active: int, r=r) -> None:
                if on_progress is not None:
                    on_progress("nc", r, epoch, active)

            nc = neural_cleanse(model, clean.x, dataclasses.replace(cfg.nc, seed=cfg.nc.seed + 1000 * (r - 1)),
                                num_classes=clean.num_classes, progress=tick)
        ncs.append(nc)
        first_most = nc.most_likely if first_most is None else first_most
        info = RoundInfo(r, nc.seconds, nc.epochs.tolist(), nc.l1.tolist(), nc.anomaly.tolist(), nc.flagged,
                         used_triggers(nc, cfg.triggers, cfg.top_k), nc.most_likely, nc.least_likely, {},
                         nc_plan=nc.plan, nc_phase_seconds=nc.phase_seconds)
        if cfg.early_stop and r > 1 and nc.least_likely == first_most:
            info.stopped = True
        else:
            masks, info.resets, info.retrain_seconds = reset_and_retrain(model, clean, nc, cfg, units, masks, r,
                                                                         on_progress)
            if info.used_triggers and not any(info.resets.values()):
                warnings.warn(f"round {r}: Algorithm 1 reset no unit (no activation difference for the recovered "
                              f"trigger(s) {info.used_triggers} exceeds DT {cfg.dt:g} / CT {cfg.ct:g}, "
                              f"{cfg.threshold_mode}): this round was retraining alone", stacklevel=2)
            if held is not None:
                info.attacker_acc = accuracy(model, held.x, held.y)
        info.seconds = clock.now() - t0
        rounds.append(info)
        if on_round is not None:
            info.metrics = dict(on_round(r, model, info) or {})
        if on_state is not None:
            on_state(LaunderState(list(rounds), dict(masks), first_most,
                                  {k: v.detach().clone() for k, v in model.state_dict().items()}), nc)
        if info.stopped:
            break
    model.eval()
    return LaunderResult(model, rounds, masks, ncs, clock.now() - t_all, skipped)
