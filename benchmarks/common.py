"""What every benchmark script shares: the machine and commit a row names, and the rate interval."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from nnlaunder.checkpoint import atomic_write_bytes, atomic_write_json
from nnlaunder.device import code_commit, machine_name
from nnlaunder.report.build import PAPER  # Aiken et al.'s Table 2: the figures every Table 2 result stands beside

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

__all__ = ["ROOT", "RESULTS", "PAPER", "ROWS", "machine", "commit", "provenance", "stored", "write",
           "default_thresholds", "with_paper_rule", "engine_cells", "counts_line", "row_label"]


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


def stored(name: str, empty: Any = None) -> Any:
    """The result file benchmarks/results/<name> as stored, or `empty` ([] unless given) before a run wrote it."""
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else ([] if empty is None else empty)


def write(name: str, data: Any) -> Path:
    """Write benchmarks/results/<name> whole or not at all: JSON for a .json name, else text (a list of Markdown
    lines is joined, ending in a newline)."""
    path = RESULTS / name
    if name.endswith(".json"):
        atomic_write_json(path, data)
    else:
        atomic_write_bytes(path, (data if isinstance(data, str) else "\n".join(data) + "\n").encode())
    return path


def default_thresholds(ds: str) -> dict[str, float]:
    """The default rule's threshold (percent) for each Table 2 row of `ds` (verdicts.json)."""
    rows = stored("verdicts.json")["thresholds"]
    return {t["row"]: t["threshold"] for t in rows if t["default"] and t["dataset"] == ds}


def with_paper_rule(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row (`dataset`, `name`: the watermark as "adi-pt") with the paper's-rule threshold of verdicts.json
    beside its own, where it has none (a cell given its threshold in the experiment file records no other)."""
    paper = {(t["dataset"], t["row"]): t["threshold"]
             for t in stored("verdicts.json")["thresholds"] if t["rule"] == "paper"}
    return [{"threshold_paper": paper[(r["dataset"], r["name"])], **r} if (r["dataset"], r["name"]) in paper else r
            for r in rows]


def engine_cells(workspace: str | Path, experiments: list[str]) -> tuple[list[dict[str, Any]], dict[str, tuple]]:
    """The finished cells of `experiments/paper/<name>.toml` as the file is now (its cells' ids) for each name in
    `experiments`, from the engine's store at `workspace` (or a cell export such as benchmarks/cells), and for
    each name (cells in the store, cells in the file)."""
    from nnlaunder.experiments.config import load_experiment
    from nnlaunder.experiments.store import workspace_cells

    ids = {e: {c.cell_id() for c in load_experiment(ROOT / "experiments" / "paper" / f"{e}.toml")}
           for e in experiments}
    # a store keeps the cells of an experiment file's earlier versions too: only the current file's count
    cells = [c for c in workspace_cells(workspace) if c["experiment"] in ids and c["cell_id"] in ids[c["experiment"]]]
    return cells, {e: (sum(c["experiment"] == e for c in cells), len(ids[e])) for e in experiments}


def counts_line(counts: dict[str, tuple]) -> str:
    """"Cells in the store: a 3 of 5, b 0 of 2." for `engine_cells`' counts."""
    return "Cells in the store: " + ", ".join(f"{e} {have} of {total}" for e, (have, total) in counts.items()) + "."


def row_label(r: dict[str, Any]) -> str:
    """A result row's watermark as the tables name it: the scheme, with Adi's mode ("adi-pt")."""
    return r["scheme"] + (f"-{r['mode']}" if r.get("mode") else "")


# The Table 2 rows per dataset with the attacker's budget (a fraction of the training set).
ROWS = {
    "mnist": [("zhang-content", 0.006), ("zhang-noise", 0.006), ("zhang-unrelated", 0.006)],
    "cifar10": [("zhang-content", 0.006), ("zhang-noise", 0.006), ("zhang-unrelated", 0.006),
                ("adi-pt", 0.108), ("adi-fs", 0.108)],
}
