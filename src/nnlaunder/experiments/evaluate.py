"""The evaluator: measures test and watermark accuracy for an attack, through its callback.

The attack calls `on_round(round, model, info)`; only this side knows the owner's
verification set. Keeping it here keeps `attacks/` free of any watermark knowledge.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..data import Dataset
from ..train import accuracy
from ..watermarks.schemes import Watermark


def evaluator(test: Dataset, wm: Watermark | None = None):
    """A callback returning {"test_acc", "wm_acc"} (percent) for the model it is given."""

    def on_round(r: int, model: nn.Module, info: Any = None) -> dict[str, float]:
        out = {"test_acc": accuracy(model, test.x, test.y)}
        if wm is not None:
            out["wm_acc"] = accuracy(model, wm.verify_x, wm.verify_y)
        return out

    return on_round
