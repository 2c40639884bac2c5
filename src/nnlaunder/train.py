"""One training loop for everyone: owners embedding watermarks, attackers retraining, restorers.

- Data are in-memory tensors; batches are index slices, augmentation is batched tensor code.
- Seeded: shuffling and augmentation use a generator seeded from (seed, epoch), dropout the
  global RNG reseeded per epoch, so a resumed run draws the same numbers as an unbroken one.
- The learning rate is a pure function of the global step (`lr_at`), so no scheduler state.
- `masks` keep chosen weights at zero (laundering's reset neurons): gradients and weights are
  multiplied by the mask after every step.
- `append` adds k extra examples to every batch (Adi et al.'s from-scratch embedding).
- `callbacks` run after every epoch and may add metrics or ask to stop ({"stop": True}).
- With `checkpoint_dir`, the last epoch's model + optimizer state is written (safetensors +
  JSON) after every epoch; `resume=True` continues from it.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import clock
from .device import amp_supported, channels_last_runs, model_device
from .errors import UserError
from .speed.rewrite import relu_after_pool

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "onecycle", "step")
AUGMENTS = ("none", "crop-flip")


MAX_EPOCHS = 10_000      # more is a typo: at seconds per epoch it would run for months


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/Inf; nothing is written."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    l2: float = 0.0               # Keras-style kernel L2 coefficient: loss += l2 * sum(w**2)
    schedule: str = "constant"
    step_epochs: int = 20         # "step": lr × 0.1 every step_epochs
    warmup: float = 0.25          # "onecycle": fraction of steps rising to lr
    label_smoothing: float = 0.0
    augment: str = "none"
    seed: int = 0
    # Speed measures that leave the function computed unchanged (channels-last can change the
    # rounding: other kernels); benchmarks/perf switches them off to measure each. Not part of a
    # model's identity (`identity()`).
    channels_last: bool = True
    relu_after_pool: bool = True
    # bfloat16 autocast in the forward pass where the hardware runs it natively (`device.amp_supported`:
    # a CPU with AMX or AVX512-BF16, a GPU with bf16), weights and optimiser in fp32. Faster (perf.md's
    # train_*_amp rows), but it rounds differently, so it is part of what is trained; off by default.
    amp: bool = False

    def identity(self) -> dict[str, Any]:
        """The settings that decide what is trained (the speed measures left out): what names a
        trained model in the experiment workspace. `amp` counts only when on, so every identity from
        before it existed stays the same."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("channels_last", "relu_after_pool") and not (k == "amp" and not v)}

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.epochs <= MAX_EPOCHS, f"epochs must be in [0, {MAX_EPOCHS}], got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.l2 >= 0, f"l2 must be >= 0, got {self.l2}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (0 < self.warmup < 1, f"warmup must be in (0, 1), got {self.warmup}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.augment in AUGMENTS, f"augment must be one of {AUGMENTS}, got {self.augment!r}"),
            (self.step_epochs >= 1, f"step_epochs must be >= 1, got {self.step_epochs}"),
            (isinstance(self.amp, bool), f"amp must be true or false, got {self.amp!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    epochs_run: int = 0
    stopped_early: bool = False


Callback = Callable[[int, nn.Module], "dict[str, Any] | None"]


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate at global step `step` of `total` (pure, so resuming needs no state)."""
    t = step / max(total, 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        steps_per_epoch = total / max(cfg.epochs, 1)
        return cfg.lr * 0.1 ** int(step / steps_per_epoch // cfg.step_epochs)
    # onecycle: linear warm-up from lr/25 to lr, then cosine down to lr/1e4
    if t < cfg.warmup:
        return cfg.lr * (0.04 + 0.96 * t / cfg.warmup)
    u = (t - cfg.warmup) / (1 - cfg.warmup)
    return cfg.lr * (1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * u)))


def crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Batched random crop (zero padding `pad`) and horizontal flip; x (N,C,H,W)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))            # (N,H)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))            # (N,W)
    flip = torch.rand(n, generator=g) < 0.5
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    dev = x.device                                                  # draws on the CPU: same on any device
    idx_n = torch.arange(n, device=dev).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.to(dev).view(n, h, 1), cols.to(dev).view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def eval_batch(dev: torch.device) -> int:
    """Images per forward pass when only predicting: on a CPU a small batch keeps each layer's
    activations in cache (perf.md, eval_batch rows); elsewhere a large one fills the device."""
    return 128 if dev.type == "cpu" else 1000


def predict_checked(model: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> tuple[torch.Tensor, int]:
    """(predicted labels (N,), number of inputs whose outputs hold NaN or Inf), in eval mode, on the
    CPU. An input with a non-finite output has no prediction: its label is -1, never a class
    (argmax over NaN would name class 0). `batch_size` None: `eval_batch` for the model's device."""
    was = model.training
    model.eval()
    dev = model_device(model)
    batch_size = batch_size or eval_batch(dev)
    preds, bad = [], 0
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                out = model(x[i:i + batch_size].to(dev))
                if not isinstance(out, torch.Tensor) or out.ndim != 2:
                    raise UserError(f"the model's output is {type(out).__name__} "
                                    f"{tuple(getattr(out, 'shape', ()))}, not (batch, classes) logits")
                if out.is_complex():
                    raise UserError("the model's outputs are complex numbers, not logits")
                ok = torch.isfinite(out).all(1)
                p = out.argmax(1)
                p[~ok] = -1
                bad += int((~ok).sum())
                preds.append(p.cpu())
    finally:
        model.train(was)
    return (torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)), bad


def predict(model: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Predicted labels (N,) in eval mode, on the CPU (x may live anywhere); -1 where the
    model's output is NaN or Inf, so such an input never counts as a hit."""
    return predict_checked(model, x, batch_size)[0]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> float:
    """Accuracy in percent (0-100); an input with a non-finite output counts as wrong."""
    if len(x) == 0:
        raise UserError("cannot measure accuracy on an empty set")
    return 100.0 * (predict(model, x, batch_size) == y.cpu()).float().mean().item()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Kernel L2 (Keras-style, on conv/dense weights only) as coupled weight decay 2·l2."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": 2 * cfg.l2}, {"params": other, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(groups, lr=cfg.lr)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
    if not masks:
        return
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name, m in masks.items():
            params[name].mul_(m)


# --------------------------------------------------------------------------------------------
# Resumable state (model + optimizer + history) as safetensors + JSON
def _save_state(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int,
                history: list[dict[str, float]], cfg: TrainConfig) -> None:
    from .checkpoint import atomic_save_tensors, atomic_write_json

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    scalars: dict[str, Any] = {}
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    atomic_save_tensors(folder / "last.safetensors", tensors)
    atomic_write_json(folder / "last.json", {"epoch": epoch, "history": history, "config": asdict(cfg),
                                             "opt_scalars": scalars})


def _load_state(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig
                ) -> tuple[int, list[dict[str, float]]]:
    from .checkpoint import load_into, load_state

    meta_path = folder / "last.json"
    if not meta_path.is_file():
        return 0, []
    meta = json.loads(meta_path.read_text())
    if meta.get("config") != asdict(cfg):
        raise UserError(f"{folder}: the checkpoint was made with another training config; "
                        "resume with the same settings or use a new output folder")
    tensors = load_state(folder / "last.safetensors")
    load_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, str(folder))
    osd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for k, v in meta.get("opt_scalars", {}).items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    osd["state"] = state
    opt.load_state_dict(osd)
    return int(meta["epoch"]), list(meta["history"])


# --------------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    append: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | str = True,
    freeze_bn: bool = False,
    interleave: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    fixed_tail: int = 0,
) -> TrainResult:
    """Train `model` in place on (x, y); x (N,C,H,W) float in [0,1], y (N,) int64.

    eval_sets: name -> (x, y); after every epoch "<name>_acc" (percent) joins the history.
    freeze_bn: keep batch-norm layers in eval mode (running statistics frozen) while training.
    interleave: (x2, y2, every): after every `every`-th batch, one extra step on a batch of (x2, y2)
    (Ngo et al.'s "mixed" fine-tuning).
    fixed_tail: the last `fixed_tail` examples of x are never augmented (watermark triggers: a
    mirrored or shifted trigger is a different trigger). The random draws are unchanged.
    Returns the per-epoch history (loss, lr, seconds, eval accuracies, callback metrics).
    """
    _check_inputs(x, y, fixed_tail, append)
    # Data follow the model: moved once, so batches are slices of device tensors.
    dev = model_device(model)
    if cfg.amp and not amp_supported(dev):
        warnings.warn(f"amp: this {dev.type} has no native bfloat16; training in fp32", stacklevel=2)
    x, y = x.to(dev), y.to(dev)
    append, interleave = _moved(append, dev), _moved(interleave, dev)
    masks = {k: v.to(dev) for k, v in masks.items()} if masks else masks
    opt = make_optimizer(model, cfg)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, history = (0, [])
    if folder is not None and resume:
        start, history = _load_state(folder, model, opt, cfg)
    apply_masks(model, masks)
    fmt = _memory_format(model, x, cfg)
    model.to(memory_format=fmt)
    # same function and parameters, fewer ReLU values
    net = relu_after_pool(model) if cfg.relu_after_pool else model
    run = _Run(model, net, opt, cfg, x, y, fmt, masks, append, interleave, fixed_tail, freeze_bn)
    result = TrainResult(history=history, epochs_run=start)
    t_all = clock.now()
    desc = progress if isinstance(progress, str) else "train"
    for epoch in range(start, cfg.epochs):
        t0 = clock.now()
        bar = tqdm(range(run.steps), desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not progress, mininterval=1.0)
        loss = run.epoch(epoch, bar)
        bar.close()
        row: dict[str, Any] = {"epoch": epoch + 1, "loss": loss, "lr": opt.param_groups[0]["lr"],
                               "seconds": clock.now() - t0}
        stop = _after_epoch(model, epoch + 1, row, eval_sets, callbacks)
        history.append(row)
        result.epochs_run = epoch + 1
        if folder is not None:
            _save_state(folder, model, opt, epoch + 1, history, cfg)
        if progress:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
            tqdm.write(f"[{desc}] epoch {epoch + 1}/{cfg.epochs}: {shown}")
        if stop:
            result.stopped_early = True
            break
    model.eval()
    result.seconds = clock.now() - t_all
    return result


def n_batches(n: int, size: int) -> int:
    """How many batches of `size` `n` images make when a lone last image joins the batch before it (batch norm
    cannot train on one image: 65 images in batches of 32 make 32 and 33)."""
    return n // size + (n % size > 1) if n > 1 else n


def batch_of(order: torch.Tensor, i: int, size: int, count: int) -> torch.Tensor:
    """Batch `i` of the `count` (`n_batches`) that `order` makes: the last one takes what is left."""
    return order[i * size:(i + 1) * size] if i < count - 1 else order[i * size:]


def batches(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    """`order` in batches of `size`, a lone last image in the batch before it (`n_batches`)."""
    count = n_batches(len(order), size)
    return [batch_of(order, i, size, count) for i in range(count)]


def _memory_format(model: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> torch.memory_format:
    """channels_last pays for these convnets on a CPU (measured in docs/recipes.md), where the model's
    forward allows it (`device.channels_last_runs`)."""
    convnet = x.ndim == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())
    ok = cfg.channels_last and convnet and channels_last_runs(model, x[:2])
    return torch.channels_last if ok else torch.contiguous_format


def _after_epoch(model: nn.Module, epoch: int, row: dict[str, Any],
                 eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, callbacks: Sequence[Callback]) -> bool:
    """The epoch's accuracies on `eval_sets` and what the callbacks add, into `row`; True where a
    callback asks to stop."""
    for name, (ex, ey) in (eval_sets or {}).items():
        row[f"{name}_acc"] = accuracy(model, ex, ey)
    stop = False
    for cb in callbacks:
        extra = cb(epoch, model) or {}
        stop = stop or bool(extra.pop("stop", False))
        row.update(extra)
    return stop


def _check_inputs(x: torch.Tensor, y: torch.Tensor, fixed_tail: int,
                  append: tuple[torch.Tensor, torch.Tensor, int] | None) -> None:
    if len(x) == 0 or len(x) != len(y):
        raise UserError(f"training set is empty or mismatched (x {len(x)}, y {len(y)})")
    if not 0 <= fixed_tail <= len(x):
        raise UserError(f"fixed_tail must be in [0, {len(x)}], got {fixed_tail}")
    if append is not None and (len(append[0]) == 0 or append[2] < 1):
        raise UserError("append needs at least one example and k >= 1")


def _moved(extra: tuple[torch.Tensor, torch.Tensor, int] | None, dev: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    return None if extra is None else (extra[0].to(dev), extra[1].to(dev), extra[2])


# Epoch e's image order (and augmentation draws) come from the seed cfg.seed * EPOCH_SEED_STRIDE + e.
EPOCH_SEED_STRIDE = 1_000_003


@dataclass
class _Run:
    """One training run's fixed parts; `epoch` runs one pass over the data."""
    model: nn.Module
    net: nn.Module                     # the model as trained (ReLU/pool reordered: same function)
    opt: torch.optim.Optimizer
    cfg: TrainConfig
    x: torch.Tensor
    y: torch.Tensor
    fmt: torch.memory_format
    masks: dict[str, torch.Tensor] | None
    append: tuple[torch.Tensor, torch.Tensor, int] | None
    interleave: tuple[torch.Tensor, torch.Tensor, int] | None
    fixed_tail: int
    freeze_bn: bool

    @property
    def steps(self) -> int:
        return n_batches(len(self.x), self.cfg.batch_size)

    def _orders(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This epoch's image order, and the orders of the appended and interleaved sets."""
        dev, steps, cfg = self.x.device, self.steps, self.cfg
        perm = torch.randperm(len(self.x), generator=g).to(dev)
        aperm = iperm = None
        if self.append is not None:
            ax, _, k = self.append
            aperm = torch.randperm(len(ax), generator=g).repeat(math.ceil(steps * k / len(ax)) + 1).to(dev)
        if self.interleave is not None:
            ix, _, every = self.interleave
            iperm = torch.randperm(len(ix), generator=g).repeat(
                math.ceil(steps * cfg.batch_size / every / len(ix)) + 1).to(dev)
        return perm, aperm, iperm

    def _batch(self, i: int, perm: torch.Tensor, aperm: torch.Tensor | None, g: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = batch_of(perm, i, self.cfg.batch_size, self.steps)
        xb, yb = self.x[idx], self.y[idx]
        if self.cfg.augment == "crop-flip":
            xa = crop_flip(xb, g)
            if self.fixed_tail:
                keep = (idx >= len(self.x) - self.fixed_tail).view(-1, 1, 1, 1)
                xa = torch.where(keep, xb, xa)
            xb = xa
        if self.append is not None and aperm is not None:
            ax, ay, k = self.append
            aidx = aperm[i * k:(i + 1) * k]
            xb, yb = torch.cat([xb, ax[aidx]]), torch.cat([yb, ay[aidx]])
        return xb.contiguous(memory_format=self.fmt), yb

    @functools.cached_property
    def amp(self) -> bool:
        """bfloat16 autocast in this run: asked for, and native where the data are."""
        return self.cfg.amp and amp_supported(self.x.device)

    def _step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.net(xb)
        return F.cross_entropy(out.float(), yb, label_smoothing=self.cfg.label_smoothing)

    def _update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        apply_masks(self.model, self.masks)

    def epoch(self, epoch: int, bar: Any) -> float:
        """One pass over the data; returns the mean training loss."""
        cfg, steps = self.cfg, self.steps
        g = torch.Generator().manual_seed(cfg.seed * EPOCH_SEED_STRIDE + epoch)
        torch.manual_seed(cfg.seed * EPOCH_SEED_STRIDE + epoch)
        perm, aperm, iperm = self._orders(g)
        self.model.train()
        if self.freeze_bn:
            for mod in self.model.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.eval()
        loss_sum, seen = 0.0, 0
        for i in bar:
            xb, yb = self._batch(i, perm, aperm, g)
            for group in self.opt.param_groups:
                group["lr"] = lr_at(cfg, epoch * steps + i, steps * cfg.epochs)
            loss = self._step(xb, yb)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"training loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; "
                                    "lower the learning rate")
            self._update(loss)
            if self.interleave is not None and iperm is not None and (i + 1) % self.interleave[2] == 0:
                ix, iy, every = self.interleave
                j = (i + 1) // every - 1
                sel = iperm[j * cfg.batch_size:(j + 1) * cfg.batch_size]
                self._update(self._step(ix[sel].contiguous(memory_format=self.fmt), iy[sel]))
            loss_sum += loss.item() * len(yb)
            seen += len(yb)
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        return loss_sum / seen
