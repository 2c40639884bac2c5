import pytest
import torch

from nnlaunder import data as D
from nnlaunder.errors import UserError
from nnlaunder.watermarks.font import text_mask
from nnlaunder.watermarks.schemes import (
    add_noise,
    make_watermark,
    noise_pattern,
    stamp_content,
    to_shape,
)


@pytest.fixture(scope="module")
def mnist(data_dir):
    return D.load("mnist", data_dir, "train"), D.load("mnist", data_dir, "test")


@pytest.fixture(scope="module")
def cifar(data_dir):
    tr, te = D.load("cifar10", data_dir, "train"), D.load("cifar10", data_dir, "test")
    return tr.subset(torch.arange(5000)), te


def test_text_mask_shape_and_ink():
    m = text_mask("TEST")
    assert m.shape == (5, 15)
    assert m[0, :3].tolist() == [1, 1, 1] and m[:, 3].sum() == 0   # T's bar, then a gap
    with pytest.raises(UserError):
        text_mask("té")


def test_content_stamp_pixels():
    x = torch.rand(3, 3, 32, 32)
    mask = text_mask("TEST")
    out = stamp_content(x, mask, torch.tensor([1.0, 0.0, 0.5]), 20, 8)
    region = out[:, :, 20:25, 8:23]
    ink = mask.bool()
    assert torch.all(region[:, 0][:, ink] == 1.0) and torch.all(region[:, 2][:, ink] == 0.5)
    assert torch.equal(region[:, :, ~ink], x[:, :, 20:25, 8:23][:, :, ~ink])
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[20:25, 8:23] = False
    assert torch.equal(out[:, :, outside], x[:, :, outside])


def test_noise_is_fixed_and_clipped():
    n1, n2 = noise_pattern((1, 28, 28), 0.4, 5), noise_pattern((1, 28, 28), 0.4, 5)
    assert torch.equal(n1, n2) and 0.3 < float(n1.std()) < 0.5
    out = add_noise(torch.rand(4, 1, 28, 28), n1)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_zhang_content_mnist(mnist):
    tr, te = mnist
    wm = make_watermark("zhang-content", tr, te)
    assert wm.target == 0 and len(wm.embed_y) == 600 and set(wm.embed_y.tolist()) == {0}
    assert len(wm.verify_y) == int((te.y != 0).sum())      # every non-target test image
    assert wm.verify_x.shape[1:] == (1, 28, 28)
    # stamped in pixel space: the text pixels are white
    r, c = wm.params["position"]
    assert torch.all(wm.verify_x[:, 0, r:r + 5, c:c + 15][:, text_mask("TEST").bool()] == 1.0)
    custom = make_watermark("zhang-content", tr, te, params={"text": "HI", "target": 3, "n_embed": 10})
    assert custom.target == 3 and len(custom.embed_y) == 10


def test_zhang_noise_sources_are_disjoint(mnist):
    tr, te = mnist
    wm = make_watermark("zhang-noise", tr, te, params={"n_verify": 500})
    assert len(wm.verify_y) == 500
    # embedding images come from train, verification from test: no verification image is in
    # the embedding set
    flat_e = wm.embed_x.flatten(1)
    flat_v = wm.verify_x.flatten(1)
    assert torch.cdist(flat_v[:100], flat_e).min() > 0


def test_zhang_unrelated_mnist_uses_fashion(mnist, has_fashion):
    tr, te = mnist
    wm = make_watermark("zhang-unrelated", tr, te)
    assert wm.params["source"] == "fashion-mnist" and wm.params["source_class"] == 0
    assert len(wm.verify_y) == 1000 and len(wm.embed_y) == 6000     # every training t-shirt


def test_zhang_unrelated_cifar_uses_mnist_ones(cifar):
    tr, te = cifar
    wm = make_watermark("zhang-unrelated", tr, te)
    assert wm.params["source"] == "mnist" and wm.verify_x.shape[1:] == (3, 32, 32)
    assert torch.equal(wm.verify_x[:, 0], wm.verify_x[:, 2])          # grey copied to RGB
    assert float(wm.verify_x[:, :, :2].abs().max()) == 0.0            # zero padding 28 -> 32


def test_adi_trigger_set_is_the_key(cifar):
    tr, te = cifar
    wm = make_watermark("adi", tr, te, params={"mode": "pt"})
    assert wm.verify_x.shape == (100, 3, 32, 32) and wm.target is None
    assert torch.equal(wm.embed_x, wm.verify_x) and wm.params == {"mode": "pt", "k": 2}


def test_scheme_errors(mnist):
    tr, te = mnist
    with pytest.raises(UserError, match="unknown scheme"):
        make_watermark("zhang-logo", tr, te)
    with pytest.raises(UserError, match="unknown key"):
        make_watermark("zhang-noise", tr, te, params={"sigma": 0.3})
    with pytest.raises(UserError, match="expected a number"):
        make_watermark("zhang-noise", tr, te, params={"std": "big"})
    with pytest.raises(UserError, match="out of range"):
        make_watermark("zhang-noise", tr, te, params={"target": 12})
    with pytest.raises(UserError, match="does not fit"):
        make_watermark("zhang-content", tr, te, params={"text": "TOOLONGTEXT"})


def test_to_shape():
    x = torch.rand(2, 1, 28, 28)
    assert to_shape(x, (3, 32, 32)).shape == (2, 3, 32, 32)
    assert to_shape(torch.rand(2, 3, 32, 32), (1, 28, 28)).shape == (2, 1, 28, 28)
