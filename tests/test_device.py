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


def test_code_commit_outside_a_checkout_is_none(tmp_path):
    """A result run from a folder git does not track names no commit, rather than a wrong one."""
    from nnlaunder.device import code_commit

    assert code_commit(tmp_path) is None
    here = code_commit()               # this checkout: a short hash, "-dirty" while src/ is edited
    assert here is None or len(here.removesuffix("-dirty")) >= 7
