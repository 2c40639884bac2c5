"""NAD: Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li, Ma; ICLR 2021).

1. Teacher: the model fine-tuned on the attacker's clean set (10 epochs, SGD lr 0.01).
2. Student: the original model, trained on the same set with cross-entropy plus, per chosen layer,
   beta x the mean squared difference between the student's and the teacher's attention maps.
   An attention map is the channel sum of |activation|^p, divided by its L2 norm over positions.

Layers: the paper reads the outputs of a WideResNet's three residual groups; here the three taps
are the activations (`Unit.tap`: the activation module, or the unit's own output rectified where the
activation is a function) of the last hidden conv unit of each third of
the model's conv units, in forward order, so that any conv net has them. Its defaults weight only
the deepest (betas 0, 0, 5000; p = 2), with 20 epochs of SGD (Nesterov, momentum 0.9, weight decay
1e-4) at lr 0.1 for 2 epochs and 0.01 after. The teacher is frozen. Models without conv units
are refused.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import clock
from ..config import int_in, raise_first
from ..data import Dataset
from ..device import model_device
from ..errors import UserError
from ..train import TrainConfig, batches, train
from .base import AttackResult, attack_copy
from .units import Unit, discover_units


@dataclass(frozen=True)
class NADConfig:
    teacher: TrainConfig = TrainConfig(epochs=10, batch_size=64, optimizer="sgd", lr=0.01, momentum=0.9)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    lr_after: float = 0.01          # from epoch `drop_at` on
    drop_at: int = 2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float, float] = (0.0, 0.0, 5000.0)   # low, middle, high layer
    p: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            int_in("epochs", self.epochs, 0, 10_000),
            int_in("batch_size", self.batch_size, 1, 1 << 20),
            (all(math.isfinite(v) and v > 0 for v in (self.lr, self.lr_after)), "lr and lr_after must be > 0"),
            (isinstance(self.drop_at, int) and self.drop_at >= 0, f"drop_at must be >= 0, got {self.drop_at}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be >= 0"),
            (len(self.betas) == 3 and all(math.isfinite(b) and b >= 0 for b in self.betas),
             f"betas must be three numbers >= 0, got {self.betas}"),
            (math.isfinite(self.p) and self.p > 0, f"p must be > 0, got {self.p}"),
        ]
        raise_first(checks)


def attention_map(fm: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """Channel sum of |fm|^p, L2-normalised over positions: (N, 1, H, W)."""
    am = fm.abs().pow(p).sum(1, keepdim=True)
    return am / (am.norm(dim=(2, 3), keepdim=True) + eps)


def attention_taps(units: list[Unit]) -> list[tuple[str, bool]]:
    """Where to read the last conv unit of each third of the conv units (low, middle, high): (module,
    rectify), as `Unit.tap` says."""
    convs = [u for u in units if u.kind == "conv"]
    if not convs:
        raise UserError("NAD needs a convolutional layer: it distils attention maps of feature maps")
    n = len(convs)
    return [convs[max(0, math.ceil(n * k / 3) - 1)].tap() for k in (1, 2, 3)]


class _Taps:
    """Forward hooks keeping the latest output of each named module (rectified where asked)."""

    def __init__(self, model: nn.Module, taps: list[tuple[str, bool]]):
        mods = dict(model.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self.hooks = [mods[n].register_forward_hook(self._keep(n, r)) for n, r in set(taps)]

    def _keep(self, name: str, rectify: bool):
        def hook(mod, inp, out) -> None:
            # where(), not clamp_min: its backward keeps only the mask, so a shared in-place ReLU that
            # later writes into `out` cannot spoil it (same values and gradients)
            self.out[name] = torch.where(out >= 0, out, 0.0) if rectify else out
        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def nad(model: nn.Module, clean: Dataset, cfg: NADConfig) -> AttackResult:
    t0 = clock.now()
    student = attack_copy(model, clean)
    units, _ = discover_units(student, clean.x[:2])
    taps = attention_taps(units)
    teacher = attack_copy(model, clean)
    train(teacher, clean.x, clean.y, cfg.teacher, progress=False)
    teacher.eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    dev = model_device(student)
    x, y = clean.x.to(dev), clean.y.to(dev)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.momentum > 0)
    g = torch.Generator().manual_seed(cfg.seed)
    ts, tt = _Taps(student, taps), _Taps(teacher, taps)
    diverged = None
    try:
        for epoch in range(cfg.epochs):
            for group in opt.param_groups:
                group["lr"] = cfg.lr if epoch < cfg.drop_at else cfg.lr_after
            student.train()
            for step, idx in enumerate(batches(torch.randperm(len(x), generator=g), cfg.batch_size)):
                xb, yb = x[idx.to(dev)], y[idx.to(dev)]
                with torch.no_grad():
                    teacher(xb)
                loss = F.cross_entropy(student(xb), yb)
                for beta, (name, _) in zip(cfg.betas, taps, strict=True):
                    if beta > 0:
                        loss = loss + beta * F.mse_loss(attention_map(ts.out[name], cfg.p),
                                                        attention_map(tt.out[name].detach(), cfg.p))
                if not torch.isfinite(loss):        # every later step would stay non-finite: stop, and say so
                    diverged = [epoch, step]
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if diverged:
                warnings.warn(f"NAD diverged: non-finite loss at epoch {epoch}, step {step} (lr "
                              f"{opt.param_groups[0]['lr']}); the returned model is not usable. A lower lr may "
                              "train stably.", stacklevel=2)
                break
    finally:
        ts.close()
        tt.close()
    student.eval()
    return AttackResult(student, {"taps": [n for n, _ in taps], "betas": list(cfg.betas), "diverged_at": diverged},
                        clock.now() - t0)
