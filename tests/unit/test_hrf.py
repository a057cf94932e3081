"""HRF scaffold (``scaffold.hrf``) and deHRF fold (``fold.hrf``): matching, exactness, purity, replay."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgec.core.pass_manager
from edgec.core.errors import EdgecError
from edgec.core.graph import Model, max_error, trace, verify_equivalent
from edgec.core.pass_manager import PassManager, PreconditionError
from edgec.core.spec import Dim, InputSpec, TensorSpec
from edgec.layers.hrf import HRFExpand
from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
from edgec.passes.bnfold import FoldBatchNorm
from edgec.passes.hrf import FoldHRF, HRFScaffold, find_ffns

TOL = 1e-5
# arch -> (number of FFNs, number of first-linear modules an HRF feeds per FFN)
# bert: two encoder FFNs (the pooler → tanh → classifier head is not an FFN); lwdetr: 4 encoder, 3 decoder FFNs and
# the d → d → d part of each of the 3 box heads
ZOO_FFNS = {"convtransformer": (3, 1), "conformer": (4, 1), "hafformer": (4, 2), "bert": (2, 1), "speechformer": (6, 1),
            "lwdetr": (10, 1)}


@pytest.fixture(scope="module")
def base():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = new_model(arch, seed=0)
        return cache[arch]

    return get


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(edgec.core.pass_manager.PASSES, "scaffold.hrf", "edgec.passes.hrf:HRFScaffold")
    monkeypatch.setitem(edgec.core.pass_manager.PASSES, "fold.hrf", "edgec.passes.hrf:FoldHRF")


def scaffold(model, **params):
    return HRFScaffold(**params)(model)


def perturb(model: Model, seed=1, scale=0.3) -> None:
    """Random changes to every HRF and first-linear weight, as fine-tuning would make."""
    g = torch.Generator().manual_seed(seed)
    hrf = {n for n, _ in model.scaffolds()}
    targets = set(hrf)
    for n, m in model.gm.named_modules():
        if isinstance(m, HRFExpand):
            for u in (u for node in model.gm.graph.nodes if node.target == n for u in node.users):
                targets.add(u.target)
    with torch.no_grad():
        for name, p in model.gm.named_parameters():
            if name.rpartition(".")[0].removesuffix(".h") in targets:
                p.add_(torch.randn(p.shape, generator=g) * scale * (float(p.std()) if p.numel() > 1 else 1.0))


def layout(model: Model) -> tuple[dict, dict]:
    types = {n: type(m) for n, m in model.gm.named_modules() if n}
    shapes = {n: tuple(p.shape) for n, p in model.gm.named_parameters()}
    return types, shapes


@pytest.mark.parametrize("arch", sorted(ZOO_FFNS))
def test_scaffold_fold_exact_and_restores_architecture(arch, base):
    model = base(arch)
    digest = model.digest()
    n_ffn, per_ffn = ZOO_FFNS[arch]
    assert len(find_ffns(model)) == n_ffn

    res = scaffold(model)
    scaf = res.model
    assert res.modified and res.checks == {}
    assert f"{n_ffn} FFN(s)" in res.summary
    hrfs = scaf.scaffolds()
    assert len(hrfs) == n_ffn
    assert all(isinstance(m, HRFExpand) and m.kind == "hrf" and m.folded_by == "fold.hrf" for _, m in hrfs)
    d = {n: m.in_features for n, m in hrfs}
    assert all(m.out_features == 4 * d[n] for n, m in hrfs)
    # H is a call_module node feeding only the first linear(s): nothing sits between H and W1'.
    nodes = [n for n in scaf.gm.graph.nodes if n.op == "call_module" and n.target in d]
    assert len(nodes) == n_ffn
    assert all(len(n.users) == per_ffn for n in nodes)
    assert all(isinstance(scaf.gm.get_submodule(u.target), nn.Linear) for n in nodes for u in n.users)
    assert model.digest() == digest  # input untouched

    perturb(scaf)
    assert max_error(model.run(model.spec.sample(0)), scaf.run(model.spec.sample(0)))["rel_error"] > 1e-3
    scaf_digest = scaf.digest()
    fold = FoldHRF()(scaf)
    folded = fold.model
    assert scaf.digest() == scaf_digest
    assert fold.modified and fold.checks["equivalence"]["passed"]
    assert fold.checks["equivalence"]["rel_error"] <= TOL
    assert folded.scaffolds() == []
    assert layout(folded) == layout(model)
    assert folded.param_count() == model.param_count()
    assert folded.gm.code == model.gm.code


@pytest.mark.parametrize("arch", sorted(ZOO_FFNS))
def test_preserve_init_keeps_outputs(arch, base):
    model = base(arch)
    digest = model.digest()
    rng = torch.get_rng_state()
    res = HRFScaffold(init="preserve", seed=3)(model)
    assert torch.equal(torch.get_rng_state(), rng)  # preserve draws from its own seeded generator
    assert model.digest() == digest
    eq = res.checks["equivalence"]
    assert eq["passed"] and eq["rel_error"] <= TOL
    for _, m in res.model.scaffolds():  # H has orthonormal columns, c = 0
        h = m.h.weight.detach().double()
        assert torch.allclose(h.T @ h, torch.eye(h.shape[1], dtype=torch.float64), atol=1e-6)
        assert float(m.h.bias.detach().abs().max()) == 0.0


def test_preserve_is_seeded(base):
    model = base("bert")
    a = HRFScaffold(init="preserve", seed=3)(model).model
    assert HRFScaffold(init="preserve", seed=3)(model).model.digest() == a.digest()
    assert HRFScaffold(init="preserve", seed=4)(model).model.digest() != a.digest()


def test_default_init_is_seeded_by_param(base):
    model = base("convtransformer")
    rng = torch.get_rng_state()
    a, b, c = scaffold(model, seed=5).model, scaffold(model, seed=5).model, scaffold(model, seed=6).model
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    assert a.digest() == b.digest() != c.digest()
    # default init changes the function by design; no check is recorded
    assert max_error(model.run(model.spec.sample(0)), a.run(model.spec.sample(0)))["rel_error"] > 1e-3


def test_no_ffn_is_a_clear_error(base):
    with pytest.raises(PreconditionError, match=r"^no FFN found \(Linear → activation → Linear\) in resnet: none "
                                                r"of its 1 nn.Linear layer\(s\) is followed by an activation$"):
        HRFScaffold()(base("resnet"))


def test_fold_without_scaffold_is_quiet_noop(base):
    model = base("resnet")
    res = FoldHRF()(model)
    assert not res.modified and res.summary == "no HRF scaffold" and res.checks == {}
    out, records = PassManager([FoldHRF(), FoldBatchNorm()])(base("conformer"))
    assert [r["modified"] for r in records] == [False, True]
    assert [r["pass"] for r in out.passes] == ["fold.batchnorm"]


def test_include_exclude_select_subsets(base):
    conformer = base("conformer")
    only_ffn1 = scaffold(conformer, include=["*.ffn1.*"]).model
    assert [n for n, _ in only_ffn1.scaffolds()] == ["blocks.0.ffn1.linear1_hrf", "blocks.1.ffn1.linear1_hrf"]
    not_block0 = scaffold(conformer, exclude=["blocks.0.*"]).model
    assert [n for n, _ in not_block0.scaffolds()] == ["blocks.1.ffn1.linear1_hrf", "blocks.1.ffn2.linear1_hrf"]
    one = scaffold(conformer, include=["blocks.1.ffn2.linear1"]).model
    assert [n for n, _ in one.scaffolds()] == ["blocks.1.ffn2.linear1_hrf"]
    # a gated FFN is selected by either of its input projections
    haf = scaffold(base("hafformer"), include=["levels.2.*.w_v"]).model
    assert [n for n, _ in haf.scaffolds()] == ["levels.2.0.geglu.w_g_hrf"]
    with pytest.raises(PreconditionError, match="select none of the 4 FFN"):
        HRFScaffold(include=["nothing.*"])(conformer)
    with pytest.raises(PreconditionError, match="select none"):
        HRFScaffold(exclude=["*"])(conformer)
    # a second scaffold adds the rest, skipping FFNs that already carry one; a third has nothing left
    both = scaffold(only_ffn1).model
    assert len(both.scaffolds()) == 4
    with pytest.raises(PreconditionError, match="already carry an HRF scaffold"):
        HRFScaffold()(both)
    perturb(both)
    assert FoldHRF()(both).checks["equivalence"]["passed"]


@pytest.mark.parametrize("k", [1, 2, 8])
def test_expand_sets_width(k, base):
    model = base("bert")
    scaf = scaffold(model, expand=k).model
    d = model.gm.get_submodule("encoder.layer.0.intermediate.dense").in_features
    hrf = scaf.gm.get_submodule("encoder.layer.0.intermediate.dense_hrf")
    w1 = scaf.gm.get_submodule("encoder.layer.0.intermediate.dense")
    assert (hrf.in_features, hrf.out_features) == (d, k * d)
    assert w1.in_features == k * d
    assert tuple(hrf.h.weight.shape) == (k * d, d) and tuple(hrf.h.bias.shape) == (k * d,)


@pytest.mark.parametrize("bad", [{"expand": 0}, {"expand": 1.5}, {"init": "zeros"}, {"include": [""]},
                                 {"exclude": 3}])
def test_bad_params(bad):
    with pytest.raises(EdgecError):
        HRFScaffold(**bad)


def test_record_has_every_param():
    assert HRFScaffold(include="blocks.*").record() == {
        "pass": "scaffold.hrf", "version": 1,
        "params": {"expand": 4, "include": ["blocks.*"], "exclude": [], "init": "default", "seed": 0}}


@pytest.mark.parametrize("arch", ["conformer", "hafformer"])
def test_checkpoint_roundtrip_replays(arch, base, registered, tmp_path):
    scaf, records = PassManager([HRFScaffold(expand=2, exclude=["*.ffn2.*"])])(base(arch))
    assert [r["pass"] for r in scaf.passes] == ["scaffold.hrf"]
    perturb(scaf)
    path = tmp_path / "hrf.pt"
    digest = save_checkpoint(scaf, path)
    loaded = load_checkpoint(path)
    assert loaded.digest() == digest
    assert loaded.gm.code == scaf.gm.code
    assert [n for n, _ in loaded.scaffolds()] == [n for n, _ in scaf.scaffolds()]
    assert max_error(scaf.run(scaf.spec.sample(0)), loaded.run(scaf.spec.sample(0)))["max_abs_error"] == 0.0

    folded, _ = PassManager([FoldHRF()])(loaded)
    assert [r["pass"] for r in folded.passes] == ["scaffold.hrf", "fold.hrf"]
    assert layout(folded) == layout(base(arch))
    path2 = tmp_path / "folded.pt"
    digest2 = save_checkpoint(folded, path2)
    again = load_checkpoint(path2)  # replays scaffold, then fold, then loads the folded weights strictly
    assert again.digest() == digest2
    assert again.gm.code == base(arch).gm.code


def test_scaffold_then_fold_hrf_and_batchnorm_on_conformer(base):
    model = base("conformer").clone()
    g = torch.Generator().manual_seed(7)
    for m in model.gm.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    scaf, _ = PassManager([HRFScaffold()])(model)
    perturb(scaf)
    out, records = PassManager([FoldHRF(), FoldBatchNorm()])(scaf)
    assert [r["modified"] for r in records] == [True, True]
    assert all(r["checks"]["equivalence"]["passed"] for r in records)
    assert out.scaffolds() == []
    assert not any(isinstance(m, nn.BatchNorm1d) for m in out.gm.modules())
    err = verify_equivalent(scaf, out, TOL)
    assert err["passed"], err
    assert [r["pass"] for r in out.passes] == ["scaffold.hrf", "fold.hrf", "fold.batchnorm"]


# ---- dataflow matching on user models (not names) ------------------------------------------------------

class _Mixed(nn.Module):
    """A functional-activation FFN, a method-activation FFN, a bias-free SwiGLU (product operands swapped),
    and decoys that are not FFNs (Linear -> LayerNorm -> Linear; Linear -> act feeding two places)."""

    def __init__(self, d=16):
        super().__init__()
        self.a1, self.a2 = nn.Linear(d, 32), nn.Linear(32, d)
        self.b1, self.b2 = nn.Linear(d, 24), nn.Linear(24, d)
        self.up, self.gate, self.down = (nn.Linear(d, 40, bias=False), nn.Linear(d, 40, bias=False),
                                         nn.Linear(40, d, bias=False))
        self.n1, self.norm, self.n2 = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, d)
        self.f1, self.f2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = x + self.a2(F.dropout(F.relu(self.a1(x)), 0.1, self.training))
        x = x + self.b2(self.b1(x).relu())
        x = x + self.down(torch.mul(self.up(x), F.silu(self.gate(x))))
        x = self.n2(self.norm(self.n1(x)))
        h = torch.tanh(self.f1(x))
        return self.f2(h) + h

    def input_spec(self):
        return InputSpec((TensorSpec("x", (Dim("batch", 2, 3), Dim("time", 5, 7), 16)),))


def _user_model() -> Model:
    torch.manual_seed(0)
    module = _Mixed().eval()
    return Model(trace(module), "test:_Mixed", {}, module.input_spec())


def test_matching_by_dataflow_on_user_model():
    model = _user_model()
    found = [(f.names, f.w2.target, f.gated) for f in find_ffns(model)]
    assert found == [(["a1"], "a2", False), (["b1"], "b2", False), (["gate", "up"], "down", True)]
    scaf = scaffold(model).model
    hrfs = dict(scaf.scaffolds())
    assert sorted(hrfs) == ["a1_hrf", "b1_hrf", "gate_hrf"]
    assert hrfs["gate_hrf"].h.bias is None  # bias-free FFN: no c, so the fold adds no bias
    perturb(scaf)
    folded = FoldHRF()(scaf)
    assert folded.checks["equivalence"]["passed"], folded.checks
    assert layout(folded.model) == layout(model)
    assert HRFScaffold(init="preserve")(model).checks["equivalence"]["passed"]


def test_preserve_trains_every_expanded_dim():
    model = _user_model()
    scaf = HRFScaffold(init="preserve")(model).model
    gm = scaf.gm.train()
    x = model.spec.sample(0)[0]
    gm(x).square().mean().backward()
    h = gm.get_submodule("a1_hrf").h
    w1 = gm.get_submodule("a1")
    assert float(h.weight.grad.abs().sum()) > 0
    assert bool((w1.weight.grad.abs().sum(0) > 0).all())  # all r input columns of W1' get gradient
