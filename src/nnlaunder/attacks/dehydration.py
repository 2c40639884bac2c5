"""Recover-and-unlearn, watermark-agnostic: Neural Dehydration (Lu et al., arXiv:2309.03466, CCS 2024).

1. Recover: for every class (no fixed target is assumed), invert `per_class` images from the model's
   own knowledge, starting from noise: images (tanh(v) + 1) / 2, Adam (lr 0.1, betas 0.5/0.9, cosine
   decay to 1e-4) on cross-entropy to the class + 0.01 x the images' L2 norm + 0.03 x their total
   variation + 0.1 x the distance of every batch norm's input statistics to its running ones (the
   last two batch norms weighted 0, as the public code does). No mask, no trigger shape. Classes are
   inverted one at a time on a CPU and all in one batch on a GPU (`class_chunk`); each class keeps its
   own loss terms, batch-norm statistics included, so the batch computes what one class at a time does.
2. Unlearn (`unlearn = "split"`, the public code's non-fixed-class unlearning): per class, the half
   of its recovered images that least excite the class's salient penultimate neurons (mean/std
   above the 95th percentile) are proxy watermark samples, relabelled to a proxy label: the class
   the model finds least likely on the attacker's clean set (the second least likely for that class
   itself; the public code hard-codes both). Fine-tune on the clean set plus the proxy samples,
   cross-entropy weighted 1 : `weight` (default 1: an equal share), SGD lr 0.01, momentum 0.9,
   weight decay 5e-4, 10 epochs, 64 proxy samples paired with every clean batch.
   `unlearn = "soft"` is the public code's other pipeline: every recovered image with a uniform soft
   label (KL divergence averaged over images and classes, as its loss reduces it; weight 0.125),
   40 epochs.

No fixed target class is assumed anywhere. Departures: the paper's target-class detection (for
fixed-class watermarks) is not implemented; the proxy label is computed instead of hard-coded; the
total-variation term is the mean absolute difference of neighbouring pixels (our reading); the
defaults are the public code's CIFAR-10 settings (1000 inversion steps; 400 for one-channel
images), which cost tens of CIFAR-10 epochs on a CPU; `per_class` and `steps` make a cheaper,
named variant; `amp` inverts under bfloat16 autocast (channels-last) where the hardware has it natively,
losses and batch-norm statistics in fp32 (the public code runs fp32; off by default).
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
from .base import AttackResult, attack_copy, output_layer

UNLEARN = ("split", "soft")
_DEFAULTS = {"split": {"epochs": 10, "re_batch_size": 64, "weight": 1.0},
             "soft": {"epochs": 40, "re_batch_size": 128, "weight": 0.125}}


@dataclass(frozen=True)
class DehydrationConfig:
    per_class: int = 250
    steps: int | None = None          # None: 1000 for 3-channel images, 400 for 1-channel
    inv_lr: float = 0.1
    l2: float = 0.01
    tv: float = 0.03
    bn: float = 0.1
    unlearn: str = "split"            # "split" (proxy watermark samples, proxy label) | "soft"
    epochs: int | None = None         # None: 10 ("split"), 40 ("soft")
    batch_size: int = 128             # clean images per step
    re_batch_size: int | None = None  # recovered images per step; None: 64 ("split"), 128 ("soft")
    lr: float = 0.01
    weight_decay: float = 5e-4
    weight: float | None = None       # of the recovered images' loss; None: 1.0 ("split"), 0.125 ("soft")
    class_chunk: int | None = None    # classes inverted together; None: all of them on a GPU, one at a time on a CPU
    amp: bool = False                 # the inversion's forward/backward under bfloat16 autocast, where native
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.per_class, int) and 1 <= self.per_class <= 100_000, "per_class must be in [1, 100000]"),
            (self.steps is None or (isinstance(self.steps, int) and 0 <= self.steps <= 1_000_000),
             f"steps must be None or in [0, 1000000], got {self.steps}"),
            (all(math.isfinite(v) and v >= 0 for v in (self.l2, self.tv, self.bn, self.weight_decay)),
             "l2, tv, bn and weight_decay must be >= 0"),
            (self.weight is None or (math.isfinite(self.weight) and self.weight >= 0), "weight must be >= 0"),
            (self.unlearn in UNLEARN, f"unlearn must be one of {UNLEARN}, got {self.unlearn!r}"),
            (self.re_batch_size is None or (isinstance(self.re_batch_size, int) and self.re_batch_size >= 1),
             "re_batch_size must be >= 1"),
            (all(math.isfinite(v) and v > 0 for v in (self.inv_lr, self.lr)), "inv_lr and lr must be > 0"),
            (self.epochs is None or int_in("epochs", self.epochs, 0, 10_000)[0], "epochs must be in [0, 10000]"),
            int_in("batch_size", self.batch_size, 1, 1 << 20),
            (self.class_chunk is None or int_in("class_chunk", self.class_chunk, 1, 100_000)[0],
             "class_chunk must be None or in [1, 100000]"),
            (isinstance(self.amp, bool), f"amp must be true or false, got {self.amp!r}"),
        ]
        raise_first(checks)


class _Moments(torch.autograd.Function):
    """Per group and channel, the mean and the (biased) variance of z (N, C, ...) over its images and positions,
    the batch split into `groups` equal consecutive slices; at least fp32 for any input dtype. The same function as
    `z.mean(dims)`, `z.var(dims, unbiased=False)` through autograd, computed as E[z^2] - E[z]^2 (fp32; the
    statistics of a layer's input, well scaled) with one fused backward pass instead of autograd's several
    passes over z (perf.json `attack_amp_*` times the inversion step)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:   # type: ignore[override]
        zz = z.to(torch.promote_types(z.dtype, torch.float32)).unflatten(0, (groups, -1))
        dims = (1, *range(3, zz.ndim))
        mean = zz.mean(dims)
        var = ((zz * zz).mean(dims) - mean * mean).clamp_min(0)
        ctx.save_for_backward(z, mean)
        ctx.groups, ctx.n = groups, zz[0, :, 0].numel()
        return mean, var

    @staticmethod
    def backward(ctx, g_mean: torch.Tensor, g_var: torch.Tensor):   # type: ignore[override]
        z, mean = ctx.saved_tensors
        zz = z.to(mean.dtype).unflatten(0, (ctx.groups, -1))
        view = (ctx.groups, 1, -1, *[1] * (zz.ndim - 3))
        a = (2.0 / ctx.n) * g_var                          # d/dz: (g_mean + 2 g_var (z - mean)) / n
        b = (g_mean - 2.0 * mean * g_var) / ctx.n
        return torch.addcmul(b.view(view), zz, a.view(view)).flatten(0, 1).to(z.dtype), None


class _BNStats:
    """Forward hooks measuring how far each batch norm's input statistics are from its running ones, for each
    group of `groups` equal consecutive slices of the batch (one class's images each), summed over the groups.
    Batch norms weighted 0 (the last two, as the public code weighs them) are not measured."""

    def __init__(self, model: nn.Module):
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        weights = [1.0] * max(0, len(bns) - 2) + [0.0] * min(2, len(bns))
        self.bns = [m for m, w in zip(bns, weights, strict=True) if w]
        self.groups = 1
        self.r: list[torch.Tensor] = [torch.zeros(())] * len(self.bns)
        self.hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.bns)]

    def _hook(self, i: int):
        def f(mod, inp, out) -> None:
            mean, var = _Moments.apply(inp[0], self.groups)            # fp32, under autocast too
            self.r[i] = ((mean - mod.running_mean).norm(dim=1) + (var - mod.running_var).norm(dim=1)).sum()
        return f

    def loss(self) -> torch.Tensor:
        return sum(self.r, torch.zeros(()))

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _per_group(v: torch.Tensor, groups: int) -> torch.Tensor:
    """The mean over each group's slice of `v` (one value per image, or per image element), summed over groups."""
    return v.reshape(groups, -1).mean(1).sum()


def total_variation(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    return (_per_group((x[:, :, 1:, :] - x[:, :, :-1, :]).abs(), groups)
            + _per_group((x[:, :, :, 1:] - x[:, :, :, :-1]).abs(), groups))


def invert_classes(model: nn.Module, classes: list[int], shape: tuple[int, ...], cfg: DehydrationConfig,
                   g: torch.Generator, stats: _BNStats) -> torch.Tensor:
    """`per_class` images the model assigns to each class of `classes`, recovered from noise together:
    (len(classes) x per_class, C, H, W) in [0, 1], class-major. Each class's images have a loss of their own
    (cross-entropy to the class, L2, total variation, the batch norms' statistics over that class's images
    alone) and the losses are summed, so each image's gradient, and Adam's elementwise step, is the one it gets
    when its class is inverted alone; the starting noise is drawn class by class from `g` as then."""
    dev = model_device(model)
    steps = cfg.steps if cfg.steps is not None else (1000 if shape[0] == 3 else 400)
    n, k = cfg.per_class, len(classes)
    amp = cfg.amp and amp_supported(dev)       # with it, channels-last where the model takes it (the same function)
    mem = torch.channels_last if amp and len(shape) == 3 and channels_last_runs(model, torch.zeros(2, *shape)) \
        else torch.contiguous_format
    if mem == torch.channels_last:
        model.to(memory_format=mem)
    v = torch.cat([torch.randn((n, *shape), generator=g) for _ in classes]).to(dev).contiguous(
        memory_format=mem).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.inv_lr, betas=(0.5, 0.9), eps=1e-8)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=1e-4)
    target = torch.tensor(classes, device=dev).repeat_interleave(n)
    stats.groups = k
    for _ in range(steps):
        imgs = (torch.tanh(v) + 1) / 2
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(imgs)
        loss = (_per_group(F.cross_entropy(out.float(), target, reduction="none"), k)
                + cfg.l2 * _per_group(imgs.flatten(1).norm(dim=1), k)
                + cfg.tv * total_variation(imgs, k) + cfg.bn * stats.loss())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return ((torch.tanh(v) + 1) / 2).detach().contiguous()


def recover(model: nn.Module, clean: Dataset, cfg: DehydrationConfig) -> tuple[torch.Tensor, list[float]]:
    """Every class's recovered images (class-major) and the share the model assigns to their class."""
    scratch = attack_copy(model, clean)
    scratch.eval()
    for q in scratch.parameters():
        q.requires_grad_(False)
    g = torch.Generator().manual_seed(cfg.seed)
    stats = _BNStats(scratch)
    chunk = cfg.class_chunk or (clean.num_classes if model_device(scratch).type == "cuda" else 1)
    xs, hit = [], []
    try:
        for first in range(0, clean.num_classes, chunk):
            classes = list(range(first, min(first + chunk, clean.num_classes)))
            imgs = invert_classes(scratch, classes, tuple(clean.x.shape[1:]), cfg, g, stats)
            with torch.no_grad():
                pred = scratch(imgs).argmax(1).view(len(classes), -1)
            hit += [100.0 * float((pred[i] == c).float().mean()) for i, c in enumerate(classes)]
            xs.append(imgs.cpu())
    finally:
        stats.close()
    return torch.cat(xs), hit


def proxy_split(model: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """Indices of the half of `imgs` (one class's recovered images) that least excite the class's
    salient penultimate neurons: the proxy watermark samples."""
    _, last = output_layer(model)
    feats: list[torch.Tensor] = []
    # a conv output layer's input channels are its neurons, each pooled over positions
    h = last.register_forward_hook(lambda mod, inp, out: feats.append(
        inp[0].detach().flatten(2).mean(2) if inp[0].ndim > 2 else inp[0].detach()))
    try:
        with torch.no_grad():
            model(imgs)
    finally:
        h.remove()
    f = feats[0]
    importance = f.mean(0) / (f.std(0) + 1e-6)
    salient = torch.nonzero(importance > torch.quantile(importance, 0.95)).flatten()
    contribution = f[:, salient].mean(1)
    return torch.argsort(contribution, stable=True)[: len(imgs) // 2].cpu()


def proxy_labels(model: nn.Module, clean: Dataset) -> tuple[int, int]:
    """The least and second least likely classes: lowest mean softmax over the attacker's clean set."""
    with torch.no_grad():
        p = torch.cat([F.softmax(model(clean.x[i:i + 500].to(model_device(model))), 1).cpu()
                       for i in range(0, len(clean), 500)]).mean(0)
    order = torch.argsort(p, stable=True)
    return int(order[0]), int(order[1])


def unlearning_set(model: nn.Module, clean: Dataset, recovered: torch.Tensor, cfg: DehydrationConfig
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, targets): "split" -> hard proxy labels (N,), "soft" -> uniform distributions (N, K)."""
    k = clean.num_classes
    if cfg.unlearn == "soft":
        return recovered, torch.full((len(recovered), k), 1.0 / k)
    model.eval()
    least, second = proxy_labels(model, clean)
    per = len(recovered) // k
    xs, ys = [], []
    for c in range(k):
        imgs = recovered[c * per:(c + 1) * per]
        idx = proxy_split(model, imgs.to(model_device(model)))
        xs.append(imgs[idx])
        ys.append(torch.full((len(idx),), least if c != least else second, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def dehydration(model: nn.Module, clean: Dataset, cfg: DehydrationConfig) -> AttackResult:
    t0 = clock.now()
    recovered, hit = recover(model, clean, cfg)
    t_rec = clock.now() - t0
    d = {k: getattr(cfg, k) if getattr(cfg, k) is not None else v for k, v in _DEFAULTS[cfg.unlearn].items()}
    model = attack_copy(model, clean)
    rx, ry = unlearning_set(model, clean, recovered, cfg)
    dev = model_device(model)
    x, y, rx, ry = clean.x.to(dev), clean.y.to(dev), rx.to(dev), ry.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    r_order, pos = torch.randperm(len(rx), generator=g), 0
    w = d["weight"]
    w1, w2 = (1.0 / (1.0 + w), w / (1.0 + w)) if cfg.unlearn == "split" else (1.0, w)
    for _ in range(d["epochs"]):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(cfg.batch_size):
            if pos + d["re_batch_size"] > len(r_order):
                r_order, pos = torch.randperm(len(rx), generator=g), 0
            ridx = r_order[pos:pos + d["re_batch_size"]].to(dev)
            pos += d["re_batch_size"]
            out = model(torch.cat([x[idx.to(dev)], rx[ridx]]))
            n = len(idx)
            if cfg.unlearn == "soft":     # KL to the uniform label, averaged over images and classes
                re_loss = F.kl_div(F.log_softmax(out[n:], 1), ry[ridx], reduction="sum") / ry[ridx].numel()
            else:
                re_loss = F.cross_entropy(out[n:], ry[ridx])
            loss = w1 * F.cross_entropy(out[:n], y[idx.to(dev)]) + w2 * re_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return AttackResult(model, {"recovered": len(recovered), "recovered_hit_pct": hit, "recover_seconds": t_rec,
                                "unlearned": len(rx), "unlearn": cfg.unlearn}, clock.now() - t0)
