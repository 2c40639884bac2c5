"""A model this project did not train, with the user's data: the `--model-factory` flags as typed
options, and what they load (the network, its data, test set and trigger set).

`nnlaunder launder --model-factory ...` (`byo.py`) and `nnlaunder audit --model-factory ...` (an
experiment cell with `external` set) both start here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import data as D
from ..config import from_dict
from ..data.fetch import sha256_file
from ..errors import UserError
from .data import read_external, read_npz
from .models import CodeAllowance, PixelInput, check_factory_spec, check_model_fits, external_model


def floats(s: str | None, what: str, n: int | None = None) -> tuple[float, ...] | None:
    if s is None:
        return None
    try:
        vals = tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{what} wants comma-separated numbers, got {s!r}") from None
    if not vals or (n is not None and len(vals) != n):
        raise UserError(f"{what} wants {n or 'some'} comma-separated numbers, got {s!r}")
    return vals


def factory_kwargs(s: str | None) -> dict[str, Any]:
    if not s:
        return {}
    try:
        out = json.loads(s)
    except (ValueError, RecursionError) as e:          # also nested too deeply, or a 5000-digit number
        raise UserError(f"--model-kwargs is not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(out, dict):
        raise UserError(f"--model-kwargs must be a JSON object, got {s!r}")
    return out


@dataclass(frozen=True)
class ExternalModel:
    """A model this project did not train, and the user's data (the `--model-factory` flags, as given)."""
    factory: str
    weights: str | None
    data: str | None
    kwargs: str | None = None            # JSON object for the factory
    test_data: str | None = None
    verify_npz: str | None = None
    input_range: str | None = None       # "LO,HI"
    mean: str | None = None              # "M1[,M2,M3]"
    std: str | None = None
    allow_torch_load: bool = False

    def require(self, *flags: str) -> None:
        """One line naming the first missing flag of `flags` (attribute names)."""
        for f in flags:
            if not getattr(self, f):
                raise UserError(f"--model-factory needs --{f.replace('_', '-')}")

    def check_allowed(self, allow: CodeAllowance, source: str) -> None:
        """Refuse, before anything is imported or read, the code this spec asks to run (its factory, and
        `torch.load` for .pt/.pth weights) unless `allow` (the command line) allows it."""
        check_factory_spec(self.factory, f"{source}: factory")
        allow.check_factory(self.factory, source)
        if self.allow_torch_load:
            allow.check_torch_load(source)

    def identity(self) -> dict[str, Any]:
        """The options plus the weights' and data files' SHA-256: what an experiment cell is keyed by, so a
        changed file under the same name is a new cell."""
        out: dict[str, Any] = dataclasses.asdict(self)
        for f in ("weights", "verify_npz"):
            path = getattr(self, f)
            if path:
                try:
                    out[f"{f}_sha256"] = sha256_file(Path(path))
                except OSError as e:
                    raise UserError(f"--{f.replace('_', '-')} {path}: {e.strerror or e}") from None
        return out


DIGESTS = ("weights_sha256", "verify_npz_sha256")


def from_identity(d: dict[str, Any]) -> ExternalModel:
    """`ExternalModel.identity()` (as an experiment cell keeps it) back to the options."""
    return from_dict(ExternalModel, {k: v for k, v in d.items() if k not in DIGESTS}, "external")


@dataclass
class ExternalSetup:
    model: PixelInput
    data: D.Dataset                                   # the user's labelled images
    test: D.Dataset | None                            # --test-data
    verify: tuple[torch.Tensor, torch.Tensor] | None  # --verify-npz: triggered inputs and their target labels
    input_range: tuple[float, float]


def load_external(spec: ExternalModel, allow: CodeAllowance, source: str = "--model-factory") -> ExternalSetup:
    """Build the network, read the data, and check they fit each other. `allow` is what the command line
    allows (`CodeAllowance.typed(spec.factory)` when the user typed the spec); `source` names where the
    spec came from, for the refusal."""
    spec.check_allowed(allow, source)
    spec.require("weights", "data")
    assert spec.weights is not None and spec.data is not None
    input_range = floats(spec.input_range, "--input-range", 2) or (0.0, 1.0)
    model = external_model(spec.factory, factory_kwargs(spec.kwargs), spec.weights, allow=allow, source=source,
                           allow_torch_load=spec.allow_torch_load, input_range=input_range,  # type: ignore[arg-type]
                           mean=floats(spec.mean, "--mean"), std=floats(spec.std, "--std"))
    data = read_external(spec.data)
    check_model_fits(model, data.x, data.num_classes, str(spec.data))
    model.eval()
    test = verify = None
    if spec.test_data:
        test = read_external(spec.test_data)
        _check_like(test.x, test.y, data, "--test-data", "labels")
    if spec.verify_npz:
        v = read_npz(spec.verify_npz)
        _check_like(v.x, v.y, data, "--verify-npz", "target labels")
        verify = (v.x, v.y)
    return ExternalSetup(model, data, test, verify, input_range)  # type: ignore[arg-type]


def _check_like(x: torch.Tensor, y: torch.Tensor, data: D.Dataset, flag: str, what: str) -> None:
    if tuple(x.shape[1:]) != data.shape:
        raise UserError(f"{flag} images are {tuple(x.shape[1:])}, --data images {data.shape}")
    if len(y) and int(y.max()) >= data.num_classes:
        raise UserError(f"{flag} has {what} up to {int(y.max())}; --data has {data.num_classes} classes")
