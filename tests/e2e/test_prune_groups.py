"""Coupled-channel analysis and the ``prune.channels`` structural pass on every zoo model.

Strongest check: a physically pruned model equals the original with the removed units zeroed (producer
rows/biases, BatchNorm γ/β, depthwise kernels), at the traced and alternative shapes.
"""
import pytest
import torch
from torch import nn

import edgec.core.pass_manager
from edgec.analysis.groups import analyse, describe_groups, find_groups, importance, keep_from_counts, zero_channels
from edgec.core.errors import EdgecError
from edgec.core.graph import Model, max_error, trace, verify_equivalent
from edgec.core.pass_manager import PassManager
from edgec.core.spec import Dim, InputSpec, TensorSpec
from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
from edgec.onnx.export import export
from edgec.passes.prune_channels import PruneChannels

# small configs keep the ONNX exports (~5 s each) inside the test budget; structure is the zoo's
ZOO = {
    "convtransformer": {"num_layers": 1},
    "conformer": {"num_layers": 1},
    "hafformer": {"depths": [2, 1, 1]},
    "resnet": {"blocks_per_stage": [2, 2, 1, 1]},
    "bert": {"num_hidden_layers": 1, "num_attention_heads": 4},
}

# (kind, size) of every prunable group, per model
EXPECTED = {
    "convtransformer": {"frontend.layers.0": ("conv", 64), "blocks.0.attn.q_proj": ("heads", 4),
                        "blocks.0.ffn.linear1": ("hidden", 256)},
    "conformer": {"subsampling.conv.0": ("conv", 32), "subsampling.conv.2": ("conv", 32),
                  "blocks.0.ffn1.linear1": ("hidden", 256), "blocks.0.attn.q_proj": ("heads", 4),
                  "blocks.0.conv.pointwise1": ("glu", 64), "blocks.0.ffn2.linear1": ("hidden", 256)},
    "hafformer": {"levels.0.0.geglu.w_g": ("gated", 128), "levels.0.1.geglu.w_g": ("gated", 128),
                  "levels.1.0.geglu.w_g": ("gated", 160), "levels.2.0.geglu.w_g": ("gated", 192)},
    "resnet": {"stem.0": ("residual", 16), "stages.0.0.conv1": ("conv", 16), "stages.0.1.conv1": ("conv", 16),
               "stages.1.0.conv1": ("conv", 32), "stages.1.0.conv2": ("residual", 32), "stages.1.1.conv1": ("conv", 32),
               "stages.2.0.conv1": ("conv", 64), "stages.2.0.conv2": ("residual", 64),
               "stages.3.0.conv1": ("conv", 128), "stages.3.0.conv2": ("residual", 128)},
    "bert": {"encoder.layer.0.attention.self.query": ("heads", 4), "encoder.layer.0.intermediate.dense": ("hidden", 512),
             "pooler.dense": ("hidden", 128)},
}
UNPRUNABLE = {  # group -> a phrase of its first reason
    "convtransformer": {"frontend.layers.3": "not prunable", "classifier": "model output"},
    "conformer": {"subsampling.out": "not prunable", "classifier": "model output"},
    "hafformer": {"embed": "LayerNorm", "merges.0.proj": "LayerNorm", "merges.1.proj": "LayerNorm",
                  "classifier": "model output"},
    "resnet": {"classifier": "model output"},
    "bert": {"embeddings.word_embeddings": "LayerNorm", "classifier": "model output"},
}


@pytest.fixture(autouse=True)
def _register(monkeypatch):
    monkeypatch.setitem(edgec.core.pass_manager.PASSES, "prune.channels", "edgec.passes.prune_channels:PruneChannels")


def _model(arch, seed=0):
    model = new_model(arch, ZOO[arch], seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-trivial statistics and biases, so zeroing/slicing mistakes show
        for m in model.gm.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def _keep_all(analysis):
    return {g.name: list(range(g.size)) for g in analysis.groups}


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_groups_and_keep_all_is_identity(arch):
    model = _model(arch)
    analysis = analyse(model)
    print(f"\n{arch}:\n{describe_groups(analysis)}")
    found = {g.name: g for g in analysis.groups}
    assert {g.name: (g.kind, g.size) for g in analysis.prunable} == EXPECTED[arch]
    for name, phrase in UNPRUNABLE[arch].items():
        assert not found[name].prunable and phrase in found[name].reasons[0], found[name].reasons
    assert set(found) == set(EXPECTED[arch]) | set(UNPRUNABLE[arch])
    assert all(g.zero_exact for g in analysis.prunable)
    # names are stable: a second analysis (and one of the kept-all model) gives the same groups
    assert [g.name for g in find_groups(model)] == list(found)

    before = model.digest()
    same, records = PassManager([PruneChannels(keep=_keep_all(analysis))])(model)
    assert model.digest() == before, "the pass mutated its input"
    assert not records[0]["modified"] and same.passes == model.passes
    assert same.param_count() == model.param_count()
    check = verify_equivalent(model, same, 0.0)
    assert check["max_abs_error"] <= 1e-6, check
    assert [g.name for g in find_groups(same)] == list(found)
    _, record = export(same)
    assert record["checks"]["ort_parity"]["passed"]


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_half_pruned_is_smaller_valid_and_mask_equivalent(arch):
    model = _model(arch)
    analysis = analyse(model)
    p = PruneChannels.from_fraction(model, 0.5)
    keep = p.params["keep"]
    assert set(keep) == {g.name for g in analysis.prunable}
    for g in analysis.prunable:
        assert len(keep[g.name]) == max(1, round(g.size / 2)) and keep[g.name] == sorted(set(keep[g.name]))
    pruned, records = PassManager([p])(model)
    rec = records[0]
    assert rec["modified"] and pruned.passes[-1]["pass"] == "prune.channels"
    assert rec["checks"]["mask_equivalence"]["passed"], rec["checks"]
    assert pruned.param_count() < 0.8 * model.param_count()
    # every prunable group shrank to what was asked, and the rest is unchanged
    after = {g.name: g for g in find_groups(pruned)}
    for g in analysis.prunable:
        if g.name in after and after[g.name].kind == g.kind:
            assert after[g.name].size == len(keep[g.name])
    # independent mask check on fresh inputs: pruned == original with the removed units zeroed
    masked = zero_channels(model, keep)
    for alt in (False, True):
        x = model.spec.sample(seed=5, alt=alt)
        err = max_error(masked.run(x), pruned.run(x))
        assert err["rel_error"] <= 1e-5, err
        # ... and zeroing really changed the function (the check is not vacuous)
        assert max_error(model.run(x), masked.run(x))["max_abs_error"] > 1e-4
    _, record = export(pruned)
    assert record["checks"]["ort_parity"]["passed"]


def test_attention_heads_pruned_whole():
    model = _model("conformer")
    pruned, records = PassManager([PruneChannels(keep={"blocks.0.attn.q_proj": [0, 2]})])(model)
    assert records[0]["checks"]["mask_equivalence"]["passed"]
    m = dict(pruned.gm.named_modules())
    for name in ("q_proj", "k_proj", "v_proj"):
        lin = m[f"blocks.0.attn.{name}"]
        assert lin.out_features == 32 and lin.in_features == 64
        ref = dict(model.gm.named_modules())[f"blocks.0.attn.{name}"]
        rows = torch.cat([torch.arange(0, 16), torch.arange(32, 48)])
        torch.testing.assert_close(lin.weight, ref.weight[rows], rtol=0, atol=0)
    assert m["blocks.0.attn.out_proj"].in_features == 32 and m["blocks.0.attn.out_proj"].out_features == 64
    # the head count and width literals of the reshapes were rewritten
    shapes = [n.args[1:] for n in pruned.gm.graph.nodes if n.op == "call_method" and n.target in ("view", "reshape")]
    assert sum(1 for s in shapes if s[-2:] == (2, 16)) == 3 and sum(1 for s in shapes if s[-1] == 32) == 1
    g = analyse(pruned).group("blocks.0.attn.q_proj")
    assert (g.kind, g.size, g.width) == ("heads", 2, 16)
    # importance ranks heads; from_counts keeps the strongest
    scores = importance(model, "blocks.0.attn.q_proj")
    keep = keep_from_counts(model, {"blocks.0.attn.q_proj": 1})["blocks.0.attn.q_proj"]
    assert keep == [int(scores.argmax())]


def test_bert_heads_with_inferred_head_count():
    """BERT's reshape uses -1 for the head count: nothing to rewrite, heads still prune."""
    model = _model("bert")
    pruned, records = PassManager([PruneChannels(keep={"encoder.layer.0.attention.self.query": [1, 3]})])(model)
    assert records[0]["checks"]["mask_equivalence"]["passed"]
    assert dict(pruned.gm.named_modules())["encoder.layer.0.attention.self.value"].out_features == 64


def test_pruned_checkpoint_roundtrip(tmp_path):
    from edgec.passes.bnfold import FoldBatchNorm

    model = _model("resnet")
    folded, _ = PassManager([FoldBatchNorm()])(model)
    pruned, _ = PassManager([PruneChannels.from_fraction(folded, 0.5)])(folded)
    assert [r["pass"] for r in pruned.passes] == ["fold.batchnorm", "prune.channels"]
    save_checkpoint(pruned, tmp_path / "p.pt")
    loaded = load_checkpoint(tmp_path / "p.pt")
    assert loaded.digest() == pruned.digest()
    for alt in (False, True):
        x = model.spec.sample(seed=2, alt=alt)
        torch.testing.assert_close(loaded.run(x)[0], pruned.run(x)[0], rtol=0, atol=0)
    # pruning a pruned model again (indices refer to the current units) also replays
    again, _ = PassManager([PruneChannels.from_fraction(loaded, 0.5, groups=["stem.0"])])(loaded)
    save_checkpoint(again, tmp_path / "q.pt")
    assert load_checkpoint(tmp_path / "q.pt").digest() == again.digest()
    assert analyse(again).group("stem.0").size == 4

    # a transformer with heads, GLU and a flatten-merged conv front-end
    conf = _model("conformer")
    p, _ = PassManager([PruneChannels.from_fraction(conf, 0.5)])(conf)
    save_checkpoint(p, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt")
    assert back.digest() == p.digest()
    x = conf.spec.sample(seed=4, alt=True)
    torch.testing.assert_close(back.run(x)[0], p.run(x)[0], rtol=0, atol=0)


def test_bad_requests_are_clear_errors():
    model = _model("conformer")
    with pytest.raises(EdgecError, match="no channel group named 'nope'"):
        PassManager([PruneChannels(keep={"nope": [0]})])(model)
    with pytest.raises(EdgecError, match="sorted"):
        PassManager([PruneChannels(keep={"blocks.0.ffn1.linear1": [3, 1]})])(model)
    with pytest.raises(EdgecError, match="at least one"):
        PassManager([PruneChannels(keep={"blocks.0.ffn1.linear1": []})])(model)
    with pytest.raises(EdgecError, match="outside"):
        PassManager([PruneChannels(keep={"blocks.0.ffn1.linear1": [0, 256]})])(model)
    with pytest.raises(EdgecError, match="cannot prune channel group 'subsampling.out'.*not prunable"):
        PassManager([PruneChannels(keep={"subsampling.out": [0, 1]})])(model)
    with pytest.raises(EdgecError, match="cannot keep 0"):
        PruneChannels.from_counts(model, {"blocks.0.ffn1.linear1": 0})


def _custom(net, shape, dynamic=0):
    dims = tuple(Dim("batch", 2, 3) if i == 0 else Dim("t", 9, 7) if i == dynamic and i else n
                 for i, n in enumerate(shape))
    return Model(trace(net.eval()), "test", {}, InputSpec((TensorSpec("x", dims),)))


class _Rolled(nn.Module):
    """conv -> roll over channels -> conv: a channel permutation the analysis does not understand."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(3, 8, 3, padding=1)
        self.b = nn.Conv1d(8, 8, 3, padding=1)
        self.c = nn.Conv1d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.roll(self.a(x), 1, 1))))


def test_unanalysable_op_marks_group_and_errors_only_when_pruned():
    model = _custom(_Rolled(), (2, 3, 9), dynamic=2)
    groups = {g.name: g for g in find_groups(model)}
    print("\n" + describe_groups(list(groups.values())))
    assert not groups["a"].prunable and "node 'roll'" in groups["a"].reasons[0]
    assert groups["b"].prunable  # the rest of the model is still prunable
    pruned, _ = PassManager([PruneChannels(keep={"b": [0, 5]})])(model)
    assert dict(pruned.gm.named_modules())["c"].in_channels == 2
    with pytest.raises(EdgecError, match=r"cannot prune channel group 'a': node 'roll' \(function roll\(\)\)"):
        PassManager([PruneChannels(keep={"a": [0, 1]})])(model)


class _Mixed(nn.Module):
    """concatenation (offsets), depthwise conv + BN, flatten over a static dim, GLU, a low-bit layer."""

    def __init__(self):
        super().__init__()
        from edgec.layers.lowbit import LowBitLinear

        self.a = nn.Conv1d(3, 6, 3, padding=1)
        self.b = nn.Conv1d(3, 4, 1)
        self.dw = nn.Conv1d(13, 13, 3, padding=1, groups=13)
        self.bn = nn.BatchNorm1d(13)
        self.pool = nn.AdaptiveAvgPool1d(2)
        self.fc = nn.Linear(26, 10)
        self.glu = nn.GLU(dim=-1)
        self.head = nn.Linear(5, 3)
        self.lb = LowBitLinear(3, 7)
        self.lb_out = nn.Linear(7, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), x, self.b(x)], dim=1)  # 6 + 3 (input: fixed) + 4
        y = self.pool(torch.relu(self.bn(self.dw(y))))
        h = self.head(self.glu(self.fc(y.flatten(1))))
        return h + self.lb_out(self.lb(x.mean(dim=2)))


def test_concat_depthwise_flatten_glu_lowbit():
    net = _Mixed()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.uniform_(0.5, 2)
        net.bn.bias.uniform_(-1, 1)
        net.lb.codes.copy_(torch.randint(-1, 2, net.lb.codes.shape, dtype=torch.int8))
    model = _custom(net, (2, 3, 9), dynamic=2)
    groups = {g.name: g for g in find_groups(model)}
    print("\n" + describe_groups(list(groups.values())))
    assert groups["a"].prunable and groups["a"].per_channel == ["dw", "bn"] and groups["a"].consumers == ["fc"]
    assert groups["b"].prunable and groups["b"].size == 4
    assert (groups["fc"].kind, groups["fc"].size, groups["fc"].prunable) == ("glu", 5, True)
    assert groups["head"].kind == "residual" and not groups["head"].prunable  # head + lb_out reach the output
    assert "lb" not in groups  # low-bit layers are not producers of prunable groups
    keep = {"a": [1, 2, 4], "b": [0, 3], "fc": [0, 2, 3]}
    pruned, records = PassManager([PruneChannels(keep=keep)])(model)
    assert records[0]["checks"]["mask_equivalence"]["passed"], records[0]["checks"]
    m = dict(pruned.gm.named_modules())
    assert m["dw"].in_channels == m["dw"].out_channels == m["dw"].groups == 3 + 3 + 2
    assert m["fc"].in_features == 16 and m["fc"].out_features == 6 and m["head"].in_features == 3
    x = model.spec.sample(seed=1, alt=True)
    assert max_error(zero_channels(model, keep).run(x), pruned.run(x))["max_abs_error"] < 1e-5


class _LowBitFFN(nn.Module):
    def __init__(self):
        super().__init__()
        from edgec.layers.lowbit import LowBitLinear

        self.up = LowBitLinear(4, 8)
        self.down = nn.Linear(8, 4)
        self.up2 = nn.Linear(4, 8)
        self.down2 = LowBitLinear(8, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + self.down2(torch.relu(self.up2(x)))


def test_lowbit_layers_are_unprunable():
    model = _custom(_LowBitFFN(), (2, 4))
    groups = {g.name: g for g in find_groups(model)}
    assert not groups["up2"].prunable and "low-bit" in groups["up2"].reasons[0]
    assert "up" not in groups


class _Sigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.down = nn.Linear(8, 3)
        self.ls = nn.Linear(4, 6)
        self.gamma = nn.Parameter(torch.rand(6))  # a per-channel scale outside a module ("layer scale")
        self.proj = nn.Linear(6, 3)

    def forward(self, x):
        return self.down(torch.sigmoid(self.up(x))) + self.proj(self.ls(x) * self.gamma)


def test_not_zero_exact_group_prunes_without_mask_check():
    model = _custom(_Sigmoid(), (2, 4))
    groups = {g.name: g for g in find_groups(model)}
    print("\n" + describe_groups(list(groups.values())))
    assert groups["up"].prunable and not groups["up"].zero_exact  # sigmoid(0) = 0.5
    assert not groups["ls"].prunable and "node 'mul'" in groups["ls"].reasons[0]  # gamma is not sliced
    pruned, records = PassManager([PruneChannels(keep={"up": [1, 4, 6]})])(model)
    assert records[0]["checks"]["mask_equivalence"]["skipped"]
    assert dict(pruned.gm.named_modules())["down"].in_features == 3
    assert pruned.run(model.spec.sample(seed=0, alt=True))[0].shape == (3, 3)
