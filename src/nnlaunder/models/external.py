"""Models from outside the registry: any PyTorch image classifier, built by the user's own factory.

    model = external_model("mypkg.nets:make_net", {"width": 64}, "weights.safetensors",
                           input_range=(0.0, 255.0), mean=(0.5,), std=(0.25,))

The returned model takes pixels in [0, 1] (like every model of this project) and maps them to the
value range and normalisation the user's network expects (`PixelInput`), so Neural Cleanse stamps
triggers in pixel space. Its `inner` is the user's network, whose state_dict is what gets saved.
Naming a factory runs that code, by design (it is the user's own); weights are data and are read
without running anything (safetensors, or `torch.load(weights_only=True)` behind an explicit flag).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import TORCH_SUFFIXES, load_into, load_state
from ..device import compute_device
from ..errors import UserError


class PixelInput(nn.Module):
    """x in [0, 1] -> lo + x (hi - lo) -> (· - mean) / std -> inner."""

    def __init__(self, inner: nn.Module, input_range: tuple[float, float] = (0.0, 1.0),
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        lo, hi = input_range
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise UserError(f"--input-range must be two finite numbers LO,HI with HI > LO, got {lo},{hi}")
        if (mean is None) != (std is None):
            raise UserError("--mean and --std go together")
        if std is not None and (len(std) != len(mean or ()) or any(not (s > 0) for s in std)):
            raise UserError(f"--std needs one positive value per --mean value, got mean {mean}, std {std}")
        self.inner = inner
        self.lo, self.hi = float(lo), float(hi)
        m = torch.tensor(mean if mean is not None else [0.0], dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std if std is not None else [1.0], dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(((self.lo + x * (self.hi - self.lo)) - self.mean) / self.std)


def load_factory(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """'package.module:function' -> function(**kwargs), checked to be an nn.Module."""
    if ":" not in spec:
        raise UserError(f"--model-factory wants package.module:function, got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(f"--model-factory: cannot import {mod_name!r} ({e}); is it on PYTHONPATH?") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise UserError(f"--model-factory: {mod_name} has no function {fn_name!r}")
    try:
        model = fn(**(kwargs or {}))
    except TypeError as e:
        raise UserError(f"--model-factory: {spec}(**{kwargs or {}}) failed: {e}") from e
    if not isinstance(model, nn.Module):
        raise UserError(f"--model-factory: {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def external_model(factory: str, kwargs: dict[str, Any] | None, weights: str | Path, *,
                   allow_torch_load: bool = False, input_range: tuple[float, float] = (0.0, 1.0),
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> PixelInput:
    """Build the user's network, load its weights (checked to fit, finite), wrap it for pixels."""
    inner = load_factory(factory, kwargs)
    w = Path(weights)
    if w.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise UserError(f"{w}: weights must be a .safetensors file or a .pt/.pth state_dict")
    load_into(inner, load_state(w, allow_torch_load), str(w))
    model = PixelInput(inner, input_range, mean, std).to(compute_device())
    model.eval()
    return model


def check_model_fits(model: nn.Module, x: torch.Tensor, num_classes: int, what: str = "the data") -> int:
    """Run one batch through `model`; the output must be (N, K) logits with K == num_classes."""
    from ..device import model_device

    try:
        with torch.no_grad():
            out = model.eval()(x[:2].to(model_device(model)))
    except Exception as e:     # the user's model rejected the input: a mistake, not a crash
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the model does not accept inputs of shape {tuple(x.shape[1:])} from {what}: {first}") from e
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise UserError(f"the model must return (N, classes) logits, got "
                        f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if out.shape[1] != num_classes:
        raise UserError(f"the model has {out.shape[1]} outputs but {what} has {num_classes} classes")
    return int(out.shape[1])
