"""Attacker-side calibration: choose laundering options from the attacker's own data only.

The attacker holds the model and a small clean labelled set; it cannot see the owner's triggers,
target class or verification set. What it can measure, for each candidate set of options:
- its clean accuracy on held-out parts of its own set (k-fold: every image is held out once, so
  the whole set scores each candidate, not one small slice);
- residual trigger flips: how often the triggers Neural Cleanse recovered (every class's, not
  only the ones a candidate used) still send held-out images to their class after laundering.

The rule (docs/methods.md, fixed before any row was re-run under it): a candidate is set aside only
when the best candidate's k-fold held-out accuracy beats it by more than the standard error of their
difference across folds (paired: the folds are the same for every candidate); every other candidate is
acceptable, and a preference declared in advance decides among them: the most aggressive reset (lowest
DT + CT), then the most triggers (top-k before one), then the fewest retraining epochs. Residual flips
are measured and recorded, never used to choose (they are as noisy as the accuracies). Neural Cleanse
runs once, on the whole set, before calibration; its result is reused by every candidate and by the
final laundering.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import from_dict
from ..data import Dataset
from ..errors import UserError
from ..train import accuracy, predict
from .laundering import LaunderConfig, reset_and_retrain
from .neural_cleanse import NCResult, stamp
from .units import discover_units, select_units

# Options a candidate may set (LaunderConfig fields; the retraining epochs as "retrain_epochs").
CANDIDATE_KEYS = {"dt", "ct", "retrain_epochs", "triggers", "top_k", "diff", "add_masks", "bn_stats", "measure",
                  "stamping", "threshold_mode", "layers"}


def apply_candidate(base: LaunderConfig, cand: dict[str, Any]) -> LaunderConfig:
    unknown = sorted(set(cand) - CANDIDATE_KEYS)
    if unknown:
        raise UserError(f"calibration candidate: unknown option(s) {unknown}; allowed: {sorted(CANDIDATE_KEYS)}")
    epochs = cand.get("retrain_epochs", base.retrain.epochs)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise UserError(f"calibration candidate: retrain_epochs must be an integer >= 0, got {epochs!r}")
    over = {k: v for k, v in cand.items() if k != "retrain_epochs"}
    try:
        cfg = from_dict(LaunderConfig, {**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, **over},
                        "calibration candidate")
    except TypeError as e:
        raise UserError(f"calibration candidate: {e}") from e
    if "retrain_epochs" in cand:
        cfg = dataclasses.replace(cfg, retrain=dataclasses.replace(cfg.retrain, epochs=int(cand["retrain_epochs"])))
    return cfg


def default_grid(model: nn.Module, example: torch.Tensor) -> list[dict[str, Any]]:
    """What acts on this model: CT (conv channels) always, DT only when the model has a hidden
    dense layer Algorithm 1 can reset; retraining length; one trigger or the three smallest."""
    units, _ = discover_units(model, example[:2])
    dts = (0.5, 2.0) if any(u.kind == "dense" for u in units) else (0.5,)
    grid = []
    for dt in dts:
        for ct in (1.0, 2.0):
            for ep in (5, 20):
                for trig in ({"triggers": "flagged"}, {"triggers": "top-k", "top_k": 3, "diff": "per-trigger"}):
                    grid.append({"dt": dt, "ct": ct, "retrain_epochs": ep, **trig})
    return grid


def residual_flips(model: nn.Module, held: Dataset, nc: NCResult) -> float:
    """Percent of held-out images (not of class t) that every recovered trigger t still sends to t,
    averaged over the classes."""
    rates = []
    for t in range(len(nc.l1)):
        keep = held.y != t
        if keep.any():
            xs = stamp(held.x[keep], nc.masks[t], nc.patterns[t])
            rates.append(100.0 * float((predict(model, xs) == t).float().mean()))
    return sum(rates) / max(len(rates), 1)


@dataclass
class Score:
    candidate: dict[str, Any]
    acc: float                 # k-fold held-out accuracy, percent (every image held out once)
    se: float                  # its binomial standard error, points
    flips: float               # residual trigger flips, percent (mean over folds)
    resets: float              # units reset (mean over folds)
    acceptable: bool = False
    fold_accs: list[float] = field(default_factory=list)   # held-out accuracy per fold, percent
    gap: float = 0.0           # the best candidate's accuracy minus this one's, points (mean over folds)
    gap_se: float = 0.0        # the standard error of that difference across folds


@dataclass
class Calibration:
    scores: list[Score]
    chosen: dict[str, Any]
    folds: int
    margin: float              # accuracy points below the best that were acceptable
    n: int                     # images scored
    rule: str = field(default="acceptable unless the best k-fold accuracy beats it by more than the standard "
                              "error of the paired difference across folds; then lowest DT + CT, most triggers, "
                              "fewest epochs (declared in advance)")
    why: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _folds(n: int, k: int, seed: int) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[i::k] for i in range(k)]


def _preference(s: Score) -> tuple:
    """The declared preference among acceptable candidates: the most aggressive reset first."""
    c = s.candidate
    triggers = 0 if c.get("triggers") == "top-k" else 1
    return (c.get("dt", 0) + c.get("ct", 0), triggers, c.get("retrain_epochs", 0))


def choose(scores: list[Score], n: int, min_margin: float = 0.0) -> tuple[dict[str, Any], float, str]:
    """Mark the acceptable candidates; return (the chosen one, the largest gap accepted, why).

    With fold accuracies, a candidate is acceptable unless the best beats it by more than the standard
    error of the paired difference across folds (and by more than `min_margin` points). Without them (a
    single score per candidate), the binomial standard error of the best's accuracy stands in."""
    best = max(scores, key=lambda s: s.acc)
    for s in scores:
        if s.fold_accs and len(s.fold_accs) == len(best.fold_accs) and len(s.fold_accs) > 1:
            d = [b - a for a, b in zip(s.fold_accs, best.fold_accs, strict=True)]
            mean = sum(d) / len(d)
            sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
            s.gap, s.gap_se = mean, sd / math.sqrt(len(d))
        else:
            s.gap, s.gap_se = best.acc - s.acc, best.se
        s.acceptable = s.gap <= max(s.gap_se, min_margin)
    ok = [s for s in scores if s.acceptable]
    pick = min(ok, key=_preference)
    margin = max(s.gap for s in ok)
    why = (f"{len(ok)} of {len(scores)} candidates within the standard error of the best k-fold accuracy "
           f"({best.acc:.2f}%); of those, the most aggressive by the declared preference (lowest DT + CT, most "
           f"triggers, fewest epochs): {pick.candidate}")
    return pick.candidate, margin, why


def calibrate(model: nn.Module, clean: Dataset, nc: NCResult, base: LaunderConfig,
              grid: list[dict[str, Any]] | None = None, folds: int = 3, min_margin: float = 0.0,
              on_candidate: Callable[[Score], None] | None = None) -> Calibration:
    """Score every candidate of `grid` (default: `default_grid`) by k-fold over `clean` with the
    Neural Cleanse result `nc` (from the whole of `clean`), and choose one by the module's rule."""
    if folds < 2:
        raise UserError(f"calibration needs at least 2 folds, got {folds}")
    if len(clean) < 2 * folds:
        raise UserError(f"the clean set ({len(clean)} images) is too small for {folds}-fold calibration")
    grid = grid if grid is not None else default_grid(model, clean.x)
    if not grid:
        raise UserError("calibration needs at least one candidate")
    parts = _folds(len(clean), folds, base.seed)
    scores = []
    for cand in grid:
        cfg = apply_candidate(base, cand)
        hits, flips, resets, fold_accs = 0, [], [], []
        for i, held_idx in enumerate(parts):
            train_idx = torch.sort(torch.cat([p for j, p in enumerate(parts) if j != i])).values
            part, held = clean.subset(train_idx), clean.subset(held_idx)
            m = copy.deepcopy(model)
            units = select_units(discover_units(m, part.x[:2])[0], cfg.layers)
            _, r, _ = reset_and_retrain(m, part, nc, cfg, units, {})
            acc = accuracy(m, held.x, held.y)
            fold_accs.append(acc)
            hits += round(acc * len(held) / 100)
            flips.append(residual_flips(m, held, nc))
            resets.append(sum(r.values()))
        p = hits / len(clean)
        s = Score(dict(cand), 100.0 * p, 100.0 * math.sqrt(max(p * (1 - p), 1e-12) / len(clean)),
                  sum(flips) / len(flips), sum(resets) / len(resets), fold_accs=fold_accs)
        scores.append(s)
        if on_candidate is not None:
            on_candidate(s)
    chosen, margin, why = choose(scores, len(clean), min_margin)
    return Calibration(scores, chosen, folds, margin, len(clean), why=why)
