"""The records of a laundering run: one round's account, and the state an interrupted run resumes
from with its file (`save_launder_state` / `load_launder_state`, on top of checkpoint's generic
safetensors I/O); `Keeper`: every Neural Cleanse run's optimisation state while it runs, in files, so that
a run stopped inside Neural Cleanse continues it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..checkpoint import atomic_save_tensors, dtype_kind, tensor_bytes, weights_digest
from ..config import from_dict
from ..device import machine_name
from ..errors import UserError
from .neural_cleanse import NCKeep


@dataclass
class RoundInfo:
    round: int
    nc_seconds: float
    nc_epochs: list[int]
    l1: list[float]
    anomaly: list[float]
    flagged: list[int]
    used_triggers: list[int]
    most_likely: int
    least_likely: int
    resets: dict[str, int]
    retrain_seconds: float = 0.0
    seconds: float = 0.0
    attacker_acc: float | None = None      # accuracy on the attacker's own held-out slice
    stopped: bool = False                  # the early-stop rule fired; nothing was changed
    nc_plan: dict[str, Any] = field(default_factory=dict)  # how Neural Cleanse ran (precision, ...: NCResult.plan)
    nc_phase_seconds: dict[str, float] = field(default_factory=dict)  # its seconds per phase (NCResult.phase_seconds)
    metrics: dict[str, Any] = field(default_factory=dict)   # what the caller's on_round measured: recorded
    #   for the report, never read by laundering (the attacker decides on nothing in it)



@dataclass
class LaunderState:
    """Where a multi-round laundering stands after a finished round: enough for
    `launder(..., resume=state)` to go on exactly as an unbroken run would (each round's Neural
    Cleanse and retraining are seeded by the round number)."""
    rounds: list[RoundInfo]                 # the finished rounds, metrics included
    masks: dict[str, torch.Tensor]          # weight masks of every unit reset so far
    first_most: int                         # round 1's most likely infected class (early stop)
    model_state: dict[str, torch.Tensor]    # the model after the last finished round


def save_launder_state(path: str | os.PathLike, state: LaunderState, owner: str, extra: dict[str, Any]) -> None:
    """A multi-round laundering's state after a finished round (`launder(on_state=...)`), in one file
    written atomically: model and reset masks as tensors; the rounds so far, round 1's most likely
    class, the digest of the weights laundering started from and the caller's `extra` as JSON
    metadata."""
    tensors = {**{f"model.{k}": v for k, v in state.model_state.items()},
               **{f"mask.{k}": v for k, v in state.masks.items()}}
    meta = {"rounds": [dataclasses.asdict(r) for r in state.rounds], "first_most": state.first_most,
            "owner": owner, "extra": extra}
    atomic_save_tensors(Path(path), tensors, {"launder_state": json.dumps(meta, default=float)})


def load_launder_state(path: str | os.PathLike, owner: str) -> tuple[LaunderState, dict[str, Any]] | None:
    """(state, extra) as `save_launder_state` wrote them, or None when there is no such file or it was
    made from other starting weights than those with digest `owner`."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("launder_state") or "null")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, ValueError) as e:
        raise UserError(f"{path}: not a laundering state this version can read ({e}); delete it to start over") from e
    if not isinstance(meta, dict) or meta.get("owner") != owner:
        return None
    try:
        bad = [k for k, v in tensors.items() if dtype_kind(v) in ("float", "complex") and not torch.isfinite(v).all()]
        wrong = [k for k, v in tensors.items() if k.startswith("mask.") and not bool(((v == 0) | (v == 1)).all())]
        if not isinstance(meta["rounds"], list):
            raise TypeError("'rounds' is not a list")
        rounds = [from_dict(RoundInfo, r, f"rounds[{i}]") for i, r in enumerate(meta["rounds"])]
        first_most = meta["first_most"]
        if type(first_most) is not int or not 0 <= first_most < 100_000:
            raise ValueError(f"first_most must be a class index, got {first_most!r:.40}")
        if [r.round for r in rounds] != list(range(1, len(rounds) + 1)):
            raise ValueError("the rounds are not 1, 2, ... in order")
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise UserError(f"{path}: a laundering state with broken metadata ({e}); delete it to start over") from e
    if bad or wrong or any(dtype_kind(v) == "complex" for v in tensors.values()):
        raise UserError(f"{path}: a laundering state with NaN/Inf or impossible values in {(bad + wrong)[:3]}; "
                        "delete it to start over")
    state = LaunderState(rounds, {k[5:]: v for k, v in tensors.items() if k.startswith("mask.")}, first_most,
                         {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return state, meta["extra"] if isinstance(meta.get("extra"), dict) else {}


def check_state_fits(state: LaunderState, model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Refuse a state whose masks or weights do not fit `model` (a parameter it lacks, another shape), in
    one line naming the first, before anything is applied."""
    own = model.state_dict()
    for kind, tensors in (("mask", state.masks), ("weights", state.model_state)):
        for k, v in tensors.items():
            if k not in own:
                raise UserError(f"{path}: {kind} for {k!r:.80}, which the model does not have; delete it to start over")
            if tuple(v.shape) != tuple(own[k].shape):
                raise UserError(f"{path}: {kind} for {k!r} has shape {tuple(v.shape)}, the model's is "
                                f"{tuple(own[k].shape)}; delete it to start over")
    missing = sorted(set(own) - set(state.model_state))
    if state.model_state and missing:
        raise UserError(f"{path}: no weights for {missing[:3]}; delete it to start over")


def run_digest(model: torch.nn.Module, x: torch.Tensor, settings: dict[str, Any], machine: bool = True) -> str:
    """What a Neural Cleanse run depends on, as a key: the weights, the images, its settings and (with `machine`)
    the machine (a fast preset's plan differs by hardware)."""
    h = hashlib.sha256()
    h.update(weights_digest(model).encode())
    h.update(tensor_bytes(x.detach().cpu().contiguous()))
    h.update(json.dumps({**settings, **({"machine": machine_name()} if machine else {})}, sort_keys=True,
                        default=str).encode())
    return h.hexdigest()[:32]


class Keeper:
    """Every Neural Cleanse run of a cell keeps its optimisation state in `folder` (`neural_cleanse.keeping`),
    one file per run, named by what the run depends on (weights, images, settings, candidate classes), so a
    cell stopped part-way (a session's end, a kill) continues its Neural Cleanse at the epoch it reached, on
    this machine or, carried there (`nnlaunder export` / `merge`), on another whose plan is the same (a state
    of another plan or shape is not used). On one machine the run ends as an unbroken run would; a state
    begun elsewhere continues with that machine's rounding, and `machines` then names where it ran.
    `resumed` sums the seconds of work held by the states it handed back that the runs used (the cell counts
    them as its own)."""

    def __init__(self, folder: Path, every: float = 60.0) -> None:
        self.folder, self.every, self.resumed = Path(folder), every, 0.0
        self.machines: list[str] = []       # where the states the runs used were worked on, this machine aside
        self._seen: dict[Path, list[str]] = {}      # the machines a loaded state names (used or not)
        self._ran: dict[Path, list[str]] = {}       # the machines a run's own state has been worked on

    def __call__(self, model: torch.nn.Module, x: Any, cfg: Any, cls: list[int]) -> NCKeep:
        key = run_digest(model, x, {"nc": dataclasses.asdict(cfg), "classes": cls}, machine=False)
        path = self.folder / f"nc-{key}.safetensors"
        return NCKeep(load=lambda: self._load(path), save=lambda state: self._save(path, state), every=self.every,
                      resumed=lambda seconds: self._count(path, seconds))

    def _count(self, path: Path, seconds: float) -> None:
        self.resumed += seconds
        self._ran[path] = list(self._seen.get(path, []))           # the state was used: its machines count
        here = machine_name()
        self.machines += [m for m in self._ran[path] if m != here and m not in self.machines]

    def _load(self, path: Path) -> dict | None:
        from safetensors import SafetensorError, safe_open

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads(f.metadata()["nc_state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, KeyError, ValueError, TypeError, RuntimeError, SafetensorError):
            return None              # a damaged file: the run starts over
        ran = meta.get("machines") if isinstance(meta, dict) else None
        self._seen[path] = [str(m) for m in ran] if isinstance(ran, list) else []
        return {"tensors": tensors, "meta": meta}

    def _save(self, path: Path, state: dict) -> None:
        self._ran[path] = list(dict.fromkeys([*self._ran.get(path, []), machine_name()]))
        meta = {**state["meta"], "machines": self._ran[path]}
        atomic_save_tensors(path, state["tensors"], {"nc_state": json.dumps(meta, default=str)})
