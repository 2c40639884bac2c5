"""`nnlaunder data fetch` against a local HTTP server on 127.0.0.1: the real download, checksum,
unpack and skip code, with no internet. Files are built from tiny canonical-format data; the
real pinned sources are exercised by serving ../shared/data's byte-identical copies as a mirror."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nnlaunder import data as D
from nnlaunder.cli import main
from nnlaunder.data.fetch import check, fetch
from nnlaunder.data.sources import Remote, Source
from nnlaunder.errors import UserError


class _Server:
    """Serves `files` (URL path -> bytes); /fail/* answers 500; /drop/* promises more bytes than it sends."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.hits = files, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.hits.append(self.path)
                if self.path.startswith(("/drip/", "/endless/")):
                    self.send_response(200)
                    self.end_headers()
                    try:
                        for _ in range(200):            # one byte at a time, or far more than was pinned
                            self.wfile.write(b"x" if self.path.startswith("/drip/") else b"x" * 65536)
                            self.wfile.flush()
                            time.sleep(0.05 if self.path.startswith("/drip/") else 0)
                    except OSError:
                        pass
                    return
                if self.path.startswith("/fail/"):
                    self.send_error(500, "broken on purpose")
                    return
                body = outer.files.get(self.path.removeprefix("/drop"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (1000 if self.path.startswith("/drop/") else 0)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                if self.path.startswith("/drop/"):
                    self.connection.shutdown(2)     # the connection drops before the promised end

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _mnist_source(base: str, files: dict[str, bytes], prefix: str = "") -> Source:
    return Source("mnist", tuple(Remote(n, (f"{base}{prefix}/mnist/{n}",), _sha(b)) for n, b in files.items()),
                  tuple(files), "test")


def _served(tiny: Path) -> dict[str, bytes]:
    return {n: (tiny / "mnist" / n).read_bytes() for n in D.sources.MNIST.present}


def test_fetch_verifies_unpacks_nothing_twice_and_the_reader_takes_it(tiny, tmp_path):
    files = _served(tiny)
    srv = _Server({f"/mnist/{n}": b for n, b in files.items()})
    try:
        src = {"mnist": _mnist_source(srv.url, files)}
        out = tmp_path / "data"
        assert check("mnist", out, src).state == "missing"
        st = fetch("mnist", out, sources=src, progress=False, log=lambda m: None)
        assert st.state == "verified" and len(srv.hits) == 4
        assert len(D.load("mnist", out, "test")) == 100         # the real reader takes what was fetched
        fetch("mnist", out, sources=src, progress=False, log=lambda m: None)
        assert len(srv.hits) == 4                                # the rerun downloaded nothing
        (out / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
        fetch("mnist", out, sources=src, progress=False, log=lambda m: None)
        assert srv.hits[4:] == ["/mnist/t10k-labels-idx1-ubyte.gz"]     # only the damaged file again
    finally:
        srv.close()


def test_checksum_mismatch_server_error_and_dropped_connection_leave_no_file(tiny, tmp_path):
    files = _served(tiny)
    srv = _Server({f"/mnist/{n}": b for n, b in files.items()})
    try:
        name = "t10k-labels-idx1-ubyte.gz"
        for base, pin, needle in ((srv.url, "0" * 64, "checksum mismatch"),
                                  (srv.url + "/fail", _sha(files[name]), "HTTP 500"),
                                  (srv.url + "/drop", _sha(files[name]), "closed")):
            src = {"mnist": Source("mnist", (Remote(name, (f"{base}/mnist/{name}",), pin),), (name,), "test")}
            out = tmp_path / needle.replace(" ", "-")
            with pytest.raises(UserError, match=needle):
                fetch("mnist", out, sources=src, progress=False, log=lambda m: None)
            assert not list((out / "mnist").iterdir())           # no half file, no .part left
        # a failing first URL falls through to the next one
        src = {"mnist": Source("mnist", (Remote(name, (f"{srv.url}/fail/mnist/{name}", f"{srv.url}/mnist/{name}"),
                                                _sha(files[name])),), (name,), "test")}
        assert fetch("mnist", tmp_path / "ok", sources=src, progress=False, log=lambda m: None).state == "verified"
    finally:
        srv.close()


def _tar(members: dict[str, bytes], link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for n, b in members.items():
            info = tarfile.TarInfo(n)
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
        if link:
            info = tarfile.TarInfo("cifar-10-batches-py/evil-link")
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
    return buf.getvalue()


def test_an_archive_is_unpacked_safely(tiny, tmp_path):
    batches = tiny / "cifar10" / "cifar-10-batches-py"
    cases = {"good": _tar({f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in batches.iterdir()}),
             "traversal": _tar({"cifar-10-batches-py/../../escaped.txt": b"x"}),
             "link": _tar({}, link="/etc/passwd")}
    srv = _Server({f"/{k}/cifar10/cifar-10-python.tar.gz": v for k, v in cases.items()})
    try:
        for kind, body in cases.items():
            present = tuple(f"cifar-10-batches-py/{p.name}" for p in batches.iterdir())
            src = {"cifar10": Source("cifar10", (Remote("cifar-10-python.tar.gz",
                                                        (f"{srv.url}/{kind}/cifar10/cifar-10-python.tar.gz",),
                                                        _sha(body), unpack=True),), present, "test")}
            out = tmp_path / kind
            if kind == "good":
                assert fetch("cifar10", out, sources=src, progress=False, log=lambda m: None).state == "verified"
                assert not (out / "cifar10" / "cifar-10-python.tar.gz").exists()      # the archive is removed
                assert len(D.load("cifar10", out, "test")) > 0
            else:
                with pytest.raises(UserError, match="outside" if kind == "traversal" else "link"):
                    fetch("cifar10", out, sources=src, progress=False, log=lambda m: None)
                assert not (tmp_path / "escaped.txt").exists() and not (out / "escaped.txt").exists()
                assert not (out / "cifar10" / "cifar-10-batches-py").exists()
    finally:
        srv.close()


def test_the_cli_fetches_the_real_pinned_files_from_a_mirror(data_dir, tmp_path, capsys):
    """The real sources (pinned SHA-256 of the published MNIST and Adi files), served from the
    byte-identical copies in the shared data folder by a local mirror, never the internet."""
    files = {f"/mnist/{n}": (data_dir / "mnist" / n).read_bytes() for n in D.sources.MNIST.present}
    adi = data_dir / "adi-trigger-set"
    files.update({f"/adi-trigger-set/{n}": (adi / n).read_bytes() for n in D.sources.ADI_TRIGGER_SET.present})
    srv = _Server(files)
    out = tmp_path / "fetched"
    try:
        out.mkdir()
        code = main(["data", "fetch", "mnist", "adi-trigger-set", "--data-dir", str(out), "--quiet",
                     "--mirror", srv.url, "--mirror-only"])
        assert code == 0
        code = main(["data", "check", "--data-dir", str(out)])
        o = capsys.readouterr().out
        assert code == 0
        assert "mnist            verified" in o and "adi-trigger-set  verified" in o
        assert "cifar10          missing" in o and "nnlaunder data fetch cifar10" in o
        assert len(D.load_adi_trigger_set(out)) == 100
    finally:
        srv.close()


def test_no_network_is_one_line_naming_the_url(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NNLAUNDER_DATA_MIRROR_ONLY", "1")
    code = main(["data", "fetch", "mnist", "--data-dir", str(tmp_path), "--quiet", "--mirror", "http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "http://127.0.0.1:9/mnist/" in err[0] and "could not fetch" in err[0]
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_the_default_data_folder_and_the_fetch_hint(tmp_path, monkeypatch):
    monkeypatch.delenv("NNLAUNDER_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)                                  # no ../shared/data from here
    assert D.default_data_dir() == tmp_path / "cache" / "nnlaunder" / "data"
    with pytest.raises(UserError, match="nnlaunder data fetch mnist"):
        D.load("mnist", None, "test")
    with pytest.raises(UserError, match="nnlaunder data fetch adi-trigger-set"):
        D.load_adi_trigger_set(None)
    with pytest.raises(UserError, match="does not exist"):
        D.resolve_data_dir(tmp_path / "nowhere")
    assert os.environ.get("NNLAUNDER_DATA") is None


def test_a_tampered_unpacked_file_is_not_verified_even_with_a_forged_stamp(tiny, tmp_path):
    import json
    import os

    batches = tiny / "cifar10" / "cifar-10-batches-py"
    body = _tar({f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in batches.iterdir()})
    srv = _Server({"/cifar10/cifar-10-python.tar.gz": body})
    try:
        present = tuple(f"cifar-10-batches-py/{p.name}" for p in batches.iterdir())
        url = f"{srv.url}/cifar10/cifar-10-python.tar.gz"
        src = {"cifar10": Source("cifar10", (Remote("cifar-10-python.tar.gz", (url,), _sha(body), unpack=True),),
                                 present, "test")}
        out = tmp_path / "d"
        assert fetch("cifar10", out, sources=src, progress=False, log=lambda m: None).state == "verified"
        folder = out / "cifar10"
        victim = folder / "cifar-10-batches-py" / "test_batch"
        st = victim.stat()
        data = bytearray(victim.read_bytes())
        data[-10] ^= 0xFF                                   # same size ...
        victim.write_bytes(bytes(data))
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        assert check("cifar10", out, src).state == "present"      # size and mtime differ: hashed again
        # a forged stamp of the old form (the archive's pinned hash, no record of the files) vouches for nothing
        (folder / ".nnlaunder-fetch.json").write_text(json.dumps({"cifar-10-python.tar.gz": _sha(body)}))
        got = check("cifar10", out, src)
        assert got.state == "present" and "unchecked" in got.detail
        # fetch does not keep what it cannot vouch for: it fetches the archive again
        assert fetch("cifar10", out, sources=src, progress=False, log=lambda m: None).state == "verified"
        assert victim.read_bytes() == (batches / "test_batch").read_bytes()
        # a FIFO as the stamp is never opened
        (folder / ".nnlaunder-fetch.json").unlink()
        os.mkfifo(folder / ".nnlaunder-fetch.json")
        assert check("cifar10", out, src).state == "present"
    finally:
        srv.close()


def test_a_dripping_or_endless_mirror_is_given_up(tmp_path, monkeypatch):
    """A server that sends a byte at a time is given up when it stalls; one that sends more than the pinned size
    is cut off at it; neither leaves a file."""
    import nnlaunder.data.fetch as F

    monkeypatch.setattr(F, "STALL_S", 0.5)
    srv = _Server({})
    try:
        for kind, needle in (("drip", "stalled"), ("endless", "more than the pinned")):
            src = {"mnist": Source("mnist", (Remote("f.gz", (f"{srv.url}/{kind}/f.gz",), "0" * 64, 100_000),),
                                   ("f.gz",), "test")}
            t0 = time.monotonic()
            with pytest.raises(UserError, match=needle):
                fetch("mnist", tmp_path, sources=src, progress=False, log=lambda m: None)
            assert time.monotonic() - t0 < 8
            assert not list((tmp_path / "mnist").glob("*")), list((tmp_path / "mnist").glob("*"))
    finally:
        srv.close()
