"""Ownership verification: watermark accuracy, the paper's vanilla threshold, a binomial p-value.

- Watermark accuracy: percent of the verification triggers classified as their watermark label.
- Vanilla threshold (Aiken et al. §7.1): the highest watermark accuracy that a clean model of
  the same task, never watermarked, reaches over its training epochs (max over epochs and over
  the clean seeds measured). A model at or below it proves nothing.
- p-value: probability that a model which hits a trigger with the threshold's rate (p0) scores
  at least the observed hits out of n (one-sided binomial tail).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ..errors import Inconclusive, UserError
from ..train import predict_checked
from .schemes import Watermark


def wm_hits(model: nn.Module, wm: Watermark) -> tuple[int, int]:
    """(hits, n) on the verification set. Raises `Inconclusive` when any verification output is
    NaN or Inf: a watermark accuracy is never computed over predictions that are not real."""
    pred, bad = predict_checked(model, wm.verify_x)
    if bad:
        raise Inconclusive(f"inconclusive: the model's outputs on {bad} of {len(wm.verify_y)} verification inputs "
                           "are NaN or Inf; no watermark accuracy and no verdict can be given")
    return int((pred == wm.verify_y).sum()), len(wm.verify_y)


def wm_accuracy(model: nn.Module, wm: Watermark) -> float:
    hits, n = wm_hits(model, wm)
    return 100.0 * hits / n


def vanilla_threshold(per_epoch_wm_acc: Iterable[float] | Iterable[Iterable[float]]) -> float:
    """Max watermark accuracy (percent) over a clean model's epochs (and over seeds, if nested)."""
    flat: list[float] = []
    for v in per_epoch_wm_acc:
        if isinstance(v, int | float):
            flat.append(float(v))
        else:
            flat.extend(float(u) for u in v)
    if not flat:
        raise UserError("a vanilla threshold needs at least one clean-model measurement")
    if any(not 0 <= v <= 100 or math.isnan(v) for v in flat):
        raise UserError("watermark accuracies must be percentages in [0, 100]")
    return max(flat)


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), computed in log space (exact, stable for n ~ 1e5)."""
    if n < 0 or not 0 <= k <= n or not 0 <= p <= 1:
        raise ValueError(f"bad binomial arguments k={k} n={n} p={p}")
    if k == 0:
        return 1.0
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k, n + 1)]
    m = max(terms)
    return min(1.0, math.exp(m) * sum(math.exp(t - m) for t in terms))


@dataclass(frozen=True)
class Verdict:
    wm_acc: float        # percent
    hits: int
    n: int
    threshold: float     # percent, the vanilla threshold
    p_value: float       # P(>= hits | rate = threshold)
    alpha: float
    owned: bool          # wm_acc > threshold and p_value < alpha

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        word = "OWNERSHIP SHOWN" if self.owned else "no ownership proof"
        return (f"{word}: watermark accuracy {self.wm_acc:.2f}% ({self.hits}/{self.n}) vs vanilla threshold "
                f"{self.threshold:.2f}%, p = {self.p_value:.3g} (alpha {self.alpha})")


def verdict(hits: int, n: int, threshold: float, alpha: float = 0.01) -> Verdict:
    """Ownership verdict from hits/n against the vanilla threshold (percent).

    The null rate is the threshold itself, floored at 1/n so that a threshold measured as 0
    (a clean model never hit a trigger) does not turn one lucky hit into a proof.
    """
    if n < 1 or not 0 <= hits <= n:
        raise UserError(f"need 0 <= hits <= n and n >= 1, got hits={hits} n={n}")
    if not 0 <= threshold <= 100:
        raise UserError(f"threshold must be a percentage in [0, 100], got {threshold}")
    if not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {alpha}")
    p0 = max(threshold / 100.0, 1.0 / n)
    p = binomial_sf(hits, n, min(p0, 1.0))
    acc = 100.0 * hits / n
    return Verdict(acc, hits, n, threshold, p, alpha, acc > threshold and p < alpha)


def verify(model: nn.Module, wm: Watermark, threshold: float, alpha: float = 0.01) -> Verdict:
    hits, n = wm_hits(model, wm)
    return verdict(hits, n, threshold, alpha)


def read_threshold(path: str | Path, scheme: str) -> float:
    """The vanilla threshold for `scheme` from a JSON file written by `nnlaunder threshold`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"missing threshold file {p} (make one with `nnlaunder threshold`)")
    try:
        t = json.loads(p.read_text(encoding="utf-8"))["thresholds"][scheme]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
        raise UserError(f"{p}: no threshold for {scheme!r} in it") from e
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 100:
        raise UserError(f"{p}: the threshold for {scheme!r} must be a percentage in [0, 100], got {t!r:.80}")
    return float(t)
