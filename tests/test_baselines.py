import copy

import pytest
import torch
from torch import nn

from nnlaunder.attacks.baselines import (
    FinePruneConfig,
    FinetuneConfig,
    PruneConfig,
    UnlearnConfig,
    fine_prune,
    finetune,
    magnitude_masks,
    prune,
)
from nnlaunder.attacks.neural_cleanse import NCConfig
from nnlaunder.attacks.registry import ATTACKS, run_attack
from nnlaunder.errors import UserError
from nnlaunder.train import TrainConfig, accuracy, train

from .synthetic import make_images

QUICK = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.01)


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 9, 4))


@pytest.fixture(scope="module")
def trained():
    data = make_images(600, 0)
    net = bn_net()
    train(net, data.x, data.y, TrainConfig(epochs=4, batch_size=32, lr=3e-3), progress=False)
    return net, make_images(120, 1)


def changed(a: nn.Module, b: nn.Module) -> dict[str, bool]:
    sb = b.state_dict()
    return {k: not torch.equal(v, sb[k]) for k, v in a.state_dict().items() if v.is_floating_point()}


def test_magnitude_pruning_per_layer_and_kept_through_finetuning(trained):
    net, clean = trained
    masks = magnitude_masks(net, 0.9)
    for name, m in masks.items():
        assert abs(float((m == 0).float().mean()) - 0.9) < 0.02, name
    res = prune(net, clean, PruneConfig(0.9, QUICK))
    for name, m in masks.items():
        w = dict(res.model.named_parameters())[name]
        assert torch.count_nonzero(w[m == 0]) == 0
    assert changed(net, res.model)["8.weight"]          # survivors were fine-tuned
    only = prune(net, clean, PruneConfig(0.5))
    assert not changed(net, only.model)["1.running_mean"]   # pruning alone trains nothing


def test_finetune_family_changes_exactly_what_it_says(trained):
    net, clean = trained
    before = copy.deepcopy(net)
    ftll = finetune(net, clean, FinetuneConfig("ftll", QUICK))
    c = changed(net, ftll.model)
    assert c["8.weight"] and c["8.bias"]
    assert not any(v for k, v in c.items() if not k.startswith("8."))    # BN statistics included
    rtll = finetune(net, clean, FinetuneConfig("rtll", QUICK))
    c = changed(net, rtll.model)
    assert c["8.weight"] and not any(v for k, v in c.items() if not k.startswith("8."))
    ftal = finetune(net, clean, FinetuneConfig("ftal", QUICK))
    c = changed(net, ftal.model)
    assert c["0.weight"] and c["4.weight"] and c["8.weight"] and c["1.running_mean"]
    rtal = finetune(net, clean, FinetuneConfig("rtal", TrainConfig(epochs=0)))
    assert changed(net, rtal.model)["8.weight"] and not changed(net, rtal.model)["0.weight"]
    with pytest.raises(UserError):
        FinetuneConfig("ftxx")
    # the attacks never change the model they were given
    assert not any(changed(before, net).values())
    assert all(p.requires_grad for p in net.parameters())


def test_mixed_finetuning_is_ngo_et_als_threat_on_one_split_of_the_set(trained):
    """mix_split: fine-tune on a stratified part of the set, one extra step on a batch of the rest after every
    mix_every-th batch: the persistence threat's `finetune_threat(split, mixed_with=rest)` exactly."""
    from nnlaunder.data import disjoint_split
    from nnlaunder.restore import finetune_threat

    net, clean = trained
    cfg = TrainConfig(epochs=1, batch_size=16, optimizer="adam", lr=1e-3, seed=3)
    got = finetune(net, clean, FinetuneConfig("ftal", cfg, seed=3, mix_split=0.3, mix_every=2)).model
    split, rest = disjoint_split(clean, 0.3, 3)
    want = copy.deepcopy(net)
    finetune_threat(want, split, cfg, mixed_with=rest, mix_every=2)
    assert not any(changed(want, got).values())
    plain = finetune(net, clean, FinetuneConfig("ftal", cfg, seed=3)).model
    assert any(changed(plain, got).values())
    for bad in ({"mix_split": 1.0}, {"mix_split": 0.0}, {"mix_every": 0}):
        with pytest.raises(UserError, match="mix_"):
            FinetuneConfig("ftal", **bad)


def test_fine_pruning_prunes_last_conv_within_the_bound(trained):
    net, clean = trained
    res = fine_prune(net, clean, FinePruneConfig(max_drop=100.0, finetune=TrainConfig(epochs=0)))
    assert res.info["layer"] == "4" and res.info["pruned_channels"] == 7      # all but one channel
    tight = fine_prune(net, clean, FinePruneConfig(max_drop=0.0, finetune=QUICK))
    k = tight.info["pruned_channels"]
    w = tight.model[4].weight
    assert int((w.flatten(1).abs().sum(1) == 0).sum()) == k
    loose = fine_prune(net, clean, FinePruneConfig(max_drop=2.0, finetune=TrainConfig(epochs=0)))
    assert accuracy(net, clean.x, clean.y) - accuracy(loose.model, clean.x, clean.y) <= 2.0


def test_nc_unlearning_resets_nothing(trained):
    net, clean = trained
    res = run_attack("nc-unlearn", net, clean, UnlearnConfig(nc=NCConfig(max_epochs=3), retrain=QUICK))
    zeros_before = sum(int((p == 0).sum()) for p in net.parameters())
    zeros_after = sum(int((p == 0).sum()) for p in res.model.parameters())
    assert zeros_after == zeros_before and changed(net, res.model)["0.weight"]
    assert res.info["used_triggers"]


def test_registry():
    assert {"launder", "prune", "prune-ft", "ftll", "ftal", "rtll", "rtal", "fine-prune", "nc-unlearn"} <= set(ATTACKS)
    with pytest.raises(UserError, match="unknown attack"):
        run_attack("magic", bn_net(), make_images(40, 0))


def test_weight_noise_scales_with_each_layer_and_is_seeded(trained):
    net, clean = trained
    a = run_attack("weight-noise", net, clean)
    b = run_attack("weight-noise", net, clean)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert a.info["layers"] == 3 and not changed(net, a.model)["1.running_mean"]   # weights only
    for name, p in net.named_parameters():
        if name.endswith("weight") and p.ndim in (2, 4):
            noise = dict(a.model.named_parameters())[name] - p
            assert 0.07 < float(noise.std() / p.std()) < 0.13, name       # 0.1 x the layer's std
    louder = run_attack("weight-noise", net, clean, scale=1.0)
    assert accuracy(louder.model, clean.x, clean.y) < accuracy(a.model, clean.x, clean.y)
    with pytest.raises(UserError, match="scale"):
        run_attack("weight-noise", net, clean, scale=-1.0)


def test_an_experiment_cell_runs_any_registered_attack_through_one_path(trained):
    from nnlaunder.attacks.registry import Hooks, configure

    net, clean = trained
    cfg = configure("weight-noise", {"scale": 0.2, "seed": 3})
    assert cfg.scale == 0.2 and cfg.seed == 3
    with pytest.raises(UserError, match="only laundering has rounds"):
        configure("weight-noise", {}, rounds=2)
    with pytest.raises(UserError, match="unknown"):
        configure("weight-noise", {"sigma": 1})
    seen = []
    ATTACKS["weight-noise"].run(net, clean, cfg, Hooks(on_round=lambda r, m, info: seen.append((r, info.seconds))))
    assert len(seen) == 1 and seen[0][0] == 1 and seen[0][1] >= 0
