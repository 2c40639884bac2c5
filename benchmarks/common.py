"""What every benchmark script shares: the machine and commit a row names, and the rate interval."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from nnlaunder.device import code_commit, machine_name
from nnlaunder.errors import UserError
from nnlaunder.watermarks.verify import wilson

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

__all__ = ["ROOT", "RESULTS", "machine", "commit", "provenance", "default_thresholds", "engine_cells", "counts_line",
           "wilson"]


def machine() -> str:
    """The device a row ran on: the GPU's name, else the CPU's model with the threads torch uses."""
    return machine_name()


def commit() -> str:
    """The checked-out commit (short hash), with "-dirty" where the code (src/, benchmarks' scripts) differs
    from it: a result then came from code no commit holds. A long run takes it once, when it starts."""
    return code_commit(ROOT, ("src", ":(glob)benchmarks/**/*.py")) or "unknown"


def provenance(command: str, rev: str | None = None) -> dict[str, str]:
    """What a result row names about how it was made: machine, date, commit (`rev`, taken when a long run
    started, else now) and the command."""
    return {"machine": machine(), "date": datetime.date.today().isoformat(), "commit": rev or commit(),
            "command": command}


def default_thresholds(ds: str) -> dict[str, float]:
    """The default rule's threshold (percent) for each Table 2 row of `ds` (verdicts.json)."""
    rows = json.loads((RESULTS / "verdicts.json").read_text())["thresholds"]
    return {t["row"]: t["threshold"] for t in rows if t["default"] and t["dataset"] == ds}


def engine_cells(workspace: str | Path, experiments: list[str]) -> tuple[list[dict[str, Any]], dict[str, tuple]]:
    """The finished cells of `experiments/paper/<name>.toml` for each name in `experiments`, from the engine's
    store at `workspace`, and for each name (cells in the store, cells in the file)."""
    from nnlaunder.experiments.config import load_experiment
    from nnlaunder.experiments.store import Store

    db = Path(workspace) / "results.sqlite"
    if not db.is_file():
        raise UserError(f"no results store at {db}: run the experiment files first (nnlaunder run ...)")
    with Store(db, readonly=True) as s:
        cells = [c for c in s.cells() if c["experiment"] in experiments]
    return cells, {e: (sum(c["experiment"] == e for c in cells),
                       len(load_experiment(ROOT / "experiments" / "paper" / f"{e}.toml"))) for e in experiments}


def counts_line(counts: dict[str, tuple]) -> str:
    """"Cells in the store: a 3 of 5, b 0 of 2." for `engine_cells`' counts."""
    return "Cells in the store: " + ", ".join(f"{e} {have} of {total}" for e, (have, total) in counts.items()) + "."


def row_label(r: dict[str, Any]) -> str:
    """A result row's watermark as the tables name it: the scheme, with Adi's mode ("adi-pt")."""
    return r["scheme"] + (f"-{r['mode']}" if r.get("mode") else "")


def owner_models(ds: str, rows, only: list[str] | None, tr, te, data_dir):
    """For each (name, extra) of `rows` (all, or the names in `only`) whose model exists under
    models/<ds>/: (name, extra, model, meta, model sha, the owner's watermark)."""
    from nnlaunder.checkpoint import load_model, model_digest
    from nnlaunder.watermarks.schemes import make_watermark

    for name, extra in rows:
        if only and name not in only:
            continue
        path = ROOT / "models" / ds / name
        if not path.with_suffix(".safetensors").is_file():
            print(f"{ds}/{name}: no model yet, skipped", flush=True)
            continue
        model, meta = load_model(path)
        wm = make_watermark(meta["scheme"], tr, te, data_dir, meta.get("scheme_params") or {})
        yield name, extra, model, meta, model_digest(path), wm


# ---- the per-architecture rule of the Table 2 headline rows (benchmarks/table2.py)
# One choice per architecture from single held-out slices of several owner models' attacker sets: of
# the (DT, CT, retraining epochs) candidates whose held-out accuracy, averaged over the models, is
# within one point of the best, the most aggressive. Kept for the headline rows it produced; a user
# laundering one model calibrates with `calibrate` above.
Candidate = tuple[float, float, int]          # (DT, CT, retraining epochs)


def most_aggressive_within(acc: dict[Candidate, float], margin: float = 1.0) -> Candidate:
    """Of the candidates whose held-out accuracy is within `margin` points of the best, the lowest
    DT + CT, then the fewest retraining epochs."""
    if not acc:
        raise UserError("no calibration candidates to choose from")
    best = max(acc.values())
    ok = [k for k, a in acc.items() if a >= best - margin]
    return min(ok, key=lambda k: (k[0] + k[1], k[2], k))


def joint_choice(records: list[dict[str, Any]], ds: str, arch: str) -> tuple[Candidate, list[str]]:
    """`most_aggressive_within` over every calibration record of `arch` on `ds` (records with
    "stage" == "calibration", "dt", "ct", "epochs", "name" and "attacker_acc"), the accuracy averaged
    over the models per candidate: one choice for models calibrated in separate runs."""
    cells: dict[Candidate, dict[str, float]] = {}
    for r in records:
        if r.get("stage") == "calibration" and r["dataset"] == ds and r["arch"] == arch:
            cells.setdefault((r["dt"], r["ct"], r["epochs"]), {})[r["name"]] = r["attacker_acc"]
    if not cells:
        raise UserError(f"no calibration records for {ds}/{arch}")
    names = sorted({n for c in cells.values() for n in c})
    full = {k: sum(c.values()) / len(c) for k, c in cells.items() if len(c) == len(names)}
    if not full:
        raise UserError(f"no candidate was calibrated on all of {names}")
    return most_aggressive_within(full), names
