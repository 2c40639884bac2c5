"""Neural Cleanse's tuned plan (precision, memory format, input gradient, chunk) and the confirmed
best mask of the fast preset."""

import json

import pytest
import torch

import nnlaunder.attacks.neural_cleanse as NC
import nnlaunder.speed.kernels as kernels
from nnlaunder.attacks.neural_cleanse import NCConfig, nc_config, neural_cleanse, stamp
from nnlaunder.speed.plans import BF16_MARGIN, Plan, pick

from .synthetic import make_images, tiny_net


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NNLAUNDER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "nc-plans.json"


def _p(amp: bool, cl: bool = False) -> Plan:
    return Plan(amp, cl, "native", 2, tuned=True)


def test_bf16_only_where_it_is_faster_by_the_margin():
    assert not pick({_p(False): 1.0, _p(True): 0.95}).amp                    # a 5% gain is inside the noise
    assert pick({_p(False): 1.0, _p(True): BF16_MARGIN * 0.99}).amp
    assert not pick({_p(False): 1.0, _p(False, True): 0.7, _p(True): 0.8}).amp  # fp32 channels-last wins
    assert pick({_p(False, True): 0.7}) == _p(False, True)


def test_tuned_plan_is_recorded_cached_and_reused(cache):
    model, x = tiny_net().eval(), make_images(64, 0).x
    cfg = nc_config("fast", max_epochs=3)
    a = neural_cleanse(model, x, cfg, num_classes=4)
    assert a.plan["tuned"] and a.plan["precision"] in ("fp32", "bf16") and a.plan["timing"]["cached"] is False
    assert {r["memory_format"] for r in a.plan["timing"]["stage1"]} == {"contiguous", "channels_last"}
    stored = json.loads(cache.read_text())
    assert len(stored["plans"]) == 1
    b = neural_cleanse(model, x, cfg, num_classes=4)
    assert b.plan["timing"] == {"cached": True}
    assert {k: v for k, v in b.plan.items() if k != "timing"} == {k: v for k, v in a.plan.items() if k != "timing"}
    # the faithful preset does not tune: it runs as configured and says so
    c = neural_cleanse(model, x, NCConfig(max_epochs=2), num_classes=4)
    assert c.plan == {"precision": "fp32", "memory_format": "contiguous", "input_grad": "matmul",
                      "class_chunk": 2 if x.device.type == "cpu" else None, "tuned": False, "im2col_forward": True,
                      "fused_conv_pool": False}      # tiny_net's 8-channel conv is not one the kernel takes


def test_never_bf16_where_slower_or_not_allowed(cache, monkeypatch):
    monkeypatch.setattr(NC, "amp_supported", lambda dev: True)
    # bf16 measured slower than fp32: the plan stays fp32 (timings are made up; nothing runs in bf16)
    monkeypatch.setattr(NC, "_step_seconds", lambda model, x, cfg, plan, n: n * (2.0 if plan.amp else 1.0))
    model, x = tiny_net().eval(), make_images(32, 0).x
    r = neural_cleanse(model, x, nc_config("fast", max_epochs=1), num_classes=4)
    assert r.plan["precision"] == "fp32"
    assert any(s["precision"] == "bf16" for s in r.plan["timing"]["stage1"])          # it was timed
    cache.unlink()
    monkeypatch.setattr(NC, "_step_seconds", lambda model, x, cfg, plan, n: n * (0.1 if plan.amp else 1.0))
    r = neural_cleanse(model, x, nc_config("fast", max_epochs=1, amp=False), num_classes=4)
    assert r.plan["precision"] == "fp32"
    assert all(s["precision"] == "fp32" for s in r.plan["timing"]["stage1"])          # not even timed


def test_one_channel_forward_path_is_timed_for_fp32_plans(cache, monkeypatch):
    # fp32 wins and the library's own forward of the one-channel conv beats im2col: the plan says so
    monkeypatch.setattr(NC, "_step_seconds", lambda model, x, cfg, plan, n: n * (
        (2.0 if plan.amp else 1.0) * (1.0 if plan.im2col_forward else 0.5)))
    model, x = tiny_net().eval(), make_images(32, 0).x
    assert x.shape[1] == 1
    r = neural_cleanse(model, x, nc_config("fast", max_epochs=1, input_grad="matmul"), num_classes=4)
    assert r.plan["precision"] == "fp32" and r.plan["im2col_forward"] is False
    assert {s["im2col_forward"] for s in r.plan["timing"]["stage2"]} == {True, False}
    # and the choice reaches the network: no im2col forward in the run
    calls = []
    monkeypatch.setattr(kernels, "conv_forward_im2col",
                        lambda *a: calls.append(1) or (kernels.F.conv2d(*a[:3], padding=a[3]), None))
    r2 = neural_cleanse(model, x, nc_config("fast", max_epochs=1, input_grad="matmul"), num_classes=4)
    assert r2.plan["timing"] == {"cached": True} and r2.plan["im2col_forward"] is False and not calls
    neural_cleanse(model, x, NCConfig(max_epochs=1, input_grad="matmul", im2col_forward=True), num_classes=4)
    assert calls                                   # (the untuned configuration does take the im2col path)


def test_damaged_or_unwritable_cache_is_timed_again(cache, monkeypatch):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    model, x = tiny_net().eval(), make_images(32, 0).x
    r = neural_cleanse(model, x, nc_config("fast", max_epochs=1), num_classes=4)
    assert r.plan["timing"]["cached"] is False and json.loads(cache.read_text())["plans"]
    monkeypatch.setenv("NNLAUNDER_CACHE", "off")
    r = neural_cleanse(model, x, nc_config("fast", max_epochs=1), num_classes=4)
    assert r.plan["timing"]["cached"] is False


def test_confirmed_masks_reach_the_target_on_all_images(cache):
    model, x = tiny_net(seed=1).eval(), make_images(96, 2).x
    cfg = nc_config("fast", max_epochs=30, steps_per_epoch=1, batch_size=16, patience=2, early_stop_patience=3,
                    success=0.9)
    r = neural_cleanse(model, x, cfg, num_classes=4)
    with torch.no_grad():
        rates = torch.tensor([float((model(stamp(x, r.masks[k], r.patterns[k])).argmax(1) == k).float().mean())
                              for k in range(4)])
    # `success` is now the share over all the images, measured here independently
    assert torch.allclose(r.success, rates, atol=1e-6)
    assert torch.equal(r.found, rates >= cfg.success)
    unconfirmed = neural_cleanse(model, x, NCConfig(**{**cfg.__dict__, "confirm_best": False}), num_classes=4)
    # the confirmed mask is one of the successive bests: never smaller than the unconfirmed best
    assert (r.l1 >= unconfirmed.l1 - 1e-4).all()


@pytest.mark.parametrize("chunk", [8, 24, 64])
def test_confirmation_rule_with_early_exit_equals_counting_everything(monkeypatch, chunk):
    # Each candidate's share is computed in full here; the confirmation drops a failing one after the
    # first chunk of images over the allowed misses (64: only ever at the last chunk; 24: a short last
    # chunk), and must choose exactly the same masks.
    monkeypatch.setattr(NC, "CONFIRM_CHUNK", chunk)
    model, x = tiny_net(seed=1).eval(), make_images(64, 3).x
    g = torch.Generator().manual_seed(0)
    cands = [[(torch.rand(1, 12, 12, generator=g) * s, torch.rand(1, 12, 12, generator=g), float(j))
              for j, s in enumerate((1.0, 0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02))] for _ in range(4)]

    def share(m, p, c):
        with torch.no_grad():
            return float((model(stamp(x, m, p)).argmax(1) == c).float().mean())

    for success in (0.2, 0.5, 1.0):                 # some pass, few pass, none passes
        cfg = NCConfig(success=success)
        res = {"masks": torch.zeros(4, 1, 12, 12), "patterns": torch.zeros(4, 1, 12, 12), "l1": torch.zeros(4),
               "success": torch.zeros(4), "found": torch.zeros(4, dtype=torch.bool),
               "candidates": [list(c) for c in cands]}
        NC._confirm(model, x, cfg, list(range(4)), res)
        for k in range(4):
            look = [j for j in (0, 1, 2, 3, 5, 9) if j < len(cands[k])]       # newest first, then doubling
            tried = [cands[k][-1 - j] for j in look]
            rates = [share(m, p, k) for m, p, _ in tried]
            passing = [i for i, r in enumerate(rates) if r >= success]
            i = passing[0] if passing else max(range(len(tried)), key=lambda j: (rates[j], -j))
            assert torch.equal(res["masks"][k], tried[i][0]) and float(res["l1"][k]) == tried[i][2]
            assert abs(float(res["success"][k]) - rates[i]) < 1e-6 and bool(res["found"][k]) == bool(passing)


def _bn_net(seed: int = 0):
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(8 * 9, 4))
    for m in net.modules():                     # running statistics far from the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def test_batch_norm_folding_is_the_same_function_and_safe():
    from torch import nn

    from nnlaunder.models import build
    from nnlaunder.speed.rewrite import fold_batchnorm

    x = make_images(16, 0).x
    net = _bn_net()
    folded = fold_batchnorm(net, x[:4])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(net(x), folded(x), atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())           # the original is untouched
    res = build("resnet20", 10, seed=0).eval()
    xr = torch.rand(4, 3, 32, 32)
    fr = fold_batchnorm(res, xr)
    assert fr is not res and torch.allclose(res(xr), fr(xr), atol=1e-4)
    # left as it is: training mode, a hook anywhere, nothing to fold (BN after a ReLU)
    assert fold_batchnorm(net.train(), x) is net
    net.eval()
    h = net[2].register_forward_hook(lambda m, i, o: o)
    assert fold_batchnorm(net, x) is net
    h.remove()
    cnn = build("cifar-cnn", 10, seed=0).eval()
    assert fold_batchnorm(cnn, torch.rand(2, 3, 32, 32)) is cnn


def test_neural_cleanse_with_folded_batch_norm_matches(cache):
    torch.set_default_dtype(torch.float64)
    try:
        net = _bn_net().double()
        x = make_images(48, 1).x.double()
        cfg = NCConfig(max_epochs=4, patience=2, batch_size=16, seed=1)
        a = neural_cleanse(net, x, cfg, num_classes=4)
        b = neural_cleanse(net, x, NCConfig(**{**cfg.__dict__, "fold_bn": True}), num_classes=4)
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.allclose(a.masks, b.masks, atol=1e-6) and torch.equal(a.epochs, b.epochs)


def test_the_native_conv_pool_kernel_is_timed_and_taken_only_where_it_pays(cache, monkeypatch):
    from torch import nn

    from nnlaunder.speed import native

    native.reset()
    if native.conv_pool() is None:
        pytest.skip(f"native kernel unavailable here: {native.status()}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 25, 4)).eval()
    x = make_images(32, 0).x
    for fused_cost, expect in ((0.5, True), (2.0, False)):
        monkeypatch.setattr(NC, "_step_seconds", lambda model, x, cfg, plan, n, c=fused_cost: n * (
            (2.0 if plan.amp else 1.0) * (c if plan.fused_conv_pool else 1.0)))
        r = neural_cleanse(model, x, nc_config("fast", max_epochs=1), num_classes=4)
        assert r.plan["fused_conv_pool"] is expect
        assert {s["fused_conv_pool"] for s in r.plan["timing"]["stage_fused"]} == {True, False}
        cache.unlink()
    # switched off: not timed, not used, and a cached plan that used it is not taken
    monkeypatch.setattr(NC, "_step_seconds", lambda model, x, cfg, plan, n: n * (0.5 if plan.fused_conv_pool else 1.0))
    neural_cleanse(model, x, nc_config("fast", max_epochs=1), num_classes=4)
    r = neural_cleanse(model, x, nc_config("fast", max_epochs=1, fused_conv_pool=False), num_classes=4)
    assert r.plan["fused_conv_pool"] is False and "stage_fused" not in r.plan["timing"]
    monkeypatch.setenv("NNLAUNDER_NATIVE", "off")
    native.reset()
    try:
        r = neural_cleanse(model, x, nc_config("fast", max_epochs=1), num_classes=4)
        assert r.plan["fused_conv_pool"] is False
    finally:
        native.reset()
