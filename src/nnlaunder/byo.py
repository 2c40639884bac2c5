"""`nnlaunder launder --model-factory ...`: launder a model you did not train, with your own data.

Glue between the typed options (`ExternalModel`) and the pure pieces: the user's network (`external.models`), their data
(`external.data`), laundering (`attacks.laundering`) and the measurements the user asked for
(test accuracy on `--test-data`, attack success on `--verify-npz`). Nothing here knows a scheme,
a target class or a trigger: the attacker's view only.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from . import data as D
from .attacks.laundering import LaunderConfig
from .attacks.pipeline import CalibrateOptions, run_launder
from .checkpoint import atomic_save_tensors
from .external.models import CodeAllowance
from .external.setup import ExternalModel, ExternalSetup, factory_kwargs, load_external
from .progress import LaunderBars
from .train import accuracy


def _evals(setup: ExternalSetup) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What the user asked to be measured: test accuracy on --test-data, attack success on --verify-npz."""
    evals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if setup.test is not None:
        evals["test_acc"] = (setup.test.x, setup.test.y)
    if setup.verify is not None:
        evals["attack_success"] = setup.verify
    return evals


def run_external(spec: ExternalModel, cfg: LaunderConfig, out_dir: Path, *, budget: D.Budget | None = None,
                 seed: int = 0, calibrate: CalibrateOptions | None = None,
                 progress: bool = True) -> int:
    """`launder` for a model from `--model-factory` and data from `--data`."""
    setup = load_external(spec, CodeAllowance.typed(spec.factory, spec.allow_torch_load))
    model, data, input_range = setup.model, setup.data, setup.input_range
    evals = _evals(setup)
    clean = D.stratified_subset(data, seed=seed, **(budget or D.Budget(fraction=1.0)).kwargs())

    def measure(r: int, m: torch.nn.Module, info: Any = None) -> dict[str, float]:
        return {k: accuracy(m, x, y) for k, (x, y) in evals.items()}

    before = measure(0, model)
    shown = ", ".join(f"{k} {v:.2f}%" for k, v in before.items()) or \
        "nothing to measure (no --test-data/--verify-npz)"
    print(f"attacker's clean set: {len(clean)} images of {len(data)} in {spec.data}; before: {shown}")
    report = {"model_factory": spec.factory, "model_kwargs": factory_kwargs(spec.kwargs), "weights": str(spec.weights),
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
