"""Embedding a watermark (the owner's training) and measuring the vanilla threshold.

- Zhang et al.'s schemes: train on the training set plus the embedding triggers.
- Adi et al. from scratch (FS): train with k trigger images appended to every batch.
- Adi et al. pre-trained (PT): the same, but starting from a clean pre-trained model
  (fine-tuning); the caller passes that model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..data import Dataset
from ..errors import UserError
from ..models import build
from ..train import Callback, TrainConfig, TrainResult, train
from .schemes import Watermark


def embed(model: nn.Module, train_set: Dataset, wm: Watermark, cfg: TrainConfig, *,
          test: Dataset | None = None, augment_triggers: bool = True, trigger_repeat: int = 1,
          eval_wm: bool = True, **train_kwargs) -> TrainResult:
    """Train `model` in place so it carries watermark `wm`; history has test_acc and wm_acc.

    augment_triggers=False keeps Zhang et al.'s embedding triggers out of cfg.augment (the training
    images are still augmented): a flipped "TEST" is not the trigger the owner verifies with. The
    stored models were trained with it True (the default); docs/recipes.md measures what False does on
    the CIFAR-10 content model. Adi et al.'s appended triggers are never augmented.
    trigger_repeat: Zhang et al.'s triggers appear this many times per epoch (oversampling; 1 is
    the paper's recipe; benchmarks/topup.py chooses it on held-out stamped training images).
    eval_wm=False leaves the verification set out of the per-epoch history (choosing a recipe
    without looking at it).
    """
    if trigger_repeat < 1:
        raise UserError(f"trigger_repeat must be >= 1, got {trigger_repeat}")
    if wm.verify_x.shape[1:] != train_set.x.shape[1:]:
        raise UserError(f"the {wm.scheme} triggers are {tuple(wm.verify_x.shape[1:])}, "
                        f"the data {tuple(train_set.x.shape[1:])}")
    eval_sets = dict(train_kwargs.pop("eval_sets", None) or {})
    if test is not None:
        eval_sets["test"] = (test.x, test.y)
    if eval_wm:
        eval_sets["wm"] = (wm.verify_x, wm.verify_y)
    if wm.scheme == "adi":
        return train(model, train_set.x, train_set.y, cfg, append=(wm.embed_x, wm.embed_y, wm.params["k"]),
                     eval_sets=eval_sets, **train_kwargs)
    ex, ey = wm.embed_x.repeat(trigger_repeat, 1, 1, 1), wm.embed_y.repeat(trigger_repeat)
    x = torch.cat([train_set.x, ex])
    y = torch.cat([train_set.y, ey])
    return train(model, x, y, cfg, eval_sets=eval_sets,
                 fixed_tail=0 if augment_triggers else len(ex), **train_kwargs)


def clean_wm_curve(arch: str, train_set: Dataset, wms: dict[str, Watermark], cfg: TrainConfig, *,
                   test: Dataset | None = None, seed: int = 0, callbacks: Sequence[Callback] = (),
                   progress: bool | str = True, model_hook: Callable[[nn.Module], None] | None = None,
                   **train_kwargs) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a clean (never watermarked) model and record, after every epoch, how often it
    classifies each scheme's verification triggers as the watermark label (Figure 5)."""
    model = build(arch, train_set.num_classes, seed=seed)
    eval_sets = {f"wm:{name}": (w.verify_x, w.verify_y) for name, w in wms.items()}
    if test is not None:
        eval_sets["test"] = (test.x, test.y)
    res = train(model, train_set.x, train_set.y, cfg, eval_sets=eval_sets, callbacks=callbacks,
                progress=progress, **train_kwargs)
    if model_hook is not None:
        model_hook(model)
    return model, res.history


