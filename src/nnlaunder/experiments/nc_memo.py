"""Neural Cleanse results kept per (model, attacker's set, Neural Cleanse settings, machine) in a workspace,
so that laundering cells that differ only after trigger recovery (an ablation's variants, Table 2's seeds
beside them) recover the triggers once. Round 1 only: later rounds run on a model the round changed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from ..attacks.neural_cleanse import NCResult
from ..checkpoint import atomic_save_tensors, tensor_bytes, weights_digest
from ..data import Dataset
from ..device import machine_name

_TENSORS = ("masks", "patterns", "l1", "success", "found", "epochs", "anomaly")


def nc_key(model: nn.Module, clean: Dataset, cfg: Any) -> str:
    """What round 1's Neural Cleanse depends on: the weights, the attacker's images (before laundering
    holds some out, by `cfg.holdout` and `cfg.seed`), its settings, and the machine (a fast preset's plan
    differs by hardware)."""
    h = hashlib.sha256()
    h.update(weights_digest(model).encode())
    h.update(tensor_bytes(clean.x.detach().cpu().contiguous()))
    h.update(json.dumps({"nc": dataclasses.asdict(cfg.nc), "holdout": cfg.holdout, "seed": cfg.seed,
                         "machine": machine_name()}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


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

