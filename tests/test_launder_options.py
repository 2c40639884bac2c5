"""The laundering options that follow the paper's text more closely: batch-norm statistics,
the unit measured = the unit reset (ResNet branches), the masks as retraining images, and
top-k / all triggers for watermarks with several targets."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nnlaunder.attacks.laundering import (
    _retrain_set,
    apply_reset,
    launder,
    launder_config,
    reestimate_bn,
    reset_and_retrain,
    reset_masks,
    used_triggers,
)
from nnlaunder.attacks.neural_cleanse import NCConfig
from nnlaunder.attacks.units import discover_units, mean_activations
from nnlaunder.data import Dataset
from nnlaunder.errors import UserError
from nnlaunder.models import build
from nnlaunder.train import TrainConfig, predict, train

from .synthetic import add_trigger, make_images


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _fake_nc(k: int, shape=(3, 8, 8), least: int = 2):
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(masks=torch.rand(k, 1, *shape[1:], generator=g),
                           patterns=torch.rand(k, *shape, generator=g), least_likely=least,
                           l1=torch.tensor([5.0, 1.0, 9.0, 2.0][:k]), flagged=[], most_likely=1,
                           found=torch.ones(k, dtype=torch.bool))


def test_reestimated_bn_statistics_equal_those_of_the_clean_set():
    net = _bn_net()
    x = torch.rand(200, 3, 8, 8) * 2 + 1
    inputs = {}
    def keep(name):
        def hook(mod, i, o) -> None:           # returns None: the output is left as it is
            inputs[name] = i[0].detach()
        return hook
    hooks = [m.register_forward_hook(keep(n)) for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():                    # the reference: each BN's input over the whole clean set
        net.eval()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
        net(x)
    for h in hooks:
        h.remove()
    net.train()
    for m in net.modules():                   # stale statistics from elsewhere
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(7.0)
            m.running_var.fill_(0.01)
    reestimate_bn(net, x, batch_size=1000)
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            ref = inputs[name]
            torch.testing.assert_close(m.running_mean, ref.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(m.running_var, ref.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
            assert m.momentum == 0.1                  # restored
    assert net.training


@pytest.mark.parametrize("mode", ["keep", "reset", "reestimate", "reinit"])
def test_bn_stats_option_before_retraining(mode):
    net = _bn_net()
    clean = Dataset("toy", torch.rand(64, 3, 8, 8), torch.arange(64) % 4, ("a", "b", "c", "d"))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(7.0)
    units, _ = discover_units(net, clean.x[:2])
    cfg = launder_config("strong", triggers="all", bn_stats=mode, retrain=TrainConfig(epochs=0))
    reset_and_retrain(net, clean, _fake_nc(4), cfg, units, {})
    bn = net[1]
    if mode == "reinit":
        assert torch.all(bn.running_mean == 0) and torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    elif mode == "keep":
        assert torch.all(bn.running_mean == 7.0)
    elif mode == "reset":
        assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    else:
        ref = _bn_net()
        ref.load_state_dict(net.state_dict())
        reestimate_bn(ref, clean.x)
        torch.testing.assert_close(bn.running_mean, ref[1].running_mean)
        assert not torch.all(bn.running_mean == 0)


def test_faithful_variant_resets_bn_statistics():
    assert launder_config("faithful").bn_stats == "reset" and launder_config("strong").bn_stats == "keep"
    with pytest.raises(UserError):
        launder_config("strong", bn_stats="forget")
    with pytest.raises(UserError):
        launder_config("strong", ct=float("inf"))


def test_resnet_branch_unit_is_the_unit_reset():
    """A ResNet block's second conv: reset it, and its measured activation is zero only when it is
    read on its own branch (after bn2, before the residual add)."""
    net = build("resnet20", seed=0).eval()
    x = torch.rand(16, 3, 32, 32)
    units, _ = discover_units(net, x[:2])
    u = {v.name: v for v in units}
    assert u["blocks.0.conv2"].own == "blocks.0.bn2" and u["blocks.0.conv1"].own == "blocks.0.bn1"
    assert u["blocks.3.shortcut"].own == "blocks.3.shortcut"          # no BN of its own
    for name in ("blocks.0.conv2", "blocks.3.shortcut"):
        m = build("resnet20", seed=0).eval()
        masks = reset_masks(m, units, {name: torch.tensor([0, 5])})
        apply_reset(m, masks)
        branch = mean_activations(m, [u[name]], x, point="branch")[name]
        after_add = mean_activations(m, [u[name]], x, point="relu")[name]
        assert branch[0] == 0 and branch[5] == 0 and branch[1] > 0
        assert after_add[0] > 0                 # the old reading still sees the residual stream
    # plain conv-ReLU models read the same either way
    mnist = build("mnist-cnn", seed=0)
    mu, _ = discover_units(mnist, torch.rand(2, 1, 28, 28))
    xs = torch.rand(8, 1, 28, 28)
    a, b = mean_activations(mnist, mu, xs, point="relu"), mean_activations(mnist, mu, xs, point="branch")
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_masks_join_the_retraining_set_with_the_least_likely_label():
    clean = Dataset("toy", torch.rand(10, 3, 8, 8), torch.arange(10) % 4, ("a", "b", "c", "d"))
    nc = _fake_nc(4, least=2)
    x, y = _retrain_set(clean, nc, [1, 3], add_masks=True)
    assert len(x) == 10 + 2 * 10 + 2
    torch.testing.assert_close(x[-2:], nc.masks[[1, 3]].expand(-1, 3, -1, -1))
    assert y[-2:].tolist() == [2, 2] and torch.equal(y[10:20], clean.y) and torch.equal(y[20:30], clean.y)
    x2, y2 = _retrain_set(clean, nc, [1, 3], add_masks=False)
    assert len(x2) == 30
    # "random": one stamped copy per image, each with one of the used triggers
    xr, yr = _retrain_set(clean, nc, [1, 3], add_masks=False, stamping="random", seed=0)
    assert len(xr) == 20 and torch.equal(yr[10:], clean.y)
    from nnlaunder.attacks.neural_cleanse import stamp
    for i in range(10):
        assert any(torch.allclose(xr[10 + i], stamp(clean.x[i:i + 1], nc.masks[t], nc.patterns[t])[0])
                   for t in (1, 3))


def test_trigger_choices():
    nc = _fake_nc(4)
    assert used_triggers(nc, "all") == [0, 1, 2, 3]
    assert used_triggers(nc, "flagged") == [1]
    assert used_triggers(nc, "top-k", 2) == [1, 3]


def _second_trigger(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[:, :, 0, 11] = out[:, :, 1, 10] = 1.0
    out[:, :, 0, 10] = out[:, :, 1, 11] = 0.0
    return out


def test_top_k_triggers_reach_both_targets_of_a_two_target_watermark():
    """Two backdoors (checkerboard -> class 0, corner pattern -> class 3): laundering with the two
    smallest masks, per-trigger differences, removes both."""
    base, p1, p2 = make_images(3000, 30), make_images(300, 31), make_images(300, 32)
    x = torch.cat([base.x, add_trigger(p1.x), _second_trigger(p2.x)])
    y = torch.cat([base.y, torch.zeros(300, dtype=torch.long), torch.full((300,), 3)])
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(16 * 9, 32), nn.ReLU(), nn.Linear(32, 4))
    torch.manual_seed(3)
    train(net, x, y, TrainConfig(epochs=8, batch_size=64, lr=3e-3, seed=3), progress=False)
    test = make_images(600, 33)
    v0, v3 = test.subset(torch.nonzero(test.y != 0).flatten()), test.subset(torch.nonzero(test.y != 3).flatten())

    def asr(m):
        return (100 * float((predict(m, add_trigger(v0.x)) == 0).float().mean()),
                100 * float((predict(m, _second_trigger(v3.x)) == 3).float().mean()))
    assert min(asr(net)) > 90
    cfg = launder_config("strong", triggers="top-k", top_k=2, diff="per-trigger", dt=2.0, ct=2.0,
                         nc=NCConfig(max_epochs=60, batch_size=32),
                         retrain=TrainConfig(epochs=15, batch_size=32, lr=1e-3))
    res = launder(net, make_images(100, 34), cfg)
    assert sorted(res.rounds[0].used_triggers) == [0, 3]
    after = asr(res.model)
    assert max(after) < 10, after
    assert dataclasses.asdict(cfg)["top_k"] == 2


def test_calibration_rule_and_k_fold():
    from nnlaunder.attacks.calibrate import Score, apply_candidate, calibrate, choose

    # four candidates scored on the same 3 folds
    folds = {"a": [90.0, 91.0, 89.0], "b": [92.0, 90.0, 91.0], "c": [93.0, 91.0, 92.0], "d": [88.0, 87.0, 89.0]}
    cands = {"a": {"dt": 0.5, "ct": 1.0, "retrain_epochs": 5}, "b": {"dt": 0.5, "ct": 2.0, "retrain_epochs": 5},
             "c": {"dt": 2.0, "ct": 2.0, "retrain_epochs": 20}, "d": {"dt": 0.5, "ct": 1.0, "retrain_epochs": 20}}
    scores = [Score(cands[k], sum(v) / 3, 1.5, 0.0 if k == "d" else 2.0, 3, fold_accs=v) for k, v in folds.items()]
    chosen, margin, why = choose(scores, 300)
    # c is best (92.0); b trails it by exactly 1.0 point in every fold (standard error 0): set aside; a trails
    # by 2.0 +- 0.58: set aside; d by 4.0 +- 0.58: set aside. Only c is acceptable.
    assert [s.acceptable for s in scores] == [False, False, True, False] and chosen == cands["c"]
    # noisy folds: a's gap (1.0) is within its paired standard error (sqrt 3): acceptable, and the more
    # aggressive reset wins by the declared preference, whatever the residual flips say
    noisy = [Score(cands["a"], 91.0, 1.5, 50.0, 3, fold_accs=[95.0, 88.0, 90.0]),
             Score(cands["c"], 92.0, 1.5, 0.0, 3, fold_accs=[93.0, 92.0, 91.0])]
    chosen, margin, why = choose(noisy, 300)
    assert chosen == cands["a"] and noisy[0].acceptable and "declared preference" in why
    assert noisy[0].gap == pytest.approx(1.0) and noisy[0].gap_se == pytest.approx(3 ** 0.5)
    # identical candidates (a threshold that changes nothing) tie: the preference decides
    same = [Score(cands["b"], 90.0, 1.5, 0.0, 3, fold_accs=[90.0, 90.0, 90.0]),
            Score(cands["a"], 90.0, 1.5, 0.0, 3, fold_accs=[90.0, 90.0, 90.0])]
    assert choose(same, 300)[0] == cands["a"]
    cfg = apply_candidate(launder_config("strong"), {"ct": 3.0, "retrain_epochs": 7, "triggers": "top-k"})
    assert cfg.ct == 3.0 and cfg.retrain.epochs == 7 and cfg.triggers == "top-k"
    with pytest.raises(UserError, match="unknown option"):
        apply_candidate(cfg, {"lr": 1})
    # on the synthetic backdoor: two candidates, 2 folds, every clean image scored once
    from nnlaunder.attacks.neural_cleanse import neural_cleanse

    data = make_images(800, 40)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 36, 16), nn.ReLU(), nn.Linear(16, 4))
    train(net, data.x, data.y, TrainConfig(epochs=2, batch_size=64, lr=3e-3), progress=False)
    clean = make_images(60, 41)
    base = launder_config("strong", nc=NCConfig(max_epochs=3, batch_size=16))
    nc = neural_cleanse(net, clean.x, base.nc, num_classes=4)
    grid = [{"ct": 1.0, "retrain_epochs": 1}, {"ct": 2.0, "retrain_epochs": 1, "triggers": "top-k", "top_k": 2}]
    seen = []
    cal = calibrate(net, clean, nc, base, grid=grid, folds=2, on_candidate=seen.append)
    assert len(seen) == 2 and cal.n == 60 and cal.chosen in grid and any(s.acceptable for s in cal.scores)
    assert all(0 <= s.acc <= 100 and 0 <= s.flips <= 100 for s in cal.scores)
    with pytest.raises(UserError, match="too small"):
        calibrate(net, clean.subset(torch.arange(3)), nc, base, grid=grid, folds=2)


def test_algorithm1_over_given_trigger_images_and_no_images():
    """`reset_and_retrain_on` takes trigger images from any source (the oracle diagnostic's true
    triggers): images far from the clean ones reset units; no images reset none."""
    from nnlaunder.attacks.laundering import reset_and_retrain_on
    clean = Dataset("toy", torch.rand(64, 3, 8, 8) * 0.1, torch.arange(64) % 4, ("a", "b", "c", "d"))
    cfg = launder_config("strong", retrain=TrainConfig(epochs=0))
    net = _bn_net().eval()
    units, _ = discover_units(net, clean.x[:2])
    bright = clean.x.clone()
    bright[:, :, 2:5, 2:5] = 1.0                 # a patch every stamped image carries
    masks, resets, _ = reset_and_retrain_on(net, clean, [bright], cfg, units, {})
    assert sum(resets.values()) > 0 and masks
    for name, m in masks.items():                 # the reset weights are zero in the model
        assert torch.all(dict(net.named_parameters())[name][m == 0] == 0)
    net2 = _bn_net().eval()
    masks2, resets2, _ = reset_and_retrain_on(net2, clean, [], cfg, units, {})
    assert sum(resets2.values()) == 0 and masks2 == {}


def test_reinit_second_half_touches_only_the_second_half():
    from nnlaunder.attacks.laundering import reinit_second_half
    net = build("resnet20", seed=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    names = reinit_second_half(net, seed=1)
    convs = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    half = convs[len(convs) // 2:]
    assert set(half) <= set(names) and not set(convs[:len(convs) // 2]) & set(names)
    assert "fc" in names or any(n.endswith("fc") for n in names)
    after = net.state_dict()
    assert torch.equal(after["stem.0.weight"], before["stem.0.weight"])       # first layer untouched
    assert not torch.equal(after[f"{half[0]}.weight"], before[f"{half[0]}.weight"])
    again = build("resnet20", seed=0)
    reinit_second_half(again, seed=1)                                        # seeded: the same draw
    assert all(torch.equal(after[k], again.state_dict()[k]) for k in after)
    with pytest.raises(UserError):
        launder_config("strong", reinit="everything")


def test_reinit_option_in_a_round_keeps_reset_units_at_zero():
    from nnlaunder.attacks.laundering import reset_and_retrain_on
    clean = Dataset("toy", torch.rand(32, 3, 8, 8) * 0.1, torch.arange(32) % 4, ("a", "b", "c", "d"))
    net = _bn_net().eval()
    units, _ = discover_units(net, clean.x[:2])
    bright = clean.x.clone()
    bright[:, :, 2:5, 2:5] = 1.0
    cfg = launder_config("strong", reinit="second-half", retrain=TrainConfig(epochs=1, batch_size=8))
    masks, _, _ = reset_and_retrain_on(net, clean, [bright], cfg, units, {})
    params = dict(net.named_parameters())
    for name, m in masks.items():
        assert torch.all(params[name][m == 0] == 0)


def test_a_channel_pooled_by_its_peak_sees_a_small_trigger_that_its_mean_dilutes():
    """A conv channel that fires only on a 4x4 corner patch of a 28x28 image: over all positions its mean moves
    by the patch's share of the image, under a CT of 1x the layer's mean clean activation, so Algorithm 1 as the
    paper reads it (`pool = "mean"`) resets nothing; its peak per image moves by the full response, so
    `pool = "max"` resets that channel, and only it."""
    from nnlaunder.attacks.laundering import activation_differences, select_resets

    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0] = 1.0                   # channel 0: a bright patch (9 bright pixels → 9)
        conv.bias[0] = -8.0                    # ... and nothing else: a patch detector
        conv.weight[1, 0, 1, 1] = 1.0          # channels 1, 2: the image itself, as any edge or texture unit
        conv.weight[2, 0, 1, 1] = 0.5
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 28 * 28, 10))
    clean = torch.rand(64, 1, 28, 28) * 0.8               # never 9 bright pixels in a 3x3 window
    units = [u for u in discover_units(net, clean[:2])[0] if u.kind == "conv"]
    stamped = clean.clone()
    stamped[:, :, -5:-1, -5:-1] = 1.0                      # BadNets' corner square
    picked = {}
    for pool in ("mean", "max"):
        diff, an = activation_differences(net, units, clean, stamped, pool=pool)
        picked[pool] = select_resets(units, diff, an, dt=0.5, ct=1.0, mode="relative")[units[0].name].tolist()
    assert picked == {"mean": [], "max": [0]}
    with pytest.raises(UserError, match="pool must be one of"):
        launder_config("strong", pool="median")
    with pytest.raises(ValueError, match="pool must be one of"):
        mean_activations(net, units, clean, pool="median")
