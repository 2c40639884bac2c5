"""The evaluator: measures test and watermark accuracy for an attack, through its callback, and the
verdict `nnlaunder verify` would give.

The attack calls `on_round(round, model, info)`; only this side knows the owner's
verification set. Keeping it here keeps `attacks/` free of any watermark knowledge.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..data import Dataset
from ..train import predict_checked
from ..watermarks.schemes import Watermark
from ..watermarks.verify import base_rate, verdict


def evaluator(test: Dataset, wm: Watermark | None = None, threshold: float | None = None, alpha: float = 0.01):
    """A callback returning {"test_acc", "wm_acc"} (percent) for the model it is given, and
    "wm_nonfinite" (how many verification outputs were NaN or Inf) when there are any: such an
    input counts as a miss in wm_acc, and no verdict is given over it. With `threshold`, also the verdict
    (`owned`, `status`) with the model's base rate, as `nnlaunder verify` decides it."""

    def on_round(r: int, model: nn.Module, info: Any = None) -> dict[str, Any]:
        pred_test, _ = predict_checked(model, test.x)
        out: dict[str, Any] = {"test_acc": 100.0 * float((pred_test == test.y).float().mean())}
        if wm is not None:
            pred, bad = predict_checked(model, wm.verify_x)
            out["wm_acc"] = 100.0 * float((pred == wm.verify_y).float().mean())
            if bad:
                out["wm_nonfinite"] = bad
            elif threshold is not None:
                base = base_rate(model, wm, test.x, test.y, test.num_classes, pred_t=pred, pred_test=pred_test)
                v = verdict(int((pred == wm.verify_y).sum()), len(wm.verify_y), threshold, alpha, base)
                out.update(owned=v.owned, status=v.status, base_rate=v.base_rate, base_p=v.base_p, p_value=v.p_value,
                           p_log10=v.p_log10)
        return out

    return on_round
