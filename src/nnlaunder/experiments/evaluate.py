"""The evaluator: measures test and watermark accuracy for an attack, through its callback.

The attack calls `on_round(round, model, info)`; only this side knows the owner's
verification set. Keeping it here keeps `attacks/` free of any watermark knowledge.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..data import Dataset
from ..train import accuracy, predict_checked
from ..watermarks.schemes import Watermark


def evaluator(test: Dataset, wm: Watermark | None = None):
    """A callback returning {"test_acc", "wm_acc"} (percent) for the model it is given, and
    "wm_nonfinite" (how many verification outputs were NaN or Inf) when there are any: such an
    input counts as a miss in wm_acc, and the runner never calls that watermark removed."""

    def on_round(r: int, model: nn.Module, info: Any = None) -> dict[str, float]:
        out: dict[str, float] = {"test_acc": accuracy(model, test.x, test.y)}
        if wm is not None:
            pred, bad = predict_checked(model, wm.verify_x)
            out["wm_acc"] = 100.0 * float((pred == wm.verify_y).float().mean())
            if bad:
                out["wm_nonfinite"] = bad
        return out

    return on_round
