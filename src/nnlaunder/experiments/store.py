"""The results store: one SQLite file per workspace, no server.

A cell's round rows and its "done" mark are written in ONE transaction when the cell finishes,
so a run killed at any moment (even SIGKILL) leaves either a finished cell or nothing of it; the
next run skips finished cells and redoes the rest.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    cell_id   TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    config    TEXT NOT NULL,
    finished  REAL NOT NULL,
    seconds   REAL NOT NULL,
    summary   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    cell_id TEXT NOT NULL REFERENCES cells(cell_id),
    round   INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (cell_id, round)
);
"""


class Store:
    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            try:
                self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
                self.db.execute("SELECT count(*) FROM cells").fetchone()
                self.db.execute("SELECT count(*) FROM rounds").fetchone()
            except (sqlite3.Error, OSError) as e:
                raise UserError(f"{self.path}: not a results store this version can read ({e})") from e
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            cols = {t: [r[1] for r in self.db.execute(f"PRAGMA table_info({t})")] for t in ("cells", "rounds")}
            self.db.execute("BEGIN IMMEDIATE")        # writable now, not after the first cell's hours of work
            self.db.execute("ROLLBACK")
        except (sqlite3.Error, OSError) as e:
            raise UserError(f"{self.path}: not a results store this version can read and write ({e}); "
                            "use another --workspace or delete the file") from e
        if cols["cells"][:6] != ["cell_id", "experiment", "config", "finished", "seconds", "summary"] or \
                cols["rounds"][:3] != ["cell_id", "round", "metrics"]:
            raise UserError(f"{self.path}: a SQLite file with other tables than a results store's")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def done(self, cell_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM cells WHERE cell_id = ?", (cell_id,)).fetchone() is not None

    def finished_ids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT cell_id FROM cells")}

    def record(self, cell_id: str, experiment: str, config: dict[str, Any], rounds: list[dict[str, Any]],
               summary: dict[str, Any], seconds: float, finished: float | None = None) -> None:
        """Write a finished cell and all its rounds atomically (all or nothing); `finished` (default now) is
        when the cell finished."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute("DELETE FROM rounds WHERE cell_id = ?", (cell_id,))
            cur.executemany("INSERT INTO rounds (cell_id, round, metrics) VALUES (?, ?, ?)",
                            [(cell_id, int(r["round"]), json.dumps(r, sort_keys=True, default=str)) for r in rounds])
            cur.execute("INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, ?, ?)",
                        (cell_id, experiment, json.dumps(config, sort_keys=True, default=str),
                         time.time() if finished is None else finished, seconds,
                         json.dumps(summary, sort_keys=True, default=str)))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def merge(self, other: str | Path) -> tuple[int, int]:
        """Copy into this store every finished cell of the store at `other` (a cell run on another machine)
        that this one lacks, with its rounds, seconds and finish time; a cell both hold stays as this store
        has it. Returns (cells copied, cells already here)."""
        if Path(other).resolve() == self.path.resolve():
            raise UserError(f"{other}: merging a store into itself")
        with Store(other, readonly=True) as src:
            theirs = src.cells()
        have = self.finished_ids()
        new = [c for c in theirs if c["cell_id"] not in have]
        for c in new:
            self.record(c["cell_id"], c["experiment"], c["config"], c["rounds"], c["summary"], c["seconds"],
                        finished=c["finished"])
        return len(new), len(theirs) - len(new)

    def cells(self, experiment: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT cell_id, experiment, config, finished, seconds, summary FROM cells"
        args: tuple = ()
        if experiment is not None:
            q += " WHERE experiment = ?"
            args = (experiment,)
        out = []
        try:
            for cid, exp, cfg, fin, sec, summ in self.db.execute(q + " ORDER BY finished", args):
                rounds = [json.loads(m) for (m,) in self.db.execute(
                    "SELECT metrics FROM rounds WHERE cell_id = ? ORDER BY round", (cid,))]
                cell = {"cell_id": cid, "experiment": exp, "config": json.loads(cfg), "finished": fin,
                        "seconds": sec, "summary": json.loads(summ), "rounds": rounds}
                if not (isinstance(cell["config"], dict) and isinstance(cell["summary"], dict)
                        and all(isinstance(r, dict) for r in rounds) and isinstance(exp, str)):
                    raise ValueError(f"cell {cid!r} is malformed")
                out.append(cell)
        except (sqlite3.Error, ValueError, TypeError, RecursionError) as e:
            raise UserError(f"{self.path}: a corrupt results store ({str(e).splitlines()[0][:200]})") from e
        return out


def ran_on(cells: Sequence[dict[str, Any]]) -> str:
    """The machines, commits and dates the cells ran on, as their summaries name them."""
    seen = dict.fromkeys(f"{s.get('machine') or 'machine not recorded'}, commit {s.get('commit') or 'not recorded'}, "
                         f"{s.get('date') or 'date not recorded'}" for s in (c["summary"] for c in cells))
    return "; ".join(seen) or "-"
