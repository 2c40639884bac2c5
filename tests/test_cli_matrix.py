"""Every CLI command on every registered architecture, and laundering on a bring-your-own model
with batch norm: tiny data in the canonical formats (tests/tinydata.py), one epoch, a few Neural
Cleanse steps; each case ends in the command's documented outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from nnlaunder.cli import main

from .tinydata import make_tiny_data

ARCHS = {"mnist-cnn": "mnist", "cifar-cnn": "cifar10", "resnet20": "cifar10"}
COMMANDS = ("train", "embed", "verify", "threshold", "launder", "finetune", "restore", "landscape", "run", "report")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tinydata"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("matrix")


def cli(args: list[str], capsys, tiny: Path) -> str:
    """Run one command; it must exit 0. Returns its stdout."""
    code = main([*args, "--data-dir", str(tiny), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, f"nnlaunder {' '.join(args)} exited {code}: {err}"
    assert "Traceback" not in err
    return out


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path.name} was not made (an earlier command of the matrix failed)")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_command_on_architecture(arch, command, tiny, work, capsys):
    ds, d = ARCHS[arch], work / arch
    d.mkdir(exist_ok=True)
    train = ["--epochs", "1", "--batch-size", "32"]
    if command == "train":
        out = cli(["train", "--dataset", ds, "--arch", arch, *train, "--out", str(d / "clean")], capsys, tiny)
        meta = json.loads((d / "clean.json").read_text())
        assert (d / "clean.safetensors").is_file() and meta["arch"] == arch and "test accuracy" in out
        assert not (d / "clean.ckpt").exists()              # the resume point goes once the model is saved
    elif command == "embed":
        cli(["embed", "--dataset", ds, "--arch", arch, "--scheme", "zhang-content", *train, "--out", str(d / "wm")],
            capsys, tiny)
        meta = json.loads((d / "wm.json").read_text())
        assert meta["scheme"] == "zhang-content" and 0 <= meta["metrics"]["wm_acc"] <= 100
        if ds == "cifar10":                          # Adi et al., fine-tuned from the clean model (mode=pt)
            _need(d / "clean.safetensors")
            cli(["embed", "--dataset", ds, "--arch", arch, "--scheme", "adi", "--param", "mode=pt", "--base",
                 str(d / "clean"), *train, "--out", str(d / "adi")], capsys, tiny)
            assert json.loads((d / "adi.json").read_text())["scheme_params"]["mode"] == "pt"
    elif command == "verify":
        _need(d / "wm.safetensors")
        v = json.loads(cli(["verify", str(d / "wm"), "--threshold", "10", "--json"], capsys, tiny))
        assert v["n"] == 90 and v["status"] in ("owned", "no proof", "no evidence")
        assert v["owned"] == (v["status"] == "owned")
        assert not v["owned"] or (v["wm_acc"] > 10 and v["p_value"] < 0.01 and v["base_p"] < 0.01)
    elif command == "threshold":
        cli(["threshold", "--dataset", ds, "--arch", arch, "--seeds", "0", *train, "--schemes",
             "zhang-content,zhang-noise", "--out", str(d / "th.json")], capsys, tiny)
        th = json.loads((d / "th.json").read_text())
        assert set(th["thresholds"]) == {"zhang-content", "zhang-noise"} and len(th["test_acc"]) == 1
    elif command == "launder":
        _need(d / "wm.safetensors")
        _need(d / "th.json")
        out = cli(["launder", str(d / "wm"), "--budget", "3/class", "--nc-preset", "fast", "--nc-epochs", "1",
                   "--retrain-epochs", "1", "--verify-scheme", "zhang-content", "--threshold-file",
                   str(d / "th.json"), "--out", str(d / "laundered")], capsys, tiny)
        report = json.loads((d / "laundered" / "report.json").read_text())
        assert report["n_clean"] == 30 and len(report["rounds"]) == 1 and "watermark accuracy" in out
        assert (d / "laundered" / "laundered.safetensors").is_file()
        assert (d / "laundered" / "triggers.png").stat().st_size > 1000
    elif command == "finetune":
        _need(d / "wm.safetensors")
        cli(["finetune", str(d / "wm"), "--split", "0.3", "--epochs", "2", "--out", str(d / "ft")], capsys, tiny)
        hist = json.loads((d / "ft" / "history.json").read_text())
        assert hist["n_split"] == 90 and len(hist["history"]) == 2 and (d / "ft" / "epoch-002.safetensors").is_file()
    elif command == "restore":
        _need(d / "ft" / "model.safetensors")
        cli(["restore", str(d / "ft" / "model"), "--split", "0.3", "--epochs", "1", "--out", str(d / "rs")],
            capsys, tiny)
        assert json.loads((d / "rs" / "history.json").read_text())["n_owner"] == 210
    elif command == "landscape":
        _need(d / "ft" / "epoch-002.safetensors")
        cli(["landscape", str(d / "ft"), "--grid", "3", "--images", "50", "--out", str(d / "land.png")],
            capsys, tiny)
        assert len(json.loads((d / "land.json").read_text())["loss"]) == 3 and (d / "land.png").is_file()
    elif command == "run":
        (d / "exp.toml").write_text(
            f'name = "matrix-{arch}"\ndataset = "{ds}"\narch = "{arch}"\nscheme = "zhang-content"\n'
            'threshold_seeds = [0]\nbudget = "3/class"\n[owner]\nepochs = 1\nbatch_size = 32\n'
            '[attack_params]\nnc = {preset = "fast", max_epochs = 1}\nretrain = {epochs = 1}\n'
            '[sweep]\nseed = [0, 1]\n')
        out = cli(["run", str(d / "exp.toml"), "--workspace", str(d / "ws")], capsys, tiny)
        assert "2 cells run" in out and (d / "ws" / "results.sqlite").is_file()
    elif command == "report":
        _need(d / "ws" / "results.sqlite")
        cli(["report", "--workspace", str(d / "ws")], capsys, tiny)
        page = (d / "ws" / "report" / "index.html").read_text()
        assert f"matrix-{arch}" in page and "launder" in page and "<img" in page


class BNNet(nn.Module):
    """A user's model with batch norm (running statistics and a 0-d `num_batches_tracked` buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


def make_bn_net() -> nn.Module:
    return BNNet()


def test_launder_bring_your_own_model_with_batch_norm(tiny, tmp_path, capsys):
    torch.manual_seed(0)
    net = BNNet()
    rng = np.random.default_rng(0)
    x = (rng.random((60, 32, 32, 3)) * 255).astype(np.uint8)
    y = np.arange(60) % 10
    net.train()
    net(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)      # non-trivial running statistics
    save_file(net.state_dict(), tmp_path / "net.safetensors")
    np.savez(tmp_path / "clean.npz", x=x, y=y)
    np.savez(tmp_path / "verify.npz", x=x[:10], y=np.zeros(10, dtype=np.int64))
    cli(["launder", "--model-factory", "tests.test_cli_matrix:make_bn_net", "--weights",
         str(tmp_path / "net.safetensors"), "--data", str(tmp_path / "clean.npz"), "--verify-npz",
         str(tmp_path / "verify.npz"), "--nc-preset", "fast", "--nc-epochs", "1", "--retrain-epochs", "1",
         "--out", str(tmp_path / "out")], capsys, tiny)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["rounds"]) == 1 and (tmp_path / "out" / "laundered.safetensors").is_file()
    # the attacker-side calibration works on a user's model too
    cli(["launder", "--model-factory", "tests.test_cli_matrix:make_bn_net", "--weights",
         str(tmp_path / "net.safetensors"), "--data", str(tmp_path / "clean.npz"), "--nc-preset", "fast",
         "--nc-epochs", "1", "--calibrate", "--calibrate-folds", "2", "--calibrate-grid",
         '[{"ct": 1, "retrain_epochs": 1}, {"ct": 2, "retrain_epochs": 1}]', "--out", str(tmp_path / "cal")],
        capsys, tiny)
    cal = json.loads((tmp_path / "cal" / "report.json").read_text())["calibration"]
    assert cal["n"] == 60 and len(cal["scores"]) == 2


def test_launder_calibrate_records_its_choice(tiny, work, capsys):
    d = work / "mnist-cnn"
    _need(d / "wm.safetensors")
    out = cli(["launder", str(d / "wm"), "--budget", "3/class", "--nc-preset", "fast", "--nc-epochs", "1",
               "--calibrate", "--calibrate-folds", "2", "--calibrate-grid",
               '[{"ct": 1, "retrain_epochs": 1}, {"ct": 2, "retrain_epochs": 1, "triggers": "top-k"}]',
               "--out", str(d / "calibrated")], capsys, tiny)
    report = json.loads((d / "calibrated" / "report.json").read_text())
    cal = report["calibration"]
    assert len(cal["scores"]) == 2 and cal["n"] == 30 and cal["chosen"] in [s["candidate"] for s in cal["scores"]]
    assert report["config"]["ct"] == cal["chosen"]["ct"] and "calibration: chose" in out
