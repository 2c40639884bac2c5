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


def test_seconds_leave_out_the_time_the_process_was_stopped(tmp_path):
    """A run paused with SIGSTOP (Ctrl-Z, kill -STOP) records the seconds it worked, not the pause: clock.now()
    advances by the busy time only, and the stop is counted once, within a tick."""
    import signal
    import subprocess
    import sys
    import time

    import pytest

    if not hasattr(signal, "SIGSTOP"):
        pytest.skip("no job control signals on this platform")
    script = tmp_path / "busy.py"
    script.write_text("import time\nfrom nnlaunder import clock\nassert clock.watch_stops()\n"
                      "print('ready', flush=True)\n"
                      "t0, w0 = clock.now(), time.perf_counter()\n"
                      "while time.perf_counter() - w0 < 2.5:\n    sum(range(1000))\n"
                      "print(clock.now() - t0, time.perf_counter() - w0, clock.stopped_seconds(), flush=True)\n")
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    p.send_signal(signal.SIGSTOP)
    time.sleep(1.5)
    p.send_signal(signal.SIGCONT)
    work, wall, stopped = map(float, p.stdout.readline().split())
    assert p.wait() == 0
    assert wall == pytest.approx(2.5, abs=0.1)
    assert stopped == pytest.approx(1.5, abs=0.25) and work == pytest.approx(wall - stopped, abs=1e-3)
