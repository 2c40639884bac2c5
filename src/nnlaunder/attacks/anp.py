"""ANP: Adversarial Neuron Pruning (Wu & Wang; NeurIPS 2021).

Each neuron (a conv channel or a dense unit) gets a mask m in [0, 1] and adversarial multiplicative
perturbations delta, xi in [-eps, eps] of its scale and shift. With the neuron's output written
as `out = s * z + b` (its scale s applied to the normalised or raw response z, shift b), ANP uses
`(m + delta) * s * z + (1 + xi) * b`. Per iteration, on a batch of the attacker's clean set:
1. delta, xi start uniform in [-eps, eps] and take `steps` signed-gradient steps of size eps/steps
   that increase the cross-entropy (kept within [-eps, eps]);
2. the masks take one SGD step (momentum 0.9) on alpha * CE(no perturbation) + (1 - alpha) *
   CE(perturbed), and are clipped to [0, 1].
Then neurons whose mask is <= `threshold` are pruned (or the `fraction` with the smallest masks):
their scale is set to zero and held there, their shift kept, as the reference code prunes.

Where a neuron's scale lives: ANP perturbs batch-norm layers. A unit with its own batch norm
(ResNet: conv-BN-ReLU; the Table 7 CNN: conv-ReLU-BN), or a group, instance or layer norm with a
weight, is read at that norm: s and b are its weight and bias. A unit without one (the MNIST CNN
of Table 5 has no batch norm) is read at its own output: s scales its incoming weights and b is its
bias, the same per-unit affine degree of freedom. The paper's defaults: eps 0.4, one step, alpha
0.2, mask lr 0.2, 2000 iterations of 128 images, threshold 0.2.
The model's weights never change while the masks are learned (batch norms use batch statistics,
as in the reference code's training mode); pruning is applied to a fresh copy. `amp` learns the masks
under bfloat16 autocast (channels-last) where the hardware has it natively, the losses, masks and
perturbations in fp32 (the reference code runs fp32; off by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import clock
from ..config import int_in, raise_first
from ..data import Dataset
from ..device import amp_supported, channels_last_runs, model_device
from ..errors import UserError
from ..train import apply_masks
from .base import AttackResult, attack_copy
from .units import discover_units, feature_axis

PRUNE_BY = ("threshold", "fraction")


@dataclass(frozen=True)
class ANPConfig:
    eps: float = 0.4
    steps: int = 1
    alpha: float = 0.2
    lr: float = 0.2
    iterations: int = 2000
    batch_size: int = 128
    prune_by: str = "threshold"
    threshold: float = 0.2        # prune_by "threshold": masks <= this
    fraction: float = 0.05        # prune_by "fraction": this share of all neurons, smallest masks first
    amp: bool = False             # the mask learning's forward/backward under bfloat16 autocast, where native
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (math.isfinite(self.eps) and 0 <= self.eps <= 1, f"eps must be in [0, 1], got {self.eps}"),
            int_in("steps", self.steps, 1, 1000),
            (0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}"),
            int_in("iterations", self.iterations, 0, 1_000_000),
            int_in("batch_size", self.batch_size, 1, 1 << 20),
            (self.prune_by in PRUNE_BY, f"prune_by must be one of {PRUNE_BY}, got {self.prune_by!r}"),
            (0 <= self.threshold <= 1, f"threshold must be in [0, 1], got {self.threshold}"),
            (0 <= self.fraction < 1, f"fraction must be in [0, 1), got {self.fraction}"),
            (isinstance(self.amp, bool), f"amp must be true or false, got {self.amp!r}"),
        ]
        raise_first(checks)


class _Neurons:
    """Masks and perturbations on every unit's own affine output, through forward hooks."""

    def __init__(self, model: nn.Module, where: dict[str, str]):
        mods = dict(model.named_modules())
        dev = model_device(model)
        self.where = where                                   # unit -> module read
        self.mods = {u: mods[m] for u, m in where.items()}
        self.kind = {u: "dense" if isinstance(mods[u], nn.Linear) else "conv" for u in where}
        width = {u: int(m.weight.shape[0]) for u, m in self.mods.items()}
        self.mask = {u: torch.ones(w, device=dev, requires_grad=True) for u, w in width.items()}
        self.delta = {u: torch.zeros(w, device=dev, requires_grad=True) for u, w in width.items()}
        self.xi = {u: torch.zeros(w, device=dev, requires_grad=True) for u, w in width.items()}
        self.noisy = False
        self.hooks = [m.register_forward_hook(self._hook(u)) for u, m in self.mods.items()]

    def _hook(self, u: str):
        def f(mod, inp, out):
            shape = [1] * out.ndim
            shape[feature_axis(self.kind[u], out.ndim)] = -1      # a conv's channels; a dense layer's features
            scale = self.mask[u] + self.delta[u] if self.noisy else self.mask[u]
            if getattr(mod, "bias", None) is None:
                return out * scale.view(shape).to(out.dtype)
            shift = 1 + self.xi[u] if self.noisy else torch.ones_like(self.mask[u])
            # scale * (out - b) + shift * b, in one pass over out and in its dtype (bfloat16 under `amp`)
            return torch.addcmul(((shift - scale) * mod.bias).view(shape).to(out.dtype), out,
                                 scale.view(shape).to(out.dtype))
        return f

    def noise(self) -> list[torch.Tensor]:
        return [*self.delta.values(), *self.xi.values()]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def optimise_masks(model: nn.Module, clean: Dataset, cfg: ANPConfig, where: dict[str, str]) -> dict[str, torch.Tensor]:
    """ANP's mask learning on a scratch copy of `model`: unit -> mask values in [0, 1]."""
    scratch = attack_copy(model, clean)
    for q in scratch.parameters():
        q.requires_grad_(False)
    scratch.train()
    for m in scratch.modules():                 # batch statistics, as the reference; no dropout noise
        if isinstance(m, nn.Dropout):
            m.eval()
    dev = model_device(scratch)
    x, y = clean.x.to(dev), clean.y.to(dev)
    amp = cfg.amp and amp_supported(dev)        # with it, channels-last where the model takes it (the same function)
    if amp and channels_last_runs(scratch, x[:2]):
        scratch.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    nn_ = _Neurons(scratch, where)
    mask_opt = torch.optim.SGD(list(nn_.mask.values()), lr=cfg.lr, momentum=0.9)
    noise_opt = torch.optim.SGD(nn_.noise(), lr=cfg.eps / cfg.steps)

    def ce(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = scratch(xb)
        return F.cross_entropy(out.float(), yb)

    g = torch.Generator().manual_seed(cfg.seed)
    try:
        for _ in range(cfg.iterations):
            idx = torch.randint(len(x), (cfg.batch_size,), generator=g).to(dev)   # with replacement
            xb, yb = x[idx], y[idx]
            loss_rob = 0.0
            if cfg.eps > 0:
                with torch.no_grad():
                    for t in nn_.noise():
                        t.copy_(torch.empty(t.shape).uniform_(-cfg.eps, cfg.eps, generator=g))
                nn_.noisy = True
                for _ in range(cfg.steps):
                    noise_opt.zero_grad(set_to_none=True)
                    (-ce(xb, yb)).backward()
                    for t in nn_.noise():
                        t.grad = t.grad.sign()
                    noise_opt.step()
                    with torch.no_grad():
                        for t in nn_.noise():
                            t.clamp_(-cfg.eps, cfg.eps)
                mask_opt.zero_grad(set_to_none=True)
                loss_rob = ce(xb, yb)
            else:
                mask_opt.zero_grad(set_to_none=True)
            nn_.noisy = False
            loss = cfg.alpha * ce(xb, yb) + (1 - cfg.alpha) * loss_rob
            loss.backward()
            mask_opt.step()
            with torch.no_grad():
                for m in nn_.mask.values():
                    m.clamp_(0, 1)
    finally:
        nn_.close()
    return {u: m.detach().cpu() for u, m in nn_.mask.items()}


def choose_pruned(masks: dict[str, torch.Tensor], cfg: ANPConfig) -> dict[str, torch.Tensor]:
    """unit -> indices of the neurons to prune, by threshold or by the smallest fraction."""
    if cfg.prune_by == "threshold":
        return {u: torch.nonzero(m <= cfg.threshold).flatten() for u, m in masks.items()}
    flat = torch.cat([m for m in masks.values()])
    k = int(cfg.fraction * len(flat))
    cut = torch.sort(flat, stable=True).values[k - 1] if k > 0 else -1.0
    out, left = {}, k
    for u, m in masks.items():                  # ties at the cut taken in unit order, k in all
        below = torch.nonzero(m < cut).flatten()
        at = torch.nonzero(m == cut).flatten()
        take = torch.cat([below, at])[:max(0, left)] if k > 0 else below[:0]
        left -= len(take)
        out[u] = torch.sort(take).values
    return out


def mask_sites(model: nn.Module, probe: torch.Tensor) -> dict[str, str]:
    """unit -> the module whose output ANP masks: the unit's norm where it has a weight, else the unit itself."""
    units, _ = discover_units(model, probe)
    if not units:
        raise UserError("ANP found no neuron to mask (a hidden Conv2d/Linear with an activation after it)")
    mods = dict(model.named_modules())
    return {u.name: u.bn if u.bn and getattr(mods[u.bn], "weight", None) is not None else u.name for u in units}


def anp(model: nn.Module, clean: Dataset, cfg: ANPConfig) -> AttackResult:
    t0 = clock.now()
    out = attack_copy(model, clean)
    where = mask_sites(out, clean.x[:2])
    masks = optimise_masks(model, clean, cfg, where)
    pruned = choose_pruned(masks, cfg)
    params = dict(out.named_parameters())
    weight_masks = {}
    for u, idx in pruned.items():
        if len(idx):
            name = f"{where[u]}.weight"
            m = torch.ones_like(params[name])
            m[idx] = 0
            weight_masks[name] = m
    apply_masks(out, weight_masks)
    out.eval()
    return AttackResult(out, {"pruned": {u: int(len(i)) for u, i in pruned.items()},
                              "neurons": sum(len(m) for m in masks.values()),
                              "read_at": where}, clock.now() - t0)
