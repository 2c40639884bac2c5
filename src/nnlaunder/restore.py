"""Persistence and restoration of watermarks (Ngo et al., arXiv:2501.02704).

- `finetune_threat`: the owner's threat model: fine-tune every layer on a disjoint split, with the
  "mixed" variant that takes one extra step on an owner-training batch every `mix_every` batches.
- `restore`: continue training on the owner's clean training data only: the function has no
  argument through which trigger data could enter.
- `param_shift`: L2 distance between two models per layer and in total.
- `pca_directions` / `loss_surface`: the 2-D loss (and accuracy) surface along the first two PCA
  directions of a checkpoint trajectory (Ngo et al.'s landscape analysis).

Pure tensor code; evaluation happens through the trainer's `eval_sets` supplied by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset
from .device import model_device
from .errors import UserError
from .train import Callback, TrainConfig, TrainResult, accuracy, train

# Ngo et al.'s settings: Adam 1e-4; 50 epochs fine-tuning, 30 epochs restoration.
PERSISTENCE_FINETUNE = TrainConfig(epochs=50, batch_size=128, optimizer="adam", lr=1e-4)
RESTORE = TrainConfig(epochs=30, batch_size=128, optimizer="adam", lr=1e-4)


def finetune_threat(model: nn.Module, split: Dataset, cfg: TrainConfig = PERSISTENCE_FINETUNE, *,
                    mixed_with: Dataset | None = None, mix_every: int = 2,
                    eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                    callbacks: Sequence[Callback] = (), progress: bool | str = False) -> TrainResult:
    """Fine-tune all layers of `model` in place on `split`; with `mixed_with`, one extra step on a
    batch of that (owner-training) set after every `mix_every`-th batch."""
    interleave = None
    if mixed_with is not None:
        if mix_every < 1:
            raise UserError(f"mix_every must be >= 1, got {mix_every}")
        interleave = (mixed_with.x, mixed_with.y, mix_every)
    return train(model, split.x, split.y, cfg, interleave=interleave, eval_sets=eval_sets, callbacks=callbacks,
                 progress=progress)


def restore(model: nn.Module, owner_train: Dataset, cfg: TrainConfig = RESTORE, *,
            eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
            callbacks: Sequence[Callback] = (), progress: bool | str = False) -> TrainResult:
    """Continue training on the owner's clean training data only (no triggers). `eval_sets` are
    only measured after each epoch (the owner's verification), never trained on."""
    return train(model, owner_train.x, owner_train.y, cfg, eval_sets=eval_sets, callbacks=callbacks,
                 progress=progress)


# --------------------------------------------------------------------------------------------
def _layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def param_shift(a: nn.Module, b: nn.Module) -> dict[str, float]:
    """L2 distance between the parameters of two models of one architecture, per layer (module
    name) and in total ("total" = sqrt of the sum of squared per-layer distances)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys() or any(pa[k].shape != pb[k].shape for k in pa):
        raise UserError("parameter shift needs two models of the same architecture")
    sq: dict[str, float] = {}
    for k in pa:
        d = float((pa[k].detach().double() - pb[k].detach().double()).pow(2).sum())
        sq[_layer_of(k)] = sq.get(_layer_of(k), 0.0) + d
    out = {k: v ** 0.5 for k, v in sq.items()}
    out["total"] = sum(sq.values()) ** 0.5
    return out


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]).clone()


def set_flat_params(model: nn.Module, vec: torch.Tensor) -> None:
    i = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(vec[i:i + n].view_as(p))
            i += n
    if i != len(vec):
        raise UserError(f"vector has {len(vec)} values, the model {i}")


@dataclass(frozen=True)
class PCAPlane:
    origin: torch.Tensor          # (P,) the plane's origin (the last checkpoint)
    directions: torch.Tensor      # (2, P) orthonormal
    coords: torch.Tensor          # (T, 2) the trajectory projected onto the plane
    explained: torch.Tensor       # (2,) fraction of the trajectory's variance per direction


def pca_directions(trajectory: Sequence[torch.Tensor]) -> PCAPlane:
    """First two principal directions of the checkpoint trajectory (T vectors of P parameters),
    relative to its last point (Li et al. 2018's recipe, as used by Ngo et al.)."""
    if len(trajectory) < 3:
        raise UserError("a PCA plane needs at least 3 checkpoints")
    m = torch.stack([t.double() for t in trajectory])
    origin = m[-1]
    diffs = m[:-1] - origin
    centred = diffs - diffs.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    dirs = vh[:2]
    var = s.pow(2)
    explained = var[:2] / var.sum().clamp_min(1e-30)
    coords = (m - origin) @ dirs.T
    return PCAPlane(origin.float(), dirs.float(), coords.float(), explained.float())


@torch.no_grad()
def loss_surface(model: nn.Module, plane: PCAPlane, alphas: torch.Tensor, betas: torch.Tensor,
                 x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy (percent) at origin + a·d1 + b·d2 for every (a, b) in the grid:
    two (len(alphas), len(betas)) tensors. The model's buffers (BN statistics) are kept."""
    saved = flat_params(model)
    dev = model_device(model)
    was = model.training
    model.eval()
    loss = torch.zeros(len(alphas), len(betas))
    acc = torch.zeros(len(alphas), len(betas))
    try:
        for i, a in enumerate(alphas.tolist()):
            for j, b in enumerate(betas.tolist()):
                set_flat_params(model, plane.origin + a * plane.directions[0] + b * plane.directions[1])
                tot = 0.0
                for k in range(0, len(x), batch_size):
                    xb, yb = x[k:k + batch_size].to(dev), y[k:k + batch_size].to(dev)
                    tot += float(F.cross_entropy(model(xb), yb, reduction="sum"))
                loss[i, j] = tot / len(x)
                acc[i, j] = accuracy(model, x, y, batch_size)
    finally:
        set_flat_params(model, saved)
        model.train(was)
    return loss, acc


def trajectory_landscape(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, points: int = 15,
                         margin: float = 1.3) -> dict[str, Any]:
    """The loss and accuracy surface of the last model of a trajectory over the trajectory's PCA
    plane, on a `points` x `points` grid spanning `margin` times the trajectory's extent."""
    plane = pca_directions([flat_params(m) for m in models])
    span = float(plane.coords.abs().max()) * margin or 1.0
    grid = torch.linspace(-span, span, points)
    loss, acc = loss_surface(models[-1], plane, grid, grid, x, y)
    return {"grid": grid, "loss": loss, "acc": acc, "coords": plane.coords, "explained": plane.explained}
