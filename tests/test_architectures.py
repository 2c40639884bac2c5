"""Every registered attack runs on networks written the ways published backdoor code writes them:
flattening with `.view`, one in-place ReLU module shared by several layers after bias-free convs and
batch norms, group norm with depthwise convs and a functional residual, group and instance norms, a
small vision transformer, an all-convolutional classifier. The speed measures (channels-last,
the im2col first conv, folded batch norms) must adapt to such a model or step aside, never break it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnlaunder as nl
from nnlaunder.attacks.base import output_layer
from nnlaunder.attacks.laundering import reset_masks
from nnlaunder.attacks.neural_cleanse import COST_MAX, NCConfig, _Lambda, nc_config, neural_cleanse
from nnlaunder.attacks.registry import ATTACKS
from nnlaunder.attacks.units import discover_units, mean_activations
from nnlaunder.data import Dataset
from nnlaunder.device import channels_last_runs
from nnlaunder.errors import UserError
from nnlaunder.train import TrainConfig, accuracy, apply_masks, batches, n_batches, train

from .synthetic import make_images


class ViewFlatten(nn.Module):
    """conv (no bias) -> BN -> one shared in-place ReLU, twice; `.view` before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.c1, self.b1 = nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(self.relu(self.b2(self.c2(x))), 2)
        return self.fc(x.view(x.size(0), -1))


class GroupDepthwise(nn.Module):
    """conv -> GroupNorm -> GELU, then a depthwise + pointwise branch added back (functional SiLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.gn, self.act = nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.GELU()
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gn(self.c1(x)))
        h = h + F.silu(self.pw(self.dw(h)))
        return self.fc(h.mean((2, 3)))


class TokenBlock(nn.Module):
    """A pre-norm transformer block as timm writes it: layer norms, one qkv Linear, fused attention
    (`F.scaled_dot_product_attention`), an MLP of Linear -> GELU -> Linear on (N, T, D) tokens."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.n1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.n2, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(self.act(self.fc1(self.n2(x))))


class TinyViT(nn.Module):
    """Patch embedding conv, a class token, two transformer blocks, the head on the class token."""

    def __init__(self) -> None:
        super().__init__()
        self.patch, self.cls = nn.Conv2d(1, 16, 4, stride=4), nn.Parameter(torch.zeros(1, 1, 16))
        self.blocks = nn.Sequential(TokenBlock(), TokenBlock())
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        return self.head(self.norm(self.blocks(t))[:, 0])


def group_norm_cnn() -> nn.Sequential:
    """conv -> GroupNorm -> ReLU and conv -> InstanceNorm -> SiLU, as normalisation-free-of-batch code writes them."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.SiLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def all_conv_net() -> nn.Sequential:
    """An all-convolutional classifier (NiN / All-CNN style): the last conv has one channel per class, then
    global average pooling; no nn.Linear anywhere."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


FT = TrainConfig(epochs=1, batch_size=16, optimizer="adam", lr=1e-3)
CHEAP = {"prune-ft": {"finetune": FT}, "ftll": {"train": FT}, "ftal": {"train": FT}, "rtll": {"train": FT},
         "rtal": {"train": FT}, "fine-prune": {"finetune": FT},
         "nc-unlearn": {"nc": NCConfig(max_epochs=2, steps_per_epoch=2), "retrain": FT},
         "nad": {"epochs": 1, "teacher": FT}, "anp": {"iterations": 3, "batch_size": 16},
         "i-bau": {"rounds": 1, "k": 1, "batch_size": 16}, "dehydration": {"per_class": 2, "steps": 2, "epochs": 1}}


@pytest.fixture(scope="module", params=[ViewFlatten, GroupDepthwise, TinyViT, group_norm_cnn, all_conv_net],
                ids=["view-shared-relu", "groupnorm-depthwise", "vit", "group-instance-norm", "all-conv"])
def trained(request):
    torch.manual_seed(0)
    net = request.param()
    data = make_images(400, 0)
    train(net, data.x, data.y, TrainConfig(epochs=3, batch_size=32, lr=3e-3), progress=False)
    return net.eval(), make_images(48, 1)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_runs_on_published_styles_of_network(trained, name):
    net, clean = trained
    before = [p.detach().clone() for p in net.parameters()]
    if name == "launder":
        res = nl.launder(net, clean, seed=0, nc=nc_config("fast", max_epochs=3), retrain=FT)   # folds, im2col
    else:
        res = nl.attack(name, net, clean, **CHEAP.get(name, {}))
    out = res.model(clean.x[:8])
    assert out.shape == (8, 4) and torch.isfinite(out).all()
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))   # the input model kept


def test_channels_last_steps_aside_for_a_view_flatten(trained):
    net, clean = trained
    if type(net) not in (ViewFlatten, GroupDepthwise):
        pytest.skip("the case is the .view flatten against a model that takes channels-last")
    assert channels_last_runs(net, clean.x[:2]) == (type(net) is GroupDepthwise)   # `.view` cannot flatten it
    copy_ = copy.deepcopy(net)
    train(copy_, clean.x, clean.y, TrainConfig(epochs=1, batch_size=16, lr=1e-4), progress=False)
    assert math.isfinite(accuracy(copy_, clean.x, clean.y))


def test_lambda_stops_growing_before_float32_overflows():
    """A class any input reaches (here: a model whose bias always wins) keeps succeeding, so λ would
    double without bound and overflow; it stops at COST_MAX and Neural Cleanse ends with finite masks."""
    lam, cfg = _Lambda(cost=1.0), NCConfig(cost_up=1e9, patience=1)
    for _ in range(10):
        lam.update(True, cfg)
    assert lam.cost == COST_MAX
    net = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    with torch.no_grad():
        net[1].bias.copy_(torch.tensor([1e4, 0.0, 0.0, 0.0]))
    res = neural_cleanse(net.eval(), make_images(32, 2).x, NCConfig(cost_up=1e9, max_epochs=40, steps_per_epoch=1,
                                                                   patience=1, early_stop=False), num_classes=4)
    assert torch.isfinite(res.l1).all()


def test_a_lone_last_image_joins_the_batch_before_it():
    assert [len(b) for b in batches(torch.arange(65), 32)] == [32, 33]
    assert [len(b) for b in batches(torch.arange(66), 32)] == [32, 32, 2]
    assert [len(b) for b in batches(torch.arange(1), 32)] == [1]
    assert all(n_batches(n, 32) == len(batches(torch.arange(n), 32)) for n in range(1, 200))
    assert sorted(torch.cat(batches(torch.randperm(97), 32)).tolist()) == list(range(97))


def test_batch_norm_in_the_classifier_trains_on_a_set_that_leaves_one_image_over():
    """65 images in batches of 32: a batch of one would stop BatchNorm1d in training mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(400, 16), nn.BatchNorm1d(16),
                        nn.ReLU(), nn.Linear(16, 4)).eval()
    clean = make_images(65, 3)
    for name in ("ftal", "fine-prune", "nad"):
        res = nl.attack(name, net, clean, **CHEAP.get(name, {}))
        assert torch.isfinite(res.model(clean.x[:4])).all()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_clean_set_of_one_class_is_a_one_line_error(name):
    net = nn.Sequential(nn.Flatten(), nn.Linear(144, 1)).eval()
    one = Dataset("one", torch.rand(8, 1, 12, 12), torch.zeros(8, dtype=torch.long), ("only",))
    with pytest.raises(UserError, match="at least 2"):
        nl.attack(name, net, one, **CHEAP.get(name, {}))


class LogitsAndFeatures(nn.Module):
    """A forward that returns (logits, features), as some training code writes it; `as_dict` returns a dict."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.c, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 144, 4)

    def forward(self, x: torch.Tensor):
        f = torch.relu(self.c(x)).flatten(1)
        return {"logits": self.fc(f), "features": f} if self.as_dict else (self.fc(f), f)


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
@pytest.mark.parametrize("name", ["launder", "ftal", "nad", "anp", "dehydration"])
def test_a_forward_that_returns_more_than_logits_is_a_one_line_error(name, as_dict):
    net, clean = LogitsAndFeatures(as_dict).eval(), make_images(48, 1)
    with pytest.raises(UserError, match="returns the .N, classes. logits alone"):
        nl.attack(name, net, clean, **CHEAP.get(name, {}))
    with pytest.raises(UserError, match="returns the .N, classes. logits alone"):
        neural_cleanse(net, clean.x, nc_config("fast", max_epochs=1), num_classes=4)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_parameters_the_models_code_froze_are_the_attackers_to_train(name):
    """A model whose code set requires_grad False (a transfer-learning script's frozen backbone, here every layer)
    is attacked like any other; the caller's model keeps its flags and weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 144, 4)).eval()
    for q in net.parameters():
        q.requires_grad_(False)
    before = [q.clone() for q in net.parameters()]
    clean = make_images(48, 1)
    if name == "launder":
        res = nl.launder(net, clean, seed=0, nc=nc_config("fast", max_epochs=2), retrain=FT)
    else:
        res = nl.attack(name, net, clean, **CHEAP.get(name, {}))
    assert torch.isfinite(res.model(clean.x[:4])).all()
    assert not any(q.requires_grad for q in net.parameters())
    assert all(torch.equal(a, q) for a, q in zip(before, net.parameters(), strict=True))


def test_a_dense_layer_on_tokens_is_measured_and_reset_per_feature():
    """A transformer's Linear runs on (N, T, D) tokens: its units are the D features (the last axis), measured
    as their mean over tokens and images; reading axis 1 would mix tokens with features and reset rows that
    do not exist or are not the ones measured."""
    torch.manual_seed(0)
    net, x = TinyViT().eval(), make_images(24, 4).x
    units, _ = discover_units(net, x[:2])
    fc1 = next(u for u in units if u.name == "blocks.0.fc1")
    assert (fc1.kind, fc1.width, fc1.act) == ("dense", 32, "blocks.0.act")
    got = mean_activations(net, units, x)
    seen = []
    h = net.blocks[0].act.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        net(x)
    h.remove()
    assert got["blocks.0.fc1"].shape == (32,)
    torch.testing.assert_close(got["blocks.0.fc1"], seen[0].mean(1).mean(0))
    assert all(got[u.name].shape == (u.width,) for u in units)
    masks = reset_masks(net, units, {"blocks.0.fc1": torch.tensor([3, 31])})
    assert masks["blocks.0.fc1.weight"].shape == (32, 16)
    assert masks["blocks.0.fc1.weight"].sum(1).eq(0).nonzero().flatten().tolist() == [3, 31]


def test_a_group_norm_after_a_conv_is_the_units_norm_and_a_reset_silences_the_channel():
    torch.manual_seed(0)
    net, x = group_norm_cnn().eval(), make_images(8, 5).x
    units, skipped = discover_units(net, x[:2])
    assert [(u.name, u.bn, u.act) for u in units] == [("0", "1", "2"), ("4", "5", "6")] and not skipped
    apply_masks(net, reset_masks(net, units, {"0": torch.tensor([2]), "4": torch.tensor([5])}))
    outs = {}
    hooks = [net[i].register_forward_hook(lambda m, i_, o, i=i: outs.__setitem__(i, o)) for i in (2, 6)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    assert outs[2][:, 2].abs().max() == 0 and outs[6][:, 5].abs().max() == 0
    assert outs[2][:, 3].abs().max() > 0


def test_the_output_layer_of_an_all_conv_classifier_is_its_last_conv():
    """FTLL trains only the output layer: here the 1x1 conv with one channel per class (no nn.Linear exists)."""
    torch.manual_seed(0)
    net, clean = all_conv_net().eval(), make_images(48, 1)
    assert output_layer(net)[0] == "6"
    res = nl.attack("ftll", net, clean, **CHEAP["ftll"])
    moved = {n for (n, a), b in zip(net.state_dict().items(), res.model.state_dict().values(), strict=True)
             if a.is_floating_point() and not torch.equal(a, b)}
    assert moved == {"6.weight", "6.bias"}
    with pytest.raises(UserError, match="no nn.Linear or nn.Conv2d output layer"):
        output_layer(nn.Sequential(nn.Flatten(), nn.Bilinear(2, 2, 2)))


def test_fine_pruning_says_why_no_conv_layer_qualifies():
    """A conv straight into a grouped conv: neither is a unit fine-pruning can prune, and the error says why."""
    no_act = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.ReLU(),
                           nn.Flatten(), nn.Linear(4 * 144, 4)).eval()
    with pytest.raises(UserError, match="hidden Conv2d with an activation.*skipped: 0: no activation after it"):
        nl.attack("fine-prune", no_act, make_images(48, 1))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(144, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with pytest.raises(UserError, match="and the model has none$"):
        nl.attack("fine-prune", mlp, make_images(48, 1))
