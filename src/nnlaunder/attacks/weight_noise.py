"""Gaussian weight noise: add N(0, (scale * std of the layer's weights)^2) to every Conv2d / Linear
weight, then optionally fine-tune on the attacker's clean set. The simplest perturbation baseline:
it asks whether the watermark sits in a sharp region that any random shove leaves."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import clock
from ..data import Dataset
from ..errors import UserError
from ..train import TrainConfig, train
from .base import AttackResult, attack_copy


@dataclass(frozen=True)
class WeightNoiseConfig:
    scale: float = 0.1                    # noise std as a multiple of each layer's weight std
    finetune: TrainConfig | None = None   # None: noise only
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.scale <= 100:
            raise UserError(f"weight-noise scale must be in [0, 100], got {self.scale}")


def weight_noise(model: nn.Module, clean: Dataset, cfg: WeightNoiseConfig) -> AttackResult:
    t0 = clock.now()
    model = attack_copy(model, clean)
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = 0
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d | nn.Linear):
                w = mod.weight
                noise = torch.randn(w.shape, generator=gen, dtype=torch.float32) * cfg.scale * float(w.std())
                w.add_(noise.to(w.device, w.dtype))
                layers += 1
    if cfg.finetune is not None:
        train(model, clean.x, clean.y, cfg.finetune, progress=False)
    model.eval()
    return AttackResult(model, {"scale": cfg.scale, "layers": layers}, clock.now() - t0)
