"""Bring your own model and data: a network defined only in this file, loaded through
`--model-factory tests.test_byo:make_net`, backdoored with plain PyTorch, laundered end to end."""

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nnlaunder.attacks.units import discover_units
from nnlaunder.cli import main
from nnlaunder.errors import UserError
from nnlaunder.external.data import read_external, read_image_folder, read_npz
from nnlaunder.external.models import CodeAllowance, PixelInput, check_model_fits, external_model, load_factory

from .synthetic import add_trigger, make_images


class Net(nn.Module):
    """Not one of ours: takes pixels in 0..255 and normalises itself with its own constants."""

    def __init__(self, width: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 9, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.head(self.features((x - 40.0) / 60.0))


def make_net(width: int = 8, classes: int = 4) -> nn.Module:
    return Net(width, classes)


def not_a_module():
    return 42


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.relu(self.conv(x * 255.0)).flatten(2).transpose(1, 2)      # (N, 144, 8)
        h, _ = self.attn(h, h, h)
        return self.out(h.mean(1))


def make_attention():
    return WithAttention()


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    """A BadNets-style backdoor (checkerboard -> class 0) planted with a plain PyTorch loop."""
    d = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    train_set, poison = make_images(3000, 10), make_images(300, 11)
    x = torch.cat([train_set.x, add_trigger(poison.x)]) * 255.0          # the model's own pixel range
    y = torch.cat([train_set.y, torch.zeros(300, dtype=torch.long)])
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(8):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    save_file(net.state_dict(), str(d / "net.safetensors"))
    torch.save(net.state_dict(), d / "net.pt")
    clean, test = make_images(100, 13), make_images(1000, 12)
    victims = test.subset(torch.nonzero(test.y != 0).flatten())
    as_u8 = lambda t: (t.squeeze(1) * 255).round().to(torch.uint8).numpy()  # noqa: E731
    np.savez(d / "clean.npz", x=as_u8(clean.x), y=clean.y.numpy())
    np.savez(d / "test.npz", x=test.x.permute(0, 2, 3, 1).numpy(), y=test.y.numpy())        # floats in [0, 1]
    np.savez(d / "verify.npz", x=as_u8(add_trigger(victims.x)), y=np.zeros(len(victims), dtype=np.int64))
    return d


def test_factory_model_launders_end_to_end(backdoored, tmp_path, capsys):
    d = backdoored
    rc = main(["launder", "--model-factory", "tests.test_byo:make_net", "--model-kwargs", '{"width": 8}',
               "--weights", str(d / "net.safetensors"), "--input-range", "0,255",
               "--data", str(d / "clean.npz"), "--test-data", str(d / "test.npz"),
               "--verify-npz", str(d / "verify.npz"), "--out", str(tmp_path / "out"), "--quiet",
               "--dt", "2", "--ct", "2", "--nc-epochs", "60", "--retrain-epochs", "15", "--retrain-lr", "1e-3"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["n_clean"] == 100 and rep["skipped_layers"] == []
    assert rep["before"]["attack_success"] > 95 and rep["before"]["test_acc"] > 95
    assert rep["after"]["attack_success"] < 10, rep["after"]
    assert rep["after"]["test_acc"] > 90
    # the laundered weights are the user's own state_dict: they load back into their network
    net = make_net()
    net.load_state_dict(load_file(str(tmp_path / "out" / "laundered.safetensors")))
    assert (tmp_path / "out" / "triggers.png").stat().st_size > 0


def test_pt_weights_need_the_flag(backdoored, tmp_path, capsys):
    args = ["launder", "--model-factory", "tests.test_byo:make_net", "--weights", str(backdoored / "net.pt"),
            "--data", str(backdoored / "clean.npz"), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(args) == 2
    assert "--allow-torch-load" in capsys.readouterr().err
    m = external_model("tests.test_byo:make_net", {}, backdoored / "net.pt", allow_torch_load=True,
                       allow=CodeAllowance.typed("tests.test_byo:make_net", torch_load=True), input_range=(0, 255))
    assert isinstance(m, PixelInput)


@pytest.mark.parametrize("argv, needle", [
    (["--model-factory", "no_such_pkg.nets:make"], "cannot import"),
    (["--model-factory", "tests.test_byo:nope"], "has no function"),
    (["--model-factory", "tests.test_byo"], "package.module:function"),
    (["--model-factory", "tests.test_byo:not_a_module"], "not a torch.nn.Module"),
    (["--model-factory", "tests.test_byo:make_net", "--model-kwargs", '{"width": 4}'], "do not fit"),
    (["--model-factory", "tests.test_byo:make_net", "--model-kwargs", "[1]"], "JSON object"),
    (["--model-factory", "tests.test_byo:make_net", "--model-kwargs", '{"depth": 3}'], "failed"),
    (["--model-factory", "tests.test_byo:make_net", "--model-kwargs", '{"classes": 5}'], "do not fit"),
    (["--model-factory", "tests.test_byo:make_net", "--input-range", "1,0"], "HI > LO"),
    (["--model-factory", "tests.test_byo:make_net", "--mean", "0.5"], "go together"),
])
def test_factory_mistakes_are_one_line(backdoored, tmp_path, capsys, argv, needle):
    base = ["launder", "--weights", str(backdoored / "net.safetensors"), "--data", str(backdoored / "clean.npz"),
            "--out", str(tmp_path / "o"), "--quiet"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    ramp = (np.arange(64).reshape(8, 8) * 1024).astype(np.uint16)          # 0 .. 64512 of 65535
    Image.fromarray(ramp).save(tmp_path / "imgs" / "a" / "0.png")
    assert Image.open(tmp_path / "imgs" / "a" / "0.png").mode.startswith("I;16")
    ds = read_image_folder(tmp_path / "imgs")
    assert ds.x.shape == (1, 1, 8, 8)
    assert torch.allclose(ds.x[0, 0], torch.from_numpy(np.round(ramp / 257) / 255).float())   # RGB would be white
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(tmp_path / "imgs" / "a" / "1.tiff")
    (tmp_path / "imgs" / "a" / "1.tiff").rename(tmp_path / "imgs" / "a" / "1.png")          # a float image named .png
    with pytest.raises(UserError, match="no fixed range"):
        read_image_folder(tmp_path / "imgs")


def test_class_count_that_disagrees_with_the_data(backdoored, tmp_path):
    x = np.zeros((12, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "six.npz", x=x, y=np.arange(12) % 6)
    m = external_model("tests.test_byo:make_net", {}, backdoored / "net.safetensors",
                       allow=CodeAllowance.typed("tests.test_byo:make_net"))
    with pytest.raises(UserError, match="4 outputs but .* 6 classes"):
        check_model_fits(m, read_npz(tmp_path / "six.npz").x, 6, "six.npz")
    np.savez(tmp_path / "big.npz", x=np.zeros((4, 20, 20), dtype=np.uint8), y=np.arange(4))
    with pytest.raises(UserError, match="does not accept inputs of shape"):
        check_model_fits(m, read_npz(tmp_path / "big.npz").x, 4, "big.npz")


def test_unsupported_layers_are_listed_and_a_model_without_any_is_refused(backdoored, tmp_path):
    net = make_attention()
    units, skipped = discover_units(net, torch.rand(2, 1, 12, 12))
    assert [u.name for u in units] == ["conv"]
    assert {n for n, _ in skipped} == {"attn", "attn.out_proj"}
    assert any("MultiheadAttention" in why for _, why in skipped)
    no_relu = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))      # nothing with a ReLU after it
    from nnlaunder.attacks.laundering import launder, launder_config

    with pytest.raises(UserError, match="no layer it can reset"):
        launder(no_relu, make_images(40, 1), launder_config("strong"))


def test_image_folder_and_npz_readers(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    ds = read_image_folder(tmp_path / "imgs")
    assert ds.x.shape == (6, 3, 8, 8) and ds.classes == ("cat", "dog") and ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert 0 <= float(ds.x.min()) and float(ds.x.max()) <= 1
    first = np.array(Image.open(tmp_path / "imgs" / "cat" / "0.png"))
    assert torch.equal(ds.x[0], torch.from_numpy(first).permute(2, 0, 1).float() / 255)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (5, 8, 8), dtype=np.uint8), y=np.array([0, 1, 2, 1, 0]))
    ds = read_external(tmp_path / "d.npz")
    assert ds.x.shape == (5, 1, 8, 8) and ds.num_classes == 3
    # clear errors
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "dog" / "odd.png")
    with pytest.raises(UserError, match="differ in size"):
        read_image_folder(tmp_path / "imgs")
    np.savez(tmp_path / "bad.npz", x=np.full((2, 4, 4), 2.0), y=np.array([0, 1]))
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        read_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((2, 4, 4)))
    with pytest.raises(UserError, match="needs arrays"):
        read_npz(tmp_path / "nolabels.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([object()] * 2, dtype=object), y=np.array([0, 1]))
    with pytest.raises(UserError, match="pickled"):
        read_npz(tmp_path / "obj.npz")
    with pytest.raises(UserError, match="does not exist"):
        read_external(tmp_path / "missing.npz")


def test_load_factory_builds_the_module():
    spec = "tests.test_byo:make_net"
    assert isinstance(load_factory(spec, {"width": 4}, allow=CodeAllowance.typed(spec)), Net)


def _spec(d):
    from nnlaunder.external.setup import ExternalModel

    return ExternalModel(factory="tests.test_byo:make_net", weights=str(d / "net.safetensors"),
                         data=str(d / "clean.npz"), test_data=str(d / "test.npz"),
                         verify_npz=str(d / "verify.npz"), input_range="0,255")


def test_an_audit_of_your_own_model(backdoored, tmp_path):
    """`nnlaunder audit --model-factory ...`: the threshold measured on the clean models the user gives, the
    grid run as experiment cells, the owner's restoration after each attack, the report."""
    from nnlaunder.experiments.audit import ExternalAudit, Profile, run_audit
    from nnlaunder.external.setup import load_external
    from nnlaunder.train import accuracy

    torch.manual_seed(1)
    save_file(make_net().state_dict(), str(tmp_path / "clean.safetensors"))
    spec = _spec(backdoored)
    tiny = Profile(budgets=(0.5,), attacks=("launder", "rtal"), seeds=1, rounds=1, nc_preset="fast", calibrate=False,
                   threshold_seeds=(0,), restore_epochs=1, restore_fraction=0.5, nc_epochs=3)
    ext = ExternalAudit(spec, clean_weights=(str(tmp_path / "clean.safetensors"),))
    got = run_audit(None, None, {}, profile=tiny, workspace=str(tmp_path / "ws"), progress=False, log=lambda m: None,
                    external=ext)
    clean = load_external(dataclasses.replace(spec, weights=str(tmp_path / "clean.safetensors")), ext.allowance())
    expected = accuracy(clean.model, *clean.verify)
    rows = got["rows"]
    assert [(r["attack"], r["n"], r["n_clean"]) for r in rows] == [("launder", 1, 50), ("rtal", 1, 50)]
    assert all(r["threshold"] == pytest.approx(expected) for r in rows)
    assert rows[0]["orig_wm_acc"] > 95 and rows[0]["restored_wm_median"] is not None
    report = json.loads((Path(got["folder"]) / "audit.json").read_text())
    assert "clean model(s) given with --clean-weights" in json.dumps(report)
    assert (Path(got["folder"]) / "audit.html").stat().st_size > 5000
    # the same weights again: every cell is already in the store; other weights under the same name: new cells
    again = run_audit(None, None, {}, profile=tiny, workspace=str(tmp_path / "ws"), progress=False,
                      log=lambda m: None, external=ext)
    assert again["rows"] == rows
    ids = {c.cell_id() for c in _cells(ext, tiny)}
    save_file(make_net().state_dict(), str(backdoored / "net-copy.safetensors"))
    moved = dataclasses.replace(ext, spec=dataclasses.replace(spec, weights=str(backdoored / "net-copy.safetensors")))
    assert ids.isdisjoint(c.cell_id() for c in _cells(moved, tiny))


def _cells(ext, profile):
    from nnlaunder.experiments.audit import audit_cells

    return audit_cells("a", None, {"dataset": "external"}, "external", {}, profile, external=ext.spec.identity(),
                       threshold=5.0)


@pytest.mark.parametrize("extra, needle", [
    ([], "needs its vanilla threshold"),
    (["--threshold", "3", "--clean-weights", "x.safetensors"], "needs its vanilla threshold"),
    (["--threshold", "130"], "[0, 100]"),
    (["--threshold", "3", "--scheme", "zhang-content"], "--verify-npz"),
    (["--threshold", "3", "models/mnist/zhang-content"], "not both"),
])
def test_audit_of_your_own_model_mistakes_are_one_line(backdoored, tmp_path, capsys, extra, needle):
    d = backdoored
    base = ["audit", "--model-factory", "tests.test_byo:make_net", "--weights", str(d / "net.safetensors"),
            "--input-range", "0,255", "--data", str(d / "clean.npz"), "--test-data", str(d / "test.npz"),
            "--verify-npz", str(d / "verify.npz"), "--workspace", str(tmp_path / "ws"), "--quick", "--quiet"]
    assert main(base + extra) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_audit_flags_of_your_own_model_need_the_factory(tmp_path, capsys):
    assert main(["audit", "models/mnist/zhang-content", "--threshold", "3", "--workspace", str(tmp_path)]) == 2
    assert "--threshold goes with --model-factory" in capsys.readouterr().err
    assert main(["audit", "--workspace", str(tmp_path)]) == 2
    assert "audit needs a MODEL" in capsys.readouterr().err
    d = tmp_path
    assert main(["audit", "--model-factory", "tests.test_byo:make_net", "--weights", str(d / "w.safetensors"),
                 "--data", str(d / "x.npz"), "--threshold", "3", "--workspace", str(tmp_path)]) == 2
    assert "needs --test-data" in capsys.readouterr().err


def test_a_model_that_ends_in_softmax_is_named():
    logits = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    x = torch.rand(4, 1, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_model_fits(logits, x, 4) == 4                      # logits: no warning
    with pytest.warns(UserWarning, match="ends? in a softmax"):
        check_model_fits(nn.Sequential(logits, nn.Softmax(dim=1)), x, 4)
