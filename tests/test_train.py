import math

import pytest
import torch
from torch import nn

from nnlaunder.errors import UserError
from nnlaunder.train import NonFiniteLoss, TrainConfig, accuracy, crop_flip, lr_at, train


def _toy(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    return x, y


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 2))


class Spy(nn.Module):
    """_net() that records every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.net = _net()
        self.batches: list[torch.Tensor] = []

    def forward(self, inp):
        if self.training:
            self.batches.append(inp.detach().clone())
        return self.net(inp)


def test_training_learns_a_simple_rule():
    x, y = _toy(512)
    m = _net()
    before = accuracy(m, x, y)
    res = train(m, x, y, TrainConfig(epochs=15, batch_size=32, lr=3e-3), progress=False)
    assert accuracy(m, x, y) > max(90.0, before + 20)
    assert len(res.history) == 15 and res.history[-1]["loss"] < res.history[0]["loss"]


def test_same_seed_same_weights_and_resume_equals_unbroken(tmp_path):
    x, y = _toy()
    cfg = TrainConfig(epochs=4, batch_size=32, lr=1e-2, schedule="onecycle", seed=7)
    a = _net()
    train(a, x, y, cfg, progress=False)
    # Interrupted after 2 epochs (a callback stops it), then resumed from the checkpoint.
    b = _net()
    train(b, x, y, cfg, checkpoint_dir=tmp_path, progress=False,
          callbacks=[lambda ep, m: {"stop": ep == 2}])
    c = _net(seed=123)  # different init: the checkpoint must overwrite it
    res = train(c, x, y, cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    for p, q in zip(a.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q)


def test_resume_with_another_config_is_refused(tmp_path):
    x, y = _toy()
    train(_net(), x, y, TrainConfig(epochs=1, batch_size=64), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(UserError, match="another training config"):
        train(_net(), x, y, TrainConfig(epochs=1, batch_size=32), checkpoint_dir=tmp_path, resume=True,
              progress=False)


def test_masks_keep_weights_zero():
    x, y = _toy()
    m = _net()
    mask = torch.ones_like(m[1].weight)
    mask[:5] = 0
    bmask = torch.ones_like(m[1].bias)
    bmask[:5] = 0
    train(m, x, y, TrainConfig(epochs=2, batch_size=32, lr=1e-2, l2=1e-3), progress=False,
          masks={"1.weight": mask, "1.bias": bmask})
    assert torch.count_nonzero(m[1].weight[:5]) == 0 and torch.count_nonzero(m[1].bias[:5]) == 0
    assert torch.count_nonzero(m[1].weight[5:]) > 0


def test_append_adds_k_examples_per_batch():
    x, y = _toy(64)
    extra_x = torch.zeros(3, 1, 8, 8)
    extra_y = torch.ones(3, dtype=torch.long)
    spy = Spy()
    train(spy, x, y, TrainConfig(epochs=1, batch_size=16), append=(extra_x, extra_y, 2), progress=False)
    assert [len(b) for b in spy.batches] == [18, 18, 18, 18]


def test_fixed_tail_is_never_augmented_the_rest_is():
    # 24 ordinary images then 8 "triggers" (the tail); every training batch is recorded.
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 1, 8, 8, generator=g)
    y = torch.zeros(32, dtype=torch.long)
    spy = Spy()
    cfg = TrainConfig(epochs=2, batch_size=8, augment="crop-flip")
    train(spy, x, y, cfg, fixed_tail=8, progress=False)
    seen = torch.cat(spy.batches)
    exact = [(seen == img).flatten(1).all(1).any().item() for img in x]
    assert all(exact[24:])                 # every trigger went in exactly as given, in both epochs
    assert sum(exact[:24]) < 12            # ordinary images were cropped/flipped
    assert sum((seen == img).flatten(1).all(1).sum().item() for img in x[24:]) == 16
    with pytest.raises(UserError, match="fixed_tail"):
        train(_net(), x, y, cfg, fixed_tail=33, progress=False)


def test_crop_flip_moves_pixels_but_keeps_shape_and_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    out = crop_flip(x, g)
    assert out.shape == x.shape
    assert not torch.equal(out, x)
    # every output pixel is an input pixel of the same image/channel or padding zero
    for i in range(4):
        vals = set(x[i, 0].flatten().tolist()) | {0.0}
        assert set(out[i, 0].flatten().tolist()) <= vals


def test_lr_schedules():
    cfg = TrainConfig(epochs=10, lr=0.1, schedule="onecycle")
    lrs = [lr_at(cfg, s, 1000) for s in range(1000)]
    assert max(lrs) == pytest.approx(0.1, rel=1e-2) and lrs[0] < 0.01 and lrs[-1] < 1e-3
    step = TrainConfig(epochs=40, lr=0.1, schedule="step", step_epochs=20)
    assert lr_at(step, 0, 400) == 0.1 and math.isclose(lr_at(step, 250, 400), 0.01)
    cos = TrainConfig(lr=1.0, schedule="cosine")
    assert lr_at(cos, 500, 1000) == pytest.approx(0.5)


def test_bad_configs_and_nan_loss():
    with pytest.raises(UserError, match="epochs"):
        TrainConfig(epochs=-1)
    with pytest.raises(UserError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    x, y = _toy()
    x[0] = float("nan")
    with pytest.raises(NonFiniteLoss):
        train(_net(), x, y, TrainConfig(epochs=1, batch_size=512), progress=False)


def test_relu_after_pool_same_function_gradients_and_parameters():
    from nnlaunder.models import build
    from nnlaunder.train import relu_after_pool

    model = build("mnist-cnn", 10, seed=0)
    net = relu_after_pool(model)
    kinds = [type(m).__name__ for m in net]
    assert kinds[1:7] == ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU"]
    assert [type(m).__name__ for m in model][2:4] == ["ReLU", "MaxPool2d"]     # the model is untouched
    assert all(p is q for p, q in zip(model.parameters(), net.parameters(), strict=True))
    x = torch.rand(16, 1, 28, 28)
    x[:4, :, :14] = 0.0                 # blank regions: windows of non-positive pre-activations
    ya, yb = model(x), net(x)
    assert torch.equal(ya, yb)
    ga = torch.autograd.grad(ya.square().sum(), list(model.parameters()))
    gb = torch.autograd.grad(yb.square().sum(), list(net.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ga, gb, strict=True))
    # a hooked ReLU keeps its place; a non-Sequential model comes back as it is
    h = model[2].register_forward_hook(lambda *a: None)
    assert [type(m).__name__ for m in relu_after_pool(model)][2:4] == ["ReLU", "MaxPool2d"]
    h.remove()
    res = build("resnet20", 10, seed=0)
    assert relu_after_pool(res) is res


def _toy_watermark(seed: int):
    """24 toy images (class 0) and 8 noise-like triggers labelled 1, as a zhang-noise Watermark."""
    from nnlaunder.data import Dataset
    from nnlaunder.watermarks.schemes import Watermark

    g = torch.Generator().manual_seed(seed)
    data = Dataset("toy", torch.rand(24, 1, 8, 8, generator=g), torch.zeros(24, dtype=torch.long), ("a", "b"))
    trig = torch.rand(8, 1, 8, 8, generator=g)
    wm = Watermark("zhang-noise", trig, torch.ones(8, dtype=torch.long), trig, torch.ones(8, dtype=torch.long),
                   1, {})
    return data, trig, wm


@pytest.mark.parametrize("augment_triggers", [False, True])
def test_embed_keeps_triggers_out_of_augmentation_on_request(augment_triggers):
    from nnlaunder.watermarks.embed import embed

    data, trig, wm = _toy_watermark(2)
    spy = Spy()
    embed(spy, data, wm, TrainConfig(epochs=2, batch_size=8, augment="crop-flip"),
          augment_triggers=augment_triggers, progress=False)
    seen = torch.cat(spy.batches)
    exact = sum((seen == t).flatten(1).all(1).sum().item() for t in trig)
    assert (exact == 16) if not augment_triggers else (exact < 8)


def test_embed_oversamples_triggers_and_can_leave_verification_out():
    from nnlaunder.watermarks.embed import embed

    data, trig, wm = _toy_watermark(4)
    spy = Spy()
    res = embed(spy, data, wm, TrainConfig(epochs=1, batch_size=8, augment="crop-flip"), trigger_repeat=3,
                augment_triggers=False, eval_wm=False, eval_sets={"val": (trig, torch.ones(8, dtype=torch.long))},
                progress=False)
    seen = torch.cat(spy.batches)
    assert len(seen) == 24 + 3 * 8            # one epoch: the data once, every trigger three times
    assert all((seen == t).flatten(1).all(1).sum().item() == 3 for t in trig)
    assert "val_acc" in res.history[-1] and "wm_acc" not in res.history[-1]
    with pytest.raises(UserError, match="trigger_repeat"):
        embed(Spy(), data, wm, TrainConfig(epochs=1, batch_size=8), trigger_repeat=0, progress=False)




def test_amp_trains_in_bfloat16_where_native_and_names_another_model(monkeypatch):
    """amp: the forward pass in bfloat16 where the hardware has it natively (weights stay fp32 and the model
    learns the rule); where it has not, fp32 with a warning. It is part of a model's identity only when on."""
    from nnlaunder import device
    from nnlaunder import train as T

    x, y = _toy()
    cfg = TrainConfig(epochs=8, batch_size=32, lr=1e-2, seed=0)
    plain, mixed = _net(), _net()
    train(plain, x, y, cfg, progress=False)
    monkeypatch.setattr(T, "amp_supported", lambda dev: True)      # as on a CPU with AMX or a bf16 GPU
    seen = []
    hook = mixed[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    train(mixed, x, y, TrainConfig(epochs=8, batch_size=32, lr=1e-2, seed=0, amp=True), progress=False)
    hook.remove()
    assert torch.bfloat16 in seen and all(p.dtype == torch.float32 for p in mixed.parameters())
    assert accuracy(mixed, x, y) > 90 and not torch.equal(plain[1].weight, mixed[1].weight)
    monkeypatch.setattr(T, "amp_supported", lambda dev: False)
    again = _net()
    with pytest.warns(UserWarning, match="no native bfloat16; training in fp32"):
        train(again, x, y, TrainConfig(epochs=8, batch_size=32, lr=1e-2, seed=0, amp=True), progress=False)
    assert torch.equal(plain[1].weight, again[1].weight)
    assert TrainConfig().identity() == {k: v for k, v in TrainConfig(amp=True).identity().items() if k != "amp"}
    assert "amp" not in TrainConfig().identity() and device.amp_supported(torch.device("meta")) is False
    with pytest.raises(UserError, match="amp must be true or false"):
        TrainConfig(amp="yes")
