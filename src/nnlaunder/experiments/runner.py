"""Run experiment cells: owner models and clean trajectories are trained once per config and
reused (content-addressed in the workspace); results go to the workspace's SQLite store.

Workspace layout:
    <ws>/results.sqlite                      the store (one row per cell and round)
    <ws>/models/owner-<hash>.safetensors      watermarked owner models (+ .json)
    <ws>/models/clean-<hash>/epoch-NN.*       clean models after every epoch (vanilla thresholds,
                                              Figure 5, loss-landscape trajectories)
    <ws>/thresholds/<hash>.json               vanilla thresholds per clean config and scheme
    <ws>/triggers/<cell>-roundNN.safetensors  laundering cells: Neural Cleanse's masks and patterns per
                                              round, with a watermark sample and a clean image
                                              (Figures 6/8 in the report)
    <ws>/partial/<cell>.safetensors           a laundering cell's state after its last finished round
                                              (model, reset masks, rounds so far): a rerun of an
                                              interrupted cell continues from there; removed once
                                              the cell is in the store
    <ws>/partial/<cell>-nc/nc-<hash>.safetensors  every Neural Cleanse run of a cell while it runs (masks,
                                              patterns, Adam's moments, the schedule), saved every minute:
                                              an interrupted cell continues it at the epoch it reached
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import clock
from .. import data as D
from ..attacks.neural_cleanse import keeping
from ..attacks.records import Keeper, RoundInfo
from ..attacks.registry import Hooks, attack_spec
from ..checkpoint import atomic_save_tensors, atomic_write_json, load_model, model_meta, save_model
from ..config import from_dict
from ..device import code_commit, deterministic, machine_name, today
from ..errors import UserError
from ..external.models import NO_CODE, CodeAllowance
from ..models import build
from ..restore import param_shift
from ..watermarks.embed import embed
from ..watermarks.schemes import Watermark, make_watermark
from ..watermarks.verify import outcome
from .config import CellConfig, digest
from .evaluate import evaluator
from .store import Store, export_workspace


def clean_seed(cell: CellConfig, seed: int, ws: Path, tr: D.Dataset, te: D.Dataset, progress: bool):
    """The clean trajectory of the cell's (dataset, architecture, owner recipe) and `seed`, from the shared
    clean-model cache (trained once; the workspace holds it where the cache is off)."""
    from .clean import clean_root, clean_trajectory

    return clean_trajectory(cell.dataset, cell.arch_name, cell.owner_train(), seed, tr, te,
                            root=clean_root(ws / "models" / "clean"), progress=progress)


def threshold_for(cell: CellConfig, wm: Watermark, ws: Path, tr: D.Dataset, te: D.Dataset, progress: bool
                  ) -> dict[str, Any]:
    """The cell's threshold under its rule, and the paper's, over the converged (or every) epoch of every
    clean seed: evaluation of cached clean models only, once they exist."""
    from ..watermarks.verify import threshold_rule
    from .clean import wm_points

    key = digest({"clean": [cell.dataset, cell.arch_name, cell.owner_train().identity(), list(cell.threshold_seeds)],
                  "scheme": cell.scheme, "params": wm.params, "rule": cell.threshold_rule, "v": 2})
    path = ws / "thresholds" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    pts = [p for s in cell.threshold_seeds for p in wm_points(clean_seed(cell, s, ws, tr, te, progress), wm)]
    rule, paper = threshold_rule(cell.threshold_rule, pts), threshold_rule("paper", pts)
    out = {"threshold": rule.threshold, "rule": rule.as_dict(), "paper": paper.threshold,
           "seeds": list(cell.threshold_seeds), "n": len(wm.verify_y),
           "curves": [[p.rate for p in pts if p.seed == s] for s in cell.threshold_seeds]}
    atomic_write_json(path, out)
    return out


def owner_model(cell: CellConfig, wm: Watermark, ws: Path, tr: D.Dataset, te: D.Dataset, progress: bool):
    if cell.owner_path:
        model, meta = load_model(cell.owner_path)
        got = (meta.get("dataset"), meta.get("arch"), meta.get("scheme"))
        if got != (cell.dataset, cell.arch_name, cell.scheme):
            raise UserError(f"owner_path: {cell.owner_path} is a {got} model, the experiment wants "
                            f"{(cell.dataset, cell.arch_name, cell.scheme)}")
        recorded = meta.get("scheme_params")
        sizes = ("n_embed", "n_verify")             # how many images, not which watermark
        def norm(params: dict) -> dict:          # as JSON stores it (tuples become lists)
            return json.loads(json.dumps({k: v for k, v in params.items() if k not in sizes}, default=str))

        if recorded is not None and norm(recorded) != norm(wm.params):
            raise UserError(f"owner_path: {cell.owner_path} was watermarked with {cell.scheme} parameters {recorded}, "
                            f"the experiment's scheme_params give {wm.params}: its verification set would not "
                            f"match; set scheme_params to the model's")
        return model
    cfg = cell.owner_train()
    key = digest({"dataset": cell.dataset, "arch": cell.arch_name, "scheme": cell.scheme, "params": wm.params,
                  "train": cfg.identity()})
    path = ws / "models" / f"owner-{key}"
    if path.with_suffix(".safetensors").is_file():
        return load_model(path)[0]
    if wm.params.get("mode") == "pt":
        files = clean_seed(cell, cell.owner_seed, ws, tr, te, progress).files
        model, _ = load_model(files[-1])
    else:
        model = build(cell.arch_name, tr.num_classes, seed=cell.owner_seed)
    embed(model, tr, wm, cfg, checkpoint_dir=path.with_suffix(".ckpt"), resume=True,
          progress=f"owner {cell.scheme}" if progress else False)
    save_model(path, model, model_meta(cell.arch_name, cell.dataset, tr.num_classes, seed=cell.owner_seed,
                                       config=cfg, scheme=cell.scheme, scheme_params=wm.params))
    return model


def run_cell(cell: CellConfig, ws: Path, data_dir: str | None, progress: bool = False,
             allow: CodeAllowance = NO_CODE) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    """Everything one cell needs, then its attack; returns (round rows, summary, seconds). A cell on the
    user's own model runs its factory only if `allow` (the command line) allows it."""
    deterministic()
    t0 = clock.now()
    if cell.external is not None:
        tr, te, wm, model = external_inputs(cell, allow)
    else:
        tr, te = D.load(cell.dataset, data_dir, "train"), D.load(cell.dataset, data_dir, "test")
        wm = make_watermark(cell.scheme, tr, te, data_dir, cell.scheme_params)
        model = owner_model(cell, wm, ws, tr, te, progress)
    known = {"threshold": cell.threshold} if cell.threshold is not None else threshold_for(cell, wm, ws, tr, te,
                                                                                          progress)
    th = known["threshold"]
    clean = D.stratified_subset(tr, seed=cell.seed, **cell.budget_spec())
    ev = evaluator(te, wm, th)
    rows = [{"round": 0, **ev(0, model), "threshold": th, "seconds": 0.0}]
    cfg = cell.attack_config()
    t1 = clock.now()
    bar = tqdm(total=cell.rounds, desc=f"{cell.scheme} {cell.attack} {cell.budget}", leave=False,
               disable=not progress)

    def on_round(r: int, m, info) -> dict[str, Any]:
        metrics = ev(r, m)
        rows.append({"round": r, **metrics, "threshold": th, "seconds": info.seconds, **_round_record(info)})
        bar.update(1)
        bar.set_postfix(test=f"{metrics['test_acc']:.1f}", wm=f"{metrics['wm_acc']:.1f}")
        return metrics

    def on_resume(extra: dict[str, Any]) -> None:
        if isinstance(extra.get("rows"), list):
            rows[:] = extra["rows"]
            bar.update(len(rows) - 1)

    hooks = Hooks(on_round=on_round, state_file=ws / "partial" / f"{cell.cell_id()}.safetensors",
                  extra=lambda: {"rows": rows}, on_resume=on_resume,
                  on_state=lambda state, nc: save_round_triggers(ws / "triggers", cell.cell_id(), len(state.rounds),
                                                                 nc, wm, te))
    reused = _memo_nc(cell, cfg, model, clean, ws, hooks)
    keeper = Keeper(ws / "partial" / f"{cell.cell_id()}-nc")      # Neural Cleanse's state while it runs
    try:
        with keeping(keeper):
            res = attack_spec(cell.attack).run(model, clean, cfg, hooks)
    finally:
        bar.close()
    for r in rows:
        r["test_drop"] = rows[0]["test_acc"] - r["test_acc"]
        r["outcome"] = outcome(bool(r.get("owned")) or bool(r.get("wm_nonfinite")), r["test_drop"],
                               tolerance=cell.tolerance)    # NaN outputs prove no removal: kept
        r["removed"] = r["outcome"] == "removed"
    last = rows[-1]
    summary = {"n_clean": len(clean), "threshold": th, "threshold_rule": cell.threshold_rule,
               "orig_test_acc": rows[0]["test_acc"], "orig_wm_acc": rows[0]["wm_acc"],
               **{k: last.get(k) for k in ("test_acc", "wm_acc", "status", "base_rate", "p_value", "p_log10",
                                           "test_drop")},
               "owned": bool(last.get("owned")), "tolerance": cell.tolerance, "rounds_run": len(rows) - 1,
               "attack_seconds": clock.now() - t1 + keeper.resumed, "n_verify": len(wm.verify_y),
               "machine": machine_name() + (f" (its Neural Cleanse begun on {', '.join(keeper.machines)})"
                                            if keeper.machines else ""),
               "param_shift": param_shift(model, res.model)["total"],     # L2 distance the attack moved the weights
               "nc_reused": reused}
    if "paper" in known:                     # the paper's rule (the maximum over every clean epoch), beside it
        summary["threshold_paper"] = known["paper"]
    if res.info.get("calibration"):
        summary["calibration"] = res.info["calibration"]
    if cell.restore_epochs and (cell.restore_if == "always" or last["outcome"] != "kept"):
        summary.update(owner_restores(res.model, cell, tr, ev))
    summary["outcome"] = outcome(last["outcome"] == "kept", last["test_drop"], summary.get("restored"),
                                 cell.tolerance)
    summary["removed"] = summary["outcome"] == "removed"
    return rows, summary, clock.now() - t0 + keeper.resumed


def _memo_nc(cell: CellConfig, cfg: Any, model, clean: D.Dataset, ws: Path, hooks: Hooks) -> bool:
    """Laundering's first Neural Cleanse from the workspace's kept results where an earlier cell ran it on
    the same model, set and settings (and kept for later cells where none did); calibration runs its own.
    NC unlearning takes the same kept result: with nothing held out, laundering's Neural Cleanse on the same
    model, images, settings and seed is the one it would run. True when it was reused."""
    if cell.attack == "nc-unlearn":
        from .nc_memo import load_nc, save_nc, unlearn_key

        key, folder = unlearn_key(model, clean, cfg, cell.seed), ws / "nc"
        hooks.first_nc = load_nc(folder, key, clean)
        hooks.on_nc = lambda nc: save_nc(folder, key, nc)
        return hooks.first_nc is not None
    if cell.attack != "launder":
        return False
    if cell.calibrate:
        from ..attacks.pipeline import CalibrateOptions

        hooks.calibrate = CalibrateOptions()
        return False
    from .nc_memo import load_nc, nc_key, save_nc

    key, folder, then = nc_key(model, clean, cfg), ws / "nc", hooks.on_state
    hooks.first_nc = load_nc(folder, key, clean)

    def keep(state: Any, nc: Any) -> None:
        if len(state.rounds) == 1 and hooks.first_nc is None:
            save_nc(folder, key, nc)
        then(state, nc)

    hooks.on_state = keep
    return hooks.first_nc is not None


def external_inputs(cell: CellConfig, allow: CodeAllowance) -> tuple[D.Dataset, D.Dataset, Watermark, Any]:
    """A cell on the user's own model: (their data, their test set, their trigger set as a watermark
    with no known target, the model). The attacker's pool and the owner's restoration set are both
    drawn from `data`, as the registered datasets' training sets are."""
    import torch

    from ..external.setup import from_identity, load_external

    assert cell.external is not None
    setup = load_external(from_identity(cell.external), allow, f"experiment {cell.name!r}: [external]")
    assert setup.test is not None and setup.verify is not None     # validate() requires both
    vx, vy = setup.verify
    empty = torch.zeros((0, *setup.data.shape))
    wm = Watermark(scheme="external", embed_x=empty, embed_y=torch.zeros(0, dtype=torch.long), verify_x=vx,
                   verify_y=vy, target=None, params={"verify_npz": cell.external.get("verify_npz")})
    return setup.data, setup.test, wm, setup.model


def owner_restores(model, cell: CellConfig, tr: D.Dataset, ev) -> dict[str, Any]:
    """The owner's restoration after the attack: `restore_epochs` of training on its own clean data
    (a stratified `restore_fraction` of the training set, or what the attacker's set leaves of it). A
    removal the restoration undoes was only hidden."""
    import copy

    import torch

    from ..restore import RESTORE, restore

    t0 = clock.now()
    owner = tr if cell.restore_fraction >= 1 else D.stratified_subset(tr, fraction=cell.restore_fraction,
                                                                        seed=cell.seed)
    if cell.restore_from == "rest":            # what the attacker's set leaves of the training set
        taken = torch.zeros(len(tr), dtype=torch.bool)
        taken[D.stratified_indices(tr.y, seed=cell.seed, **cell.budget_spec())] = True
        owner = tr.subset(torch.nonzero(~taken).flatten(), f"{tr.name}[rest]")
    m = copy.deepcopy(model)
    restore(m, owner, dataclasses.replace(RESTORE, epochs=cell.restore_epochs, seed=cell.seed))
    after = ev(-1, m)
    back = bool(after.get("owned"))          # the verdict shows ownership again
    return {"restored_test_acc": after["test_acc"], "restored_wm_acc": after["wm_acc"], "restored": back,
            "restore_seconds": clock.now() - t0, "n_owner": len(owner)}


def _round_record(info: Any) -> dict[str, Any]:
    """What a laundering round adds to its row (a one-shot attack's: the seconds of the Neural Cleanse it used,
    if it used one)."""
    if not isinstance(info, RoundInfo):
        return {"nc_seconds": info.nc_seconds} if getattr(info, "nc_seconds", None) is not None else {}
    return {"nc_seconds": info.nc_seconds, "retrain_seconds": info.retrain_seconds, "flagged": info.flagged,
            "used": info.used_triggers,
            "resets": info.resets, "stopped": info.stopped}


def save_round_triggers(folder: Path, cell_id: str, r: int, nc: Any, wm: Watermark, test: D.Dataset) -> None:
    """One round's recovered triggers, for the report's Figure 6/8-style plots. Written as the round
    finishes (before its partial state), so a finished cell always has every round's."""
    other = test.x[test.y != wm.target] if wm.target is not None else test.x
    atomic_save_tensors(folder / f"{cell_id}-round{r:02d}.safetensors",
                        {"masks": nc.masks, "patterns": nc.patterns, "l1": nc.l1, "anomaly": nc.anomaly,
                         "watermark": wm.verify_x[0], "clean": other[0]},
                        {"flagged": json.dumps(nc.flagged), "target": json.dumps(wm.target),
                         "classes": json.dumps(list(test.classes))})


def _run_cell_remote(cell: dict[str, Any], ws: str, data_dir: str, allow: CodeAllowance = NO_CODE
                     ) -> tuple[list[dict], dict, float]:
    """A Ray task or pool job: rebuild the cell from its JSON-able dict and run it on a worker."""
    return run_cell(from_dict(CellConfig, cell, "cell"), Path(ws), data_dir, progress=False, allow=allow)


def prepare_cell(cell: CellConfig, ws: Path, data_dir: str | None, progress: bool) -> None:
    """Train (once) what a cell shares with others: its owner model and vanilla threshold.
    Done in the parent before cells run in parallel, so no two workers train the same model."""
    if cell.external is not None:
        return
    tr, te = D.load(cell.dataset, data_dir, "train"), D.load(cell.dataset, data_dir, "test")
    wm = make_watermark(cell.scheme, tr, te, data_dir, cell.scheme_params)
    owner_model(cell, wm, ws, tr, te, progress)
    if cell.threshold is None:
        threshold_for(cell, wm, ws, tr, te, progress)


def _pool_init(threads: int, device: str | None) -> None:
    import torch

    from ..device import set_device

    torch.set_num_threads(threads)
    set_device(device)


def cell_lines(cells: Sequence[CellConfig], ws: str | Path) -> list[str]:
    """One line per cell (its id and settings, and whether the workspace's store holds it), then the count."""
    done: set[str] = set()
    if (Path(ws) / "results.sqlite").is_file():
        with Store(Path(ws) / "results.sqlite", readonly=True) as store:
            done = store.finished_ids()
    return [*(f"{c.cell_id()}  {c.dataset}/{c.scheme} {c.attack} budget {c.budget} rounds {c.rounds} seed {c.seed}"
              f"{'  (in the store)' if c.cell_id() in done else ''}" for c in cells),
            f"{len(cells)} cells, {sum(c.cell_id() in done for c in cells)} already in the store"]


def run_experiment(cells: Sequence[CellConfig], ws: str | Path, data_dir: str | None, *, progress: bool = True,
                   on_cell: Callable[[CellConfig, dict[str, Any]], None] | None = None,
                   executor: str = "local", address: str | None = None, jobs: int = 1,
                   allow: CodeAllowance | None = None, export: str | Path | None = None) -> dict[str, int]:
    """Run every unfinished cell; finished cells (same config) are skipped. With `export`, the workspace's
    cells and the state of unfinished ones are written there as text (`store.export_workspace`) after every
    finished cell and when the run stops, however it stops short of a kill.

    `allow`: the factories the command line allows cells on the user's own model to import (none by
    default); every such cell is checked against it before anything runs.

    executor "local": in this process, in order. "ray": each cell is a Ray task on the existing
    cluster at `address` (workers must see the workspace and data folders); results come back here
    and this process alone writes the store. `jobs` > 1 with "local": that many worker processes
    on this machine (useful with a GPU, where one cell leaves it mostly idle); owner models and
    thresholds are trained first, here, so workers only attack.
    """
    allow = allow or NO_CODE
    check_code(cells, allow)
    ws = Path(ws).resolve()
    if ws.exists() and not ws.is_dir():
        raise UserError(f"workspace {ws} is a file, not a folder")
    ws.mkdir(parents=True, exist_ok=True)
    rev = code_commit()     # the code this run started with, whatever is edited while it runs
    with Store(ws / "results.sqlite") as store:
        done = store.finished_ids()
        todo = [c for c in cells if c.cell_id() not in done]
        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="cells", disable=not progress)

        def finish(cell: CellConfig, result: tuple) -> None:
            rows, summary, seconds = result
            summary = {**summary, "commit": rev, "date": today()}
            store.record(cell.cell_id(), cell.name, cell.as_dict(), rows, summary, seconds)
            (ws / "partial" / f"{cell.cell_id()}.safetensors").unlink(missing_ok=True)
            shutil.rmtree(ws / "partial" / f"{cell.cell_id()}-nc", ignore_errors=True)
            bar.update(1)
            if on_cell is not None:
                on_cell(cell, summary)
            if export is not None:
                export_workspace(ws, export)

        completed = False
        try:
            if executor == "local" and jobs <= 1:
                for cell in todo:
                    finish(cell, run_cell(cell, ws, data_dir, progress, allow))
            elif executor == "local":
                _run_in_pool(todo, ws, data_dir, jobs, progress, finish, allow)
            elif executor == "ray":
                _run_on_ray(todo, ws, str(D.resolve_data_dir(data_dir).resolve()), address, finish, allow)
            else:
                raise UserError(f"unknown executor {executor!r}; choose local or ray")
            completed = True
        finally:        # the last finished cell exported already; a stopped run adds its cell's saved state
            if export is not None and not (completed and todo):
                export_workspace(ws, export)
        bar.close()
    return {"cells": len(cells), "ran": len(todo), "skipped": len(cells) - len(todo)}


def check_code(cells: Sequence[CellConfig], allow: CodeAllowance) -> None:
    """Refuse, before anything is imported, a cell whose `[external]` factory (or torch.load) `allow`
    does not allow."""
    from ..external.setup import from_identity

    for cell in cells:
        if cell.external is not None:
            from_identity(cell.external).check_allowed(allow, f"experiment {cell.name!r}: [external]")


def _run_in_pool(todo: Sequence[CellConfig], ws: Path, data_dir: str | None, jobs: int, progress: bool,
                 finish: Callable[[CellConfig, tuple], None], allow: CodeAllowance = NO_CODE) -> None:
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from ..device import device_setting

    for cell in todo:
        prepare_cell(cell, ws, data_dir, progress)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                             initializer=_pool_init, initargs=(threads, device_setting())) as pool:
        futures = {pool.submit(_run_cell_remote, c.as_dict(), str(ws), data_dir, allow): c for c in todo}
        for fut in as_completed(futures):
            finish(futures[fut], fut.result())


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """One line when nothing listens at a Ray HOST:PORT, instead of Ray's retry loop."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except ValueError:
        raise UserError(f"--address {address!r}: expected HOST:PORT of a running Ray cluster") from None
    except OSError as e:
        raise UserError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one with `ray start --head` "
                        "or use --executor local") from None


def _run_on_ray(todo: Sequence[CellConfig], ws: Path, data_dir: str, address: str | None,
                finish: Callable[[CellConfig, tuple], None], allow: CodeAllowance = NO_CODE) -> None:
    if not address:
        raise UserError("--executor ray needs --address HOST:PORT of a running Ray cluster")
    _check_reachable(address)
    try:
        import ray
    except ImportError:
        raise UserError("the ray executor needs Ray: pip install 'nnlaunder[ray]'") from None
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {e}") from e
    try:
        task = ray.remote(num_cpus=1)(_run_cell_remote)
        pending = {task.remote(c.as_dict(), str(ws), data_dir, allow): c for c in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            finish(cell, ray.get(ready[0]))
    finally:
        ray.shutdown()
