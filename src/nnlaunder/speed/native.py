"""The project's one native kernel (`csrc/conv_pool.c`), built on first use and loaded through ctypes.

It is an accelerator, never a requirement: where there is no C compiler, the build fails, the platform
is not Linux, or `NNLAUNDER_NATIVE=off`, `conv_pool()` returns None with the reason in `status()`, and
callers run the library's ops instead (the same function, rounding aside).

The build is `$CC` (default `cc`) with `-O3 -march=native -fopenmp`, about half a second, cached as
`$NNLAUNDER_CACHE/native/conv_pool-<key>.so`, the key a hash of the source, the compiler's version, the
flags and the CPU (model and flags): a cache shared between machines never loads another CPU's build.
With `NNLAUNDER_CACHE=off` each process builds into a temporary folder of its own. Loaded after torch,
the library's OpenMP runtime (same soname) serves the kernel's threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch  # noqa: F401  (loaded first: the kernel then shares torch's OpenMP runtime)

from ..device import cache_dir, cpu_flags, cpu_name

FLAGS = ["-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC", "-fopenmp"]
_state: dict = {}


def _source() -> bytes:
    return resources.files("nnlaunder.speed").joinpath("csrc/conv_pool.c").read_bytes()


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def _build_dir() -> Path:
    cache = cache_dir()
    if cache is not None:
        return cache / "native"
    if "tmp" not in _state:
        _state["tmp"] = Path(tempfile.mkdtemp(prefix="nnlaunder-native-"))
    return _state["tmp"]


def _build(cc: str, src: bytes) -> Path:
    """The shared library for this source, compiler and CPU: from the cache, or built now (atomically)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(FLAGS).encode(), cpu_name().encode(),
                                     " ".join(cpu_flags()).encode(), platform.machine().encode()])).hexdigest()[:20]
    out = _build_dir() / f"conv_pool-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        c = Path(tmp) / "conv_pool.c"
        c.write_bytes(src)
        so = Path(tmp) / "conv_pool.so"
        r = subprocess.run([cc, *FLAGS, str(c), "-o", str(so)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        os.replace(so, out)
    return out


def _load() -> ctypes.CDLL | None:
    if os.environ.get("NNLAUNDER_NATIVE", "").lower() in ("off", "0", "none"):
        _state["reason"] = "switched off (NNLAUNDER_NATIVE=off)"
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        _state["reason"] = f"not built on {platform.system()} {platform.machine()}"
        return None
    cc = _compiler()
    if cc is None:
        _state["reason"] = f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH"
        return None
    try:
        lib = bind(_build(cc, _source()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _state["reason"] = f"build or load failed: {e}"
        return None
    _state["reason"] = "loaded"
    return lib


def bind(path: Path) -> ctypes.CDLL:
    """Load a build of the kernel and declare its entry points."""
    lib = ctypes.CDLL(str(path))
    if lib.nnl_conv_pool_version() != 1:
        raise RuntimeError("unexpected kernel version")
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    for name in ("nnl_conv_pool_fwd", "nnl_conv_pool_bwd"):
        fn = getattr(lib, name)
        fn.argtypes = [ptr] * 5 + [i32] * 8
        fn.restype = i32
    return lib


def conv_pool() -> ctypes.CDLL | None:
    """The fused conv -> max-pool -> ReLU kernel, or None where it cannot be had (see `status`).
    Built or loaded once per process."""
    if "lib" not in _state:
        _state["lib"] = _load()
    return _state["lib"]


def status() -> str:
    """Why the kernel is or is not available ("loaded", or the reason)."""
    conv_pool()
    return _state["reason"]


def reset() -> None:
    """Forget this process's attempt (tests: after changing the environment)."""
    for k in ("lib", "reason"):
        _state.pop(k, None)
