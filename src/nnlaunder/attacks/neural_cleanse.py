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
the same function and gradients). `NCConfig.relu_after_pool` / `im2col_forward` switch the last two
off for measurement (benchmarks/perf/run.py; the speed-ups are in benchmarks/results/perf.md).

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
import contextvars
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import clock
from ..device import amp_supported, channels_last_runs, model_device
from ..errors import UserError
from ..external.models import check_model_fits
from ..speed.kernels import im2col_ok, with_input_grad_convs
from ..speed.native import conv_pool as native_conv_pool
from ..speed.plans import Plan, machine, model_signature, tuned_plan
from ..speed.rewrite import conv_pool_runs, fold_batchnorm, fuse_conv_pool, relu_after_pool, rewrite_for_speed


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
    tune: bool = False                   # time the plans (bf16 only where `amp` allows it and it is faster,
    #                                      memory format, input_grad, class_chunk) and take the fastest (speed/plans.py)
    confirm_best: bool = False           # the kept mask must reach `success` on all the images, not on one
    #                                      short epoch's minibatches: the newest best that does is kept
    input_grad: str = "matmul"           # few-channel convs' input gradient as one matmul + shifted adds
    #                                      ("native": the library's backward; same sums, another order)
    # Speed measures that leave the function computed unchanged (benchmarks/perf switches them off to
    # measure each): ReLU -> max-pool pairs run as max-pool -> ReLU; a one-channel first conv's forward
    # as im2col + one matmul on a CPU.
    relu_after_pool: bool = True
    im2col_forward: bool = True
    fold_bn: bool = False                # batch norm after a conv folded into it (speed/rewrite.fold_batchnorm;
    #                                      the same function, rounding aside)
    fused_conv_pool: bool = True         # on a CPU, a few-channel conv -> 2x2 max-pool (-> ReLU) as one native
    #                                      kernel where it builds (speed/native.py; the same function, rounding aside)

    def __post_init__(self) -> None:
        finite = all(math.isfinite(v) for v in (self.lr, self.success, self.init_cost)
                     if isinstance(v, int | float))
        if not (finite and self.lr > 0 and self.batch_size >= 1 and self.max_epochs >= 1 and self.patience >= 1
                and 0 < self.success <= 1 and self.init_cost > 0
                and (self.steps_per_epoch is None or self.steps_per_epoch >= 1)
                and (self.class_chunk is None or self.class_chunk >= 1)
                and (self.max_images is None or self.max_images >= 1) and self.mad_threshold > 0
                and self.input_grad in ("native", "matmul") and isinstance(self.amp, bool)
                and len(self.betas) == 2 and all(isinstance(b, int | float) and 0 <= b < 1 for b in self.betas)
                and self.batch_size <= MAX_NC_BATCH):
            raise UserError(f"invalid Neural Cleanse settings: {self}")


MAX_NC_BATCH = 65536       # images per Neural Cleanse step: more is a typo, not a setting


# Named settings. "faithful" is Wang et al.'s algorithm; "fast" is this project's departure
# (short schedule epochs, bf16, exact model rewrite), measured against it in benchmarks/perf.
NC_PRESETS: dict[str, dict] = {
    "faithful": {},
    # input_grad: bf16 channels-last convs keep the library's backward, which measured faster than the
    # matmul path (perf.md row nc_fast_batched_input_grad_native); fp32 contiguous gains from it
    # tune: bf16 / memory format / input_grad / chunk by timing on the machine at hand, never bf16 where
    # slower; confirm_best: a short epoch's 256 images can pass 99% where all the images do not
    "fast": {"steps_per_epoch": 8, "early_stop_patience": 10, "max_epochs": 100, "amp": True, "exact_rewrite": True,
             "input_grad": "native", "tune": True, "confirm_best": True, "fold_bn": True},
    # The fast preset without tuning or confirmation: bf16 wherever the hardware has it.
    "fast-bf16": {"steps_per_epoch": 8, "early_stop_patience": 10, "max_epochs": 100, "amp": True,
                  "exact_rewrite": True, "input_grad": "native"},
}


def nc_params(preset: str = "faithful", **overrides) -> dict:
    """The one place a Neural Cleanse preset is resolved: its settings with `overrides` on top."""
    if preset not in NC_PRESETS:
        raise UserError(f"unknown Neural Cleanse preset {preset!r}; choose from {', '.join(NC_PRESETS)}")
    return {**NC_PRESETS[preset], **overrides}


def nc_config(preset: str = "faithful", **overrides) -> NCConfig:
    return NCConfig(**nc_params(preset, **overrides))


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
    plan: dict = field(default_factory=dict)   # how it ran: precision, memory format, ... (speed.plans.Plan.record)
    phase_seconds: dict = field(default_factory=dict)  # seconds per phase: "plan", "optimise", "confirm"

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
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.max_images]
        x = x[torch.sort(pick).values]
    x = x.to(model_device(model))     # the optimisation runs where the model is; results come back on the CPU
    with _frozen(model):
        num_classes = check_model_fits(model, x, num_classes, "Neural Cleanse's images")
        cls = list(range(num_classes)) if classes is None else [int(c) for c in classes]
        if not cls or min(cls) < 0 or max(cls) >= num_classes:
            raise UserError(f"candidate classes must be in 0..{num_classes - 1}, got {cls}")
        t0 = clock.now()
        plan, timed = _plan(model, x, cfg, len(cls))
        t1 = clock.now()
        net = _net(model, cfg, plan, x[:8])
        factory = _KEEPING.get()
        keep = factory(model, x, cfg, cls) if factory is not None and not per_class else None
        resumed = 0.0
        if per_class:
            parts = [_optimise(net, x, cfg, [c], progress, plan) for c in cls]
            res = {k: torch.cat([p[k] for p in parts]) for k in parts[0]
                   if k not in ("history", "candidates", "resumed_seconds")}
            history = [h for p in parts for h in p["history"]]
            res["candidates"] = [c for p in parts for c in p.get("candidates", [[]])]
        else:
            res = _optimise(net, x, cfg, cls, progress, plan, keep)
            history = res.pop("history")
            resumed = res.pop("resumed_seconds")       # work done before a stop counts, as in an unbroken run
        t2 = clock.now()
        if cfg.confirm_best:
            _confirm(model, x, cfg, cls, res)
        phases = {"plan": t1 - t0, "optimise": t2 - t1 + resumed, "confirm": clock.now() - t2}
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
                    clock.now() - t0 + resumed, history, {**plan.record(), **timed}, phases)


def _default_chunk(dev: torch.device, batch_size: int) -> int | None:
    # Every class's loss depends only on its own mask, so chunking changes nothing but speed: on a
    # CPU, 10 x 32 stamped images per op fall out of cache and a batched pass runs slower than a
    # per-class loop; ~64 images per forward keeps it in cache.
    return max(1, 64 // batch_size) if dev.type == "cpu" else None


def _net(model: nn.Module, cfg: NCConfig, plan: Plan, probe: torch.Tensor) -> nn.Module:
    """The network the optimisation runs on; the caller's model stays as it is. ReLU -> max-pool
    pairs run as max-pool -> ReLU (the same function and gradients, 4x fewer ReLU values); with
    `fold_bn`, batch norms after convs are folded into them."""
    if plan.channels_last:
        net = rewrite_for_speed(model)      # a copy: swapped pairs, channels-last weights
    else:
        net = relu_after_pool(model) if (cfg.relu_after_pool or cfg.exact_rewrite) else model
    if cfg.fold_bn:
        net = fold_batchnorm(net, probe)
        if plan.channels_last:
            net = net.to(memory_format=torch.channels_last)
    if plan.fused_conv_pool:
        net = fuse_conv_pool(net)
    if plan.input_grad == "matmul":
        net = with_input_grad_convs(net, im2col_forward=plan.im2col_forward)
    return net


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """The model in eval mode with its parameters frozen; as it was afterwards."""
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(model.parameters(), req, strict=True):
            p.requires_grad_(r)
        model.train(was_training)


def plan_for(model: nn.Module, x: torch.Tensor, cfg: NCConfig, n_classes: int) -> Plan:
    """The plan `neural_cleanse(model, x, cfg)` will run with for `n_classes` candidate classes (with
    `tune`: timed now unless cached, so a caller can take the one-time cost outside a measurement)."""
    with _frozen(model):
        return _plan(model, x.to(model_device(model)), cfg, n_classes)[0]


def _plan(model: nn.Module, x: torch.Tensor, cfg: NCConfig, n_classes: int) -> tuple[Plan, dict]:
    """How this run computes: the configuration as it is, or (`tune`) the fastest plan on this machine."""
    dev = model_device(model)
    bf16_ok = cfg.amp and amp_supported(dev)
    # channels-last maps, which the im2col first conv and the native conv-pool kernel also hand on, only
    # where the model's forward takes them (a `.view` flatten does not)
    cl_ok = channels_last_runs(model, x[:2])
    fusable = (cl_ok and cfg.fused_conv_pool and dev.type == "cpu" and x.dtype == torch.float32
               and conv_pool_runs(model) > 0 and native_conv_pool() is not None)
    default = Plan(bf16_ok, cfg.exact_rewrite and cl_ok, cfg.input_grad,
                   cfg.class_chunk or _default_chunk(dev, cfg.batch_size), im2col_forward=cfg.im2col_forward and cl_ok,
                   fused_conv_pool=fusable)
    if not cfg.tune:
        return default, {}
    few = any(im2col_ok(m, 3) for m in model.modules())
    key = {**machine(dev), "model": model_signature(model), "image": list(x.shape[1:]), "batch": cfg.batch_size,
           "relu_after_pool": cfg.relu_after_pool, "im2col_forward": cfg.im2col_forward, "amp_allowed": bf16_ok,
           "fused_allowed": fusable, **({} if cl_ok else {"channels_last": False})}

    def seconds(plan: Plan, n: int) -> float:
        return _step_seconds(model, x, cfg, plan, n)

    one = cl_ok and any(im2col_ok(m, 1) for m in model.modules())
    plan, timed = tuned_plan(dataclasses.replace(default, tuned=True), key, seconds, n_classes, bf16_ok, few,
                             dev.type == "cpu", one, fusable, cl_ok)
    return plan, {"timing": timed}


def _step_seconds(model: nn.Module, x: torch.Tensor, cfg: NCConfig, plan: Plan, n: int, repeats: int = 3,
                  min_total: float = 0.1) -> float:
    """The fastest optimisation step for `n` classes under `plan`: after one warm-up, at least
    `repeats` steps and `min_total` seconds (at most 4x `repeats` steps)."""
    net = _net(model, cfg, plan, x[:8])
    w_mask, w_pat = _init_variables(list(range(n)), cfg.seed, tuple(x.shape[1:]), x.dtype, x.device)
    xb = x[:cfg.batch_size]
    a_idx = torch.arange(n, device=x.device)
    cost_t = torch.full((n,), cfg.init_cost, dtype=x.dtype, device=x.device)
    best, spent, i = math.inf, 0.0, -1        # two warm-up steps: first-use kernel setup is slow
    while i <= repeats or (spent < min_total and i <= 4 * repeats):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        t0 = clock.now()
        _step_grads(net, xb, w_mask, w_pat, a_idx, a_idx, cost_t, plan)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        if i > 0:
            best = min(best, clock.now() - t0)
            spent += clock.now() - t0
        i += 1
    return best


@torch.no_grad()
def _confirm(model: nn.Module, x: torch.Tensor, cfg: NCConfig, cls: list[int], res: dict) -> None:
    """Keep, per class, the newest best mask (of those looked at) whose trigger sends at least
    `success` of all the images to the class (the model itself, in its own precision); where none
    does, the one that sends the most, and the class counts as not found. `success` then holds
    that share. A candidate is dropped as soon as its misses exceed what `success` allows, so a
    failing one costs a part of a pass; where none passes, each one's count goes on from where it
    stopped, to the end."""
    cl = x.device.type == "cpu" and channels_last_runs(model, x[:2])
    net = _net(model, cfg, Plan(False, cl, "native", None), x[:8])   # fp32, forward only
    mem = torch.channels_last if cl else torch.contiguous_format
    allowed = len(x) - math.ceil(cfg.success * len(x) - 1e-9)      # most misses a passing trigger may have
    for i, c in enumerate(cls):
        cands = res["candidates"][i]
        if not cands:
            continue
        # newest first, one by one, then at doubling distances: a few forward passes, not one per improvement
        look = sorted({j for j in (0, 1, 2, 3, *(2 ** e + 1 for e in range(2, 16))) if j < len(cands)})
        tried = [cands[-1 - j] for j in look]
        counts, chosen = [], None
        for m, p, reg in tried:
            hits, seen = _hits(net, x, m, p, c, mem, allowed)
            counts.append((hits, seen))
            if seen == len(x) and len(x) - hits <= allowed:          # counted to the end: it passes
                chosen = (m, p, reg, hits / len(x))
                break
        if chosen is None:               # none passes: the one that sends the most (the newest of equals),
            rates = [_hits(net, x, m, p, c, mem, None, *hs)[0] / len(x)     # each counted on from where it stopped
                     for (m, p, _), hs in zip(tried, counts, strict=True)]
            k = max(range(len(tried)), key=lambda j: (rates[j], -j))
            chosen = (*tried[k], rates[k])
        m, p, reg, rate = chosen
        res["masks"][i], res["patterns"][i], res["l1"][i], res["success"][i] = m, p, reg, rate
        res["found"][i] = rate >= cfg.success
    del res["candidates"]


CONFIRM_CHUNK = 250      # images per forward pass of the mask confirmation


def _hits(net: nn.Module, x: torch.Tensor, m: torch.Tensor, p: torch.Tensor, c: int, mem: torch.memory_format,
          allowed: int | None, hits: int = 0, start: int = 0) -> tuple[int, int]:
    """(hits, images seen): how many of the images from `start` on (with `hits` of those before it)
    the stamped trigger sends to class c, counting on until the end or until more than `allowed`
    have missed (None: to the end)."""
    m, p = m.to(x.device), p.to(x.device)
    for i in range(start, len(x), CONFIRM_CHUNK):
        xb = x[i:i + CONFIRM_CHUNK]
        hits += int((net(stamp(xb, m, p).contiguous(memory_format=mem)).argmax(1) == c).sum())
        if allowed is not None and (i + len(xb)) - hits > allowed:
            return hits, i + len(xb)
    return hits, len(x)


# Seeds: a class's initial mask and pattern come from (seed * INIT_SEED_STRIDE + class), the image
# order of pass p over the images from (seed * PASS_SEED_STRIDE + p); batched and looped runs agree.
INIT_SEED_STRIDE = 10007
PASS_SEED_STRIDE = 1_000_003


def _squash(w: torch.Tensor) -> torch.Tensor:
    """Unconstrained variable -> value in [0, 1] (Wang et al.'s tanh parametrisation)."""
    return torch.tanh(w) / 2 + 0.5


def _init_variables(cls: list[int], seed: int, chw: tuple[int, int, int], dtype: torch.dtype,
                    dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class random initial mask (K,1,H,W) and pattern (K,C,H,W) variables, seeded by (seed, class)."""
    c, h, w = chw
    w_mask = torch.empty(len(cls), 1, h, w, dtype=dtype)
    w_pat = torch.empty(len(cls), c, h, w, dtype=dtype)
    for i, cl in enumerate(cls):
        g = torch.Generator().manual_seed(seed * INIT_SEED_STRIDE + cl)
        w_mask[i] = _atanh_init(torch.rand(1, h, w, generator=g, dtype=dtype))
        w_pat[i] = _atanh_init(torch.rand(c, h, w, generator=g, dtype=dtype))
    return w_mask.to(dev).requires_grad_(True), w_pat.to(dev).requires_grad_(True)


@dataclass(frozen=True)
class NCKeep:
    """Where a long Neural Cleanse keeps its optimisation state, so that a run stopped part-way continues at
    the epoch it reached and ends as an unbroken run would: `load()` gives the state last saved (None:
    none), `save(state)` keeps one (the caller does the I/O; a state is {"tensors": ..., "meta": ...})."""
    load: Callable[[], dict | None]
    save: Callable[[dict], None]
    every: float = 60.0                 # seconds of work between saves
    resumed: Callable[[float], None] | None = None   # told the seconds of work a state it gave back held, when used


# Who supplies an NCKeep to each Neural Cleanse run inside a `keeping(...)` block (the experiment runner:
# one per cell and run), called as factory(model, images, cfg, classes) -> NCKeep | None.
_KEEPING: contextvars.ContextVar[Callable[..., NCKeep | None] | None] = contextvars.ContextVar("nc_keeping",
                                                                                             default=None)


@contextlib.contextmanager
def keeping(factory: Callable[..., NCKeep | None]) -> Iterator[None]:
    """Every Neural Cleanse run in the block (an attack's own, however deep) keeps its state where
    `factory(model, images, cfg, classes)` says; the batched run only (per_class is a speed reference)."""
    token = _KEEPING.set(factory)
    try:
        yield
    finally:
        _KEEPING.reset(token)


def keeping_active() -> bool:
    """Whether a `keeping(...)` block is open around this call."""
    return _KEEPING.get() is not None


_KEPT = ("w_mask", "w_pat", "best_mask", "best_pat", "best_succ", "epochs")


def _tensors(state: tuple) -> dict[str, torch.Tensor]:
    """The run's tensors a kept state holds, by name (the run's own objects)."""
    w_mask, w_pat, opt, _, _, best_mask, best_pat, best_succ, epochs, _, _ = state
    t = dict(zip(_KEPT, (w_mask, w_pat, best_mask, best_pat, best_succ, epochs), strict=True))
    t.update({"m_mask": opt.moments[0][0], "v_mask": opt.moments[0][1], "m_pat": opt.moments[1][0],
              "v_pat": opt.moments[1][1], "adam_steps": opt.steps})
    return t


def _pack(next_epoch: int, state: tuple, how: dict, seconds: float) -> dict:
    _, _, _, sched, active, _, _, _, _, history, cands = state
    t = _tensors(state)
    for i, cs in enumerate(cands):
        if cs:
            t[f"cand_mask{i}"], t[f"cand_pat{i}"] = torch.stack([c[0] for c in cs]), torch.stack([c[1] for c in cs])
            t[f"cand_reg{i}"] = torch.tensor([c[2] for c in cs], dtype=torch.float64)
    meta = {"next_epoch": next_epoch, "sched": [dataclasses.asdict(sc) for sc in sched], "active": list(active),
            "history": history, "plan": how, "seconds": seconds}
    return {"tensors": {k: v.detach().cpu().contiguous() for k, v in t.items()}, "meta": meta}


def _unpack(kept: dict | None, state: tuple, how: dict) -> tuple[int, float]:
    """Put a kept state back in place (tensors copied into the run's own): (the epoch to continue from, the
    seconds of work it holds); (0, 0.0) where none was kept, or one of another plan or shape."""
    _, _, _, sched, active, _, _, _, _, history, cands = state
    dsts = _tensors(state)
    if kept is None or kept["meta"].get("plan") != how or len(kept["meta"].get("sched", ())) != len(sched) or \
            any(k not in kept["tensors"] or kept["tensors"][k].shape != d.shape for k, d in dsts.items()):
        return 0, 0.0
    t, meta = kept["tensors"], kept["meta"]
    with torch.no_grad():
        for name, dst in dsts.items():
            dst.copy_(t[name])
    for i, d in enumerate(meta["sched"]):
        sched[i] = _Lambda(**d)
    active[:] = meta["active"]
    history[:] = [{**h, "classes": {int(c): v for c, v in h["classes"].items()}} for h in meta["history"]]
    for i in range(len(cands)):
        if f"cand_reg{i}" in t:
            cands[i] = [(m, p, float(r)) for m, p, r in zip(t[f"cand_mask{i}"], t[f"cand_pat{i}"],
                                                            t[f"cand_reg{i}"].tolist(), strict=True)]
    return int(meta["next_epoch"]), float(meta.get("seconds", 0.0))


# λ stops growing here. Wang et al. double it without bound; for a class the model gives any input (an
# empty mask succeeds) that overflows float32 and turns the loss NaN. Far above any λ a mask survives:
# 1e-3 doubled 43 times without one failing period.
COST_MAX = 1e10


@dataclass
class _Lambda:
    """One class's λ (cost) schedule and early stop, as Wang et al.'s visualizer runs them."""
    cost: float = 0.0
    set_cnt: int = 0
    up_cnt: int = 0
    down_cnt: int = 0
    up_flag: bool = False
    down_flag: bool = False
    reg_best: float = math.inf          # smallest mask norm among epochs that reached the success target
    es_best: float = math.inf
    es_cnt: int = 0

    def stops(self, cfg: NCConfig) -> bool:
        """Early stop: the best norm has not improved by the threshold for `patience` epochs, after
        λ went both up and down."""
        if self.reg_best < math.inf:
            self.es_cnt = self.es_cnt + 1 if self.reg_best >= cfg.early_stop_threshold * self.es_best else 0
        self.es_best = min(self.reg_best, self.es_best)
        return self.up_flag and self.down_flag and self.es_cnt >= cfg.early_stop_patience

    def update(self, success: bool, cfg: NCConfig) -> None:
        """λ starts at 0 until the target is reached for `patience` epochs, then goes up while it is
        reached and down while it is not."""
        if self.cost == 0 and success:
            self.set_cnt += 1
            if self.set_cnt >= cfg.patience:
                self.cost = cfg.init_cost
                self.up_cnt = self.down_cnt = 0
                self.up_flag = self.down_flag = False
        else:
            self.set_cnt = 0
        if success:
            self.up_cnt += 1
            self.down_cnt = 0
        else:
            self.up_cnt = 0
            self.down_cnt += 1
        if self.up_cnt >= cfg.patience:
            self.up_cnt = 0
            self.cost = min(self.cost * cfg.cost_up, COST_MAX)
            self.up_flag = True
        elif self.down_cnt >= cfg.patience:
            self.down_cnt = 0
            self.cost /= cfg.cost_down
            self.down_flag = True


class _Adam:
    """Adam over the mask and pattern variables, one step count per class (a class stopped early
    keeps its moments and count)."""

    def __init__(self, w_mask: torch.Tensor, w_pat: torch.Tensor, cfg: NCConfig) -> None:
        self.params = (w_mask, w_pat)
        self.moments = [(torch.zeros_like(t), torch.zeros_like(t)) for t in self.params]
        self.steps = torch.zeros(len(w_mask), dtype=torch.long, device=w_mask.device)
        self.cfg = cfg

    @torch.no_grad()
    def step(self, grads: tuple[torch.Tensor, torch.Tensor], a_idx: torch.Tensor) -> None:
        """`grads`: the gradients of the active classes `a_idx` only, in that order."""
        b1, b2 = self.cfg.betas
        idx = slice(None) if len(a_idx) == len(self.steps) else a_idx    # all active: views, no gather
        self.steps[idx] += 1
        t = self.steps[idx].to(self.params[0].dtype)
        for param, ga, (mom, vel) in zip(self.params, grads, self.moments, strict=True):
            mom[idx] = b1 * mom[idx] + (1 - b1) * ga
            vel[idx] = b2 * vel[idx] + (1 - b2) * ga * ga
            shape = (-1,) + (1,) * (param.ndim - 1)
            mhat = mom[idx] / (1 - b1 ** t).view(shape)
            vhat = vel[idx] / (1 - b2 ** t).view(shape)
            param[idx] = param[idx] - self.cfg.lr * mhat / (vhat.sqrt() + self.cfg.eps)


class _Batches:
    """Minibatch `global_step` of the images: pass p over them uses its own seeded permutation."""

    def __init__(self, x: torch.Tensor, cfg: NCConfig) -> None:
        self.x, self.cfg = x, cfg
        self.steps_full = math.ceil(len(x) / cfg.batch_size)     # minibatches in one pass
        self.perms: dict[int, torch.Tensor] = {}

    def __call__(self, global_step: int) -> torch.Tensor:
        p_no, s_no = divmod(global_step, self.steps_full)
        if p_no not in self.perms:
            self.perms.clear()
            g = torch.Generator().manual_seed(self.cfg.seed * PASS_SEED_STRIDE + p_no)
            self.perms[p_no] = torch.randperm(len(self.x), generator=g).to(self.x.device)
        bs = self.cfg.batch_size
        return self.x[self.perms[p_no][s_no * bs:(s_no + 1) * bs]]


def _stamped_logits(model: nn.Module, xb: torch.Tensor, m: torch.Tensor, p: torch.Tensor, use_amp: bool,
                    mem: torch.memory_format) -> torch.Tensor:
    """Logits (fp32) of every minibatch image stamped with every given class's trigger, class-major
    (A*B rows), in one forward pass."""
    bsz, (c, h, w) = len(xb), xb.shape[1:]
    xs = stamp(xb.unsqueeze(0), m.unsqueeze(1), p.unsqueeze(1)).reshape(len(m) * bsz, c, h, w)
    with (torch.autocast(xb.device.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()):
        return model(xs.contiguous(memory_format=mem)).float()


def _chunks(n: int, width: int) -> list[tuple[int, int]]:
    """[lo, hi) bounds of n classes in as few chunks of at most `width` as possible, of near-equal
    sizes (10 classes by 4: 3, 4, 3; not 4, 4, 2, whose small last chunk runs at a lower rate)."""
    k = -(-n // width)
    cuts = [round(i * n / k) for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _step_grads(model: nn.Module, xb: torch.Tensor, w_mask: torch.Tensor, w_pat: torch.Tensor, a_idx: torch.Tensor,
                targets: torch.Tensor, cost_t: torch.Tensor, plan: Plan
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step's gradients for the active classes `a_idx`, `plan.class_chunk` classes
    per forward and backward pass. Every class's loss (mean CE of its stamped minibatch + its cost
    times its mask's L1) depends on its own mask and pattern only, so each chunk's gradient is its
    own backward pass, run while the chunk's activations are still in cache. Returns the gradients
    of the active masks and patterns, and per active class: CE, mask L1, share classified as target."""
    bsz, n = len(xb), len(a_idx)
    mem = torch.channels_last if plan.channels_last else torch.contiguous_format
    g_mask, g_pat = torch.empty_like(w_mask[a_idx]), torch.empty_like(w_pat[a_idx])
    ce_all, reg_all, acc_all = (torch.empty(n, dtype=w_mask.dtype, device=w_mask.device) for _ in range(3))
    for lo, hi in _chunks(n, plan.class_chunk or n):
        idx = a_idx[lo:hi]
        wm, wp = w_mask[idx].detach().requires_grad_(True), w_pat[idx].detach().requires_grad_(True)
        m, p = _squash(wm), _squash(wp)                                  # (a,1,H,W), (a,C,H,W)
        logits = _stamped_logits(model, xb, m, p, plan.amp, mem)
        tgt = targets[idx].repeat_interleave(bsz)
        ce = F.cross_entropy(logits, tgt, reduction="none").view(len(idx), bsz).mean(1)
        reg = m.abs().sum((1, 2, 3))
        loss = (ce + cost_t[lo:hi] * reg).sum()
        if xb.device.type == "cpu" and not torch.isfinite(loss):   # on a GPU: checked once per epoch
            raise UserError("Neural Cleanse loss became NaN/Inf; check the model and inputs")
        g_mask[lo:hi], g_pat[lo:hi] = torch.autograd.grad(loss, (wm, wp))
        with torch.no_grad():
            ce_all[lo:hi], reg_all[lo:hi] = ce, reg
            acc_all[lo:hi] = (logits.argmax(1) == tgt).view(len(idx), bsz).to(w_mask.dtype).mean(1)
    return g_mask, g_pat, ce_all, reg_all, acc_all


def _epoch(model: nn.Module, batches: _Batches, w_mask: torch.Tensor, w_pat: torch.Tensor, opt: _Adam,
           targets: torch.Tensor, act: list[int], costs: list[float], epoch: int, steps: int, cfg: NCConfig,
           plan: Plan) -> tuple[list[float], list[float]]:
    """One epoch of `steps` minibatches for the active classes; returns their mean attack success
    and mask norm."""
    dev = w_mask.device
    a_idx = torch.tensor(act, device=dev)
    acc_sum, reg_sum, ce_sum = (torch.zeros(len(act), dtype=torch.float64, device=dev) for _ in range(3))
    cost_t = torch.tensor(costs, dtype=w_mask.dtype, device=dev)
    for s in range(steps):
        g_mask, g_pat, ce, reg, acc = _step_grads(model, batches(epoch * steps + s), w_mask, w_pat, a_idx, targets,
                                                  cost_t, plan)
        opt.step((g_mask, g_pat), a_idx)
        acc_sum += acc.double()
        reg_sum += reg.double()
        ce_sum += ce.double()
    if not torch.isfinite(reg_sum).all() or not torch.isfinite(ce_sum).all():
        raise UserError("Neural Cleanse loss became NaN/Inf; check the model and inputs")
    return (acc_sum / steps).tolist(), (reg_sum / steps).tolist()


def _optimise(model: nn.Module, x: torch.Tensor, cfg: NCConfig, cls: list[int],
              progress: Callable[[int, int], None] | None, plan: Plan, keep: NCKeep | None = None) -> dict:
    """Reverse-engineer a trigger (mask, pattern) for each class in `cls` at once; with `keep`, from the
    state it kept, keeping it again every `keep.every` seconds."""
    k = len(cls)
    w_mask, w_pat = _init_variables(cls, cfg.seed, tuple(x.shape[1:]), x.dtype, x.device)
    opt = _Adam(w_mask, w_pat, cfg)
    targets = torch.tensor(cls, device=x.device)
    sched = [_Lambda() for _ in range(k)]
    active = [True] * k
    best_mask, best_pat = _squash(w_mask.detach()).cpu(), _squash(w_pat.detach()).cpu()
    best_succ = torch.zeros(k, dtype=torch.float32)
    epochs = torch.zeros(k, dtype=torch.long)
    history: list[dict] = []
    cands: list[list[tuple]] = [[] for _ in range(k)]     # every successive best (confirm_best)
    batches = _Batches(x, cfg)
    steps = cfg.steps_per_epoch or batches.steps_full
    state = (w_mask, w_pat, opt, sched, active, best_mask, best_pat, best_succ, epochs, history, cands)
    how = json.loads(json.dumps(plan.record(), default=str))      # a state kept under another plan is not used
    start, before = _unpack(keep.load(), state, how) if keep is not None else (0, 0.0)
    if start and keep is not None and keep.resumed is not None:
        keep.resumed(before)
    began = saved = clock.now()
    for epoch in range(start, cfg.max_epochs):
        act = [i for i in range(k) if active[i]]
        if not act:
            break
        acc, regs = _epoch(model, batches, w_mask, w_pat, opt, targets, act, [sched[i].cost for i in act], epoch,
                           steps, cfg, plan)
        a_idx = torch.tensor(act, device=x.device)
        with torch.no_grad():
            cur_m, cur_p = _squash(w_mask[a_idx]).cpu(), _squash(w_pat[a_idx]).cpu()
        for j, i in enumerate(act):
            epochs[i] = epoch + 1
            if acc[j] >= cfg.success and regs[j] < sched[i].reg_best:
                best_mask[i], best_pat[i] = cur_m[j], cur_p[j]
                if cfg.confirm_best:
                    cands[i].append((cur_m[j].clone(), cur_p[j].clone(), regs[j]))
                sched[i].reg_best = regs[j]
                best_succ[i] = acc[j]
            if cfg.early_stop and sched[i].stops(cfg):
                active[i] = False
                continue
            sched[i].update(acc[j] >= cfg.success, cfg)
        per = {cls[i]: {"acc": acc[j], "l1": regs[j], "cost": sched[i].cost} for j, i in enumerate(act)}
        history.append({"epoch": epoch + 1, "active": len(act), "classes": per})
        if progress is not None:
            progress(epoch + 1, sum(active))
        if keep is not None and clock.now() - saved >= keep.every:
            keep.save(_pack(epoch + 1, state, how, before + clock.now() - began))
            saved = clock.now()
    reg_best = [sc.reg_best for sc in sched]
    found = torch.tensor([r < math.inf for r in reg_best])
    # Where no epoch reached the success target, keep the last mask and its norm.
    with torch.no_grad():
        last_m, last_p = _squash(w_mask).cpu(), _squash(w_pat).cpu()
    l1 = torch.tensor(reg_best, dtype=torch.float32)
    for i in range(k):
        if not found[i]:
            best_mask[i], best_pat[i] = last_m[i], last_p[i]
            l1[i] = float(last_m[i].abs().sum())
    out = {"masks": best_mask.float(), "patterns": best_pat.float(), "l1": l1, "success": best_succ,
           "found": found, "epochs": epochs, "history": history, "resumed_seconds": before}
    if cfg.confirm_best:
        out["candidates"] = cands
    return out

