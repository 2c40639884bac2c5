"""One persistence phase (Ngo et al.) with its files: fine-tuning on a disjoint split, or the owner's
restoration on its own data, a checkpoint per epoch (the trajectory `nnlaunder landscape` reads), the
final model and history.json. `nnlaunder finetune` and `nnlaunder restore` call it; `nnlaunder landscape`
calls `landscape_files` on such a trajectory."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .. import data as D
from ..checkpoint import atomic_write_json, derived_meta, load_model, save_model
from ..errors import UserError
from ..restore import PERSISTENCE_FINETUNE, RESTORE, finetune_threat, param_shift, restore, trajectory_landscape
from ..train import accuracy
from ..watermarks.schemes import Watermark

PHASES = ("finetuned", "finetuned-mixed", "restored")


def run_phase(model: nn.Module, meta: dict[str, Any], tr: D.Dataset, te: D.Dataset, wm: Watermark, phase: str,
              out: Path, *, split: float, seed: int = 0, epochs: int | None = None, batch_size: int | None = None,
              lr: float | None = None, source: str = "", progress: bool = True) -> dict[str, Any]:
    """Run the phase on `model` (in place) and write its files under `out`; returns the report."""
    if phase not in PHASES:
        raise UserError(f"unknown persistence phase {phase!r}; choose from {', '.join(PHASES)}")
    if not 0 < split < 1:
        raise UserError(f"--split must be a fraction in (0, 1), got {split}")
    original = copy.deepcopy(model)
    part, owner = D.disjoint_split(tr, split, seed)        # (fine-tuning split, the owner's data)
    over = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None}
    cfg = dataclasses.replace(RESTORE if phase == "restored" else PERSISTENCE_FINETUNE, seed=seed, **over)

    def keep(epoch: int, m: nn.Module) -> dict[str, float]:
        save_model(out / f"epoch-{epoch:03d}", m, derived_meta(meta, epoch=epoch, phase=phase))
        return {"param_shift": param_shift(original, m)["total"]}

    evals = {"test": (te.x, te.y), "wm": (wm.verify_x, wm.verify_y)}
    keep(0, model)                                          # the trajectory starts at the given model
    before = {"test_acc": accuracy(model, te.x, te.y), "wm_acc": accuracy(model, wm.verify_x, wm.verify_y)}
    if phase == "restored":
        res = restore(model, owner, cfg, eval_sets=evals, callbacks=[keep], progress=progress)
    else:
        res = finetune_threat(model, part, cfg, mixed_with=owner if phase == "finetuned-mixed" else None,
                              eval_sets=evals, callbacks=[keep], progress=progress)
    save_model(out / "model", model, derived_meta(meta, phase=phase, **{"from": source}))
    report = {"model": source, "phase": phase, "split": split, "n_split": len(part), "n_owner": len(owner),
              "config": dataclasses.asdict(cfg), "before": before, "history": res.history,
              "param_shift": param_shift(original, model)}
    atomic_write_json(out / "history.json", report)
    return report


def trajectory_files(folder: Path) -> list[Path]:
    """The epoch checkpoints a phase wrote in `folder`, in order (at least 3: a plane needs them)."""
    files = sorted(Path(folder).glob("epoch-*.safetensors"))
    if len(files) < 3:
        raise UserError(f"{folder}: need at least 3 epoch-NNN.safetensors checkpoints (from `nnlaunder finetune` "
                        "or `restore`)")
    return files


def landscape_files(files: Sequence[Path], wm: Watermark, tr: D.Dataset, out: Path, *, on: str, images: int,
                    grid: int, margin: float, allow_torch_load: bool = False, title: str = "") -> None:
    """The loss and accuracy over the plane of the trajectory's first two principal directions, on the
    watermark's verification images (`on="trigger"`) or on clean training images: `out`.png and .json."""
    from ..plots import landscape

    models = [load_model(f, allow_torch_load=allow_torch_load)[0] for f in files]
    if on == "trigger":
        x, y = wm.verify_x[:images], wm.verify_y[:images]
    else:
        sub = D.stratified_subset(tr, fraction=min(1.0, images / len(tr)), seed=0)
        x, y = sub.x, sub.y
    ls = trajectory_landscape(models, x, y, grid, margin)
    landscape(ls["grid"], ls["grid"], ls["loss"], ls["acc"], ls["coords"], out.with_suffix(".png"),
              title=f"{title} {on} loss along the trajectory's PCA plane "
                    f"({100 * float(ls['explained'].sum()):.0f}% of its variance)")
    atomic_write_json(out.with_suffix(".json"), {**{k: v.tolist() for k, v in ls.items()},
                                                 "checkpoints": [str(f) for f in files], "on": on})
