"""NAD, ANP, I-BAU and Neural Dehydration: each lowers a planted backdoor's success on a tiny
synthetic model, never receives the watermark, and refuses bad settings."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

from nnlaunder.attacks.anp import ANPConfig, anp, choose_pruned
from nnlaunder.attacks.dehydration import DehydrationConfig, dehydration
from nnlaunder.attacks.ibau import IBAUConfig, ibau
from nnlaunder.attacks.nad import NADConfig, attention_map, attention_taps, nad
from nnlaunder.attacks.registry import ATTACKS, configure
from nnlaunder.attacks.units import discover_units
from nnlaunder.data import Dataset
from nnlaunder.errors import UserError
from nnlaunder.train import TrainConfig, accuracy, train

from .synthetic import add_trigger, make_images


def bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 9, 4))


def attack_success(model: nn.Module, data: Dataset) -> float:
    keep = data.y != 0
    return accuracy(model, add_trigger(data.x[keep]), torch.zeros(int(keep.sum()), dtype=torch.long))


@pytest.fixture(scope="module")
def backdoored():
    """A BadNets model: 15% of the training images carry the checkerboard, relabelled class 0."""
    data = make_images(1500, 0)
    x, y = data.x.clone(), data.y.clone()
    poison = torch.arange(len(x)) % 7 == 0
    x[poison], y[poison] = add_trigger(x[poison]), 0
    net = bn_net()
    train(net, x, y, TrainConfig(epochs=8, batch_size=32, lr=3e-3), progress=False)
    net.eval()
    clean, test = make_images(200, 1), make_images(600, 2)
    assert accuracy(net, test.x, test.y) > 90 and attack_success(net, test) > 90
    return net, clean, test


CHEAP = {
    "nad": NADConfig(teacher=TrainConfig(epochs=10, batch_size=32, optimizer="sgd", lr=0.01), epochs=10,
                     batch_size=32, betas=(0.0, 0.0, 5000.0)),
    "anp": ANPConfig(iterations=300, batch_size=64, prune_by="fraction", fraction=0.05),
    "i-bau": IBAUConfig(rounds=5, batch_size=50, portion=0.5),
    "dehydration": DehydrationConfig(per_class=32, steps=150, epochs=10, batch_size=32),
}
RUN = {"nad": nad, "anp": anp, "i-bau": ibau, "dehydration": dehydration}


@pytest.mark.parametrize("name", list(CHEAP))
def test_each_attack_lowers_a_planted_backdoor(backdoored, name):
    net, clean, test = backdoored
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = RUN[name](net, clean, CHEAP[name])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())      # the input model is untouched
    asr0, asr1 = attack_success(net, test), attack_success(res.model, test)
    acc1 = accuracy(res.model, test.x, test.y)
    assert asr1 < asr0 - 30, f"{name}: attack success {asr0:.1f}% -> {asr1:.1f}%"
    assert acc1 > 70, f"{name}: test accuracy {acc1:.1f}%"
    assert not res.model.training and res.seconds > 0


@pytest.mark.parametrize("name", [*CHEAP, "fine-prune"])
def test_each_attack_runs_on_a_network_with_functional_activations(name):
    """Published backdoor code often writes `F.relu(self.conv(x))`: every attack that reads units reads them
    at their own output, rectified, and returns a working model."""
    from nnlaunder.attacks.registry import ATTACKS

    from .synthetic import FunctionalNet

    net, clean = FunctionalNet(3).eval(), make_images(120, 4)
    few = {"nad": dataclasses.replace(CHEAP["nad"], epochs=1, teacher=TrainConfig(epochs=1, batch_size=32)),
           "anp": dataclasses.replace(CHEAP["anp"], iterations=20),
           "i-bau": dataclasses.replace(CHEAP["i-bau"], rounds=1),
           "dehydration": dataclasses.replace(CHEAP["dehydration"], steps=10, epochs=1)}
    cfg = few.get(name) or dataclasses.replace(ATTACKS[name].default(), finetune=TrainConfig(epochs=1, batch_size=32))
    res = ATTACKS[name].run(net, clean, cfg)
    assert res.model(clean.x[:4]).shape == (4, 4) and not res.model.training
    if name == "nad":
        assert res.info["taps"][-1] == "c2"           # the last conv, read at its own output


@pytest.mark.parametrize("name", list(CHEAP))
def test_attacks_never_receive_the_watermark(name):
    """The interface admits a model, a clean labelled set and a config; no config field names a
    target, trigger, watermark or owner's data."""
    fn = RUN[name]
    assert list(inspect.signature(fn).parameters) == ["model", "clean", "cfg"]
    fields = {f.name for f in dataclasses.fields(type(CHEAP[name]))}
    assert not fields & {"target", "trigger", "watermark", "wm", "verify_x", "owner", "mask", "pattern"}
    assert ATTACKS[name].run is not None and type(ATTACKS[name].default()) is type(CHEAP[name])


@pytest.mark.parametrize("cls,bad", [
    (NADConfig, {"epochs": -1}), (NADConfig, {"betas": (1.0, 2.0)}), (NADConfig, {"p": 0.0}),
    (NADConfig, {"lr": float("nan")}), (NADConfig, {"batch_size": True}),
    (ANPConfig, {"eps": 2.0}), (ANPConfig, {"alpha": 1.5}), (ANPConfig, {"prune_by": "random"}),
    (ANPConfig, {"fraction": 1.0}), (ANPConfig, {"iterations": -5}), (ANPConfig, {"steps": 0}),
    (IBAUConfig, {"k": 0}), (IBAUConfig, {"portion": 1.5}), (IBAUConfig, {"lr": 0.0}), (IBAUConfig, {"reg": -1.0}),
    (DehydrationConfig, {"per_class": 0}), (DehydrationConfig, {"steps": -1}), (DehydrationConfig, {"weight": -1.0}),
    (DehydrationConfig, {"lr": float("inf")}), (DehydrationConfig, {"class_chunk": 0}), (DehydrationConfig, {"amp": 1}),
    (ANPConfig, {"amp": "yes"}),
])
def test_configs_reject_bad_values(cls, bad):
    with pytest.raises(UserError):
        cls(**bad)


def test_experiment_cells_configure_the_new_attacks():
    cfg = configure("anp", {"threshold": 0.3, "iterations": 10}, seed=4)
    assert cfg.threshold == 0.3 and cfg.iterations == 10 and cfg.seed == 4
    with pytest.raises(UserError):
        configure("nad", {"target": 0})


def test_nad_attention_maps_and_taps():
    fm = torch.rand(2, 5, 4, 4)
    am = attention_map(fm, 2.0)
    assert am.shape == (2, 1, 4, 4)
    torch.testing.assert_close(am.flatten(1).norm(dim=1), torch.ones(2), atol=1e-4, rtol=0)
    units, _ = discover_units(bn_net(), torch.rand(2, 1, 12, 12))
    taps = attention_taps(units)
    assert taps[-1] == (units[-1].act, False) and len(taps) == 3
    with pytest.raises(UserError):
        attention_taps([u for u in units if u.kind == "dense"])


def test_anp_pruning_choice():
    masks = {"a": torch.tensor([0.1, 0.9, 0.2]), "b": torch.tensor([0.05, 1.0])}
    by_t = choose_pruned(masks, ANPConfig(threshold=0.2))
    assert by_t["a"].tolist() == [0, 2] and by_t["b"].tolist() == [0]
    by_f = choose_pruned(masks, ANPConfig(prune_by="fraction", fraction=0.4))       # 2 of 5
    assert sorted((u, i) for u, idx in by_f.items() for i in idx.tolist()) == [("a", 0), ("b", 0)]


def test_anp_prunes_a_scale_without_batch_norm():
    """The MNIST CNN of Table 5 has no batch norm: ANP reads each unit at its own output, and pruning
    zeroes that unit's incoming weights (its bias stays)."""
    from nnlaunder.models import build

    net = build("mnist-cnn", seed=0)
    data = Dataset("toy", torch.rand(40, 1, 28, 28), torch.arange(40) % 10, tuple(map(str, range(10))))
    res = anp(net, data, ANPConfig(iterations=3, batch_size=8, prune_by="fraction", fraction=0.2))
    assert set(res.info["read_at"].values()) == set(res.info["read_at"])            # each unit read at itself
    pruned = sum(res.info["pruned"].values())
    assert pruned == int(0.2 * res.info["neurons"])
    params = dict(res.model.named_parameters())
    zero_rows = sum(int((params[f"{u}.weight"].flatten(1).abs().sum(1) == 0).sum()) for u in res.info["pruned"])
    assert zero_rows == pruned


def test_dehydration_inverts_classes_together_as_one_at_a_time(backdoored):
    """Each class keeps its own loss terms (batch-norm statistics over its own images included), so inverting
    several classes in one batch (as on a GPU) recovers the images that inverting them one at a time does."""
    from nnlaunder.attacks.dehydration import recover

    net, clean, _ = backdoored
    cfg = DehydrationConfig(per_class=6, steps=12)
    alone, hit_alone = recover(net, clean, dataclasses.replace(cfg, class_chunk=1))
    together, hit_together = recover(net, clean, dataclasses.replace(cfg, class_chunk=3))
    assert together.shape == alone.shape == (4 * 6, 1, 12, 12)
    assert torch.allclose(together, alone, atol=1e-4)
    assert hit_together == hit_alone


def test_dehydration_amp_inverts_in_bfloat16_to_about_the_same_images(backdoored):
    """`amp` runs the inversion's forward and backward under bfloat16 autocast (channels-last) where the
    hardware has it: it rounds differently, so the images differ a little and the model reads them as it reads
    fp32's; the batch-norm statistics stay fp32. Off, it is the fp32 path unchanged."""
    from nnlaunder.attacks.dehydration import recover
    from nnlaunder.device import amp_supported

    net, clean, _ = backdoored
    cfg = DehydrationConfig(per_class=8, steps=40)
    fp32, hit32 = recover(net, clean, cfg)
    again, _ = recover(net, clean, dataclasses.replace(cfg, amp=False))
    bf16, hit16 = recover(net, clean, dataclasses.replace(cfg, amp=True))
    assert torch.equal(again, fp32) and bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    if amp_supported(torch.device("cpu")):
        assert not torch.equal(bf16, fp32)                          # autocast really ran
    assert (bf16 - fp32).abs().mean() < 0.05
    assert max(abs(a - b) for a, b in zip(hit16, hit32, strict=True)) <= 25


def test_anp_amp_learns_about_the_same_masks(backdoored):
    """ANP's `amp` learns the masks under bfloat16 autocast where the hardware has it; off, the fp32 path is
    unchanged. The masks it learns stay close to fp32's."""
    from nnlaunder.attacks.anp import mask_sites, optimise_masks
    from nnlaunder.device import amp_supported

    net, clean, _ = backdoored
    where = mask_sites(net, clean.x[:2])
    assert set(where.values()) == {u.bn for u in discover_units(net, clean.x[:2])[0]}      # each read at its norm
    cfg = ANPConfig(iterations=60, batch_size=64)
    fp32 = optimise_masks(net, clean, cfg, where)
    again = optimise_masks(net, clean, dataclasses.replace(cfg, amp=False), where)
    bf16 = optimise_masks(net, clean, dataclasses.replace(cfg, amp=True), where)
    assert all(torch.equal(fp32[u], again[u]) for u in where)
    a, b = torch.cat(list(fp32.values())), torch.cat(list(bf16.values()))
    if amp_supported(torch.device("cpu")):
        assert not torch.equal(a, b)                                # autocast really ran
    assert (a - b).abs().mean() < 0.1 and torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9


def test_dehydration_batch_norm_statistics_are_the_mean_and_variance_with_their_gradient():
    """The inversion's batch-norm statistics (per group of images and channel) are torch's mean and biased
    variance, and their gradient autograd's through those, for fp64, fp32 and bfloat16 inputs."""
    from nnlaunder.attacks.dehydration import _Moments

    z = (torch.randn(6, 3, 5, 4, dtype=torch.float64) * 0.7 + 0.4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _Moments.apply(t, 2), (z,))
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(8, 4, 6, 6) * 0.5 + 0.3).to(dtype)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        mean, var = _Moments.apply(a, 2)
        zz = b.float().unflatten(0, (2, -1))
        ref_mean, ref_var = zz.mean((1, 3, 4)), zz.var((1, 3, 4), unbiased=False)
        torch.testing.assert_close((mean, var), (ref_mean, ref_var), atol=1e-5, rtol=1e-5)
        w = torch.randn(2, 4)
        ((mean * w).sum() + (var * w.flip(0)).sum()).backward()
        ((ref_mean * w).sum() + (ref_var * w.flip(0)).sum()).backward()
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-2,
                                   rtol=1e-4 if dtype == torch.float32 else 2e-2)


def test_nad_that_diverges_stops_and_says_so(backdoored):
    """At a learning rate the model cannot take, NAD's loss turns non-finite: it stops there, warns, and records
    where, instead of training on NaN for the remaining epochs."""
    net, clean, _ = backdoored
    cfg = dataclasses.replace(CHEAP["nad"], teacher=TrainConfig(epochs=1, batch_size=32), lr=1e8, drop_at=10)
    with pytest.warns(UserWarning, match="NAD diverged"):
        res = nad(net, clean, cfg)
    epoch, step = res.info["diverged_at"]
    assert epoch == 0 and step >= 1
    assert nad(net, clean, dataclasses.replace(CHEAP["nad"], epochs=1)).info["diverged_at"] is None
