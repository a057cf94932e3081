"""A pruned model's config records its real widths (``pruned_widths``) and rebuilds the pruned architecture alone.

``build_from_config`` builds the dense architecture from the config and cuts it to the widths; loading a checkpoint
does the same instead of replaying the ``prune.channels`` records the widths stand for (they stay in the log).
"""
import copy

import pytest
import torch
from torch import nn

import edgec
from edgec.analysis.groups import analyse
from edgec.core.errors import EdgecError
from edgec.core.pass_manager import PRUNED_WIDTHS, PassManager
from edgec.models.checkpoint import build_from_config, load_checkpoint, new_model, save_checkpoint, seal
from edgec.passes.bnfold import FoldBatchNorm
from edgec.passes.prune_channels import PruneChannels

SMALL = {"conformer": {"num_layers": 1}, "resnet": {"blocks_per_stage": [1, 1, 1, 1], "base_width": 8}}


class CNN(nn.Module):
    def __init__(self, classes=4, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.pool(self.block(self.stem(x))).flatten(1))


def _cnn():
    torch.manual_seed(0)
    return edgec.from_module(CNN(width=8), torch.randn(1, 3, 16, 16), config={"width": 8})


def _shapes(model) -> dict:
    return {n: tuple(t.shape) for n, t in [*model.gm.named_parameters(), *model.gm.named_buffers()]}


def _every_other(model, limit: int = 3) -> dict:
    """Keep the even units of the first ``limit`` prunable groups (a subset chosen without any measurement)."""
    return {g.name: list(range(0, g.size, 2)) for g in analyse(model).prunable[:limit]}


def _prune(model, keep):
    out, _ = PassManager([PruneChannels(keep=keep)])(model)
    return out


def _same_outputs(a, b, seed=3):
    x = a.spec.sample(seed=seed)
    torch.testing.assert_close(a.run(x)[0], b.run(x)[0], rtol=0, atol=0)


def _no_prune_replay(monkeypatch):
    """Loading must get the pruned structure from the config: replaying a prune.channels record is an error."""
    original = PruneChannels.call

    def call(self, model, *, replay=False):
        assert not replay, "prune.channels was replayed although the config holds its widths"
        return original(self, model, replay=replay)

    monkeypatch.setattr(PruneChannels, "call", call)


def _check_roundtrip(pruned, tmp_path, monkeypatch, arch=None):
    """Widths == the pruned analysis; config alone rebuilds the shapes and (with the weights) the outputs;
    the checkpoint loads without replaying the prune, identically, and saves byte-identically."""
    assert pruned.config[PRUNED_WIDTHS] == {g.name: g.size for g in analyse(pruned).groups}
    built = build_from_config(pruned.arch, pruned.config, spec=pruned.spec)
    assert built.provenance == [] and built.config == pruned.config
    assert _shapes(built) == _shapes(pruned)
    built.gm.load_state_dict(pruned.gm.state_dict(), strict=True)
    _same_outputs(built, pruned)
    save_checkpoint(pruned, tmp_path / "a.pt")
    save_checkpoint(pruned, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    with monkeypatch.context() as mp:
        _no_prune_replay(mp)
        loaded = load_checkpoint(tmp_path / "a.pt", arch)
    assert loaded.passes == pruned.passes and loaded.config == pruned.config  # the pass log stays
    assert loaded.digest() == pruned.digest()
    _same_outputs(loaded, pruned)
    if pruned.capture:  # (edgec.from_module records no capture summary; a loaded model has one)
        save_checkpoint(loaded, tmp_path / "c.pt")
        assert (tmp_path / "c.pt").read_bytes() == (tmp_path / "a.pt").read_bytes()
    return loaded


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_zoo_pruned_config_rebuilds_the_architecture(arch, tmp_path, monkeypatch):
    dense = new_model(arch, SMALL[arch], seed=1)
    config_before = copy.deepcopy(dense.config)
    keep = _every_other(dense)
    pruned = _prune(dense, keep)
    assert dense.config == config_before and PRUNED_WIDTHS not in dense.config  # the pass is pure
    assert [r["pass"] for r in pruned.passes] == ["prune.channels"]
    widths = pruned.config[PRUNED_WIDTHS]
    sizes = {g.name: g.size for g in analyse(dense).groups}
    assert set(widths) == set(sizes)  # every group, graph order
    assert {n for n in widths if widths[n] < sizes[n]} == set(keep)
    assert all(widths[n] == len(keep[n]) for n in keep)
    assert {k: v for k, v in pruned.config.items() if k != PRUNED_WIDTHS} == config_before
    assert _shapes(pruned) != _shapes(dense)
    _check_roundtrip(pruned, tmp_path, monkeypatch)


def test_user_module_pruned_config_rebuilds_the_architecture(tmp_path, monkeypatch):
    model = _cnn()
    pruned = _prune(model, {"stem.0": [0, 2, 3, 7], "block.3": list(range(0, 16, 3))})
    assert pruned.config == {"width": 8, PRUNED_WIDTHS: {"stem.0": 4, "block.3": 6, "head": 4}}
    assert model.config == {"width": 8}
    loaded = _check_roundtrip(pruned, tmp_path, monkeypatch, arch=model.arch)
    assert dict(loaded.gm.named_modules())["block.0"].groups == 4  # the depthwise conv follows its group


def test_pruning_again_composes_and_after_folding_too(tmp_path, monkeypatch):
    dense = new_model("resnet", SMALL["resnet"], seed=2)
    once = _prune(dense, {"stem.0": [0, 1, 2, 4, 6, 7]})
    twice = _prune(once, {"stem.0": [1, 3, 5], "stages.1.0.conv1": list(range(8))})
    assert [r["pass"] for r in twice.passes] == ["prune.channels"] * 2
    assert twice.config[PRUNED_WIDTHS]["stem.0"] == 3 and twice.config[PRUNED_WIDTHS]["stages.1.0.conv1"] == 8
    assert once.config[PRUNED_WIDTHS]["stem.0"] == 6  # the input of the second prune is untouched
    _check_roundtrip(twice, tmp_path, monkeypatch)

    # the README flow: fold, then prune; the widths apply where the pruning starts in the log
    folded, _ = PassManager([FoldBatchNorm()])(dense)
    pruned = _prune(folded, {"stages.0.0.conv1": [0, 5]})
    assert [r["pass"] for r in pruned.passes] == ["fold.batchnorm", "prune.channels"]
    assert pruned.config[PRUNED_WIDTHS]["stages.0.0.conv1"] == 2
    save_checkpoint(pruned, tmp_path / "f.pt")
    with monkeypatch.context() as mp:
        _no_prune_replay(mp)
        loaded = load_checkpoint(tmp_path / "f.pt")
    assert loaded.digest() == pruned.digest() and loaded.passes == pruned.passes
    _same_outputs(loaded, pruned)

    # pruned, folded, pruned again: the second prune is kept by the log alone (replayed on load)
    refolded, _ = PassManager([FoldBatchNorm()])(once)
    again = _prune(refolded, {"stages.0.0.conv1": [1, 2, 3]})
    assert again.config == refolded.config
    save_checkpoint(again, tmp_path / "g.pt")
    loaded = load_checkpoint(tmp_path / "g.pt")
    assert loaded.digest() == again.digest()
    _same_outputs(loaded, again)


def test_coupling_changed_by_a_one_unit_group_falls_back_to_the_log(tmp_path):
    dense = new_model("conformer", SMALL["conformer"], seed=0)
    thin = _prune(dense, {"blocks.0.conv.pointwise1": [5]})  # a 1-channel depthwise conv couples differently
    assert thin.config[PRUNED_WIDTHS]["blocks.0.conv.pointwise1"] == 1
    again = _prune(thin, {"blocks.0.ffn1.linear1": list(range(100))})
    assert PRUNED_WIDTHS not in again.config  # widths would not name this model's groups: the log rebuilds it
    save_checkpoint(again, tmp_path / "t.pt")
    loaded = load_checkpoint(tmp_path / "t.pt")
    assert loaded.digest() == again.digest()
    _same_outputs(loaded, again)


def test_checkpoint_without_widths_loads_as_before(tmp_path):
    dense = new_model("resnet", SMALL["resnet"], seed=3)
    pruned = _prune(dense, {"stem.0": [1, 2, 3], "stages.2.0.conv1": [0, 9]})
    save_checkpoint(pruned, tmp_path / "new.pt")
    obj = torch.load(tmp_path / "new.pt", weights_only=True)
    del obj["model"]["config"][PRUNED_WIDTHS]  # what an edgec before this change wrote
    torch.save(seal(obj), tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")  # replays prune.channels from the dense model
    assert old.config == dense.config and old.passes == pruned.passes
    assert _shapes(old) == _shapes(pruned)
    _same_outputs(old, pruned)
    again = _prune(old, {"stages.0.0.conv1": [0, 1]})
    assert PRUNED_WIDTHS not in again.config  # its widths are unknown here: the log keeps rebuilding it


@pytest.mark.parametrize("widths, message", [
    ({"nope": 3}, r"names channel group 'nope', which \S+:CNN does not have \(groups: stem\.0, block\.3, head\)"),
    ({"stem.0": 9}, r"gives group 'stem\.0' 9 unit\(s\); it has 8 \(keep 1 to all of them\)"),
    ({"stem.0": 0}, r"gives group 'stem\.0' 0 unit\(s\); it has 8"),
    ({"stem.0": "4"}, r"must map channel group names to unit counts"),
    ({"head": 2}, r"cuts group 'head' to 2 of 4 units, but it cannot be pruned: reaches the model output"),
])
def test_bad_widths_are_one_line_errors(widths, message, tmp_path):
    model = _cnn()
    config = {**model.config, PRUNED_WIDTHS: widths}
    with pytest.raises(EdgecError, match=message) as info:
        build_from_config(model.arch, config, spec=model.spec)
    assert "\n" not in str(info.value)
    save_checkpoint(model, tmp_path / "d.pt")
    obj = torch.load(tmp_path / "d.pt", weights_only=True)
    obj["model"]["config"] = config
    torch.save(seal(obj), tmp_path / "bad.pt")
    with pytest.raises(EdgecError, match=r"bad\.pt: model\.config: '" + PRUNED_WIDTHS) as info:
        load_checkpoint(tmp_path / "bad.pt", model.arch)
    assert "\n" not in str(info.value)


def test_model_built_from_widths_then_changed_refuses_a_later_prune():
    dense = new_model("resnet", SMALL["resnet"], seed=5)
    built = build_from_config("resnet", {**dense.config, PRUNED_WIDTHS: {"stem.0": 4}})
    assert analyse(built).group("stem.0").size == 4 and built.passes == []
    assert built.config[PRUNED_WIDTHS] == {g.name: g.size for g in analyse(built).groups}  # completed
    pruned = _prune(built, {"stem.0": [0, 1]})  # no other pass in between: the widths simply continue
    assert pruned.config[PRUNED_WIDTHS]["stem.0"] == 2
    folded, _ = PassManager([FoldBatchNorm()])(built)
    with pytest.raises(EdgecError, match=r"built from a pruned config .* changed by fold\.batchnorm; prune it before"):
        _prune(folded, {"stem.0": [0, 1]})
