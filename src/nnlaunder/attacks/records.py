"""The records of a laundering run: one round's account and the state an interrupted run resumes
from. Plain data, kept apart from the algorithm so that the I/O layer (`checkpoint.py`) can read and
write them without importing laundering itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RoundInfo:
    round: int
    nc_seconds: float
    nc_epochs: list[int]
    l1: list[float]
    anomaly: list[float]
    flagged: list[int]
    used_triggers: list[int]
    most_likely: int
    least_likely: int
    resets: dict[str, int]
    retrain_seconds: float = 0.0
    seconds: float = 0.0
    attacker_acc: float | None = None      # accuracy on the attacker's own held-out slice
    stopped: bool = False                  # the early-stop rule fired; nothing was changed
    metrics: dict[str, Any] = field(default_factory=dict)   # what the experiment's callback measured



@dataclass
class LaunderState:
    """Where a multi-round laundering stands after a finished round: enough for
    `launder(..., resume=state)` to go on exactly as an unbroken run would (each round's Neural
    Cleanse and retraining are seeded by the round number)."""
    rounds: list[RoundInfo]                 # the finished rounds, metrics included
    masks: dict[str, torch.Tensor]          # weight masks of every unit reset so far
    first_most: int                         # round 1's most likely infected class (early stop)
    model_state: dict[str, torch.Tensor]    # the model after the last finished round
