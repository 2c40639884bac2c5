import pickle

import pytest
import torch

from nnlaunder.checkpoint import load_model, model_digest, save_model
from nnlaunder.errors import UserError
from nnlaunder.models import build


def test_round_trip(tmp_path):
    m = build("cifar-cnn", 10, seed=3)
    m.eval()
    x = torch.rand(2, 3, 32, 32)
    save_model(tmp_path / "m", m, {"arch": "cifar-cnn", "num_classes": 10, "dataset": "cifar10", "seed": 3})
    m2, meta = load_model(tmp_path / "m.safetensors")
    assert meta["dataset"] == "cifar10" and meta["seed"] == 3
    assert torch.equal(m(x), m2(x))
    assert not list(tmp_path.glob("*.tmp"))


def test_wrong_architecture_is_a_clear_error(tmp_path):
    save_model(tmp_path / "m", build("mnist-cnn"), {"arch": "mnist-cnn", "num_classes": 10})
    (tmp_path / "m.json").write_text('{"arch": "cifar-cnn", "num_classes": 10}')
    with pytest.raises(UserError, match="do not fit the architecture"):
        load_model(tmp_path / "m")


def test_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "m.safetensors").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "m.json").write_text('{"arch": "mnist-cnn", "num_classes": 10}')
    with pytest.raises(UserError, match="safetensors"):
        load_model(tmp_path / "m")
    assert not marker.exists()


def test_nan_weights_refused(tmp_path):
    m = build("mnist-cnn")
    with torch.no_grad():
        m[1].weight[0, 0, 0, 0] = float("nan")
    save_model(tmp_path / "m", m, {"arch": "mnist-cnn", "num_classes": 10})
    with pytest.raises(UserError, match="NaN"):
        load_model(tmp_path / "m")


def test_torch_state_dict_needs_the_explicit_flag(tmp_path):
    m = build("mnist-cnn")
    torch.save(m.state_dict(), tmp_path / "m.pt")
    (tmp_path / "m.json").write_text('{"arch": "mnist-cnn", "num_classes": 10}')
    with pytest.raises(UserError, match="--allow-torch-load"):
        load_model(tmp_path / "m.pt")
    with pytest.raises(UserError, match="found m.pt"):          # the stem alone points at the flag too
        load_model(tmp_path / "m")
    got, _ = load_model(tmp_path / "m.pt", allow_torch_load=True)
    for k, v in m.state_dict().items():
        assert torch.equal(got.state_dict()[k], v)


@pytest.mark.parametrize("zipped", [False, True])
def test_code_in_a_pt_file_never_runs_even_with_the_flag(tmp_path, zipped):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    if zipped:      # the modern torch.save container with a code-running pickle inside
        torch.save({"w": Evil()}, tmp_path / "m.pt", _use_new_zipfile_serialization=True)
        marker.unlink(missing_ok=True)
    else:           # a bare legacy pickle
        (tmp_path / "m.pt").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "m.json").write_text('{"arch": "mnist-cnn", "num_classes": 10}')
    with pytest.raises(UserError, match="weights-only loader"):
        load_model(tmp_path / "m.pt", allow_torch_load=True)
    assert not marker.exists()


@pytest.mark.parametrize("wrap", ["net", "model", "state_dict", "module."])
def test_checkpoints_as_training_scripts_save_them(tmp_path, wrap):
    """{'net': sd, 'acc': .., 'epoch': ..} (kuangliu/pytorch-cifar), {'model': sd} (BackdoorBench),
    {'state_dict': sd}, and names from an nn.DataParallel model."""
    m = build("mnist-cnn", 10, seed=1)
    sd = m.state_dict()
    obj = {f"module.{k}": v for k, v in sd.items()} if wrap == "module." else {wrap: sd, "acc": 99.1, "epoch": 7}
    torch.save(obj, tmp_path / "m.pt")
    (tmp_path / "m.json").write_text('{"arch": "mnist-cnn", "num_classes": 10}')
    got, _ = load_model(tmp_path / "m.pt", allow_torch_load=True)
    assert all(torch.equal(got.state_dict()[k], v) for k, v in sd.items())


def test_pt_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "m.pt")
    (tmp_path / "m.json").write_text('{"arch": "mnist-cnn", "num_classes": 10}')
    with pytest.raises(UserError, match="expected a state_dict"):
        load_model(tmp_path / "m.pt", allow_torch_load=True)


def test_model_digest_names_the_weights(tmp_path):
    import hashlib

    m = build("mnist-cnn", 10, seed=0)
    save_model(tmp_path / "a", m, {"arch": "mnist-cnn", "num_classes": 10})
    d = model_digest(tmp_path / "a.json")              # any of the model's paths
    assert d == hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()[:16]
    save_model(tmp_path / "b", build("mnist-cnn", 10, seed=1), {"arch": "mnist-cnn", "num_classes": 10})
    assert model_digest(tmp_path / "b") != d
