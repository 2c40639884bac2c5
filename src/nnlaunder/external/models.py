"""Models from outside the registry: any PyTorch image classifier, built by the user's own factory.

    model = external_model("mypkg.nets:make_net", {"width": 64}, "weights.safetensors",
                           allow=CodeAllowance.typed("mypkg.nets:make_net"),
                           input_range=(0.0, 255.0), mean=(0.5,), std=(0.25,))

The returned model takes pixels in [0, 1] (like every model of this project) and maps them to the
value range and normalisation the user's network expects (`PixelInput`), so Neural Cleanse stamps
triggers in pixel space. Its `inner` is the user's network, whose state_dict is what gets saved.
Naming a factory runs that code. The user names it on the command line, like running Python;
a file never does so on its own: every import goes through a `CodeAllowance` that only the command
line (or a Python caller) builds, and a factory it does not list is refused before anything is
imported. Weights are data and are read without running anything (safetensors, or
`torch.load(weights_only=True)` behind an explicit flag).
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
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


_FACTORY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def check_factory_spec(spec: Any, what: str = "--model-factory") -> str:
    """`spec` as 'package.module:function' (identifiers only), or one line saying what it is not."""
    if not isinstance(spec, str) or len(spec) > 300 or not _FACTORY.fullmatch(spec):
        shown = repr(spec) if len(repr(spec)) <= 80 else repr(spec)[:77] + "..."
        raise UserError(f"{what} wants package.module:function (Python identifiers), got {shown}")
    return spec


@dataclass(frozen=True)
class CodeAllowance:
    """What the user allowed on the command line: the factories that may be imported and called, and
    whether `.pt`/`.pth` weights may go through `torch.load(weights_only=True)`.

    Built only from what the user typed (or by a Python caller); never from a file. A file that names
    a factory or asks for `allow_torch_load` is refused unless this allows it.
    """
    factories: frozenset[str] = frozenset()
    any_factory: bool = False             # --allow-code: any factory the file names
    torch_load: bool = False              # --allow-torch-load

    @classmethod
    def typed(cls, factory: str, torch_load: bool = False) -> CodeAllowance:
        """The user typed `--model-factory FACTORY` themselves."""
        return cls(frozenset({factory}), False, torch_load)

    def check_factory(self, spec: str, source: str) -> None:
        """Refuse, before any import, a factory `source` names that the user did not allow."""
        if self.any_factory or spec in self.factories:
            return
        mod, _, fn = str(spec).partition(":")
        raise UserError(f"{source} asks to import {mod!r} and call {fn!r} ({spec}); a file may not run code "
                        f"on its own. If you trust it, allow it on the command line: --allow-factory {spec} "
                        "(or --allow-code for any factory the file names)")

    def check_torch_load(self, source: str) -> None:
        if not self.torch_load:
            raise UserError(f"{source} asks to read .pt/.pth weights with torch.load; a file may not allow that on "
                            "its own: add --allow-torch-load on the command line if you trust the weights")


NO_CODE = CodeAllowance()


def load_factory(spec: str, kwargs: dict[str, Any] | None = None, *, allow: CodeAllowance,
                 source: str = "--model-factory") -> nn.Module:
    """'package.module:function' -> function(**kwargs), checked to be an nn.Module. `allow` must list
    the factory (checked before anything is imported); `source` names where the spec came from."""
    check_factory_spec(spec, source)
    allow.check_factory(spec, source)
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(f"--model-factory: cannot import {mod_name!r} ({e}); is it on PYTHONPATH?") from e
    except SystemExit as e:
        raise UserError(f"--model-factory: importing {mod_name!r} called sys.exit({e.code!r})") from None
    except Exception as e:   # the user's module failed while importing: their code, one line
        raise UserError(f"--model-factory: importing {mod_name!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise UserError(f"--model-factory: {mod_name} has no function {fn_name!r}")
    try:
        model = fn(**(kwargs or {}))
    except SystemExit as e:
        raise UserError(f"--model-factory: {spec} called sys.exit({e.code!r}) instead of returning a model") from None
    except RecursionError:
        raise UserError(f"--model-factory: {spec}(...) recursed too deeply") from None
    except Exception as e:   # the user's factory failed: their code, one line
        raise UserError(f"--model-factory: {spec}(**{kwargs or {}}) failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise UserError(f"--model-factory: {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def external_model(factory: str, kwargs: dict[str, Any] | None, weights: str | Path, *, allow: CodeAllowance,
                   source: str = "--model-factory", allow_torch_load: bool = False,
                   input_range: tuple[float, float] = (0.0, 1.0),
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> PixelInput:
    """Build the user's network, load its weights (checked to fit, finite), wrap it for pixels."""
    if allow_torch_load:
        allow.check_torch_load(source)
    inner = load_factory(factory, kwargs, allow=allow, source=source)
    w = Path(weights)
    if w.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise UserError(f"{w}: weights must be a .safetensors file or a .pt/.pth state_dict")
    load_into(inner, load_state(w, allow_torch_load), str(w))
    model = PixelInput(inner, input_range, mean, std).to(compute_device())
    model.eval()
    return model


def check_model_fits(model: nn.Module, x: torch.Tensor, num_classes: int | None, what: str = "the data") -> int:
    """Run two images through `model` in eval mode (its mode is given back after); the output must be (N, K)
    floating-point logits with K == num_classes (any K >= 2 where None); K is returned. A forward that returns a
    tuple or a dict (logits with features, as some training code writes it) is refused with what to do."""
    from ..device import model_device

    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x[:2].to(model_device(model)))
    except Exception as e:     # the user's model rejected the input: a mistake, not a crash
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the model does not accept inputs of shape {tuple(x.shape[1:])} from {what}: {first}") from e
    finally:
        model.train(was)
    if isinstance(out, tuple | list | dict):
        raise UserError(f"the model's forward returns a {type(out).__name__}; every attack here needs one that "
                        "returns the (N, classes) logits alone: wrap it in a module whose forward returns them")
    if isinstance(out, torch.Tensor) and not out.is_floating_point():
        raise UserError(f"the model must return real floating-point logits, got {out.dtype}")
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise UserError(f"the model must return (N, classes) logits, got "
                        f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise UserError(f"the model has {out.shape[1]} outputs but {what} has {num_classes} classes")
    if out.shape[1] < 2:
        raise UserError(f"the model has {out.shape[1]} output; a classifier has one logit per class, at least 2")
    if bool((out >= 0).all()) and torch.allclose(out.double().sum(1), torch.ones(len(out), dtype=torch.float64),
                                                 atol=1e-4):
        warnings.warn("the model's outputs are probabilities (non-negative, each row sums to 1): it seems to end "
                      "in a softmax, and every loss here expects logits; give a factory without it", stacklevel=2)
    return int(out.shape[1])
