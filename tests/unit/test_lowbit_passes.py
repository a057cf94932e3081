"""Ternary/binary scaffolds and folds: scaffold.sttn/fold.sttn, scaffold.dlt/fold.dlt, scaffold.binary/fold.binary.

Exactness of each fold on conv and linear layers after training steps, the value sets of the folded
weights, selection (keep_first_last, include/exclude), initialisation, straight-through gradients,
activation quantizers, checkpoint round trips, purity, the binary auxiliary path and export refusal.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgec.core.errors import EdgecError
from edgec.core.graph import Model, trace
from edgec.core.pass_manager import PassManager, PreconditionError
from edgec.core.spec import Dim, InputSpec, TensorSpec
from edgec.layers.binary import BinaryLayer, binary_aux_loss, binary_latent_weights, real_mode
from edgec.layers.lowbit import LowBitConv2d, LowBitLinear, expand_groups, lowbit_layers
from edgec.layers.ternary import DLTLayer, STTNLayer
from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
from edgec.passes.binary import BinaryScaffold, FoldBinary
from edgec.passes.dlt import DLTScaffold, FoldDLT
from edgec.passes.sttn import FoldSTTN, STTNScaffold

TOL = 1e-5
SMALL = {
    "resnet": {"base_width": 4, "blocks_per_stage": [1, 1]},
    "convtransformer": {"d_model": 16, "num_layers": 1, "ffn_dim": 32, "num_heads": 2},
    "bert": {"hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 32, "num_attention_heads": 2},
}
METHODS = {
    "sttn": (STTNScaffold, FoldSTTN, STTNLayer, {"activations": "ternary"}),
    "dlt": (DLTScaffold, FoldDLT, DLTLayer, {"group_size": 8, "shift_init": "mean"}),
    "binary": (BinaryScaffold, FoldBinary, BinaryLayer, {"activations": "binary"}),
}
CASES = [("sttn", "resnet"), ("sttn", "convtransformer"), ("dlt", "resnet"), ("dlt", "bert"),
         ("binary", "resnet"), ("binary", "convtransformer")]


@pytest.fixture(scope="module")
def base():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = new_model(arch, SMALL[arch], seed=0)
        return cache[arch]

    return get


def train_steps(model: Model, steps: int = 3, lr: float = 0.2) -> None:
    """A few SGD steps on the scaffold parameters (random labels), so latents, α and γ move."""
    gm = model.gm.train()
    params = [p for _, m in model.scaffolds() for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        out = gm(*model.spec.sample(seed=100 + i))
        labels = torch.randint(0, out.shape[-1], out.shape[:-1], generator=g)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))
        for m in gm.modules():
            if isinstance(m, BinaryLayer):
                loss = loss + binary_aux_loss(gm)
                break
        opt.zero_grad()
        loss.backward()
        opt.step()
    gm.eval()


def codes_of(model: Model) -> dict:
    return {n: m.quantized()[0].clone() for n, m in model.scaffolds()}


def outputs_equal(a: Model, b: Model) -> None:
    for seed in (0, 1):
        inputs = a.spec.sample(seed=seed)
        for x, y in zip(a.run(inputs), b.run(inputs)):
            assert torch.equal(x, y)


def assert_allowed_values(method: str, name: str, low, scaffold) -> None:
    """Each folded layer's dequantized weight takes only the allowed values in each group."""
    rows = low.weight_shape[0]
    fan_in = low.codes[0].numel()
    w = low.dequantized().reshape(rows, fan_in)
    codes = low.codes.reshape(rows, fan_in)
    gs = low.group_size
    scale = expand_groups(low.scale, fan_in, gs)
    if method == "binary":
        assert low.bits == 1 and low.shift is None
        assert set(codes.unique().tolist()) == {-1, 1}
        assert len(w.unique()) >= 2
        alpha = scaffold.weight.detach().reshape(rows, -1).abs().mean(1)
        for o in range(rows):
            assert set(w[o].unique().tolist()) <= {float(-alpha[o]), float(alpha[o])}, name
        return
    assert low.bits == 2
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    shift = expand_groups(low.shift, fan_in, gs) if low.shift is not None else torch.zeros_like(w)
    for o in range(rows):
        bounds = range(0, fan_in, gs) if gs else [0]
        for start in bounds:
            stop = start + gs if gs else fan_in
            vals = set(w[o, start:stop].unique().tolist())
            a, s = scale[o, start], shift[o, start]  # float32, as the layer computes them
            levels = {float(-a + s), float(s), float(a + s)}
            assert len(vals) <= 3 and vals <= levels, (name, o, start, vals, levels)
    if method == "sttn":  # {−2α, 0, 2α}: scale = 2α, α = (‖W1‖₁ + ‖W2‖₁)/(2n)
        assert low.shift is None and gs == 0
        c1 = scaffold.w1.detach().clamp(-1, 1).reshape(rows, -1)
        c2 = scaffold.w2.detach().clamp(-1, 1).reshape(rows, -1)
        alpha = (c1.abs().sum(1) + c2.abs().sum(1)) / (2 * fan_in)
        torch.testing.assert_close(low.scale[:, 0], 2 * alpha, rtol=1e-6, atol=0)
    else:
        assert low.shift is not None


@pytest.mark.parametrize("method,arch", CASES)
def test_scaffold_train_fold_exact_and_roundtrip(method, arch, base, tmp_path):
    scaffold_cls, fold_cls, layer_cls, params = METHODS[method]
    model = base(arch)
    digest = model.digest()
    scaf, (res,) = PassManager([scaffold_cls(**params)])(model)
    assert model.digest() == digest  # the input is not mutated
    assert res["modified"] and scaffold_cls.scaffold_fold == fold_cls.name
    found = scaf.scaffolds()
    n = res["checks"]["selection"]["count"]
    assert n == len(found) >= 4 and f"{n} layer(s)" in res["summary"]
    assert all(isinstance(m, layer_cls) and m.kind == method and m.folded_by == fold_cls.name for _, m in found)
    orig = dict(model.gm.named_modules())
    assert all(type(orig[name]) in (nn.Linear, nn.Conv1d, nn.Conv2d) for name, _ in found)  # same names

    before = codes_of(scaf)
    train_steps(scaf)
    after = codes_of(scaf)
    assert any(not torch.equal(before[k], after[k]) for k in before), "training did not move any code"

    path = tmp_path / "scaf.pt"
    save_checkpoint(scaf, path)
    loaded = load_checkpoint(path)
    assert [(n, type(m)) for n, m in loaded.scaffolds()] == [(n, type(m)) for n, m in found]
    outputs_equal(scaf, loaded)

    loaded_digest = loaded.digest()
    folded, (fres,) = PassManager([fold_cls()])(loaded)
    assert loaded.digest() == loaded_digest
    eq = fres["checks"]["equivalence"]
    assert eq["passed"] and eq["rel_error"] <= TOL and eq["max_abs_error"] <= TOL, eq
    assert fres["summary"].startswith(f"folded {n} ")
    assert not folded.scaffolds()
    lows = dict(lowbit_layers(folded.gm))
    assert sorted(lows) == sorted(n for n, _ in found)
    scaffolds = dict(loaded.scaffolds())
    for name, low in lows.items():
        assert_allowed_values(method, name, low, scaffolds[name])
        assert low.act == scaffolds[name].act

    path = tmp_path / "folded.pt"
    save_checkpoint(folded, path)
    reloaded = load_checkpoint(path)
    assert [p["pass"] for p in reloaded.passes] == [scaffold_cls.name, fold_cls.name]
    assert sorted(n for n, _ in lowbit_layers(reloaded.gm)) == sorted(lows)
    outputs_equal(folded, reloaded)
    noop = fold_cls()(folded)
    assert not noop.modified and noop.summary == f"no {fold_cls.label} scaffold"


def test_keep_first_last_and_selection(base):
    model = base("resnet")
    scaf = STTNScaffold()(model).model
    gm = scaf.gm
    assert type(gm.get_submodule("stem.0")) is nn.Conv2d and type(gm.get_submodule("classifier")) is nn.Linear
    assert isinstance(gm.get_submodule("stages.1.0.shortcut.0"), STTNLayer)
    every = STTNScaffold(keep_first_last=False)(model).model
    assert isinstance(every.gm.get_submodule("stem.0"), STTNLayer)
    assert isinstance(every.gm.get_submodule("classifier"), STTNLayer)

    ct = base("convtransformer")
    res = DLTScaffold(include=["blocks.*"], exclude=["*.attn.*"])(ct)
    assert sorted(n for n, _ in res.model.scaffolds()) == ["blocks.0.ffn.linear1", "blocks.0.ffn.linear2"]
    # scaffolding in two steps keeps the same full-precision first/last layers
    second = BinaryScaffold(include=["*.attn.*"])(res.model)
    assert second.checks["selection"]["full_precision"] == ["frontend.layers.0", "classifier"]
    assert sorted(n for n, m in second.model.scaffolds() if m.kind == "binary") == [
        f"blocks.0.attn.{p}" for p in ("k_proj", "out_proj", "q_proj", "v_proj")]
    with pytest.raises(PreconditionError, match="select none"):
        STTNScaffold(include=["nothing.*"])(ct)


class _NoWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return torch.relu(self.norm(x)).mean(1)

    def input_spec(self):
        return InputSpec((TensorSpec("x", (Dim("batch", 2, 3), Dim("time", 5, 7), 8)),))


class _OneLinear(_NoWeights):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        return self.proj(self.norm(x)).mean(1)


@pytest.mark.parametrize("scaffold_cls", [STTNScaffold, DLTScaffold, BinaryScaffold])
def test_no_selectable_layer(scaffold_cls):
    for module in (_NoWeights(), _OneLinear()):
        model = Model(trace(module.eval()), "test:user", {}, module.input_spec())
        with pytest.raises(PreconditionError, match="nothing to scaffold"):
            scaffold_cls()(model)
    model = Model(trace(_OneLinear().eval()), "test:user", {}, _OneLinear().input_spec())
    assert len(scaffold_cls(keep_first_last=False)(model).model.scaffolds()) == 1


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(self.b(self.a(x))).mean(1)

    def input_spec(self):
        return _NoWeights().input_spec()


def test_tied_layers_are_not_selected():
    model = Model(trace(_Tied().eval()), "test:tied", {}, _Tied().input_spec())
    res = DLTScaffold(keep_first_last=False)(model)
    assert [n for n, _ in res.model.scaffolds()] == ["c"]
    assert res.checks["selection"]["ineligible"] == ["a", "b"]


def test_params_recorded_and_validated():
    assert STTNScaffold().record()["params"] == {
        "activations": "none", "include": ["*"], "exclude": [], "keep_first_last": True, "first_layer": "input",
        "last_layer": "heads",
        "seed": 0, "clip": 1.96}
    assert DLTScaffold().record()["params"] == {
        "activations": "none", "include": ["*"], "exclude": [], "keep_first_last": True, "first_layer": "input",
        "last_layer": "heads",
        "group_size": 128, "shift_init": "zero", "clip": 1.5}
    assert BinaryScaffold(latent_weight="0.3,1").record()["params"] == {
        "activations": "none", "include": ["*"], "exclude": [], "keep_first_last": True, "first_layer": "input",
        "last_layer": "heads",
        "latent_weight": [0.3, 1.0], "clip": 1.0}
    for bad in ({"activations": "binary"}, {"include": [""]}, {"keep_first_last": "yes"}, {"seed": 1.5},
                {"first_layer": "first"}):
        with pytest.raises(EdgecError):
            STTNScaffold(**bad)
    with pytest.raises(EdgecError):
        DLTScaffold(group_size=-1)
    with pytest.raises(EdgecError):
        BinaryScaffold(latent_weight=[1.0])


def test_sttn_init_is_twn_with_different_latents():
    torch.manual_seed(0)
    lin = nn.Linear(40, 6)
    layer = STTNLayer(lin, seed=3)
    assert (layer.w1 != layer.w2).all()  # independent: identical latents would collapse to binary
    assert float(layer.w1.detach().abs().max()) <= 1 and float(layer.w2.detach().abs().max()) <= 1
    w = lin.weight.detach()
    delta = 0.7 * w.abs().mean(1, keepdim=True)
    twn_codes = torch.sign(w) * (w.abs() > delta)
    codes, scale, shift = layer.quantized()
    assert torch.equal(codes, twn_codes) and shift is None
    twn_scale = (w.abs() * (w.abs() > delta)).sum(1) / (w.abs() > delta).sum(1)
    torch.testing.assert_close(scale[:, 0], twn_scale, rtol=1e-5, atol=0)
    again = STTNLayer(lin, seed=3)
    assert torch.equal(again.w1, layer.w1) and not torch.equal(STTNLayer(lin, seed=4).w1, layer.w1)


def _grads(layer, *params):
    torch.manual_seed(1)
    g = torch.randn(layer.rows, layer.fan_in)
    (layer.weight_hat() * g).sum().backward()
    return g


def test_training_forward_value_is_the_quantized_one():
    torch.manual_seed(0)
    x = torch.randn(5, 10)
    for layer in (STTNLayer(nn.Linear(10, 3), "ternary", seed=0), DLTLayer(nn.Linear(10, 3), 4, "ternary"),
                  BinaryLayer(nn.Linear(10, 3), "binary")):
        y_train = layer.train()(x.clone().requires_grad_(True))
        with torch.no_grad():
            y_eval = layer.eval()(x)
        assert torch.equal(y_train.detach(), y_eval)  # the STE terms are exactly 0 in value


def test_activation_ste():
    from edgec.layers.lowbit import binary_act, ternary_act

    x = torch.tensor([-2.0, -0.7, -0.2, 0.0, 0.3, 0.8, 1.5], requires_grad=True)
    y = ternary_act(x)
    assert y.tolist() == [-1, -1, 0, 0, 0, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]
    x.grad = None
    y = binary_act(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]


def test_ste_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(10, 3)
    # STTN: ∂L/∂W1 = α·1[|W1| <= clip]·G + sign(W1)/(2n)·Σ G·(s1 + s2)   (the XNOR scale term)
    layer = STTNLayer(lin, seed=0)
    g = _grads(layer)
    c1, c2 = layer.w1.detach(), layer.w2.detach()
    s = (torch.where(c1 >= 0, 1.0, -1.0) + torch.where(c2 >= 0, 1.0, -1.0))
    alpha = (c1.abs().sum(1, keepdim=True) + c2.abs().sum(1, keepdim=True)) / 20
    expect = alpha * g + torch.sign(c1) / 20 * (g * s).sum(1, keepdim=True)
    torch.testing.assert_close(layer.w1.grad, expect)
    assert layer.w2.grad.abs().sum() > 0 and layer.bias.grad is None
    # DLT: ∂Ŵ/∂W = 1 (clipped), ∂Ŵ/∂α = T, ∂Ŵ/∂γ = 1, per group of 4 (groups 4, 4, 2)
    layer = DLTLayer(lin, group_size=4, shift_init="mean")
    g = _grads(layer)
    codes = layer.quantized()[0]
    alpha_e = expand_groups(layer.alpha.detach(), 10, 4)
    dist = (layer.weight.detach() - expand_groups(layer.gamma.detach(), 10, 4)).abs()
    torch.testing.assert_close(layer.weight.grad, g * (dist <= 1.5 * alpha_e.abs()))
    group_sum = lambda t: torch.stack([t[:, 0:4].sum(1), t[:, 4:8].sum(1), t[:, 8:10].sum(1)], 1)  # noqa: E731
    torch.testing.assert_close(layer.alpha.grad, group_sum(g * codes))
    torch.testing.assert_close(layer.gamma.grad, group_sum(g))
    # Binary: ∂L/∂W = α·1[|W| <= 1]·G + sign(W)/n·Σ G·sign(W)
    layer = BinaryLayer(lin)
    g = _grads(layer)
    w = layer.weight.detach()
    sw = torch.where(w >= 0, 1.0, -1.0)
    expect = w.abs().mean(1, keepdim=True) * g + torch.sign(w) / 10 * (g * sw).sum(1, keepdim=True)
    torch.testing.assert_close(layer.weight.grad, expect)


def test_sttn_latents_clamped_and_clip():
    lin = nn.Linear(6, 2)
    layer = STTNLayer(lin, seed=0, clip=0.5).train()
    with torch.no_grad():
        layer.w1[0, 0] = 3.0
        layer.w1[0, 1] = 0.7
    before_eval = layer.quantized()
    layer(torch.randn(4, 6)).sum().backward()
    assert float(layer.w1.detach()[0, 0]) == 1.0  # clamped in place by the training forward
    codes, scale, _ = layer.quantized()
    assert torch.equal(codes, before_eval[0]) and torch.equal(scale, before_eval[1])  # eval already read clamp(W)
    # gradient of the sign term is zero where |W| > clip: only the scale term remains there
    x = torch.randn(4, 6)
    layer.zero_grad()
    gy = torch.randn(4, 2)
    (layer(x) * gy).sum().backward()
    gw = gy.T @ x
    s = layer.quantized()[0] * 2
    scale_term = torch.sign(layer.w1.detach()) / 12 * (gw * s).sum(1, keepdim=True)
    torch.testing.assert_close(layer.w1.grad[0, 1], scale_term[0, 1])


@pytest.mark.parametrize("method,allowed", [("sttn", {-1.0, 0.0, 1.0}), ("dlt", {-1.0, 0.0, 1.0}),
                                            ("binary", {-1.0, 1.0})])
def test_activation_quantizers_at_layer_input(method, allowed, base):
    scaffold_cls, fold_cls, _, _ = METHODS[method]
    act = "binary" if method == "binary" else "ternary"
    scaf = scaffold_cls(activations=act)(base("convtransformer")).model
    seen = []
    for _, m in scaf.scaffolds():
        m._op = (lambda x, w, op=m._op: seen.append(x.detach()) or op(x, w))
    scaf.gm.train()
    x = scaf.spec.sample(seed=0)[0].requires_grad_(True)
    scaf.gm(x).sum().backward()  # training forward: the STE path
    scaf.run(scaf.spec.sample(seed=1))  # eval forward
    for _, m in scaf.scaffolds():
        del m._op
    n = len(scaf.scaffolds())
    assert len(seen) == (3 * n if method == "binary" else 2 * n)  # binary training also runs the real path
    quantized = [v for v in seen if set(v.unique().tolist()) <= allowed]
    assert len(quantized) == 2 * n  # the binary/ternary path of every layer sees only quantized inputs
    folded = fold_cls()(scaf).model
    assert all(low.act == act for _, low in lowbit_layers(folded.gm))


def test_binary_aux_path_api():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    with torch.no_grad():  # |W| constant per row: sign(W)·mean|W| == W, so y_b == y_r
        lin.weight.copy_(torch.where(torch.rand(4, 8) < 0.5, -0.5, 0.5))
    layer = BinaryLayer(lin, latent_weight=[0.25, 2.0]).train()
    gm = nn.Sequential(layer)
    assert binary_latent_weights(gm) == (0.25, 2.0)
    with pytest.raises(EdgecError, match="training-mode forward"):
        binary_aux_loss(gm)
    x = torch.randn(3, 8)
    gm(x)
    y_b, y_r = layer.aux
    assert torch.equal(y_b, y_r)
    assert float(binary_aux_loss(gm).detach()) == 0.0
    with torch.no_grad():
        layer.weight[0, 0] = 0.1
    y = gm(x)
    loss = binary_aux_loss(gm)
    assert float(loss.detach()) > 0
    assert float(binary_aux_loss(gm, lambda2=1.0).detach()) == pytest.approx(float(loss.detach()) / 2)
    loss.backward()
    assert layer.weight.grad.abs().sum() > 0
    with real_mode(gm):
        y_real = gm(x)
        assert layer.aux[0] is not None and torch.equal(layer.aux[0], y)  # real mode leaves aux as it was
    assert not layer.real
    torch.testing.assert_close(y_real, F.linear(x, layer.weight, layer.bias))
    copy.deepcopy(gm)  # aux (non-leaf tensors) is not deep-copied
    layer.eval()
    layer.aux = None
    gm(x)
    assert layer.aux is None  # eval: no latent path
    assert float(binary_aux_loss(nn.Sequential(nn.Linear(2, 2)))) == 0.0


def test_pass_manager_provenance_and_export(base):
    from edgec.onnx.export import export, refuse_scaffolds

    model = base("resnet")
    scaf, records = PassManager([DLTScaffold(group_size=16)])(model)
    assert scaf.passes[-1] == DLTScaffold(group_size=16).record()
    with pytest.raises(EdgecError, match="fold"):
        refuse_scaffolds(scaf)
    with pytest.raises(EdgecError, match="unfolded training scaffold"):
        export(scaf)
    train_steps(scaf, steps=1)
    folded, records = PassManager([FoldSTTN(), FoldDLT(), FoldBinary()])(scaf)
    assert [r["modified"] for r in records] == [False, True, False]
    assert records[1]["checks"]["equivalence"]["rel_error"] <= TOL
    assert isinstance(folded.gm.get_submodule("stages.0.0.conv1"), LowBitConv2d)
    assert type(folded.gm.get_submodule("classifier")) is nn.Linear
    # fp32 export of the LowBit graph (codes and the float ops that dequantize them), verified in onnxruntime
    fp32 = {"weights": "fp32"} if "weights" in inspect.signature(export).parameters else {}
    _, record = export(folded, **fp32)
    assert record["checks"]["ort_parity"]["passed"]


def test_bert_linear_binary_keeps_classifier(base):
    res = BinaryScaffold()(base("bert"))
    gm = res.model.gm
    assert type(gm.get_submodule("classifier")) is nn.Linear
    # the first Linear reads the embeddings, not the model input: quantized like every encoder Linear
    assert isinstance(gm.get_submodule("encoder.layer.0.attention.self.query"), BinaryLayer)
    assert isinstance(gm.get_submodule("pooler.dense"), BinaryLayer)
    low = FoldBinary()(res.model).model.gm.get_submodule("pooler.dense")
    assert isinstance(low, LowBitLinear) and low.bits == 1
