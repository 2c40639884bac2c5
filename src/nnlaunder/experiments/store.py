"""The results store: one SQLite file per workspace, no server; and its text export.

A cell's round rows and its "done" mark are written in ONE transaction when the cell finishes,
so a run killed at any moment (even SIGKILL) leaves either a finished cell or nothing of it; the
next run skips finished cells and redoes the rest.

An export (`export_workspace`) is the same cells as text: one `<experiment>.jsonl` per experiment, one
cell per line in cell-id order, so it diffs, merges and travels in a repository; with it go the state files
of cells still running (`partial/`), so a run stopped on one machine continues on another, and optionally
the trigger files the report draws. `merge_workspace` reads either form.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_bytes, safe_name
from ..errors import UserError, os_error_line

SIDE_FOLDERS = ("partial", "triggers")      # a workspace's files that belong to cells (by their id prefix)

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

    def add(self, cells: Sequence[dict[str, Any]]) -> tuple[int, int]:
        """Record every finished cell in `cells` (as `cells()` returns them, e.g. from a store on another
        machine) that this store lacks, with its rounds, seconds and finish time; a cell both hold stays as
        this store has it. Returns (cells copied, cells already here)."""
        have = self.finished_ids()
        new = [c for c in cells if c["cell_id"] not in have]
        for c in new:
            self.record(c["cell_id"], c["experiment"], c["config"], c["rounds"], c["summary"], c["seconds"],
                        finished=c["finished"])
        return len(new), len(cells) - len(new)

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
                out.append(_checked({"cell_id": cid, "experiment": exp, "config": json.loads(cfg), "finished": fin,
                                     "seconds": sec, "summary": json.loads(summ), "rounds": rounds}))
        except (sqlite3.Error, ValueError, TypeError, RecursionError) as e:
            raise UserError(f"{self.path}: a corrupt results store ({str(e).splitlines()[0][:200]})") from e
        return out


_KEYS = {"cell_id": str, "experiment": str, "config": dict, "finished": (int, float), "seconds": (int, float),
         "summary": dict, "rounds": list}


def _checked(cell: Any) -> dict[str, Any]:
    if not isinstance(cell, dict) or any(not isinstance(cell.get(k), t) or isinstance(cell.get(k), bool)
                                         for k, t in _KEYS.items()):
        raise ValueError(f"cell {str(cell.get('cell_id') if isinstance(cell, dict) else cell)[:40]!r} is malformed")
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}", cell["cell_id"]):   # it names files
        raise ValueError(f"cell id {cell['cell_id'][:40]!r} is not a plain name")
    if not all(isinstance(r, dict) and isinstance(r.get("round"), int) for r in cell["rounds"]):
        raise ValueError(f"cell {cell['cell_id'][:40]!r} has a malformed round")
    return {k: cell[k] for k in _KEYS}


def read_export(folder: Path) -> list[dict[str, Any]]:
    """The cells of an export folder's `*.jsonl` files."""
    out = []
    for f in sorted(Path(folder).glob("*.jsonl")):
        try:
            with open(f, encoding="utf-8") as fh:
                out += [_checked(json.loads(line)) for line in fh if line.strip()]
        except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as e:
            raise UserError(f"{f}: not a cell export this version can read ({str(e).splitlines()[0][:200]})") from e
    return out


def workspace_cells(folder: str | Path) -> list[dict[str, Any]]:
    """The finished cells of a workspace (its results.sqlite) or of an export (its *.jsonl files)."""
    folder = Path(folder)
    if (folder / "results.sqlite").is_file():
        with Store(folder / "results.sqlite", readonly=True) as s:
            return s.cells()
    if folder.is_dir() and (any(folder.glob("*.jsonl")) or any((folder / d).is_dir() for d in SIDE_FOLDERS)):
        return read_export(folder)
    raise UserError(f"no results store at {folder / 'results.sqlite'} (nor a cell export, *.jsonl): run an experiment "
                    f"first (`nnlaunder run FILE --workspace {folder}`), or merge an export into it "
                    f"(`nnlaunder merge DIR --workspace {folder}`)")


def _copy_side_files(src: Path, dst: Path, keep: Callable[[str, str], bool], newer: bool = False) -> int:
    """Copy the files under src's side folders that `keep(folder, cell id)` accepts (a file's cell id is its
    name's first 16 characters); a file dst has stays as it is, unless `newer` (src is the newer state).
    Returns how many were copied."""
    n = 0
    for sub in SIDE_FOLDERS:
        if (src / sub).is_symlink() or not (src / sub).is_dir():      # a link could point anywhere: not followed
            continue
        for f in sorted((src / sub).rglob("*")):
            rel = f.relative_to(src)
            if f.is_file() and not f.is_symlink() and keep(sub, rel.parts[1][:16]) and \
                    (newer or not (dst / rel).exists()):
                atomic_write_bytes(dst / rel, f.read_bytes())
                n += 1
    return n


def merge_workspace(other: str | Path, ws: str | Path) -> tuple[int, int, int]:
    """Bring into workspace `ws` every finished cell of `other` (a workspace or an export) that ws lacks, the
    trigger files ws lacks, and the state files of cells ws has not finished, so a cell stopped elsewhere
    continues here. Returns (cells copied, cells already here, files copied)."""
    other, ws = Path(other), Path(ws)
    if other.resolve() == ws.resolve():
        raise UserError(f"{other}: merging a workspace into itself")
    cells = workspace_cells(other)
    with Store(ws / "results.sqlite") as store:
        copied, here = store.add(cells)
        done = store.finished_ids()
    try:
        files = _copy_side_files(other, ws, lambda sub, cell: sub == "triggers" or cell not in done)
    except OSError as e:
        raise UserError(f"copying files from {other} into {ws}: {os_error_line(e)}") from e
    return copied, here, files


def export_workspace(ws: str | Path, out: str | Path, experiments: Sequence[str] | None = None,
                     triggers: bool = False) -> tuple[int, int]:
    """Write workspace `ws`'s finished cells (of `experiments`, default all) as `out/<experiment>.jsonl`, with
    the state files of its unfinished cells and, with `triggers`, the finished cells' trigger files. Exporting
    again into the same folder rewrites each experiment's file whole and drops the state of cells finished
    since. Returns (cells written, files copied)."""
    ws, out = Path(ws), Path(out)
    if out.resolve() == ws.resolve():
        raise UserError(f"--out {out} is the workspace itself; export into another folder")
    with Store(ws / "results.sqlite", readonly=True) as s:
        cells = s.cells()
    keep = [c for c in cells if experiments is None or c["experiment"] in experiments]
    if experiments is not None and (missing := sorted(set(experiments) - {c["experiment"] for c in cells})):
        raise UserError(f"{ws}: no finished cell of {', '.join(missing)}")
    by_exp: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in sorted(keep, key=lambda c: c["cell_id"]):
        by_exp[c["experiment"]].append(c)
    done, mine = {c["cell_id"] for c in cells}, {c["cell_id"] for c in keep}
    try:
        for exp, group in by_exp.items():
            text = "".join(json.dumps(c, sort_keys=True, default=str) + "\n" for c in group)
            atomic_write_bytes(out / f"{safe_name(exp)}.jsonl", text.encode())
        for stale in sorted((out / "partial").glob("*")) if (out / "partial").is_dir() else []:
            if stale.name[:16] in done or not (ws / "partial" / stale.name).exists():     # finished since
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        for stale in sorted((out / "triggers").glob("*")) if (out / "triggers").is_dir() else []:
            if stale.name[:16] in done and not (triggers and stale.name[:16] in mine):   # went with a running cell
                stale.unlink()
        files = _copy_side_files(ws, out, lambda sub, cell: cell not in done
                                 or (triggers and sub == "triggers" and cell in mine), newer=True)
    except OSError as e:
        raise UserError(f"writing the export {out}: {os_error_line(e)}") from e
    return len(keep), files


def ran_on(cells: Sequence[dict[str, Any]]) -> str:
    """The machines, commits and dates the cells ran on, as their summaries name them."""
    seen = dict.fromkeys(f"{s.get('machine') or 'machine not recorded'}, commit {s.get('commit') or 'not recorded'}, "
                         f"{s.get('date') or 'date not recorded'}" for s in (c["summary"] for c in cells))
    return "; ".join(seen) or "-"
