"""Ownership verification: watermark accuracy, thresholds with a stated null, and a verdict that
controls for the model's own base rate.

- Watermark accuracy: percent of the verification triggers classified as their watermark label.
- Thresholds (`THRESHOLD_RULES`), each an upper bound on how often a clean model of the same task,
  never watermarked, gives the watermark label on the verification set:
  - `paper` (Aiken et al. §7.1): the highest watermark accuracy over every epoch of every clean seed,
    warm-up included;
  - `converged` (the default): over the *converged* epochs of every clean seed (test accuracy within
    `CONVERGED_WITHIN` points of that seed's final), the largest one-sided (1 - alpha) Clopper-Pearson
    upper bound of the hit rate. It never takes an observed 0% as the truth, and it models the null an
    owner faces in court: a usable clean model (docs/methods.md#verdicts);
  - `converged-max` and `normal-fit` (mean + z_(1-alpha) sd over the converged epochs, as WRT fits its
    null), for comparison.
- Verdict: ownership is shown only when (1) the model is a model of the task (test accuracy above chance
  at alpha), (2) it does not give the watermark label to most inputs anyway, (3) its watermark accuracy
  exceeds the threshold with a one-sided binomial p-value below alpha, and (4) the trigger raises the
  watermark label's rate beyond the same model's base rate: on the same images without the trigger
  (McNemar's exact test) where the scheme has them, else on clean test images of the other classes.
- Outcome of an attack (`outcome`): kept, hidden, removed (only for a usable model: test accuracy within
  the tolerance of the owner's) or destroyed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import Inconclusive, UserError
from ..train import predict_checked
from .schemes import Watermark

CONVERGED_WITHIN = 1.0        # points of test accuracy from a seed's final epoch
DEFAULT_RULE = "converged"
DEFAULT_TOLERANCE = 3.0       # points of test accuracy an attacker may lose for a removal to count
MAX_ALPHA = 0.1               # a test of evidence at a larger level is no evidence
# Clean seeds the default threshold is measured on: 5 where a clean model trains in a minute or two on a CPU
# (the 28x28 grey tasks), 3 per architecture elsewhere (docs/methods.md, "Thresholds").
DEFAULT_THRESHOLD_SEEDS = {"mnist": (0, 1, 2, 3, 4), "fashion-mnist": (0, 1, 2, 3, 4)}
MOSTLY = 50.0                 # percent: a model giving the watermark label this often without trigger


def verification_predictions(model: nn.Module, wm: Watermark) -> torch.Tensor:
    """The model's labels for the verification inputs. Raises `Inconclusive` when any output is NaN or
    Inf: a watermark accuracy is never computed over predictions that are not real."""
    pred, bad = predict_checked(model, wm.verify_x)
    if bad:
        raise Inconclusive(f"inconclusive: the model's outputs on {bad} of {len(wm.verify_y)} verification inputs "
                           "are NaN or Inf; no watermark accuracy and no verdict can be given")
    return pred


def vanilla_threshold(per_epoch_wm_acc: Iterable[float] | Iterable[Iterable[float]]) -> float:
    """The paper's rule: max watermark accuracy (percent) over a clean model's epochs (and seeds, if nested)."""
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


# ---------------------------------------------------------------------------------------------------
# Binomial tails (exact, in log space; numpy, no scipy)
def _log_pmf(n: int, p: float) -> np.ndarray:
    i = np.arange(n + 1, dtype=np.float64)
    logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])
    with np.errstate(divide="ignore", invalid="ignore"):
        out = logfact[n] - logfact - logfact[::-1] + i * math.log(p) + (n - i) * math.log1p(-p)
    return out


def _log_sum(v: np.ndarray) -> float:
    m = float(v.max())
    return m + math.log(float(np.exp(v - m).sum())) if math.isfinite(m) else m


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if n < 0 or not 0 <= k <= n or not 0 <= p <= 1:
        raise ValueError(f"bad binomial arguments k={k} n={n} p={p}")
    if k == 0 or p == 1.0:
        return 1.0
    if p == 0.0:
        return 0.0
    return min(1.0, math.exp(_log_sum(_log_pmf(n, p)[k:])))


def binomial_log10_sf(k: int, n: int, p: float) -> float:
    """log10 P(X >= k): the bound that is printed when the tail underflows to 0."""
    if k == 0 or p == 1.0:
        return 0.0
    if p == 0.0:
        return -math.inf
    return _log_sum(_log_pmf(n, p)[k:]) / math.log(10)


def upper_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound of a binomial rate from k of n (a fraction)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"bad binomial arguments k={k} n={n}")
    if k == n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):                  # P(X <= k | p) falls with p: find where it crosses alpha
        mid = (lo + hi) / 2
        cdf = 1.0 - binomial_sf(k + 1, n, mid)
        lo, hi = (mid, hi) if cdf > alpha else (lo, mid)
    return hi


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate k/n (95% at z = 1.96): what a removal rate over seeds reports."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def format_p(p: float, log10: float | None = None) -> str:
    """A p-value for people: never '0' (the bound that was computed instead); '-' where none exists."""
    if math.isnan(p):
        return "-"
    if p > 0:
        return f"{p:.3g}"
    if log10 is not None and math.isfinite(log10):
        return f"< 1e{math.floor(log10) + 1}"
    return "< 1e-300"


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= MAX_ALPHA:
        raise UserError(f"alpha must be a significance level in (0, {MAX_ALPHA}] (e.g. 0.01), got {alpha!r:.40}")
    return float(alpha)


# ---------------------------------------------------------------------------------------------------
# Threshold rules
@dataclass(frozen=True)
class CleanPoint:
    """One epoch of one clean seed, measured on a verification set."""
    seed: int
    epoch: int
    hits: int
    n: int
    test_acc: float          # percent, this epoch
    final_test_acc: float    # percent, the seed's last epoch

    @property
    def rate(self) -> float:
        return 100.0 * self.hits / self.n


def converged(points: Sequence[CleanPoint], within: float = CONVERGED_WITHIN) -> list[CleanPoint]:
    """The epochs whose test accuracy is within `within` points of their seed's final epoch."""
    return [p for p in points if abs(p.test_acc - p.final_test_acc) <= within]


@dataclass(frozen=True)
class Threshold:
    rule: str
    threshold: float              # percent
    seeds: tuple[int, ...]
    epochs: int                   # clean (seed, epoch) points the rule used
    alpha: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _paper(points: Sequence[CleanPoint], alpha: float) -> float:
    return max(p.rate for p in points)


def _converged_ucb(points: Sequence[CleanPoint], alpha: float) -> float:
    return 100.0 * max(upper_bound(p.hits, p.n, alpha) for p in points)


def _converged_max(points: Sequence[CleanPoint], alpha: float) -> float:
    return max(p.rate for p in points)


def _normal_fit(points: Sequence[CleanPoint], alpha: float) -> float:
    rates = np.array([p.rate for p in points])
    sd = float(rates.std(ddof=1)) if len(rates) > 1 else 0.0
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - alpha)))
    return min(100.0, float(rates.mean()) + z * sd)


# name -> (function over the points it uses, uses only converged epochs)
THRESHOLD_RULES: dict[str, tuple[Any, bool]] = {
    "paper": (_paper, False),
    "converged": (_converged_ucb, True),
    "converged-max": (_converged_max, True),
    "normal-fit": (_normal_fit, True),
}


def default_threshold_seeds(dataset: str) -> tuple[int, ...]:
    """The clean seeds a threshold on `dataset` is measured on unless told otherwise."""
    return DEFAULT_THRESHOLD_SEEDS.get(dataset, (0, 1, 2))


def threshold_rule(rule: str, points: Sequence[CleanPoint], alpha: float = 0.01,
                   within: float = CONVERGED_WITHIN) -> Threshold:
    """The threshold (percent) that `rule` gives over the clean models' `points`."""
    if rule not in THRESHOLD_RULES:
        raise UserError(f"unknown threshold rule {rule!r}; choose from {', '.join(THRESHOLD_RULES)}")
    fn, conv = THRESHOLD_RULES[rule]
    used = converged(points, within) if conv else list(points)
    if not used:
        raise UserError(f"the {rule} threshold needs at least one clean-model epoch"
                        f"{' within ' + str(within) + ' points of its final test accuracy' if conv else ''}")
    if any(not 0 <= p.hits <= p.n or p.n < 1 for p in used):
        raise UserError("clean-model hits must be in [0, n]")
    return Threshold(rule, fn(used, alpha), tuple(sorted({p.seed for p in used})), len(used),
                     alpha if rule != "paper" else None)


# ---------------------------------------------------------------------------------------------------
# The model's base rate
@dataclass(frozen=True)
class BaseRate:
    """How often the model gives the watermark labels without the trigger, and whether it is a model of
    the task at all."""
    rate: float                # percent
    p_value: float             # the trigger's effect beyond `rate` (one-sided)
    p_log10: float
    paired: bool               # McNemar on the same images without the trigger; else clean test images
    test_acc: float | None     # percent
    test_p: float | None       # test accuracy above chance (one-sided binomial)


def base_rate(model: nn.Module, wm: Watermark, test_x: torch.Tensor | None = None,
              test_y: torch.Tensor | None = None, num_classes: int | None = None, *,
              pred_t: torch.Tensor | None = None, pred_test: torch.Tensor | None = None) -> BaseRate | None:
    """The model's own rate of the watermark labels without the trigger, and the p-value that the trigger
    raises it: McNemar's exact test where the scheme keeps the verification images without the trigger
    (`wm.control_x`), else a binomial test against the rate at which the model gives each watermark
    label to clean test images of other classes. None where neither exists (no test set). `pred_t` and
    `pred_test`: the model's predictions on the verification and test inputs, where the caller has them."""
    if pred_t is None:
        pred_t, _ = predict_checked(model, wm.verify_x)
    hit_t = pred_t == wm.verify_y
    test_acc = test_p = None
    pred_te = None
    if test_x is not None and test_y is not None and len(test_y):
        pred_te = pred_test if pred_test is not None else predict_checked(model, test_x)[0]
        correct = int((pred_te == test_y).sum())
        k = num_classes or int(max(int(test_y.max()), int(wm.verify_y.max())) + 1)
        test_acc = 100.0 * correct / len(test_y)
        test_p = binomial_sf(correct, len(test_y), 1.0 / k)
    if wm.control_x is not None:
        pred_c, _ = predict_checked(model, wm.control_x)
        hit_c = pred_c == wm.verify_y
        b, c = int((hit_t & ~hit_c).sum()), int((~hit_t & hit_c).sum())
        p = binomial_sf(b, b + c, 0.5)
        lp = binomial_log10_sf(b, b + c, 0.5) if b + c else 0.0
        return BaseRate(100.0 * float(hit_c.float().mean()), p, lp, True, test_acc, test_p)
    if pred_te is None or test_y is None:
        return None
    k = num_classes or int(max(int(test_y.max()), int(wm.verify_y.max())) + 1)
    other = torch.stack([((pred_te == j) & (test_y != j)).sum() / max(1, int((test_y != j).sum()))
                         for j in range(k)])
    q = float(other[wm.verify_y].mean())
    hits, n = int(hit_t.sum()), len(wm.verify_y)
    return BaseRate(100.0 * q, binomial_sf(hits, n, q), binomial_log10_sf(hits, n, q), False, test_acc, test_p)


# ---------------------------------------------------------------------------------------------------
# The verdict
@dataclass(frozen=True)
class Verdict:
    wm_acc: float        # percent
    hits: int
    n: int
    threshold: float     # percent
    p_value: float       # P(>= hits | rate = threshold)
    alpha: float
    owned: bool
    status: str = "no proof"     # "owned", "no proof", "no evidence"
    reason: str = ""
    p_log10: float = 0.0
    base_rate: float | None = None       # percent
    base_p: float | None = None
    paired: bool | None = None
    test_acc: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def word(self) -> str:
        return {"owned": "OWNERSHIP SHOWN", "no evidence": "no evidence"}.get(self.status, "no ownership proof")

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) lines for a table: the evidence, then the verdict and why."""
        out = [("watermark accuracy", f"{self.wm_acc:.2f}% ({self.hits}/{self.n})"),
               ("threshold", f"{self.threshold:.2f}%"), ("p-value", format_p(self.p_value, self.p_log10))]
        if self.base_rate is not None:
            how = "same images without the trigger" if self.paired else "clean test images of other classes"
            out.append(("base rate", f"{self.base_rate:.2f}% ({how}), trigger's effect p "
                                     f"{format_p(self.base_p or 0.0)}"))
        out.append(("verdict", self.word + (f": {self.reason}" if self.reason else "")))
        return out

    def summary(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return (f"{self.word}: watermark accuracy {self.wm_acc:.2f}% ({self.hits}/{self.n}) vs threshold "
                f"{self.threshold:.2f}%, p {format_p(self.p_value, self.p_log10)} (alpha {self.alpha}){why}")


def cell_p(summary: dict[str, Any]) -> tuple[float, float | None]:
    """(p, log10 p) of the threshold test of an attacked model's summary: as recorded, else from its WM
    accuracy and verification-set size (cells recorded before the p-value was kept); NaN without them."""
    if summary.get("p_value") is not None:
        return float(summary["p_value"]), summary.get("p_log10")
    n = int(summary.get("n_verify") or 0)
    if not n:
        return float("nan"), None
    v = verdict(round(summary["wm_acc"] * n / 100), n, summary["threshold"])
    return v.p_value, v.p_log10


def verdict(hits: int, n: int, threshold: float, alpha: float = 0.01, base: BaseRate | None = None) -> Verdict:
    """Ownership verdict from hits/n against the threshold (percent) and, given `base`, the model's own
    base rate and task accuracy. The null rate is floored at 1/n, so that a threshold of 0 does not turn
    one lucky hit into a proof."""
    if n < 1 or not 0 <= hits <= n:
        raise UserError(f"need 0 <= hits <= n and n >= 1, got hits={hits} n={n}")
    if isinstance(threshold, bool) or not 0 <= threshold <= 100:
        raise UserError(f"threshold must be a percentage in [0, 100], got {threshold}")
    check_alpha(alpha)
    p0 = min(1.0, max(threshold / 100.0, 1.0 / n))
    p = binomial_sf(hits, n, p0)
    lp = binomial_log10_sf(hits, n, p0)
    acc = 100.0 * hits / n
    status, reason = "owned", ""
    if base is not None and base.test_p is not None and not base.test_p < alpha:
        status = "no evidence"
        reason = f"test accuracy {base.test_acc:.2f}% is not above chance: not a model of the task"
    elif base is not None and base.rate >= MOSTLY:
        status, reason = "no evidence", (f"the model gives the watermark label to {base.rate:.1f}% of the same "
                                         f"{'images' if base.paired else 'clean inputs'} without the trigger")
    elif not (acc > threshold and p < alpha):
        status = "no proof"
    elif base is not None and not base.p_value < alpha:
        status, reason = "no evidence", (f"the trigger does not raise the watermark label's rate beyond the model's "
                                         f"base rate {base.rate:.2f}% (p {format_p(base.p_value, base.p_log10)})")
    extra = {} if base is None else {"base_rate": base.rate, "base_p": base.p_value, "paired": base.paired,
                                     "test_acc": base.test_acc}
    return Verdict(acc, hits, n, threshold, p, alpha, status == "owned", status, reason, lp, **extra)


def verify(model: nn.Module, wm: Watermark, threshold: float, alpha: float = 0.01,
           test: tuple[torch.Tensor, torch.Tensor] | None = None, num_classes: int | None = None) -> Verdict:
    """The verdict on `model`: its hits on the verification set and, with `test` (the task's test set), its
    base rate and task accuracy (always pass it where it exists)."""
    pred = verification_predictions(model, wm)
    base = base_rate(model, wm, *(test if test is not None else (None, None)), num_classes=num_classes, pred_t=pred)
    return verdict(int((pred == wm.verify_y).sum()), len(wm.verify_y), threshold, alpha, base)


# ---------------------------------------------------------------------------------------------------
# The outcome of an attack
OUTCOMES = ("kept", "hidden", "removed", "destroyed")


def outcome(shown_after: bool, test_drop: float, restored: bool | None = None,
            tolerance: float = DEFAULT_TOLERANCE) -> str:
    """kept: the watermark still proves ownership; destroyed: it does not, and the model lost more than
    `tolerance` points of test accuracy (no thief would use it); hidden: it does not, but the owner's
    restoration brings it back; removed: gone from a usable model."""
    if shown_after:
        return "kept"
    if test_drop > tolerance:
        return "destroyed"
    return "hidden" if restored else "removed"


def read_threshold(path: str | Path, scheme: str, expect: dict[str, Any] | None = None) -> float:
    """The threshold for `scheme` from a JSON file written by `nnlaunder threshold`. `expect` (dataset,
    arch, ...): what the file must record, where it records it; a file for another task is refused."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"missing threshold file {p} (make one with `nnlaunder threshold`)")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        t = doc["thresholds"][scheme]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{p}: no threshold for {scheme!r} in it") from e
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 100:
        raise UserError(f"{p}: the threshold for {scheme!r} must be a percentage in [0, 100], got {t!r:.80}")
    for key, want in (expect or {}).items():
        got = doc.get(key) if isinstance(doc, dict) else None
        if got is not None and want is not None and got != want:
            raise UserError(f"{p}: the threshold was measured for {key} {got!r:.60}, this model's is {want!r:.60}: "
                            "a threshold of another task says nothing about this one")
    return float(t)
