"""BatchNorm folding: exact on conformer and resnet with non-trivial statistics; pure; replayable."""
import pytest
import torch
from torch import nn

from edgec.core.graph import verify_equivalent
from edgec.core.pass_manager import PassManager
from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
from edgec.passes.bnfold import FoldBatchNorm


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.gm.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("arch,expected", [("conformer", 2), ("resnet", 20), ("convtransformer", 2)])
def test_fold_exact_and_removes_all_bn(arch, expected):
    model = new_model(arch, seed=0)
    _randomise_bn(model)
    before = model.digest()
    folded, records = PassManager([FoldBatchNorm()])(model)
    assert model.digest() == before, "the pass mutated its input"
    assert records[0]["modified"] and f"folded {expected} BatchNorm" in records[0]["summary"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.gm.modules())
    check = records[0]["checks"]["equivalence"]
    assert check["passed"] and check["rel_error"] <= 1e-5
    # independent re-check on fresh inputs
    assert verify_equivalent(model, folded, 1e-5, seeds=(11,))["passed"]
    assert folded.param_count() < model.param_count()
    assert folded.provenance[-1]["pass"] == "fold.batchnorm"
    assert folded.provenance[-1]["input_digest"] == before
    assert folded.provenance[-1]["output_digest"] == folded.digest()


def test_nothing_to_fold_is_a_noop():
    model = new_model("bert", seed=0)
    folded, records = PassManager([FoldBatchNorm()])(model)
    assert not records[0]["modified"] and folded.digest() == model.digest()
    assert folded.provenance == model.provenance


def test_folded_checkpoint_replays_on_load(tmp_path):
    model = new_model("resnet", {"base_width": 8}, seed=0)
    _randomise_bn(model, 1)
    folded, _ = PassManager([FoldBatchNorm()])(model)
    save_checkpoint(folded, tmp_path / "f.pt")
    loaded = load_checkpoint(tmp_path / "f.pt")
    assert loaded.digest() == folded.digest()
    x = model.spec.sample(seed=2)
    torch.testing.assert_close(loaded.run(x)[0], folded.run(x)[0], rtol=0, atol=0)


def test_linear_bn_only_folds_2d():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 6)
            self.bn = nn.BatchNorm1d(6)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.bn(self.fc(x)))

    from edgec.core.graph import Model, trace
    from edgec.core.spec import Dim, InputSpec, TensorSpec

    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    spec = InputSpec((TensorSpec("x", (Dim("batch", 4, 3), 8)),))
    model = Model(trace(net), "test", {}, spec)
    folded, records = PassManager([FoldBatchNorm()])(model)
    assert records[0]["modified"] and records[0]["checks"]["equivalence"]["passed"]


def test_batchnorm_folds_into_a_lowbit_conv_keeping_its_codes():
    from edgec.core.graph import Model, trace
    from edgec.core.spec import Dim, InputSpec, TensorSpec
    from edgec.layers.lowbit import LowBitConv2d, lowbit_like

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = lowbit_like(nn.Conv2d(3, 8, 3, padding=1, bias=False), group_size=9, bits=2, shift=True,
                                    act="ternary")
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(self.conv(x))

    g = torch.Generator().manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.conv.codes.copy_(torch.randint(-1, 2, net.conv.codes.shape, generator=g))
        net.conv.scale.uniform_(0.1, 1.0, generator=g)
        net.conv.shift.uniform_(-0.1, 0.1, generator=g)
    model = Model(trace(net), "test", {}, InputSpec((TensorSpec("x", (Dim("batch", 2, 3), 3, 6, 6)),)))
    _randomise_bn(model, 3)
    folded, records = PassManager([FoldBatchNorm()])(model)
    assert records[0]["checks"]["equivalence"]["passed"]
    conv = folded.gm.conv
    assert isinstance(conv, LowBitConv2d) and torch.equal(conv.codes, model.gm.conv.codes)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.gm.modules())
