"""What every attack shares: its result, and the copy of the model it works on.

An attack is a function `attack(model, clean, cfg) -> AttackResult` over the attacker's model and
its small clean labelled set; it never receives the watermark, its target or the owner's data.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..data import Dataset
from ..errors import UserError
from ..external.models import check_model_fits


@dataclass
class AttackResult:
    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def check_inputs(model: nn.Module, clean: Dataset) -> None:
    """An attacker's clean set names at least two classes and holds an image of each, at least in count, and the
    model answers its images with one logit per class (`external.models.check_model_fits`)."""
    if clean.num_classes < 2:
        raise UserError(f"the clean set names {clean.num_classes} class; a classifier has at least 2")
    if len(clean) < clean.num_classes:
        raise UserError(f"the clean set has {len(clean)} images, fewer than the {clean.num_classes} classes")
    check_model_fits(model, clean.x, clean.num_classes, "the clean set")


def trainable(model: nn.Module) -> nn.Module:
    """The attacker's copy trains what the attack chooses: every parameter takes gradients, whatever flags the
    model's own code set (a backbone a transfer-learning script froze is the attacker's to train too)."""
    for q in model.parameters():
        q.requires_grad_(True)
    return model


def attack_copy(model: nn.Module, clean: Dataset) -> nn.Module:
    check_inputs(model, clean)
    return trainable(copy.deepcopy(model))


def output_layer(model: nn.Module) -> tuple[str, nn.Linear | nn.Conv2d]:
    """The output layer: the last nn.Linear in module order; in an all-convolutional classifier (NiN, All-CNN,
    SqueezeNet: a last conv with one channel per class, then global pooling), the last nn.Conv2d."""
    for kind in (nn.Linear, nn.Conv2d):
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
        if found:
            return found[-1]
    raise UserError("the model has no nn.Linear or nn.Conv2d output layer")
