"""Clean models, trained once per (dataset, architecture, recipe, seed) and shared by every question.

A clean trajectory is a never-watermarked model trained with the owner's recipe, kept after every
epoch (weights and metrics: test accuracy, loss, seconds). Thresholds for any watermark on that
architecture (a custom text, place or target, a user's trigger set) then cost only evaluation of the
stored epochs: nothing is retrained. The runner, `nnlaunder threshold` and the audit share it.

Cache layout (`clean_root()`: `$NNLAUNDER_CACHE/clean`, else a folder the caller gives):
    <root>/<dataset>-<arch>-<key>-s<seed>/epoch-NNN.{safetensors,json}   every epoch
    <root>/<dataset>-<arch>-<key>-s<seed>/metrics.json                   per-epoch metrics
    <root>/<dataset>-<arch>-<key>-s<seed>/ckpt/                          resume state while training
    <root>/<dataset>-<arch>-<key>-s<seed>/wm-<digest>.json              hits per epoch on one
                                                                         verification set
`key` digests the recipe's identity (what is trained), so another recipe is another trajectory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import data as D
from ..checkpoint import atomic_write_json, load_model, model_meta, save_model
from ..device import cache_dir
from ..errors import UserError
from ..models import build
from ..train import TrainConfig, predict_checked
from ..watermarks.schemes import Watermark
from ..watermarks.verify import (
    DEFAULT_RULE,
    THRESHOLD_RULES,
    CleanPoint,
    base_rate,
    converged,
    default_threshold_seeds,
    threshold_rule,
    verdict,
    wilson,
)


def clean_root(fallback: str | Path | None = None) -> Path:
    """Where clean trajectories live: `$NNLAUNDER_CACHE/clean`, else `fallback` (with the cache off)."""
    root = cache_dir()
    if root is not None:
        return root / "clean"
    if fallback is None:
        raise UserError("the clean-model cache is off (NNLAUNDER_CACHE=off) and no workspace was given for it")
    return Path(fallback)


def trajectory_key(dataset: str, arch: str, cfg: TrainConfig) -> str:
    """Digest of what is trained (dataset, architecture, the recipe's identity without its seed)."""
    ident = {k: v for k, v in cfg.identity().items() if k != "seed"}
    blob = json.dumps({"dataset": dataset, "arch": arch, "train": ident}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Trajectory:
    """One clean seed's epochs: the checkpoint stems and the per-epoch metrics."""
    folder: Path
    seed: int
    metrics: tuple[dict[str, Any], ...]       # one per epoch: epoch, test_acc (percent), loss, seconds

    @property
    def files(self) -> list[Path]:
        return [self.folder / f"epoch-{m['epoch']:03d}" for m in self.metrics]

    @property
    def test_accs(self) -> list[float]:
        return [float(m["test_acc"]) for m in self.metrics]


def clean_trajectory(dataset: str, arch: str, cfg: TrainConfig, seed: int, tr: D.Dataset, te: D.Dataset, *,
                     root: str | Path | None = None, progress: bool | str = False) -> Trajectory:
    """The clean model of (dataset, arch, recipe `cfg`, `seed`) after every epoch: read from the cache, or
    trained once into it (resumable: an interrupted training continues from its last epoch)."""
    cfg = dataclasses.replace(cfg, seed=seed)
    base = Path(root) if root is not None else clean_root()
    folder = base / f"{dataset}-{arch}-{trajectory_key(dataset, arch, cfg)}-s{seed}"
    got = read_trajectory(folder, seed, cfg.epochs)
    if got is not None:
        return got
    model = build(arch, tr.num_classes, seed=seed)
    meta = model_meta(arch, dataset, tr.num_classes, seed=seed, config=cfg)

    def keep(epoch: int, m: torch.nn.Module) -> dict[str, Any]:
        save_model(folder / f"epoch-{epoch:03d}", m, {**meta, "epoch": epoch})
        return {}

    from ..train import train

    res = train(model, tr.x, tr.y, cfg, eval_sets={"test": (te.x, te.y)}, callbacks=[keep],
                checkpoint_dir=folder / "ckpt", resume=True,
                progress=progress if isinstance(progress, str) else (f"clean {arch} s{seed}" if progress else False))
    rows = [{"epoch": int(h["epoch"]), "test_acc": float(h["test_acc"]), "loss": float(h["loss"]),
             "seconds": float(h["seconds"])} for h in res.history]
    atomic_write_json(folder / "metrics.json", {"seed": seed, "dataset": dataset, "arch": arch,
                                                "config": cfg.identity(), "epochs": rows})
    return Trajectory(folder, seed, tuple(rows))


def read_trajectory(folder: Path, seed: int, epochs: int) -> Trajectory | None:
    """The trajectory in `folder` if it is whole (metrics and every epoch's weights), else None."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["epochs"]
        ok = (isinstance(rows, list) and len(rows) == epochs
              and all(isinstance(r, dict) and isinstance(r.get("epoch"), int)
                      and isinstance(r.get("test_acc"), int | float) for r in rows))
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        ok = False
    if not ok:
        return None                       # broken or partial: train again (resuming from ckpt/)
    traj = Trajectory(folder, seed, tuple(rows))
    if not all(f.with_suffix(".safetensors").is_file() for f in traj.files):
        return None
    return traj


def wm_points(traj: Trajectory, wm: Watermark) -> list[CleanPoint]:
    """Hits on `wm`'s verification set after every epoch of `traj` (cached per verification set)."""
    digest = hashlib.sha256(wm.verify_x.numpy().tobytes() + wm.verify_y.numpy().tobytes()).hexdigest()[:16]
    path = traj.folder / f"wm-{digest}.json"
    hits: list[int] | None = None
    if path.is_file():
        try:
            got = json.loads(path.read_text(encoding="utf-8"))["hits"]
            if isinstance(got, list) and len(got) == len(traj.metrics) and all(isinstance(h, int) for h in got):
                hits = got
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            hits = None
    if hits is None:
        hits = []
        for f in traj.files:
            m, _ = load_model(f)
            pred, _ = predict_checked(m, wm.verify_x)
            hits.append(int((pred == wm.verify_y).sum()))
        atomic_write_json(path, {"scheme": wm.scheme, "n": len(wm.verify_y), "hits": hits})
    n = len(wm.verify_y)
    final = traj.test_accs[-1]
    return [CleanPoint(traj.seed, int(m["epoch"]), h, n, float(m["test_acc"]), final)
            for m, h in zip(traj.metrics, hits, strict=True)]



def heldout_rates(trajs: Sequence[Trajectory], wm: Watermark, thresholds: dict[str, float], te: D.Dataset,
                  num_classes: int, alpha: float = 0.01) -> dict[str, Any]:
    """Each threshold's measured false-positive rate: on clean trajectories that set none of them, the share of
    their converged epochs for which the verdict (`verdict`: the threshold test, the base-rate check and the task
    check at `alpha`, as `nnlaunder verify` decides) shows ownership, with its 95% Wilson interval."""
    evidence, rates = [], []                  # per converged epoch: hits and the base rate (rule-independent)
    for t in trajs:
        for p in converged(wm_points(t, wm)):
            m, _ = load_model(t.folder / f"epoch-{p.epoch:03d}")
            pred, _ = predict_checked(m, wm.verify_x)
            evidence.append((int((pred == wm.verify_y).sum()),
                             base_rate(m, wm, te.x, te.y, num_classes, pred_t=pred)))
            rates.append(p.rate)
    n, by = len(wm.verify_y), {}
    for name, th in thresholds.items():
        k = sum(verdict(h, n, th, alpha, b).owned for h, b in evidence)
        lo, hi = wilson(k, len(evidence))
        by[name] = {"threshold": th, "false_positives": k if evidence else None,
                    "fpr_pct": 100.0 * k / len(evidence) if evidence else None,
                    "interval_pct": [100 * lo, 100 * hi] if evidence else None}
    return {"seeds": [t.seed for t in trajs], "epochs": len(evidence), "max_rate": max(rates, default=None),
            "by_threshold": by}


def measure_thresholds(dataset: str, arch: str, cfg: TrainConfig, seeds: Sequence[int] | None,
                       wms: dict[str, Watermark],
                       tr: D.Dataset, te: D.Dataset, *, alpha: float = 0.01, root: str | Path | None = None,
                       progress: bool = False, heldout: Sequence[int] = ()) -> dict[str, Any]:
    """Every threshold rule for every watermark in `wms`, over the clean seeds (trained only where missing):
    what `nnlaunder threshold` writes. `thresholds` holds the default rule's value per scheme. `seeds`
    None: the dataset's default seeds. `heldout`: more clean seeds, none of them among `seeds`, on which every
    rule's false-positive rate is measured (`heldout_rates`; under `heldout`, per scheme and rule)."""
    seeds = default_threshold_seeds(dataset) if seeds is None else seeds
    if overlap := sorted(set(seeds) & set(heldout)):
        raise UserError(f"held-out seeds {overlap} also set the threshold; a false-positive rate needs clean "
                        "models the threshold never saw")
    trajs = [clean_trajectory(dataset, arch, cfg, s, tr, te, root=root, progress=progress) for s in seeds]
    held = [clean_trajectory(dataset, arch, cfg, s, tr, te, root=root, progress=progress) for s in heldout]
    rules: dict[str, dict[str, Any]] = {}
    hits: dict[str, list[list[int]]] = {}
    rates: dict[str, dict[str, Any]] = {}
    for name, wm in wms.items():
        pts = [p for t in trajs for p in wm_points(t, wm)]
        rules[name] = {r: threshold_rule(r, pts, alpha).as_dict() for r in THRESHOLD_RULES}
        hits[name] = [[p.hits for p in pts if p.seed == t.seed] for t in trajs]
        if held:
            rates[name] = heldout_rates(held, wm, {r: v["threshold"] for r, v in rules[name].items()}, te,
                                        tr.num_classes, alpha)
    return {"dataset": dataset, "arch": arch, "seeds": list(seeds), "config": cfg.identity(), "rule": DEFAULT_RULE,
            "alpha": alpha, "thresholds": {n: rules[n][DEFAULT_RULE]["threshold"] for n in wms}, "rules": rules,
            "scheme_params": {n: w.params for n, w in wms.items()},
            "n_verify": {n: len(w.verify_y) for n, w in wms.items()},
            "test_acc": [list(t.test_accs) for t in trajs], "hits": hits, **({"heldout": rates} if held else {})}
