import torch

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
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.allclose(a.masks, b.masks, atol=1e-5)
    assert torch.allclose(a.patterns, b.patterns, atol=1e-5)
    assert torch.allclose(a.l1, b.l1, rtol=1e-5)
    assert torch.equal(a.epochs, b.epochs) and a.flagged == b.flagged
    assert torch.equal(a.found, b.found)


def test_model_is_not_changed():
    model = tiny_net()
    before = [p.clone() for p in model.parameters()]
    neural_cleanse(model, make_images(32, 0).x, NCConfig(max_epochs=2), num_classes=4)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
    assert all(p.requires_grad for p in model.parameters())
