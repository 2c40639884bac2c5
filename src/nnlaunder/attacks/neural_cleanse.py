"""Neural Cleanse (Wang et al., S&P 2019) trigger recovery, batched over candidate classes.

Faithful to the public Keras code (bolunwang/backdoor):
- trigger x' = (1 - m) ⊙ x + m ⊙ Δ in pixel space [0, 1]; m is (1,H,W) shared over channels,
  Δ is (C,H,W); both through tanh: m = tanh(w_m)/2 + 1/2, Δ = tanh(w_Δ)/2 + 1/2;
- loss = CE(f(x'), target) + λ·|m|₁; Adam, lr 0.1, betas (0.5, 0.9), Keras ε 1e-7;
- λ schedule per class: 0 until the attack succeeds (≥ 0.99) for `patience` epochs, then
  init_cost 1e-3; afterwards ×2 after `patience` successful epochs, ÷2^1.5 after `patience`
  failing ones;
- the BEST mask is kept (smallest epoch-mean |m|₁ among epochs with success ≥ 0.99);
- early stop when the best norm has not improved for 25 epochs after λ went both up and down;
- outliers: anomaly index = |L1 - median| / (1.4826 · MAD); flagged when below the median and > 2.

Speed: all K candidate classes are optimised together: one step over K×B stamped inputs (K masks
and patterns in one tensor; on a CPU the forward runs in cache-sized chunks of classes,
`class_chunk`) with a per-class Adam update (Adam is elementwise, so the result equals K separate
runs); classes that stopped early drop out of the batch. A
per-class Python loop is the same function called with one class at a time (`per_class=True`).
Both run the first conv's input gradient (the image has 1-3 channels, where the library's backward
crawls at a few GFLOP/s on a CPU) as one matmul plus k·k shifted adds (`input_grad="matmul"`, the
default of the faithful preset: the same sums in another order; the fast preset's bf16
channels-last convs measured faster with the library's backward); with a one-channel image its
forward is im2col + one matmul too, and every ReLU -> max-pool pair runs as max-pool -> ReLU (exact:
the same function and gradients). Together 1.3-1.6x on the faithful MNIST run (`SPEED`, perf.md).

The "fast" preset (`NC_PRESETS["fast"]`, a named departure from Wang et al.; see docs/methods.md)
adds three switches, each off in the faithful default:
- `exact_rewrite`: the optimisation runs on a copy of the model in which every ReLU directly
  followed by a max-pool is moved after it (max-pool and ReLU commute, so the function is the
  same; gradients can differ only at exact ties) and weights and inputs are channels-last;
- `amp`: bfloat16 autocast for the model's forward/backward (CPUs with AVX512-BF16/AMX, CUDA);
  the masks, patterns, loss and Adam state stay fp32;
- `steps_per_epoch`: the λ schedule, best-mask bookkeeping and early stop see "epochs" of this
  many minibatches (drawn from a running permutation of the images) instead of full passes, so
  the schedule reacts within a few hundred images; with `early_stop_patience` lowered to match and
  at most 100 such epochs (a class still running then keeps its best mask so far).

Pure tensor code: the attacker's clean images in, masks and patterns out. It knows nothing of
the watermark.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..device import model_device
from ..errors import UserError
from ..kernels import conv_forward_im2col, conv_input_grad, im2col_ok
from ..train import relu_after_pool


@dataclass(frozen=True)
class NCConfig:
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-7
    batch_size: int = 32
    init_cost: float = 1e-3
    cost_up: float = 2.0
    cost_down: float = 2.0 ** 1.5
    patience: int = 5
    success: float = 0.99
    early_stop: bool = True
    early_stop_threshold: float = 1.0
    early_stop_patience: int = 25
    max_epochs: int = 1000
    mad_threshold: float = 2.0
    max_images: int | None = 1000    # optimise on at most this many clean images (Wang et al.'s example uses 1000)
    seed: int = 0
    steps_per_epoch: int | None = None   # None: an epoch is a full pass over the images (faithful)
    amp: bool = False                    # bfloat16 autocast where the hardware has it
    exact_rewrite: bool = False          # ReLU/max-pool reorder + channels-last copy of the model
    class_chunk: int | None = None       # classes per forward pass; None: auto (CPU: ~64 images, else all)
    input_grad: str = "matmul"           # few-channel convs' input gradient as one matmul + shifted adds
    #                                      ("native": the library's backward; same sums, another order)

    def __post_init__(self) -> None:
        finite = all(math.isfinite(v) for v in (self.lr, self.success, self.init_cost)
                     if isinstance(v, int | float))
        if not (finite and self.lr > 0 and self.batch_size >= 1 and self.max_epochs >= 1 and self.patience >= 1
                and 0 < self.success <= 1 and self.init_cost > 0
                and (self.steps_per_epoch is None or self.steps_per_epoch >= 1)
                and (self.class_chunk is None or self.class_chunk >= 1)
                and (self.max_images is None or self.max_images >= 1) and self.mad_threshold > 0
                and self.input_grad in ("native", "matmul")):
            raise UserError(f"invalid Neural Cleanse settings: {self}")


# Named settings. "faithful" is Wang et al.'s algorithm; "fast" is this project's departure
# (short schedule epochs, bf16, exact model rewrite), measured against it in benchmarks/perf.
NC_PRESETS: dict[str, dict] = {
    "faithful": {},
    # input_grad: bf16 channels-last convs keep the library's backward, which measured 1.15x faster than the
    # matmul path on 2 threads (perf.md, nc_fast_batched_input_grad_native); fp32 contiguous gains from it
    "fast": {"steps_per_epoch": 8, "early_stop_patience": 10, "max_epochs": 100, "amp": True, "exact_rewrite": True,
             "input_grad": "native"},
}


def nc_config(preset: str = "faithful", **overrides) -> NCConfig:
    if preset not in NC_PRESETS:
        raise UserError(f"unknown Neural Cleanse preset {preset!r}; choose from {', '.join(NC_PRESETS)}")
    return NCConfig(**{**NC_PRESETS[preset], **overrides})


def amp_supported(device: torch.device) -> bool:
    """bfloat16 autocast pays off: CUDA with bf16, or a CPU whose oneDNN has native bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


# Speed measures that leave the function computed unchanged (the same sums in another order, or a
# reordering that is exact), on by default; benchmarks/perf switches them off to measure each.
SPEED = {"relu_after_pool": True, "im2col_forward": True}


class _InputGradConv2d(torch.autograd.Function):
    """conv2d whose backward gives the input gradient only, as (W^T @ grad_out) followed by k·k
    shifted adds (col2im, `kernels.conv_input_grad`), in fp32. For a frozen conv with 1-3 input
    channels (the first layer, whose input is the stamped image) this is several times faster on a
    CPU than the library's backward, which runs such convs at a few GFLOP/s (docs/methods.md). The
    same sums in another order: results agree with the native gradient to rounding, not bit for bit.
    Computed in fp32 (fp64 for fp64 inputs), also under bf16 autocast. On a CPU without autocast a
    one-channel input's forward is im2col + matmul as well (SPEED["im2col_forward"])."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(weight)
        ctx.in_shape, ctx.padding, ctx.in_dtype = x.shape, padding, x.dtype
        if (not SPEED["im2col_forward"] or x.shape[1] != 1 or x.device.type != "cpu"
                or torch.is_autocast_enabled(x.device.type)):
            return F.conv2d(x, weight, bias, padding=padding)
        # With 3 channels the library's forward is the faster one (docs/methods.md).
        return conv_forward_im2col(x, weight, bias, padding)[0]

    @staticmethod
    def backward(ctx, go):
        (w,) = ctx.saved_tensors
        return conv_input_grad(go, w, ctx.in_shape, ctx.padding).to(ctx.in_dtype), None, None, None


class InputGradConv(nn.Module):
    """Wraps a frozen nn.Conv2d (stride 1, no dilation, one group, zero padding) so that its input
    gradient runs through `_InputGradConv2d`. Shares the conv's parameters."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if c.weight.requires_grad or (c.bias is not None and c.bias.requires_grad) or not x.requires_grad:
            return c(x)
        return _InputGradConv2d.apply(x, c.weight, c.bias, c.padding)


def with_input_grad_convs(model: nn.Module, max_channels: int = 3) -> nn.Module:
    """A copy of `model` whose convs with at most `max_channels` input channels compute their input
    gradient as a matmul (`InputGradConv`); the original model is not touched."""
    fast = copy.deepcopy(model)
    for parent in list(fast.modules()):
        for name, child in list(parent.named_children()):
            if im2col_ok(child, max_channels):
                setattr(parent, name, InputGradConv(child))
    return fast


def rewrite_for_speed(model: nn.Module) -> nn.Module:
    """A copy of `model` computing the same function faster on a CPU: in every nn.Sequential, a
    ReLU immediately followed by a MaxPool2d is moved after the pool (max and ReLU commute: both
    are monotone, so relu(maxpool(x)) == maxpool(relu(x)) and the ReLU touches 4x fewer values),
    and parameters are channels-last. The original model is not touched."""
    fast = copy.deepcopy(model)
    for seq in fast.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        i = 0
        while i < len(names) - 1:
            a, b = seq._modules[names[i]], seq._modules[names[i + 1]]
            if type(a) is nn.ReLU and type(b) is nn.MaxPool2d and not b.return_indices:
                seq._modules[names[i]], seq._modules[names[i + 1]] = b, a
                i += 2
            else:
                i += 1
    return fast.to(memory_format=torch.channels_last)


@dataclass
class NCResult:
    masks: torch.Tensor        # (K,1,H,W) in [0,1], best mask per class
    patterns: torch.Tensor     # (K,C,H,W) in [0,1]
    l1: torch.Tensor           # (K,) L1 norm of the best mask (epoch mean, as in Wang et al.)
    success: torch.Tensor      # (K,) attack success of the best epoch (fraction)
    found: torch.Tensor        # (K,) bool: a mask reaching the success target was found
    epochs: torch.Tensor       # (K,) optimisation epochs run per class
    anomaly: torch.Tensor      # (K,) MAD anomaly index (0 where undefined)
    flagged: list[int]         # classes whose mask is an outlier below the median
    seconds: float
    history: list[dict] = field(default_factory=list)

    @property
    def most_likely(self) -> int:
        """The most likely infected class: smallest mask norm (the flagged one when there is one)."""
        return int(torch.argmin(self.l1))

    @property
    def least_likely(self) -> int:
        """The least likely infected class: the largest mask norm (definition documented in
        docs/methods.md; the paper says "lowest MAD anomaly", which is ambiguous)."""
        return int(torch.argmax(self.l1))


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - m)·x + m·Δ in pixel space. x (N,C,H,W); mask (1,H,W) or (N,1,H,W); pattern (C,H,W) or (N,C,H,W)."""
    return (1 - mask) * x + mask * pattern


def anomaly_index(l1: torch.Tensor, threshold: float = 2.0) -> tuple[torch.Tensor, list[int]]:
    """MAD outlier test on mask norms: (anomaly index per class, flagged classes below the median).

    Medians average the two middle values for an even count, as numpy's np.median in Wang et
    al.'s code (torch.median would return the lower one, hence quantile 0.5).
    """
    l1 = l1.double()
    med = torch.quantile(l1, 0.5)
    mad = 1.4826 * torch.quantile((l1 - med).abs(), 0.5)
    if mad == 0:
        return torch.zeros_like(l1), []
    idx = (l1 - med).abs() / mad
    flagged = [int(i) for i in torch.nonzero((l1 < med) & (idx > threshold)).flatten()]
    return idx.float(), flagged


def _atanh_init(u: torch.Tensor) -> torch.Tensor:
    # Wang et al.: w = arctanh((u - 0.5) * (2 - eps)) so that tanh(w)/2 + 0.5 == u (nearly)
    return torch.atanh((u - 0.5) * (2 - 1e-7))


def neural_cleanse(model: nn.Module, x: torch.Tensor, cfg: NCConfig = NCConfig(), *,
                   classes: Sequence[int] | None = None, num_classes: int | None = None,
                   per_class: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> NCResult:
    """Recover a minimal trigger for every candidate class from clean images x (N,C,H,W) in [0,1].

    The model is used in eval mode and not changed. `classes` defaults to all classes.
    `per_class=True` runs the faithful one-class-at-a-time loop (same numbers, slower).
    """
    if x.ndim != 4 or len(x) == 0:
        raise UserError(f"Neural Cleanse needs images (N,C,H,W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise UserError("Neural Cleanse input contains NaN or Inf")
    if cfg.max_images is not None and len(x) > cfg.max_images:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.max_images]
        x = x[torch.sort(keep).values]
    x = x.to(model_device(model))     # the optimisation runs where the model is; results come back on the CPU
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        if num_classes is None:
            with torch.no_grad():
                num_classes = int(model(x[:1]).shape[1])
        cls = list(range(num_classes)) if classes is None else [int(c) for c in classes]
        if not cls or min(cls) < 0 or max(cls) >= num_classes:
            raise UserError(f"candidate classes must be in 0..{num_classes - 1}, got {cls}")
        t0 = time.perf_counter()
        # The caller's model stays as it is; ReLU -> max-pool pairs run as max-pool -> ReLU (the same
        # function and gradients, 4x fewer ReLU values; exact_rewrite adds channels-last weights).
        net = (rewrite_for_speed(model) if cfg.exact_rewrite
               else relu_after_pool(model) if SPEED["relu_after_pool"] else model)
        if cfg.input_grad == "matmul":
            net = with_input_grad_convs(net)
        if per_class:
            parts = [_optimise(net, x, cfg, [c], progress) for c in cls]
            res = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "history"}
            history = [h for p in parts for h in p["history"]]
        else:
            res = _optimise(net, x, cfg, cls, progress)
            history = res.pop("history")
    finally:
        for p, r in zip(model.parameters(), req, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    # Full-size outputs indexed by class; the MAD test runs over the candidate classes.
    k_all = num_classes
    c, h, w = x.shape[1:]
    f32 = torch.float32
    masks = torch.zeros(k_all, 1, h, w, dtype=f32)
    patterns = torch.zeros(k_all, c, h, w, dtype=f32)
    l1 = torch.full((k_all,), float("nan"), dtype=f32)
    success = torch.zeros(k_all, dtype=f32)
    found = torch.zeros(k_all, dtype=torch.bool)
    epochs = torch.zeros(k_all, dtype=torch.long)
    idx = torch.tensor(cls)
    masks[idx], patterns[idx], l1[idx] = res["masks"], res["patterns"], res["l1"]
    success[idx], found[idx], epochs[idx] = res["success"], res["found"], res["epochs"]
    anomaly = torch.zeros(k_all, dtype=f32)
    a, flagged_local = anomaly_index(l1[idx], cfg.mad_threshold)
    anomaly[idx] = a
    flagged = [cls[i] for i in flagged_local]
    return NCResult(masks, patterns, l1, success, found, epochs, anomaly, flagged,
                    time.perf_counter() - t0, history)


def _optimise(model: nn.Module, x: torch.Tensor, cfg: NCConfig, cls: list[int],
              progress: Callable[[int, int], None] | None) -> dict:
    k = len(cls)
    n, c, h, w = x.shape
    dtype = x.dtype
    # Per-class random initialisation, seeded by (seed, class): batched == looped.
    w_mask = torch.empty(k, 1, h, w, dtype=dtype)
    w_pat = torch.empty(k, c, h, w, dtype=dtype)
    for i, cl in enumerate(cls):
        g = torch.Generator().manual_seed(cfg.seed * 10007 + cl)
        w_mask[i] = _atanh_init(torch.rand(1, h, w, generator=g, dtype=dtype))
        w_pat[i] = _atanh_init(torch.rand(c, h, w, generator=g, dtype=dtype))
    dev = x.device
    w_mask = w_mask.to(dev).requires_grad_(True)
    w_pat = w_pat.to(dev).requires_grad_(True)
    adam = {name: (torch.zeros_like(t), torch.zeros_like(t)) for name, t in (("m", w_mask), ("p", w_pat))}
    steps_done = torch.zeros(k, dtype=torch.long, device=dev)
    targets = torch.tensor(cls, device=dev)
    b1, b2 = cfg.betas

    # λ schedule state, one entry per class (Wang et al.'s visualizer, vectorised over classes)
    cost = [0.0] * k
    set_cnt, up_cnt, down_cnt = [0] * k, [0] * k, [0] * k
    up_flag, down_flag = [False] * k, [False] * k
    reg_best = [math.inf] * k
    es_best, es_cnt = [math.inf] * k, [0] * k
    active = [True] * k
    best_mask = (torch.tanh(w_mask.detach()) / 2 + 0.5).cpu()
    best_pat = (torch.tanh(w_pat.detach()) / 2 + 0.5).cpu()
    best_succ = torch.zeros(k, dtype=torch.float32)
    epochs = torch.zeros(k, dtype=torch.long)
    history: list[dict] = []
    steps_full = math.ceil(n / cfg.batch_size)        # minibatches in one pass over the images
    steps_per_epoch = cfg.steps_per_epoch or steps_full
    perms: dict[int, torch.Tensor] = {}
    use_amp = cfg.amp and amp_supported(dev)
    mem = torch.channels_last if cfg.exact_rewrite else torch.contiguous_format
    # Classes per forward pass. Every class's loss depends only on its own mask, so chunking changes
    # nothing but speed: on a CPU, 10 x 32 stamped images per op fall out of cache and the batched pass
    # ran slower than a per-class loop (perf.md); ~64 images per forward keeps it in cache.
    chunk = cfg.class_chunk or (max(1, 64 // cfg.batch_size) if dev.type == "cpu" else None)

    def batch(global_step: int) -> torch.Tensor:
        # Pass number p uses its own seeded permutation (full-pass epochs: pass == epoch, as before).
        p_no, s_no = divmod(global_step, steps_full)
        if p_no not in perms:
            perms.clear()
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + p_no)
            perms[p_no] = torch.randperm(n, generator=g).to(dev)
        return x[perms[p_no][s_no * cfg.batch_size:(s_no + 1) * cfg.batch_size]]

    for epoch in range(cfg.max_epochs):
        act = [i for i in range(k) if active[i]]
        if not act:
            break
        a_idx = torch.tensor(act, device=dev)
        acc_sum = torch.zeros(len(act), dtype=torch.float64, device=dev)
        reg_sum = torch.zeros(len(act), dtype=torch.float64, device=dev)
        ce_sum = torch.zeros(len(act), dtype=torch.float64, device=dev)
        cost_t = torch.tensor([cost[i] for i in act], dtype=dtype, device=dev)
        for s in range(steps_per_epoch):
            xb = batch(epoch * steps_per_epoch + s)
            bsz = len(xb)
            m = torch.tanh(w_mask[a_idx]) / 2 + 0.5                 # (A,1,H,W)
            p = torch.tanh(w_pat[a_idx]) / 2 + 0.5                  # (A,C,H,W)
            parts, width = [], chunk or len(act)                 # classes per forward (cache-sized on a CPU)
            for lo in range(0, len(act), width):
                mc, pc = m[lo:lo + width], p[lo:lo + width]
                xs = stamp(xb.unsqueeze(0), mc.unsqueeze(1), pc.unsqueeze(1)).reshape(len(mc) * bsz, c, h, w)
                with (torch.autocast(dev.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()):
                    parts.append(model(xs.contiguous(memory_format=mem)).float())
            logits = torch.cat(parts) if len(parts) > 1 else parts[0]
            tgt = targets[a_idx].repeat_interleave(bsz)
            ce = F.cross_entropy(logits, tgt, reduction="none").view(len(act), bsz).mean(1)
            reg = m.abs().sum((1, 2, 3))
            loss = (ce + cost_t * reg).sum()
            if dev.type == "cpu" and not torch.isfinite(loss):   # on a GPU: checked once per epoch
                raise UserError("Neural Cleanse loss became NaN/Inf; check the model and inputs")
            gm, gp = torch.autograd.grad(loss, (w_mask, w_pat))
            steps_done[a_idx] += 1
            t = steps_done[a_idx].to(dtype)
            with torch.no_grad():
                for name, param, grad in (("m", w_mask, gm), ("p", w_pat, gp)):
                    mom, vel = adam[name]
                    ga = grad[a_idx]
                    mom[a_idx] = b1 * mom[a_idx] + (1 - b1) * ga
                    vel[a_idx] = b2 * vel[a_idx] + (1 - b2) * ga * ga
                    shape = (-1,) + (1,) * (param.ndim - 1)
                    mhat = mom[a_idx] / (1 - b1 ** t).view(shape)
                    vhat = vel[a_idx] / (1 - b2 ** t).view(shape)
                    param[a_idx] = param[a_idx] - cfg.lr * mhat / (vhat.sqrt() + cfg.eps)
                acc_sum += (logits.argmax(1) == tgt).view(len(act), bsz).double().mean(1)
                reg_sum += reg.double()
                ce_sum += ce.double()
        if not torch.isfinite(reg_sum).all() or not torch.isfinite(ce_sum).all():
            raise UserError("Neural Cleanse loss became NaN/Inf; check the model and inputs")
        acc = (acc_sum / steps_per_epoch).tolist()
        regs = (reg_sum / steps_per_epoch).tolist()
        with torch.no_grad():
            cur_m = (torch.tanh(w_mask[a_idx]) / 2 + 0.5).cpu()
            cur_p = (torch.tanh(w_pat[a_idx]) / 2 + 0.5).cpu()
        for j, i in enumerate(act):
            epochs[i] = epoch + 1
            if acc[j] >= cfg.success and regs[j] < reg_best[i]:
                best_mask[i], best_pat[i] = cur_m[j], cur_p[j]
                reg_best[i] = regs[j]
                best_succ[i] = acc[j]
            if cfg.early_stop:
                if reg_best[i] < math.inf:
                    es_cnt[i] = es_cnt[i] + 1 if reg_best[i] >= cfg.early_stop_threshold * es_best[i] else 0
                es_best[i] = min(reg_best[i], es_best[i])
                if up_flag[i] and down_flag[i] and es_cnt[i] >= cfg.early_stop_patience:
                    active[i] = False
                    continue
            if cost[i] == 0 and acc[j] >= cfg.success:
                set_cnt[i] += 1
                if set_cnt[i] >= cfg.patience:
                    cost[i] = cfg.init_cost
                    up_cnt[i] = down_cnt[i] = 0
                    up_flag[i] = down_flag[i] = False
            else:
                set_cnt[i] = 0
            if acc[j] >= cfg.success:
                up_cnt[i] += 1
                down_cnt[i] = 0
            else:
                up_cnt[i] = 0
                down_cnt[i] += 1
            if up_cnt[i] >= cfg.patience:
                up_cnt[i] = 0
                cost[i] *= cfg.cost_up
                up_flag[i] = True
            elif down_cnt[i] >= cfg.patience:
                down_cnt[i] = 0
                cost[i] /= cfg.cost_down
                down_flag[i] = True
        per = {cls[i]: {"acc": acc[j], "l1": regs[j], "cost": cost[i]} for j, i in enumerate(act)}
        history.append({"epoch": epoch + 1, "active": len(act), "classes": per})
        if progress is not None:
            progress(epoch + 1, sum(active))
    found = torch.tensor([r < math.inf for r in reg_best])
    # Where no epoch reached the success target, keep the last mask and its norm.
    with torch.no_grad():
        last_m = (torch.tanh(w_mask) / 2 + 0.5).cpu()
        last_p = (torch.tanh(w_pat) / 2 + 0.5).cpu()
    l1 = torch.tensor(reg_best, dtype=torch.float32)
    for i in range(k):
        if not found[i]:
            best_mask[i], best_pat[i] = last_m[i], last_p[i]
            l1[i] = float(last_m[i].abs().sum())
    return {"masks": best_mask.float(), "patterns": best_pat.float(), "l1": l1, "success": best_succ,
            "found": found, "epochs": epochs, "history": history}
