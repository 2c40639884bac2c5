"""Recover-and-unlearn, watermark-agnostic: Neural Dehydration (Lu et al., arXiv:2309.03466, CCS 2024).

1. Recover: for every class (no fixed target is assumed), invert `per_class` images from the model's
   own knowledge, starting from noise: images (tanh(v) + 1) / 2, Adam (lr 0.1, betas 0.5/0.9, cosine
   decay to 1e-4) on cross-entropy to the class + 0.01 x the images' L2 norm + 0.03 x their total
   variation + 0.1 x the distance of every batch norm's input statistics to its running ones (the
   last two batch norms weighted 0, as the public code does). No mask, no trigger shape.
2. Unlearn: fine-tune on the attacker's clean set (cross-entropy) plus the recovered images with a
   uniform soft label (KL divergence averaged over images and classes, as the public code's loss
   reduces it; weight 0.125), SGD lr 0.01, momentum 0.9, weight decay 5e-4,
   40 epochs; every clean batch is paired with a batch of recovered images.

This is the public code's non-fixed-class pipeline (inversion of every class, soft labels), which
is what makes it watermark-agnostic. Departures: the paper's optional target-class detection and
split of the recovered samples are not implemented; the total-variation term is the mean absolute
difference of neighbouring pixels (our reading); the defaults are the public code's CIFAR-10
settings (1000 inversion steps; 400 for one-channel images), which cost tens of CIFAR-10 epochs on
a CPU; `per_class` and `steps` make a cheaper, named variant.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import int_in, raise_first
from ..data import Dataset
from ..device import model_device
from .base import AttackResult, attack_copy


@dataclass(frozen=True)
class DehydrationConfig:
    per_class: int = 250
    steps: int | None = None          # None: 1000 for 3-channel images, 400 for 1-channel
    inv_lr: float = 0.1
    l2: float = 0.01
    tv: float = 0.03
    bn: float = 0.1
    epochs: int = 40
    batch_size: int = 128             # clean images per step (and recovered images per step)
    lr: float = 0.01
    weight_decay: float = 5e-4
    weight: float = 0.125             # of the recovered images' loss
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.per_class, int) and 1 <= self.per_class <= 100_000, "per_class must be in [1, 100000]"),
            (self.steps is None or (isinstance(self.steps, int) and 0 <= self.steps <= 1_000_000),
             f"steps must be None or in [0, 1000000], got {self.steps}"),
            (all(math.isfinite(v) and v >= 0 for v in (self.l2, self.tv, self.bn, self.weight, self.weight_decay)),
             "l2, tv, bn, weight and weight_decay must be >= 0"),
            (all(math.isfinite(v) and v > 0 for v in (self.inv_lr, self.lr)), "inv_lr and lr must be > 0"),
            int_in("epochs", self.epochs, 0, 10_000),
            int_in("batch_size", self.batch_size, 1, 1 << 20),
        ]
        raise_first(checks)


class _BNStats:
    """Forward hooks measuring how far each batch norm's input statistics are from its running ones."""

    def __init__(self, model: nn.Module):
        self.bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.r: list[torch.Tensor] = [torch.zeros(())] * len(self.bns)
        self.hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.bns)]

    def _hook(self, i: int):
        def f(mod, inp, out) -> None:
            z = inp[0]
            mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
            self.r[i] = (mean - mod.running_mean).norm() + (var - mod.running_var).norm()
        return f

    def loss(self) -> torch.Tensor:
        if not self.bns:
            return torch.zeros(())
        w = [1.0] * max(0, len(self.bns) - 2) + [0.0] * min(2, len(self.bns))
        return sum(wi * ri for wi, ri in zip(w, self.r, strict=True))

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()


def invert_class(model: nn.Module, c: int, shape: tuple[int, ...], cfg: DehydrationConfig, g: torch.Generator,
                 stats: _BNStats) -> torch.Tensor:
    """`per_class` images the model assigns to class c, recovered from noise: (N, C, H, W) in [0, 1]."""
    dev = model_device(model)
    steps = cfg.steps if cfg.steps is not None else (1000 if shape[0] == 3 else 400)
    v = torch.randn((cfg.per_class, *shape), generator=g).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.inv_lr, betas=(0.5, 0.9), eps=1e-8)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=1e-4)
    target = torch.full((cfg.per_class,), c, dtype=torch.long, device=dev)
    for _ in range(steps):
        imgs = (torch.tanh(v) + 1) / 2
        loss = (F.cross_entropy(model(imgs), target) + cfg.l2 * imgs.flatten(1).norm(dim=1).mean()
                + cfg.tv * total_variation(imgs) + cfg.bn * stats.loss())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return ((torch.tanh(v) + 1) / 2).detach()


def recover(model: nn.Module, clean: Dataset, cfg: DehydrationConfig) -> tuple[torch.Tensor, list[float]]:
    """Every class's recovered images (class-major) and the share the model assigns to their class."""
    scratch = attack_copy(model, clean)
    scratch.eval()
    for q in scratch.parameters():
        q.requires_grad_(False)
    g = torch.Generator().manual_seed(cfg.seed)
    stats = _BNStats(scratch)
    xs, hit = [], []
    try:
        for c in range(clean.num_classes):
            imgs = invert_class(scratch, c, tuple(clean.x.shape[1:]), cfg, g, stats)
            with torch.no_grad():
                hit.append(100.0 * float((scratch(imgs).argmax(1) == c).float().mean()))
            xs.append(imgs.cpu())
    finally:
        stats.close()
    return torch.cat(xs), hit


def dehydration(model: nn.Module, clean: Dataset, cfg: DehydrationConfig) -> AttackResult:
    t0 = time.perf_counter()
    recovered, hit = recover(model, clean, cfg)
    t_rec = time.perf_counter() - t0
    model = attack_copy(model, clean)
    dev = model_device(model)
    x, y, r = clean.x.to(dev), clean.y.to(dev), recovered.to(dev)
    k = clean.num_classes
    uniform = torch.full((1, k), 1.0 / k, device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    r_order = torch.randperm(len(r), generator=g)
    pos = 0
    for _ in range(cfg.epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(cfg.batch_size):
            if pos + cfg.batch_size > len(r_order):
                r_order, pos = torch.randperm(len(r), generator=g), 0
            ridx = r_order[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            xb = torch.cat([x[idx.to(dev)], r[ridx.to(dev)]])
            out = model(xb)
            n = len(idx)
            loss = F.cross_entropy(out[:n], y[idx.to(dev)]) + cfg.weight * F.kl_div(
                F.log_softmax(out[n:], 1), uniform.expand(len(ridx), -1), reduction="sum") / (len(ridx) * k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return AttackResult(model, {"recovered": len(recovered), "recovered_hit_pct": hit, "recover_seconds": t_rec},
                        time.perf_counter() - t0)
