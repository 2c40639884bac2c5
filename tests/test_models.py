import pytest
import torch

from nnlaunder.errors import UserError
from nnlaunder.models import ARCHS, Normalize, build, check_fits, count_params


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_shapes(arch):
    m = build(arch, 10, seed=0).eval()
    x = torch.rand(4, *ARCHS[arch].input_shape)
    assert m(x).shape == (4, 10)
    first = m[0] if isinstance(m, torch.nn.Sequential) else m.normalize
    assert isinstance(first, Normalize)


def test_param_counts_match_the_papers_layouts():
    # Table 5: 32·(25+1) + 16·(32·25+1) + 512·(256+1) + 10·(512+1)
    assert count_params(build("mnist-cnn")) == 832 + 12816 + 131584 + 5130
    # Keras' cifar10_resnet v1 n=3 (ResNet20v1): 273,066 trainable parameters, plus 1,376
    # non-trainable BN moving statistics (688 channels × 2) = 274,442 in its model.summary().
    r = build("resnet20")
    bn_running = sum(m.num_features * 2 for m in r.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert count_params(r) == 273066 and bn_running == 1376
    c = build("cifar-cnn")
    assert c(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_seeded_build_is_reproducible():
    a, b = build("mnist-cnn", seed=1), build("mnist-cnn", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = build("mnist-cnn", seed=2)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_fit_errors():
    with pytest.raises(UserError, match="unknown architecture"):
        build("vgg")
    with pytest.raises(UserError, match="is for cifar10, not 'mnist'"):
        check_fits("cifar-cnn", "mnist")
    with pytest.raises(UserError, match="takes inputs"):
        check_fits("mnist-cnn", "mnist", (3, 28, 28))
