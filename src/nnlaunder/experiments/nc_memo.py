"""Neural Cleanse results kept per (model, attacker's set, Neural Cleanse settings, machine) in a workspace,
so that laundering cells that differ only after trigger recovery (an ablation's variants, Table 2's seeds
beside them), and NC unlearning beside laundering, recover the triggers once. Round 1 only: later rounds run
on a model the round changed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from ..attacks.neural_cleanse import NCResult, neural_cleanse
from ..attacks.records import run_digest
from ..checkpoint import atomic_save_tensors
from ..data import Dataset

_TENSORS = ("masks", "patterns", "l1", "success", "found", "epochs", "anomaly")


def nc_key(model: nn.Module, clean: Dataset, cfg: Any) -> str:
    """What round 1's Neural Cleanse depends on: the weights, the attacker's images (before laundering
    holds some out, by `cfg.holdout` and `cfg.seed`), its settings, and the machine (a fast preset's plan
    differs by hardware)."""
    return run_digest(model, clean.x, {"nc": dataclasses.asdict(cfg.nc), "holdout": cfg.holdout, "seed": cfg.seed})


def unlearn_key(model: nn.Module, clean: Dataset, cfg: Any, seed: int) -> str:
    """NC unlearning's key: laundering's (`nc_key`) for the same images, settings and seed with nothing held
    out, so an unlearning cell and the laundering cell beside it (same model, set and seed) share one run."""
    return run_digest(model, clean.x, {"nc": dataclasses.asdict(cfg.nc), "holdout": 0.0, "seed": seed})


def kept_nc(folder: Path, model: nn.Module, clean: Dataset, nc_cfg: Any) -> NCResult:
    """Neural Cleanse on (model, clean) with `nc_cfg`, run once and kept in `folder` (keyed by the weights,
    images, settings and machine): what a script that recovers the same triggers in several places calls."""
    key = run_digest(model, clean.x, {"nc": dataclasses.asdict(nc_cfg)})
    nc = load_nc(folder, key, clean)
    if nc is None:
        nc = neural_cleanse(model, clean.x, nc_cfg, num_classes=clean.num_classes)
        save_nc(folder, key, nc)
    return nc


def load_nc(folder: Path, key: str, clean: Dataset) -> NCResult | None:
    """The kept result, or None (none kept, or a file this module did not write whole for `clean`'s shape)."""
    from safetensors import SafetensorError, safe_open

    path = folder / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["nc"])
            tensors = {k: f.get_tensor(k) for k in _TENSORS}
        nc = NCResult(**tensors, flagged=[int(c) for c in meta["flagged"]], seconds=float(meta["seconds"]),
                      plan=dict(meta["plan"]), phase_seconds=dict(meta["phase_seconds"]))
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, SafetensorError):
        return None
    k, (c, h, w) = clean.num_classes, clean.x.shape[1:]
    shapes = [tuple(nc.masks.shape) == (k, 1, h, w), tuple(nc.patterns.shape) == (k, c, h, w),
              *(tuple(getattr(nc, t).shape) == (k,) for t in _TENSORS[2:]), all(0 <= f < k for f in nc.flagged)]
    return nc if all(shapes) else None


def save_nc(folder: Path, key: str, nc: NCResult) -> None:
    meta = {"flagged": nc.flagged, "seconds": nc.seconds, "phase_seconds": nc.phase_seconds,
            "plan": {k: v for k, v in nc.plan.items() if k != "timing"}}
    atomic_save_tensors(folder / f"{key}.safetensors", {k: getattr(nc, k) for k in _TENSORS},
                        {"nc": json.dumps(meta, default=str)})

