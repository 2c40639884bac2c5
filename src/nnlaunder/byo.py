"""`nnlaunder launder --model-factory ...`: launder a model you did not train, with your own data.

Glue between the CLI and the pure pieces: the user's network (`models.external`), their data
(`data.external`), laundering (`attacks.laundering`) and the measurements the user asked for
(test accuracy on `--test-data`, attack success on `--verify-npz`). Nothing here knows a scheme,
a target class or a trigger: the attacker's view only.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from . import data as D
from .attacks.laundering import launder
from .checkpoint import atomic_save_tensors, atomic_write_json
from .data.external import read_external, read_npz
from .errors import UserError
from .models.external import check_model_fits, external_model
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


def run_external(args: Any, out_dir: Path) -> int:
    """The `launder` command for a model from `--model-factory` and data from `--data`."""
    if args.model:
        raise UserError("give either a MODEL of this project or --model-factory with --weights, not both")
    for flag, val in (("--weights", args.weights), ("--data", args.data)):
        if not val:
            raise UserError(f"--model-factory needs {flag}")
    if args.verify_scheme:
        raise UserError("--verify-scheme needs a model of this project; for your own model give --verify-npz")
    input_range = _floats(args.input_range, "--input-range", 2) or (0.0, 1.0)
    model = external_model(args.model_factory, _kwargs(args.model_kwargs), args.weights,
                           allow_torch_load=args.allow_torch_load, input_range=input_range,  # type: ignore[arg-type]
                           mean=_floats(args.mean, "--mean"), std=_floats(args.std, "--std"))
    data = read_external(args.data)
    check_model_fits(model, data.x, data.num_classes, str(args.data))
    evals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if args.test_data:
        test = read_external(args.test_data)
        if test.shape != data.shape:
            raise UserError(f"--test-data images are {test.shape}, --data images {data.shape}")
        if int(test.y.max()) >= data.num_classes:
            raise UserError(f"--test-data has labels up to {int(test.y.max())}; --data has {data.num_classes} classes")
        evals["test_acc"] = (test.x, test.y)
    if args.verify_npz:
        v = read_npz(args.verify_npz)
        if v.shape != data.shape:
            raise UserError(f"--verify-npz images are {v.shape}, --data images {data.shape}")
        if int(v.y.max()) >= data.num_classes:
            raise UserError(f"--verify-npz target labels go up to {int(v.y.max())}; the model has "
                            f"{data.num_classes} classes")
        evals["attack_success"] = (v.x, v.y)
    budget = 1.0 if args.budget is None else args.budget
    if not 0 < budget <= 1:
        raise UserError(f"--budget is a fraction of --data in (0, 1], got {budget}")
    if args.per_class:
        clean = D.stratified_subset(data, per_class=args.per_class, seed=args.seed)
    else:
        clean = D.stratified_subset(data, fraction=budget, seed=args.seed)
    from .cli import calibrate_cli, launder_cfg

    cfg = launder_cfg(args)
    first_nc, calibration = None, None
    if args.calibrate:
        from .attacks.calibrate import apply_candidate

        first_nc, calibration = calibrate_cli(model, clean, cfg, args)
        cfg = apply_candidate(cfg, calibration["chosen"])

    def measure(r: int, m: torch.nn.Module, info: Any = None) -> dict[str, float]:
        return {k: accuracy(m, x, y) for k, (x, y) in evals.items()}

    before = measure(0, model)
    shown = ", ".join(f"{k} {v:.2f}%" for k, v in before.items()) or "nothing to measure (no --test-data/--verify-npz)"
    print(f"attacker's clean set: {len(clean)} images of {len(data)} in {args.data}; before: {shown}")

    def show(r: int, m: torch.nn.Module, info: Any) -> dict[str, float]:
        metrics = measure(r, m)
        print(f"round {r}: flagged {info.flagged or 'none'}, reset {sum(info.resets.values())} units; "
              + ", ".join(f"{k} {v:.2f}%" for k, v in metrics.items()) + f"; {info.seconds:.0f} s")
        return metrics

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = launder(model, clean, cfg, on_round=show, progress=not args.quiet, first_nc=first_nc)
    for w in caught:
        print(f"nnlaunder: warning: {w.message}")
    after = res.rounds[-1].metrics if res.rounds else {}
    report = {"model_factory": args.model_factory, "model_kwargs": _kwargs(args.model_kwargs),
              "weights": str(args.weights), "input_range": list(input_range), "mean": args.mean, "std": args.std,
              "data": str(args.data), "n_data": len(data), "n_clean": len(clean), "budget": len(clean) / len(data),
              "config": dataclasses.asdict(cfg), "before": before, "after": after,
              "skipped_layers": [list(s) for s in res.skipped], "rounds": res.report(),
              "seconds": time.perf_counter() - t0, "calibration": calibration}
    atomic_save_tensors(out_dir / "laundered.safetensors",
                        {k: v.detach().cpu().contiguous() for k, v in res.model.inner.state_dict().items()},
                        {"format": "pt"})
    atomic_write_json(out_dir / "report.json", report)
    from .report.plots import trigger_grid

    last = res.nc[-1]
    trigger_grid(last.masks, last.patterns, last.l1.tolist(), last.anomaly.tolist(), last.flagged, data.classes,
                 out_dir / "triggers.png", title=f"Neural Cleanse, round {len(res.nc)}", example=clean.x[0])
    print(f"wrote {out_dir}/laundered.safetensors (your model's own state_dict), report.json, triggers.png "
          f"({report['seconds']:.0f} s)")
    return 0
