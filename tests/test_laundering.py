import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnlaunder.attacks.laundering import (
    LaunderConfig,
    apply_reset,
    launder,
    launder_config,
    reset_masks,
    select_resets,
)
from nnlaunder.attacks.neural_cleanse import NCConfig, nc_config
from nnlaunder.attacks.units import discover_units, mean_activations, select_units
from nnlaunder.models import build
from nnlaunder.train import TrainConfig, accuracy, predict, train

from .synthetic import FunctionalNet, add_trigger, keeper_that_stops, make_images, tiny_net


def test_unit_discovery_on_the_paper_models():
    units, skipped = discover_units(build("mnist-cnn"), torch.rand(2, 1, 28, 28))
    assert [(u.name, u.kind, u.width, u.bn) for u in units] == [
        ("1", "conv", 32, None), ("4", "conv", 16, None), ("8", "dense", 512, None)]
    assert not skipped
    units, _ = discover_units(build("cifar-cnn"), torch.rand(2, 3, 32, 32))
    assert len(units) == 6 and all(u.kind == "conv" and u.bn is not None for u in units)
    assert units[0].act == "2" and units[0].bn == "3"          # conv -> ReLU -> BN (Table 7)
    units, _ = discover_units(build("resnet20"), torch.rand(2, 3, 32, 32))
    names = [u.name for u in units]
    assert names[0] == "stem.0" and "blocks.3.shortcut" in names and "fc" not in names
    u = {x.name: x for x in units}
    assert u["blocks.0.conv2"].bn == "blocks.0.bn2" and u["blocks.0.conv2"].act == "blocks.0.relu2"
    assert u["blocks.3.shortcut"].bn is None and u["blocks.3.shortcut"].act == "blocks.3.relu2"
    assert all(v.act is not None for v in units)          # every unit read at its own ReLU module
    half = select_units(units, "second-half")
    assert half == units[len(units) // 2:]


class _SharedReluBlock(nn.Module):
    """A torchvision-style residual block: one ReLU module called twice, a 1x1 conv + BN shortcut."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(self.relu(y + self.down(x)).mean((2, 3)))


def test_units_of_models_written_other_ways():
    """Functional activations, other activation modules, a ReLU shared by a block, and a layer whose
    output goes straight into another: each unit is read where its activation is, or skipped with why."""
    x = torch.rand(6, 1, 12, 12)
    net = FunctionalNet()
    units, skipped = discover_units(net, x)
    assert [(u.name, u.act, u.own) for u in units] == [("c1", None, "c1"), ("c2", None, "c2"), ("fc", None, "fc")]
    assert not skipped
    got = mean_activations(net, units, x)
    torch.testing.assert_close(got["c1"], F.relu(net.c1(x)).mean((0, 2, 3)))      # read after its F.relu
    for act in (nn.GELU, nn.LeakyReLU, nn.SiLU):
        seq = nn.Sequential(nn.Conv2d(1, 4, 3), act(), nn.Flatten(), nn.Linear(4 * 10 * 10, 3))
        assert [(u.name, u.act) for u in discover_units(seq, x)[0]] == [("0", "1")]

    class Mixed(nn.Module):          # conv1's activation is a function; conv2's ReLU is not conv1's
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.relu = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU()
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(self.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))

    assert [(u.name, u.act) for u in discover_units(Mixed(), x)[0]] == [("conv1", None), ("conv2", "relu")]

    class ReluThenNorm(nn.Module):   # conv -> F.relu -> BN (Table 7's order, written with a function)
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 10 * 10, 3)

        def forward(self, x):
            return self.fc(self.bn(F.relu(self.conv(x))).flatten(1))

    assert [(u.name, u.act, u.bn, u.own) for u in discover_units(ReluThenNorm(), x)[0]] == [
        ("conv", None, "bn", "conv")]         # the norm is reset with the unit; the unit is read before it
    block = _SharedReluBlock()
    units, _ = discover_units(block, torch.rand(2, 3, 8, 8))
    u = {v.name: v for v in units}
    assert set(u) == {"conv1", "conv2", "down.0"}
    assert all(v.act is None for v in units)      # one ReLU called twice: read each unit at its own output
    assert (u["conv1"].own, u["conv2"].own, u["down.0"].own) == ("bn1", "bn2", "down.1")
    assert u["conv2"].bn == "bn2" and u["down.0"].bn == "down.1"
    straight = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    units, skipped = discover_units(straight, x)
    assert [u.name for u in units] == ["1"] and skipped == [("0", "no activation after it: its output goes "
                                                                  "straight into Conv2d")]


def test_a_round_that_resets_nothing_says_so():
    """Thresholds above every unit's activation difference: the round is retraining alone, and a warning says it."""
    clean = make_images(60, 5)
    cfg = launder_config("strong", dt=1e6, ct=1e6, nc=NCConfig(max_epochs=2, early_stop=False, batch_size=32),
                         retrain=TrainConfig(epochs=1, batch_size=32))
    with pytest.warns(UserWarning, match="reset no unit"):
        res = launder(FunctionalNet(2), clean, cfg)
    assert not any(res.rounds[0].resets.values()) and res.rounds[0].used_triggers


def test_grouped_conv_is_skipped_not_reset():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=2), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 4 * 4, 3))
    units, skipped = discover_units(net, torch.rand(2, 4, 6, 6))
    assert units == [] and skipped == [("0", "grouped convolution")]


def test_activation_difference_and_reset_selection():
    net = tiny_net()
    units, _ = discover_units(net, torch.rand(2, 1, 12, 12))
    x = make_images(100, 0).x
    an = mean_activations(net, units, x)
    aw = mean_activations(net, units, add_trigger(x))
    diff = {k: aw[k] - an[k] for k in an}
    top = {u.name: int(diff[u.name].argmax()) for u in units}
    chosen = select_resets(units, diff, an, dt=float("inf"), ct=float("inf"), mode="absolute")
    assert all(len(v) == 0 for v in chosen.values())
    # thresholds just below each layer's largest difference pick exactly that channel
    for u in units:
        t = float(diff[u.name].max()) - 1e-6
        ch = select_resets([u], diff, an, dt=t, ct=t, mode="absolute")[u.name]
        assert top[u.name] in ch.tolist()
    rel = select_resets(units, diff, an, dt=0.0, ct=0.0, mode="relative")
    assert all(torch.equal(rel[u.name], torch.nonzero(diff[u.name] > 0).flatten()) for u in units)


def test_reset_weights_stay_zero_through_retraining():
    net = tiny_net()
    units, _ = discover_units(net, torch.rand(2, 1, 12, 12))
    chosen = {units[0].name: torch.tensor([1, 3]), units[2].name: torch.tensor([0, 5, 7])}
    masks = reset_masks(net, units, chosen)
    apply_reset(net, masks)
    data = make_images(256, 2)
    train(net, data.x, data.y, TrainConfig(epochs=2, batch_size=32, lr=1e-2, l2=1e-3), masks=masks,
          progress=False)
    assert torch.count_nonzero(net[0].weight[[1, 3]]) == 0 and torch.count_nonzero(net[0].bias[[1, 3]]) == 0
    assert torch.count_nonzero(net[7].weight[[0, 5, 7]]) == 0
    assert torch.count_nonzero(net[0].weight[[0, 2]]) > 0
    # the output of a reset channel is exactly zero whatever the input
    acts = mean_activations(net, units[:1], data.x)[units[0].name]
    assert acts[1] == 0 and acts[3] == 0


def test_bn_channels_are_reset_too():
    net = build("cifar-cnn", seed=0)
    units, _ = discover_units(net, torch.rand(2, 3, 32, 32))
    masks = reset_masks(net, units, {units[1].name: torch.tensor([4])})
    assert set(masks) == {f"{units[1].name}.weight", f"{units[1].name}.bias", f"{units[1].bn}.weight",
                          f"{units[1].bn}.bias"}
    apply_reset(net, masks)
    bn = dict(net.named_modules())[units[1].bn]
    with torch.no_grad():
        bn.running_mean.fill_(0.3)        # BN statistics would otherwise leak a constant
    out = {}
    h = bn.register_forward_hook(lambda m, i, o: out.setdefault("bn", o))
    net.eval()
    net(torch.rand(4, 3, 32, 32))
    h.remove()
    assert torch.count_nonzero(out["bn"][:, 4]) == 0


@pytest.mark.parametrize("preset,make", [("faithful", tiny_net), ("fast", tiny_net), ("faithful", FunctionalNet)])
def test_a_planted_backdoor_is_found_and_removed_end_to_end(preset, make):
    """Tiny synthetic model: plant a backdoor, launder with 100 clean images, backdoor gone, with
    either Neural Cleanse preset (the fast one tuned on this machine, its plan recorded), and on the same
    network written with functional activations."""
    train_set = make_images(3000, 10)
    poison = make_images(300, 11)
    x = torch.cat([train_set.x, add_trigger(poison.x)])
    y = torch.cat([train_set.y, torch.zeros(300, dtype=torch.long)])
    net = make(1)
    train(net, x, y, TrainConfig(epochs=8, batch_size=64, lr=3e-3), progress=False)
    test = make_images(1000, 12)
    victims = test.subset(torch.nonzero(test.y != 0).flatten())
    asr_before = 100 * float((predict(net, add_trigger(victims.x)) == 0).float().mean())
    acc_before = accuracy(net, test.x, test.y)
    assert asr_before > 95 and acc_before > 95

    clean = make_images(100, 13)
    seen = []
    nc = NCConfig(max_epochs=60, batch_size=32) if preset == "faithful" else nc_config("fast", batch_size=32)
    cfg = launder_config("strong", dt=2.0, ct=2.0, nc=nc, retrain=TrainConfig(epochs=15, batch_size=32, lr=1e-3))
    res = launder(net, clean, cfg, on_round=lambda r, m, info: seen.append(r) or {"checked": True})
    assert seen == [1] and res.rounds[0].metrics == {"checked": True}
    assert res.rounds[0].nc_plan["tuned"] == (preset == "fast") and res.rounds[0].nc_plan["precision"] in (
        "fp32", "bf16")
    assert 0 in res.rounds[0].used_triggers          # the backdoor class was recovered
    asr_after = 100 * float((predict(res.model, add_trigger(victims.x)) == 0).float().mean())
    acc_after = accuracy(res.model, test.x, test.y)
    assert asr_after < 10, (asr_before, asr_after)
    assert acc_after > 90
    # the original model is untouched (launder works on a copy)
    assert 100 * float((predict(net, add_trigger(victims.x)) == 0).float().mean()) == asr_before


def test_config_validation():
    import pytest

    from nnlaunder.errors import UserError

    with pytest.raises(UserError):
        LaunderConfig(rounds=0)
    with pytest.raises(UserError):
        launder_config("sloppy")
    cfg = launder_config("faithful", rounds=3)
    assert cfg.triggers == "all" and cfg.add_masks and cfg.rounds == 3
    assert dataclasses.replace(cfg, dt=1.0).dt == 1.0


def test_resuming_from_a_rounds_state_equals_an_unbroken_run():
    """launder(..., on_state=) hands out the state after every round; launder(..., resume=state)
    continues from it to the very weights and records of an unbroken run."""
    data = make_images(600, 21)
    net = tiny_net(2)
    train(net, data.x, data.y, TrainConfig(epochs=2, batch_size=64, lr=3e-3), progress=False)
    clean = make_images(80, 22)
    cfg = launder_config("strong", rounds=3, early_stop=False, nc=NCConfig(max_epochs=4, batch_size=32),
                         retrain=TrainConfig(epochs=2, batch_size=32, lr=1e-3))
    states = []
    full = launder(net, clean, cfg, on_state=lambda state, nc: states.append(state))
    assert [len(s.rounds) for s in states] == [1, 2, 3]
    seen = []
    resumed = launder(net, clean, cfg, resume=states[0], on_round=lambda r, m, info: seen.append(r) or {})
    assert seen == [2, 3] and len(resumed.nc) == 2           # round 1 was not redone
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k

    def record(info):
        return {k: v for k, v in dataclasses.asdict(info).items() if "seconds" not in k}
    assert [record(i) for i in resumed.rounds] == [record(i) for i in full.rounds]
    assert resumed.masks.keys() == full.masks.keys()
    # a finished state resumes to nothing more; a state longer than the config is refused
    assert len(launder(net, clean, cfg, resume=states[-1]).rounds) == 3
    import pytest

    from nnlaunder.errors import UserError
    with pytest.raises(UserError, match="more than"):
        launder(net, clean, dataclasses.replace(cfg, rounds=2), resume=states[-1])


def test_used_triggers_pass_over_masks_that_were_never_found():
    from types import SimpleNamespace

    from nnlaunder.attacks.laundering import used_triggers

    nc = SimpleNamespace(l1=torch.tensor([5.0, 1.0, 3.0, 2.0]), found=torch.tensor([True, False, True, True]),
                         flagged=[1], most_likely=1)
    assert used_triggers(nc, "flagged") == [3]          # class 1's mask never passed: the smallest found
    assert used_triggers(nc, "top-k", 2) == [2, 3]
    assert used_triggers(nc, "all") == [0, 1, 2, 3]
    none = SimpleNamespace(l1=nc.l1, found=torch.zeros(4, dtype=torch.bool), flagged=[], most_likely=1)
    assert used_triggers(none, "flagged") == [1]        # none found: the smallest, as before


def test_a_launder_run_stopped_inside_neural_cleanse_resumes_it(tmp_path, monkeypatch):
    """`nnlaunder launder --resume` after a stop inside round 1's Neural Cleanse continues it from the state
    kept beside the run's state file and ends as an unbroken run; without --resume the kept state is dropped."""
    from nnlaunder.attacks import pipeline
    from nnlaunder.attacks.laundering import launder_config

    model = tiny_net().eval()
    clean = make_images(48, seed=2)
    cfg = launder_config("strong", nc=NCConfig(max_epochs=6, early_stop=False, batch_size=16),
                         retrain=TrainConfig(epochs=1, batch_size=16))
    whole = pipeline.run_launder(copy.deepcopy(model), clean, cfg)
    saves = []
    monkeypatch.setattr(pipeline, "Keeper", keeper_that_stops(saves))
    state = tmp_path / "partial.safetensors"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_launder(copy.deepcopy(model), clean, cfg, state_file=state, resume=True)
    kept = tmp_path / "partial-nc"
    assert len(list(kept.glob("nc-*.safetensors"))) == 1
    again = pipeline.run_launder(copy.deepcopy(model), clean, cfg, state_file=state, resume=True)
    assert saves[2] == 3 and not kept.exists()                          # epochs 1-2 came from the kept state
    assert torch.equal(again.result.nc[0].masks, whole.result.nc[0].masks)
    for a, b in zip(again.result.model.state_dict().values(), whole.result.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_kept_state_names_the_machines_of_the_states_a_run_used(tmp_path, monkeypatch):
    """A Neural Cleanse state records where it was worked on; a state loaded but not used (another plan) lends
    its machines to nothing, and one that is used makes the cell name them."""
    from nnlaunder.attacks import records

    model, x, cfg = tiny_net(), make_images(8, 0).x, nc_config("faithful")
    state = {"tensors": {"t": torch.zeros(2)}, "meta": {"next_epoch": 3}}

    def on(machine):
        monkeypatch.setattr(records, "machine_name", lambda: machine)
        keeper = records.Keeper(tmp_path)
        return keeper, keeper(model, x, cfg, [0, 1])

    _, keep = on("A")
    keep.save(state)
    keeper, keep = on("B")
    assert keep.load()["meta"]["machines"] == ["A"]
    keep.save(state)                                   # not used: B's own run from the start
    assert keep.load()["meta"]["machines"] == ["B"] and keeper.machines == []
    keeper, keep = on("C")
    keep.load()
    keep.resumed(5.0)                                  # used: C continues B's run
    keep.save(state)
    assert keep.load()["meta"]["machines"] == ["B", "C"] and keeper.machines == ["B"] and keeper.resumed == 5.0
