"""One laundering run with its files, the single driver behind `nnlaunder launder` (registered and
bring-your-own models), the experiment runner's laundering cells and the demo.

`run_launder` takes the model, the attacker's clean set and a `LaunderConfig`, and optionally:
- `evaluate(round, model, info) -> metrics`: what the caller measures after each round (kept in
  the round's record and the report). The attacker's choices never read it.
- `calibrate`: choose options by k-fold over the clean set first (`attacks.calibrate`).
- `state_file` (+ `resume`): the state after every finished round, so an interrupted run goes on
  where it stopped; the caller's own `extra` data is kept with it and handed back on resume.
- `out_dir`: report.json (the caller's `report` fields, then the run's) and triggers.png (the
  last round's recovered triggers).
Messages go through `log` (the CLI passes `print`), progress events to `on_progress`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint import atomic_write_json, weights_digest
from ..data import Dataset
from ..errors import UserError
from ..plots import trigger_grid
from .calibrate import apply_candidate, calibrate
from .laundering import LaunderConfig, LaunderResult, OnProgress, launder
from .neural_cleanse import NCResult, keeping, keeping_active, neural_cleanse
from .records import Keeper, LaunderState, RoundInfo, check_state_fits, load_launder_state, save_launder_state

Evaluate = Callable[..., dict[str, Any]]
Log = Callable[[str], None]


@dataclass(frozen=True)
class CalibrateOptions:
    folds: int = 5
    grid: list[dict[str, Any]] | None = None      # None: calibrate.default_grid for the model


@dataclass
class LaunderRun:
    result: LaunderResult
    config: LaunderConfig                  # as run (after calibration)
    report: dict[str, Any]
    calibration: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)


def _quiet(msg: str) -> None:
    pass


def _metrics_line(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2f}%" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def round_line(r: int, info: RoundInfo, metrics: dict[str, Any]) -> str:
    if info.stopped:
        return f"round {r}: early stop (class {info.least_likely} was the most likely infected in round 1)"
    plan = info.nc_plan
    how = (f" (Neural Cleanse in {plan['precision']}, {plan['memory_format']}"
           f"{', tuned on this machine' if plan.get('tuned') else ''})" if plan else "")
    return (f"round {r}: flagged {info.flagged or 'none'} (used {info.used_triggers}), reset "
            f"{sum(info.resets.values())} units {info.resets}; {_metrics_line(metrics)}; {info.seconds:.0f} s{how}")


def run_calibration(model: nn.Module, clean: Dataset, cfg: LaunderConfig, opts: CalibrateOptions,
                    log: Log = _quiet) -> tuple[NCResult, dict[str, Any]]:
    """Round 1's Neural Cleanse, then the attacker-side calibration; returns (NC result, choice)."""
    if cfg.holdout:
        raise UserError("calibration scores candidates by k-fold over the whole clean set; it takes no holdout")
    log(f"calibration: Neural Cleanse on the {len(clean)} clean images ...")
    nc = neural_cleanse(model, clean.x, cfg.nc, num_classes=clean.num_classes)
    log(f"calibration: {opts.folds}-fold over the clean set; per candidate: held-out accuracy ± se, "
        "residual trigger flips, units reset")
    cal = calibrate(model, clean, nc, cfg, grid=opts.grid, folds=opts.folds,
                    on_candidate=lambda sc: log(f"  {json.dumps(sc.candidate)}: {sc.acc:.2f} ± {sc.se:.2f}%, "
                                                f"flips {sc.flips:.2f}%, {sc.resets:.0f} units"))
    log(f"calibration: chose {json.dumps(cal.chosen)} ({cal.why})")
    return nc, cal.as_dict()


def _resume_state(state_file: Path | None, resume: bool, owner: str, log: Log, model: nn.Module
                  ) -> tuple[LaunderState, dict[str, Any]] | None:
    if state_file is None:
        return None
    if state_file.exists() and not state_file.is_file():
        raise UserError(f"{state_file}: the laundering state's place holds something that is not a file")
    prior = load_launder_state(state_file, owner) if resume else None
    if prior is not None:
        check_state_fits(prior[0], model, state_file)
    if prior is None and resume:
        log(f"nothing to resume in {state_file.parent} for this model; starting at round 1")
    elif prior is None and state_file.is_file():
        log(f"note: {state_file} (an interrupted run) is replaced; --resume would have continued it")
    return prior


def run_launder(model: nn.Module, clean: Dataset, cfg: LaunderConfig, *, evaluate: Evaluate | None = None,
                calibrate: CalibrateOptions | None = None, state_file: str | Path | None = None,
                resume: bool = False, extra: Callable[[], dict[str, Any]] | None = None,
                on_resume: Callable[[dict[str, Any]], None] | None = None,
                on_state: Callable[[LaunderState, NCResult], None] | None = None,
                out_dir: str | Path | None = None, classes: Sequence[str] | None = None,
                report: dict[str, Any] | None = None, log: Log = _quiet,
                on_progress: OnProgress | None = None, first_nc: NCResult | None = None) -> LaunderRun:
    state_path = Path(state_file) if state_file is not None else None
    owner = weights_digest(model)
    prior = _resume_state(state_path, resume, owner, log, model)
    calibration = None              # `first_nc`: round 1's Neural Cleanse on this model and set, already run
    if calibrate is not None:
        if prior is not None and isinstance(prior[1].get("calibration"), dict):
            calibration = prior[1]["calibration"]
            log(f"calibration: the interrupted run's choice {calibration['chosen']}")
        else:
            first_nc, calibration = run_calibration(model, clean, cfg, calibrate, log)
        cfg = apply_candidate(cfg, calibration["chosen"])
    config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    if prior is not None:
        if prior[1].get("config") != config or prior[1].get("n_clean") != len(clean):
            raise UserError(f"{state_path} was written with other laundering settings or another clean set; "
                            "rerun with the same options, or without --resume to start over")
        log(f"resuming after round {len(prior[0].rounds)} ({state_path})")
        if on_resume is not None:
            on_resume(prior[1].get("caller") or {})

    def measured(r: int, m: nn.Module, info: RoundInfo) -> dict[str, Any]:
        metrics = evaluate(r, m, info) if evaluate is not None else {}
        log(round_line(r, info, metrics))
        return metrics

    def keep(state: LaunderState, nc: NCResult) -> None:
        if on_state is not None:
            on_state(state, nc)
        if state_path is not None and len(state.rounds) < cfg.rounds and not state.rounds[-1].stopped:
            save_launder_state(state_path, state, owner, {"config": config, "n_clean": len(clean),
                                                          "calibration": calibration,
                                                          "caller": extra() if extra is not None else {}})

    keeper = _nc_keeper(state_path, resume)
    with keeping(keeper) if keeper is not None else contextlib.nullcontext():
        res = launder(model, clean, cfg, on_round=measured, on_state=keep, on_progress=on_progress,
                      resume=None if prior is None else prior[0], first_nc=first_nc if prior is None else None)
    out = {**(report or {}), "n_clean": len(clean), "config": dataclasses.asdict(cfg),
           "after": res.rounds[-1].metrics if res.rounds else {}, "rounds": res.report(),
           "skipped_layers": [list(s) for s in res.skipped], "seconds": res.seconds, "calibration": calibration}
    run = LaunderRun(res, cfg, out, calibration)
    if out_dir is not None:
        run.files = write_outputs(Path(out_dir), run, clean, classes)
    if state_path is not None:
        state_path.unlink(missing_ok=True)
    if keeper is not None:
        shutil.rmtree(keeper.folder, ignore_errors=True)
    return run


def _nc_keeper(state_path: Path | None, resume: bool) -> Keeper | None:
    """Where a run with a state file keeps Neural Cleanse's state while it runs (beside the state file),
    so that `--resume` after a stop inside Neural Cleanse continues it; a run without --resume starts it
    afresh. None where the caller keeps it already (the experiment runner) or keeps nothing."""
    if state_path is None or keeping_active():
        return None
    folder = state_path.with_name(state_path.stem + "-nc")
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
    return Keeper(folder)


def write_outputs(out_dir: Path, run: LaunderRun, clean: Dataset, classes: Sequence[str] | None) -> list[str]:
    """report.json, and triggers.png when this run recovered triggers (a resumed run with no round
    left to do did not)."""
    atomic_write_json(out_dir / "report.json", run.report)
    files = ["report.json"]
    if run.result.nc:
        last = run.result.nc[-1]
        names = list(classes) if classes is not None else [str(c) for c in range(clean.num_classes)]
        trigger_grid(last.masks, last.patterns, last.l1.tolist(), last.anomaly.tolist(), last.flagged, names,
                     out_dir / "triggers.png", title=f"Neural Cleanse, round {len(run.result.rounds)}",
                     example=clean.x[0])
        files.append("triggers.png")
    return files
