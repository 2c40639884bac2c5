"""`nnlaunder data fetch` and `data check`: the datasets from their public sources, verified.

Every file is downloaded to a temporary name beside its target, hashed while it arrives, checked
against its pinned SHA-256 (`sources.py`) and only then renamed into place, so an interrupted or
corrupted download never leaves a file a reader would take. An archive is unpacked member by
member (regular files and folders only, each inside the dataset's folder) and then removed; a
stamp records what was verified. Files already present with the right checksum are not fetched
again. `mirror` (or $NNLAUNDER_DATA_MIRROR) is tried before the canonical URLs: it serves
`<mirror>/<dataset folder>/<file>`; with `mirror_only` (or $NNLAUNDER_DATA_MIRROR_ONLY=1) it is
the only place asked (an internal mirror on a machine without internet).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm.auto import tqdm

from ..errors import UserError
from .sources import SOURCES, Remote, Source

MIRROR_ENV = "NNLAUNDER_DATA_MIRROR"
MIRROR_ONLY_ENV = "NNLAUNDER_DATA_MIRROR_ONLY"      # "1": never reach for the canonical URLs
STAMP = ".nnlaunder-fetch.json"
TIMEOUT_S = 60                  # no byte for this long: the read fails
STALL_S, STALL_BYTES = 60.0, 64 << 10   # under 64 KiB in a minute: the download is given up
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The file's SHA-256. A path that is not a regular file (a FIFO, /dev/zero, a folder) is refused
    before it is opened: reading it could block or never end."""
    if not Path(path).is_file():
        raise UserError(f"{path}: not a regular file")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _names(names: list[str] | None, sources: Mapping[str, Source]) -> list[str]:
    if not names or names == ["all"]:
        return list(sources)
    if "all" in names:
        raise UserError("'all' stands alone: give `all` or dataset names, not both")
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise UserError(f"unknown dataset(s) {unknown}; choose from {', '.join(sources)}, or all alone")
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Status:
    name: str
    folder: Path
    state: str           # "verified", "present" (no checksum to check it against) or "missing"
    detail: str


MAX_STAMP_BYTES = 1 << 20


def _stamp(folder: Path) -> dict[str, Any]:
    """The fetch stamp, or {} where it is missing, not a regular file (a FIFO is never opened), too big,
    or not a JSON object."""
    path = folder / STAMP
    try:
        if not path.is_file() or path.stat().st_size > MAX_STAMP_BYTES:
            return {}
        got = json.loads(path.read_text(encoding="utf-8"))
        return got if isinstance(got, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def _member_record(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _changed_member(folder: Path, present: tuple[str, ...], members: Any) -> str | None:
    """The first unpacked file that is not what was unpacked (None: all are). A file whose size or mtime
    differs from the stamp's record is hashed again; a stamp without a record vouches for nothing."""
    if not isinstance(members, dict):
        return present[0] if present else None
    for rel in present:
        rec, path = members.get(rel), folder / rel
        if not isinstance(rec, dict) or not path.is_file():
            return rel
        st = path.stat()
        same = rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns
        if not same and sha256_file(path) != rec.get("sha256"):
            return rel
        if same and rec.get("sha256") is None:
            return rel
    return None


def check(name: str, data_dir: Path, sources: Mapping[str, Source] = SOURCES) -> Status:
    src = sources[name]
    folder = Path(data_dir) / src.folder
    missing = [p for p in src.present if not (folder / p).is_file()]
    if missing and src.fallback and all((Path(src.fallback) / p).is_file() for p in src.present):
        return Status(name, Path(src.fallback), "present", f"in {src.fallback} (a system package), not checked")
    if missing:
        return Status(name, folder, "missing", f"{len(missing)} of {len(src.present)} files missing "
                                               f"(e.g. {missing[0]})")
    stamp = _stamp(folder)
    for f in src.files:
        if f.unpack and stamp.get(f.name) != f.sha256:
            return Status(name, folder, "present", "present; not unpacked by `nnlaunder data fetch`, so unchecked")
        if f.unpack:
            bad = _changed_member(folder, src.present, stamp.get("members"))
            if bad is not None:
                return Status(name, folder, "present", f"{bad} is not the file `nnlaunder data fetch` unpacked "
                                                       "(changed since, or never recorded): unchecked")
        if not f.unpack and sha256_file(folder / f.name) != f.sha256:
            return Status(name, folder, "present", f"{f.name} differs from the published file (another copy?)")
    return Status(name, folder, "verified", f"{len(src.present)} files match their pinned SHA-256")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download(url: str, tmp: Path, f: Remote, progress: bool) -> None:
    """Stream `url` into `tmp`, checking its length and SHA-256; raises OSError / ValueError."""
    h, got = hashlib.sha256(), 0
    req = urllib.request.Request(url, headers={"User-Agent": "nnlaunder-data-fetch"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r, open(tmp, "wb") as out:  # noqa: S310 (http/https only)
        length = r.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else f.size
        with tqdm(total=total, unit="B", unit_scale=True, desc=f.name, leave=False, disable=not progress) as bar:
            window_start, window_bytes = time.monotonic(), 0
            for block in iter(lambda: r.read1(CHUNK), b""):     # what has arrived, never waiting for a full chunk
                got += len(block)
                if f.size is not None and got > f.size:
                    raise ValueError(f"the server sent more than the pinned {f.size} bytes")
                out.write(block)
                h.update(block)
                bar.update(len(block))
                window_bytes += len(block)
                if time.monotonic() - window_start >= STALL_S:    # a server that drips bytes: give up
                    if window_bytes < STALL_BYTES:
                        raise ValueError(f"stalled: under {STALL_BYTES} bytes in {STALL_S:.0f} s")
                    window_start, window_bytes = time.monotonic(), 0
    if length and length.isdigit() and got != int(length):
        raise ValueError(f"the connection closed after {got} of {length} bytes")
    if h.hexdigest() != f.sha256:
        raise ValueError(f"checksum mismatch (SHA-256 {h.hexdigest()[:16]}…, expected {f.sha256[:16]}…)")


def _urls(src: Source, f: Remote, mirror: str | None, mirror_only: bool = False) -> list[str]:
    urls = [f"{mirror.rstrip('/')}/{src.folder}/{f.name}"] if mirror else []
    if mirror_only and not mirror:
        raise UserError("--mirror-only needs --mirror URL (or $NNLAUNDER_DATA_MIRROR)")
    urls += [] if mirror_only else list(f.urls)
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if bad:
        raise UserError(f"only http(s) URLs can be fetched, got {bad[0]!r}")
    return urls


def fetch_file(src: Source, f: Remote, folder: Path, mirror: str | None, progress: bool,
               mirror_only: bool = False) -> Path:
    """Download `f` into `folder` from the first URL that delivers the pinned bytes."""
    target = folder / f.name
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in _urls(src, f, mirror, mirror_only):
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(name)
        try:
            _download(url, tmp, f, progress)
            os.replace(tmp, target)
            return target
        except (OSError, ValueError, http.client.HTTPException) as e:
            errors.append(f"{url}: {_reason(e)}")
        finally:
            tmp.unlink(missing_ok=True)
    raise UserError(f"could not fetch {src.folder}/{f.name}: " + "; ".join(errors))


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    if isinstance(e, http.client.IncompleteRead):
        return f"the connection closed after {len(e.partial)} bytes"
    return str(e) or type(e).__name__


def safe_unpack(archive: Path, folder: Path) -> list[str]:
    """Unpack a .tar.gz into `folder`: regular files and folders only, none outside `folder`."""
    root = folder.resolve()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = PurePosixPath(m.name).parts
                if m.name.startswith("/") or ".." in parts or not (root / m.name).resolve().is_relative_to(root):
                    raise UserError(f"{archive.name}: member {m.name!r} would land outside {folder}; refused")
                if not (m.isfile() or m.isdir()):
                    raise UserError(f"{archive.name}: member {m.name!r} is a link or device; refused")
            written = []
            for m in members:
                if m.isfile():
                    data = tar.extractfile(m)
                    assert data is not None
                    _atomic_write(folder / m.name, data.read())
                    written.append(m.name)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{archive.name}: not a readable .tar.gz ({e})") from e
    return written


def fetch(name: str, data_dir: Path, *, mirror: str | None = None, mirror_only: bool = False,
          sources: Mapping[str, Source] = SOURCES, progress: bool = True,
          log: Callable[[str], None] = print) -> Status:
    """Fetch one dataset into `data_dir/<its folder>`; what is already there and correct is kept."""
    src = sources[name]
    folder = Path(data_dir) / src.folder
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    mirror_only = mirror_only or os.environ.get(MIRROR_ONLY_ENV, "") == "1"
    before = check(name, data_dir, sources)
    own_copy = before.state == "present" and all(f.unpack for f in src.files) and not _stamp(folder)
    if before.state == "verified" or own_copy:         # a copy fetch never unpacked is the user's: kept
        log(f"{name}: already in {folder} ({before.detail})")
        return before
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(folder)
    for f in src.files:
        target = folder / f.name
        if not f.unpack and target.is_file() and sha256_file(target) == f.sha256:
            continue
        log(f"{name}: fetching {f.name} ...")
        got = fetch_file(src, f, folder, mirror, progress, mirror_only)
        if f.unpack:
            try:
                safe_unpack(got, folder)
            finally:
                got.unlink(missing_ok=True)
            stamp[f.name] = f.sha256
            stamp["members"] = {rel: _member_record(folder / rel) for rel in src.present if (folder / rel).is_file()}
            _atomic_write(folder / STAMP, json.dumps(stamp, indent=1).encode())
    after = check(name, data_dir, sources)
    log(f"{name}: {after.state} in {folder} ({after.detail}); licence: {src.licence}")
    return after


def check_lines(names: list[str] | None, data_dir: Path, sources: Mapping[str, Source] = SOURCES) -> list[str]:
    """`nnlaunder data check`: one line per dataset, with the command for what is missing."""
    out = [f"data folder: {data_dir}"]
    for n in _names(names, sources):
        st = check(n, data_dir, sources)
        todo = f"  ->  nnlaunder data fetch {n}" + (f" --data-dir {data_dir}" if st.state == "missing" else "")
        out.append(f"  {n:<16} {st.state:<9} {st.detail}{todo if st.state == 'missing' else ''}")
    return out


def fetch_all(names: list[str] | None, data_dir: Path, *, mirror: str | None = None, mirror_only: bool = False,
              sources: Mapping[str, Source] = SOURCES, progress: bool = True,
              log: Callable[[str], None] = print) -> list[Status]:
    """`nnlaunder data fetch NAME... | all`."""
    return [fetch(n, data_dir, mirror=mirror, mirror_only=mirror_only, sources=sources, progress=progress, log=log)
            for n in _names(names, sources)]
