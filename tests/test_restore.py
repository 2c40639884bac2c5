import inspect
import math

import pytest
import torch
from torch import nn

from nnlaunder.errors import UserError
from nnlaunder.restore import (
    finetune_threat,
    flat_params,
    loss_surface,
    param_shift,
    pca_directions,
    restore,
    set_flat_params,
)
from nnlaunder.train import TrainConfig

from .synthetic import make_images, tiny_net

EXACT = "donot_use_mm_for_euclid_dist"


class Spy(nn.Module):
    """tiny_net that records every training batch it is given."""

    def __init__(self, seen: list):
        super().__init__()
        self.net = tiny_net(0)
        self.seen = seen

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return self.net(x)


def test_param_shift_maths():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        for p in (*a.parameters(), *b.parameters()):
            p.zero_()
        b.weight[0, 0] = 3.0
        b.bias[1] = 4.0
    s = param_shift(a, b)
    assert s["weight"] == pytest.approx(3.0) and s["bias"] == pytest.approx(4.0)
    assert s["total"] == pytest.approx(5.0)
    net1, net2 = tiny_net(0), tiny_net(1)
    s = param_shift(net1, net2)
    assert set(s) == {"0", "3", "7", "9", "total"}
    assert s["total"] == pytest.approx(math.sqrt(sum(v**2 for k, v in s.items() if k != "total")))
    assert param_shift(net1, net1)["total"] == 0.0
    with pytest.raises(UserError):
        param_shift(nn.Linear(3, 2), nn.Linear(2, 2))


def test_pca_directions_recover_a_known_plane():
    # a trajectory that moves only along e1 and e2 (with more spread along e1)
    p = 50
    e1, e2 = torch.zeros(p), torch.zeros(p)
    e1[3], e2[10] = 1.0, 1.0
    traj = [5.0 * math.cos(t) * e1 + 1.0 * math.sin(t) * e2 for t in torch.linspace(0, 3, 12).tolist()]
    plane = pca_directions(traj)
    assert plane.directions.shape == (2, p)
    assert torch.allclose(plane.directions @ plane.directions.T, torch.eye(2), atol=1e-5)
    for d in plane.directions:                     # both directions lie in span{e1, e2}
        assert float(d @ e1) ** 2 + float(d @ e2) ** 2 == pytest.approx(1.0, abs=1e-5)
    assert abs(float(plane.directions[0] @ e1)) > 0.99   # the larger spread comes first
    assert float(plane.explained.sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(plane.coords[-1], torch.zeros(2))       # the origin is the last point
    with pytest.raises(UserError):
        pca_directions(traj[:2])


def test_loss_surface_centre_is_the_model_and_model_is_restored():
    net = tiny_net(0).eval()
    data = make_images(64, 0)
    traj = []
    for seed in range(4):
        traj.append(flat_params(tiny_net(seed)))
    traj.append(flat_params(net))
    plane = pca_directions(traj)
    before = flat_params(net)
    loss, acc = loss_surface(net, plane, torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([0.0, 0.5]), data.x, data.y)
    assert loss.shape == (3, 2) and acc.shape == (3, 2)
    centre = nn.functional.cross_entropy(net(data.x), data.y).item()
    assert loss[1, 0].item() == pytest.approx(centre, rel=1e-5)
    assert torch.equal(flat_params(net), before)
    set_flat_params(net, before)


def test_restoration_takes_no_trigger_data():
    params = inspect.signature(restore).parameters
    assert list(params)[:2] == ["model", "owner_train"]
    assert not any("trigger" in p or "wm" in p or "watermark" in p for p in params)
    seen = []
    owner = make_images(64, 3)
    restore(Spy(seen), owner, TrainConfig(epochs=1, batch_size=16))
    used = torch.cat(seen)
    # every training input the restoration saw is one of the owner's clean images
    d = torch.cdist(used.flatten(1), owner.x.flatten(1), compute_mode=EXACT).min(1).values
    assert float(d.max()) < 1e-6 and len(used) == 64


def test_mixed_finetuning_adds_one_owner_step_every_second_batch():
    split, owner = make_images(64, 4), make_images(64, 5)
    batches = []
    finetune_threat(Spy(batches), split, TrainConfig(epochs=1, batch_size=16), mixed_with=owner, mix_every=2)
    assert len(batches) == 4 + 2
    def from_owner(b):
        return float(torch.cdist(b.flatten(1), owner.x.flatten(1), compute_mode=EXACT).min(1).values.max()) < 1e-6
    assert [from_owner(b) for b in batches] == [False, False, True, False, False, True]
