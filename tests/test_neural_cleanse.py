import pytest
import torch
from torch import nn

from nnlaunder.attacks.neural_cleanse import NCConfig, anomaly_index, neural_cleanse, stamp

from .synthetic import make_images, tiny_net


def test_stamp_maths():
    x = torch.rand(3, 2, 4, 4)
    m = torch.zeros(1, 4, 4)
    m[0, 1, 2] = 1.0
    m[0, 0, 0] = 0.25
    p = torch.full((2, 4, 4), 0.8)
    out = stamp(x, m, p)
    assert torch.allclose(out[:, :, 1, 2], torch.full((3, 2), 0.8))
    assert torch.allclose(out[:, :, 0, 0], 0.75 * x[:, :, 0, 0] + 0.25 * 0.8)
    assert torch.equal(out[:, :, 3, 3], x[:, :, 3, 3])
    assert torch.equal(stamp(x, torch.zeros(1, 4, 4), p), x)


def test_mad_on_known_vectors():
    # median 10 (mean of 9 and 11), |dev| = [9,1,1,3,5,...]; MAD computed by hand
    l1 = torch.tensor([1.0, 9.0, 11.0, 13.0, 10.0, 10.0])
    dev = (l1 - 10.0).abs()                     # [9,1,1,3,0,0] -> median 1.0
    idx, flagged = anomaly_index(l1)
    assert torch.allclose(idx, dev / 1.4826)
    assert flagged == [0]                       # 9/1.4826 = 6.07 > 2 and below the median
    # large norms are never flagged, however far out
    idx, flagged = anomaly_index(torch.tensor([10.0, 10.0, 11.0, 9.0, 100.0]))
    assert flagged == [] and float(idx[4]) > 2
    # no spread: nothing flagged, no division by zero
    idx, flagged = anomaly_index(torch.full((5,), 3.0))
    assert flagged == [] and torch.all(idx == 0)


def test_batched_equals_per_class_loop():
    torch.set_default_dtype(torch.float64)
    try:
        model = tiny_net().double().eval()
        x = make_images(64, seed=1).x.double()
        cfg = NCConfig(max_epochs=12, patience=2, early_stop_patience=3, batch_size=16, seed=3)
        a = neural_cleanse(model, x, cfg, num_classes=4)
        b = neural_cleanse(model, x, cfg, num_classes=4, per_class=True)
        whole = neural_cleanse(model, x, NCConfig(**{**cfg.__dict__, "class_chunk": 4}), num_classes=4)
        chunked = neural_cleanse(model, x, NCConfig(**{**cfg.__dict__, "class_chunk": 3}), num_classes=4)
    finally:
        torch.set_default_dtype(torch.float32)
    # classes in chunks of 3 (3 + 1) or all 4 in one forward: the same optimisation
    assert torch.allclose(whole.masks, chunked.masks, atol=1e-6) and torch.equal(whole.epochs, chunked.epochs)
    assert torch.allclose(a.masks, b.masks, atol=1e-5)
    assert torch.allclose(a.patterns, b.patterns, atol=1e-5)
    assert torch.allclose(a.l1, b.l1, rtol=1e-5)
    assert torch.equal(a.epochs, b.epochs) and a.flagged == b.flagged
    assert torch.equal(a.found, b.found)


def test_model_is_not_changed():
    from nnlaunder.attacks.neural_cleanse import nc_config

    for cfg in (NCConfig(max_epochs=2), nc_config("fast", max_epochs=2)):
        model = tiny_net()
        before = [p.clone() for p in model.parameters()]
        neural_cleanse(model, make_images(32, 0).x, cfg, num_classes=4)
        assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
        assert all(p.requires_grad for p in model.parameters())
        assert [type(m).__name__ for m in model][1:3] == ["ReLU", "MaxPool2d"]


def test_rewrite_for_speed_computes_the_same_function():
    from torch import nn

    from nnlaunder.attacks.neural_cleanse import rewrite_for_speed

    model = tiny_net(seed=2).eval()
    fast = rewrite_for_speed(model)
    kinds = [type(m).__name__ for m in fast]
    assert kinds[1:3] == ["MaxPool2d", "ReLU"] and kinds[4:6] == ["MaxPool2d", "ReLU"]
    assert [type(m).__name__ for m in model][1:3] == ["ReLU", "MaxPool2d"]      # original untouched
    x = make_images(16, seed=4).x.requires_grad_(True)
    y1 = model(x)
    g1, = torch.autograd.grad(y1.square().sum(), x)
    y2 = fast(x.contiguous(memory_format=torch.channels_last))
    g2, = torch.autograd.grad(y2.square().sum(), x)
    assert torch.allclose(y1, y2, atol=1e-5) and torch.allclose(g1, g2, atol=1e-5)
    # a ReLU with something else after it, or a pool returning indices, is left alone
    seq = nn.Sequential(nn.ReLU(), nn.Conv2d(1, 1, 1), nn.ReLU(), nn.MaxPool2d(2, return_indices=True))
    assert [type(m) for m in rewrite_for_speed(seq)] == [type(m) for m in seq]


def test_short_schedule_epochs_batched_equals_loop_and_full_pass_is_unchanged():
    from nnlaunder.attacks.neural_cleanse import nc_config

    torch.set_default_dtype(torch.float64)
    try:
        model = tiny_net().double().eval()
        x = make_images(64, seed=1).x.double()
        base = dict(max_epochs=10, patience=2, early_stop_patience=3, batch_size=16, seed=3)
        cfg = nc_config("fast", amp=False, steps_per_epoch=2, **{k: v for k, v in base.items()
                                                                  if k != "early_stop_patience"})
        a = neural_cleanse(model, x, cfg, num_classes=4)
        b = neural_cleanse(model, x, cfg, num_classes=4, per_class=True)
        # an "epoch" of exactly one full pass is the faithful schedule
        full = neural_cleanse(model, x, NCConfig(**base), num_classes=4)
        same = neural_cleanse(model, x, NCConfig(steps_per_epoch=4, **base), num_classes=4)
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.allclose(a.masks, b.masks, atol=1e-5) and torch.equal(a.epochs, b.epochs)
    assert torch.equal(full.masks, same.masks) and torch.equal(full.epochs, same.epochs)
    assert a.history[0]["epoch"] == 1 and len(a.history) <= 10


def test_presets_are_validated():
    import pytest

    from nnlaunder.attacks.neural_cleanse import nc_config
    from nnlaunder.errors import UserError

    assert nc_config("faithful") == NCConfig()
    assert nc_config("fast").amp and nc_config("fast").steps_per_epoch == 8
    with pytest.raises(UserError, match="unknown Neural Cleanse preset"):
        nc_config("turbo")
    with pytest.raises(UserError):
        NCConfig(steps_per_epoch=0)


@pytest.mark.parametrize("arch,shape", [("mnist-cnn", (5, 1, 28, 28)), ("resnet20", (3, 3, 32, 32)),
                                        ("padded-1ch", (4, 1, 9, 11))])
def test_matmul_input_gradient_equals_the_native_one(arch, shape):
    from nnlaunder.models import build
    from nnlaunder.speed.kernels import InputGradConv, with_input_grad_convs

    if arch == "padded-1ch":       # one input channel (im2col forward) with padding and a non-square kernel
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 6, (3, 5), padding=(1, 2)), nn.ReLU(), nn.Flatten(),
                              nn.Linear(6 * 9 * 11, 10)).eval()
    else:
        model = build(arch, 10, seed=0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fast = with_input_grad_convs(model)
    wrapped = [m for m in fast.modules() if isinstance(m, InputGradConv)]
    assert len(wrapped) == 1 and wrapped[0].conv.in_channels == shape[1]      # only the few-channel conv
    assert not any(isinstance(m, InputGradConv) for m in model.modules())       # the original is untouched
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for net in (model, fast):
        xi = x.clone().requires_grad_(True)
        out = net(xi)
        grads.append((out, torch.autograd.grad(out.square().sum(), xi)[0]))
    # same forward (a one-channel conv runs as im2col + matmul on a CPU: the same sums in another order)
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-6 * grads[0][1].abs().max().item())
    # a conv being trained keeps the library's backward (weight gradients are needed there)
    wrapped[0].conv.weight.requires_grad_(True)
    xi = x.clone().requires_grad_(True)
    fast(xi).sum().backward()
    assert wrapped[0].conv.weight.grad is not None


class _Stopped(Exception):
    pass


def test_a_stopped_run_continues_where_it_was_kept_and_ends_as_an_unbroken_one(tmp_path):
    """Inside `keeping(...)`, Neural Cleanse saves its state (masks, patterns, Adam's moments, the schedule,
    the best masks and, with confirm_best, their candidates); a run stopped after a save and started again
    continues at that epoch and returns what an unbroken run returns, and counts the work done before."""
    from nnlaunder.attacks.neural_cleanse import keeping
    from nnlaunder.attacks.records import Keeper

    model = tiny_net().eval()
    x = make_images(64, seed=1).x
    for cfg in (NCConfig(max_epochs=14, patience=2, early_stop_patience=3, batch_size=16, seed=3),
                NCConfig(max_epochs=14, patience=2, early_stop_patience=3, batch_size=16, seed=3, confirm_best=True,
                         steps_per_epoch=2)):
        whole = neural_cleanse(model, x, cfg, num_classes=4)
        keeper = Keeper(tmp_path / f"keep-{cfg.confirm_best}", every=0.0)        # a save after every epoch
        saves = []

        def stop_after(n, keeper=keeper, saves=saves):
            def factory(*a):
                keep = keeper(*a)

                def save(state):
                    keep.save(state)
                    saves.append(state["meta"]["next_epoch"])
                    if len(saves) == n:
                        raise _Stopped
                return type(keep)(load=keep.load, save=save, every=0.0)
            return factory

        with pytest.raises(_Stopped), keeping(stop_after(5)):
            neural_cleanse(model, x, cfg, num_classes=4)
        assert saves == [1, 2, 3, 4, 5] and keeper.resumed == 0.0
        with keeping(keeper):
            again = neural_cleanse(model, x, cfg, num_classes=4)
        assert keeper.resumed > 0.0                                              # the first five epochs' work
        assert torch.equal(again.masks, whole.masks) and torch.equal(again.patterns, whole.patterns)
        assert torch.equal(again.l1, whole.l1) and torch.equal(again.epochs, whole.epochs)
        assert again.flagged == whole.flagged and again.history == whole.history
        assert again.phase_seconds["optimise"] >= keeper.resumed


def test_a_kept_state_of_another_run_is_not_used(tmp_path):
    """The state file is named by the weights, images, settings and classes; a damaged file is run again."""
    from nnlaunder.attacks.neural_cleanse import keeping
    from nnlaunder.attacks.records import Keeper

    model, x = tiny_net().eval(), make_images(64, seed=1).x
    cfg = NCConfig(max_epochs=4, patience=2, early_stop_patience=3, batch_size=16, seed=3)
    keeper = Keeper(tmp_path, every=0.0)
    with keeping(keeper):
        first = neural_cleanse(model, x, cfg, num_classes=4)
    (kept,) = list(tmp_path.glob("nc-*.safetensors"))
    with keeping(keeper):
        neural_cleanse(model, x[:32], cfg, num_classes=4)                      # other images: their own file
    assert len(list(tmp_path.glob("nc-*.safetensors"))) == 2 and keeper.resumed == 0.0
    kept.write_bytes(b"not a safetensors file")
    with keeping(keeper):
        again = neural_cleanse(model, x, cfg, num_classes=4)
    assert torch.equal(again.masks, first.masks)


def test_kept_nc_runs_neural_cleanse_once_per_model_images_and_settings(tmp_path, monkeypatch):
    """`nc_memo.kept_nc`: the first call runs and keeps the result, a second one loads it; other settings run."""
    from nnlaunder.experiments import nc_memo

    model, x = tiny_net().eval(), make_images(32, seed=1)
    calls = []
    real = nc_memo.neural_cleanse
    monkeypatch.setattr(nc_memo, "neural_cleanse", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = NCConfig(max_epochs=3, batch_size=16, seed=1)
    first = nc_memo.kept_nc(tmp_path, model, x, cfg)
    again = nc_memo.kept_nc(tmp_path, model, x, cfg)
    assert len(calls) == 1 and torch.equal(first.masks, again.masks) and first.flagged == again.flagged
    nc_memo.kept_nc(tmp_path, model, x, NCConfig(max_epochs=3, batch_size=16, seed=2))
    assert len(calls) == 2
