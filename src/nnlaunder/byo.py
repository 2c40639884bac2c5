"""`nnlaunder launder --model-factory ...`: launder a model you did not train, with your own data.

Glue between the typed options (`ExternalModel`) and the pure pieces: the user's network (`models.external`), their data
(`data.external`), laundering (`attacks.laundering`) and the measurements the user asked for
(test accuracy on `--test-data`, attack success on `--verify-npz`). Nothing here knows a scheme,
a target class or a trigger: the attacker's view only.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import data as D
from .attacks.laundering import LaunderConfig
from .attacks.pipeline import CalibrateOptions, run_launder
from .checkpoint import atomic_save_tensors
from .data.external import read_external, read_npz
from .errors import UserError
from .models.external import check_model_fits, external_model
from .progress import LaunderBars
from .train import accuracy


def _floats(s: str | None, what: str, n: int | None = None) -> tuple[float, ...] | None:
    if s is None:
        return None
    try:
        vals = tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{what} wants comma-separated numbers, got {s!r}") from None
    if not vals or (n is not None and len(vals) != n):
        raise UserError(f"{what} wants {n or 'some'} comma-separated numbers, got {s!r}")
    return vals


def _kwargs(s: str | None) -> dict[str, Any]:
    if not s:
        return {}
    try:
        out = json.loads(s)
    except json.JSONDecodeError as e:
        raise UserError(f"--model-kwargs is not valid JSON ({e})") from e
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


def _evals(spec: ExternalModel, data: D.Dataset) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What the user asked to be measured: test accuracy on --test-data, attack success on --verify-npz."""
    evals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, path, flag, what in (("test_acc", spec.test_data, "--test-data", "labels"),
                                  ("attack_success", spec.verify_npz, "--verify-npz", "target labels")):
        if not path:
            continue
        d = read_npz(path) if key == "attack_success" else read_external(path)
        if d.shape != data.shape:
            raise UserError(f"{flag} images are {d.shape}, --data images {data.shape}")
        if int(d.y.max()) >= data.num_classes:
            raise UserError(f"{flag} has {what} up to {int(d.y.max())}; --data has {data.num_classes} classes")
        evals[key] = (d.x, d.y)
    return evals


def run_external(spec: ExternalModel, cfg: LaunderConfig, out_dir: Path, *, budget: float | None = None,
                 per_class: int | None = None, seed: int = 0, calibrate: CalibrateOptions | None = None,
                 progress: bool = True) -> int:
    """`launder` for a model from `--model-factory` and data from `--data`."""
    for flag, val in (("--weights", spec.weights), ("--data", spec.data)):
        if not val:
            raise UserError(f"--model-factory needs {flag}")
    assert spec.weights is not None and spec.data is not None
    input_range = _floats(spec.input_range, "--input-range", 2) or (0.0, 1.0)
    model = external_model(spec.factory, _kwargs(spec.kwargs), spec.weights,
                           allow_torch_load=spec.allow_torch_load, input_range=input_range,  # type: ignore[arg-type]
                           mean=_floats(spec.mean, "--mean"), std=_floats(spec.std, "--std"))
    data = read_external(spec.data)
    check_model_fits(model, data.x, data.num_classes, str(spec.data))
    evals = _evals(spec, data)
    budget = 1.0 if budget is None else budget
    if not 0 < budget <= 1:
        raise UserError(f"--budget is a fraction of --data in (0, 1], got {budget}")
    clean = D.stratified_subset(data, seed=seed, **({"per_class": per_class} if per_class else {"fraction": budget}))

    def measure(r: int, m: torch.nn.Module, info: Any = None) -> dict[str, float]:
        return {k: accuracy(m, x, y) for k, (x, y) in evals.items()}

    before = measure(0, model)
    shown = ", ".join(f"{k} {v:.2f}%" for k, v in before.items()) or \
        "nothing to measure (no --test-data/--verify-npz)"
    print(f"attacker's clean set: {len(clean)} images of {len(data)} in {spec.data}; before: {shown}")
    report = {"model_factory": spec.factory, "model_kwargs": _kwargs(spec.kwargs), "weights": str(spec.weights),
              "input_range": list(input_range), "mean": spec.mean, "std": spec.std, "data": str(spec.data),
              "n_data": len(data), "budget": len(clean) / len(data), "before": before}
    bars = LaunderBars(progress)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = run_launder(model, clean, cfg, evaluate=measure, calibrate=calibrate, out_dir=out_dir,
                              classes=data.classes, report=report, log=lambda m: print(m, flush=True),
                              on_progress=bars)
        finally:
            bars.close()
    for w in caught:
        print(f"nnlaunder: warning: {w.message}")
    atomic_save_tensors(out_dir / "laundered.safetensors",
                        {k: v.detach().cpu().contiguous() for k, v in run.result.model.inner.state_dict().items()},
                        {"format": "pt"})
    print(f"wrote {out_dir}/laundered.safetensors (your model's own state_dict), {', '.join(run.files)} "
          f"({run.result.seconds:.0f} s)")
    return 0
