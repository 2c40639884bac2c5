"""Device selection: CPU by default, clear errors for devices this machine lacks."""

import pytest
import torch

from nnlaunder.device import compute_device, resolve, set_device
from nnlaunder.errors import UserError
from nnlaunder.models import build


def test_default_is_cpu_and_models_follow(monkeypatch):
    monkeypatch.delenv("NNLAUNDER_DEVICE", raising=False)
    assert compute_device() == torch.device("cpu")
    assert next(build("mnist-cnn", seed=0).parameters()).device.type == "cpu"
    assert resolve("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu0", "cuda:x"])
def test_unknown_devices_are_user_errors(name):
    with pytest.raises(UserError):
        set_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NNLAUNDER_DEVICE", "cuda")
    with pytest.raises(UserError, match="no CUDA GPU"):
        compute_device()


def test_cli_device_flag_error_is_one_line(capsys):
    from nnlaunder.cli import main

    assert main(["verify", "nope.safetensors", "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnlaunder: error:") and len(err.strip().splitlines()) == 1


def test_keep_freed_memory_is_opt_in(monkeypatch, capsys):
    import platform
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "perf"))
    from attempts import keep_freed_memory  # a benchmark's attempt, not in the library

    monkeypatch.delenv("NNLAUNDER_MALLOC", raising=False)
    assert keep_freed_memory() is False                  # off unless asked
    monkeypatch.setenv("NNLAUNDER_MALLOC", "default")
    assert keep_freed_memory() is False
    monkeypatch.setenv("NNLAUNDER_MALLOC", "kepp")                 # a typo: said on one line, then ignored
    assert keep_freed_memory() is False
    assert "NNLAUNDER_MALLOC='kepp'" in capsys.readouterr().err
    monkeypatch.setenv("NNLAUNDER_MALLOC", "keep")
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc                  # mallopt accepted where glibc is the allocator


def test_code_commit_outside_a_checkout_is_none(tmp_path):
    """A result run from a folder git does not track names no commit, rather than a wrong one."""
    from nnlaunder.device import code_commit

    assert code_commit(tmp_path) is None
    here = code_commit()               # this checkout: a short hash, "-dirty" while src/ is edited
    assert here is None or len(here.removesuffix("-dirty")) >= 7
