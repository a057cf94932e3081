"""capture(): stock transformer layers rewritten and traced, nanoGPT-style code traced with shapes, errors that
name the user's line, the input module untouched, ONNX export parity."""
from __future__ import annotations

import copy
import math
import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgec.core.errors import EdgecError
from edgec.core.graph import Model
from edgec.core.spec import Dim, InputSpec, TensorSpec
from edgec.models.capture import capture
from edgec.onnx.export import export
from edgec.passes.hrf import find_ffns

D, HEADS, FFN, VOCAB, BLOCK = 16, 4, 32, 50, 32

warnings.filterwarnings("ignore", message="enable_nested_tensor is True")


# ----- user models (plain torch, no edgec) ----------------------------------------------------------------------


class Classifier(nn.Module):
    """Keyword-spotter shape: features -> linear -> stock TransformerEncoder -> mean pool -> logits."""

    def __init__(self, batch_first=True, norm_first=False, layers=2, activation="relu"):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(8, D)
        layer = nn.TransformerEncoderLayer(D, HEADS, FFN, dropout=0.1, batch_first=batch_first,
                                           norm_first=norm_first, activation=activation)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(D))
        self.head = nn.Linear(D, 5)

    def forward(self, x, pad=None):
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=pad)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(dim=1))


class PaddedClassifier(Classifier):
    """Same, with a key padding mask that is an input (bool, True = padding)."""

    def forward(self, x, pad):
        return super().forward(x, pad)


class PerPosition(Classifier):
    """Per-position encoder output (no pooling), so padded positions are visible."""

    def forward(self, x, pad):
        return self.encoder(self.inp(x), src_key_padding_mask=pad)


class Seq2Seq(nn.Module):
    """A stock TransformerDecoder over a causal float mask and a memory, plus a bare MultiheadAttention."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerDecoderLayer(D, HEADS, FFN, dropout=0.1, batch_first=True, activation="gelu")
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.pool = nn.MultiheadAttention(D, HEADS, batch_first=False)

    def forward(self, tgt, memory):
        t = tgt.size(1)
        causal = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        h = self.decoder(tgt, memory, tgt_mask=causal)
        out, weights = self.pool(h.transpose(0, 1), memory.transpose(0, 1), memory.transpose(0, 1))
        return out.transpose(0, 1), weights


class Blocks(nn.Module):
    """Stock layers held in a ModuleList and a Sequential, MHA with separate q/k/v sizes and bool masks."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(D, HEADS, FFN, batch_first=True, bias=False,
                                                                activation=nn.GELU())])
        self.seq = nn.Sequential(nn.TransformerEncoderLayer(D, HEADS, FFN, batch_first=False, norm_first=True))
        self.cross = nn.MultiheadAttention(D, 2, kdim=8, vdim=12, batch_first=True)

    def forward(self, x, k, v):
        t = x.size(1)
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        h = self.layers[0](x, src_mask=mask, is_causal=True)
        h = self.seq(h.transpose(0, 1)).transpose(0, 1)
        out, per_head = self.cross(h, k, v, average_attn_weights=False)
        return out, per_head


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)
        self.n_head = HEADS
        self.register_buffer("bias", torch.tril(torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(D, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.wpe = nn.Embedding(BLOCK, D)
        self.ln = nn.LayerNorm(D)
        self.attn = CausalSelfAttention()
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        assert t <= BLOCK, f"Cannot forward sequence of length {t}, block size is only {BLOCK}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)
        x = self.wte(idx) + self.wpe(pos)
        x = x + self.attn(self.ln(x))
        x = x + self.mlp(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


class StaticSizes(nn.Module):
    """Python numbers from static sizes are fine (same at both shapes); dynamic ones stay graph nodes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        assert len(x.shape) == 3
        width = int(x.size(-1))
        batch, *rest = x.shape
        h = self.lin(x).reshape(batch, -1) / math.sqrt(width)
        return h.view(batch, rest[0], width)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:  # data-dependent branch: the line the error must name
            h = -h
        return h


class PerStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        steps = [self.lin(x[:, i]) for i in range(x.size(1))]  # a Python loop over a dynamic axis
        return torch.stack(steps, dim=1)


# ----- helpers --------------------------------------------------------------------------------------------------

BATCH, TIME = Dim("batch", 2, 3), Dim("time", 7, 5)


def feature_spec(padded=False, batch_first=True):
    feats = TensorSpec("x", (BATCH, TIME, 8))
    inputs = (feats,)
    if padded:
        inputs += (TensorSpec("pad", (BATCH, TIME), dtype="bool"),)
    return InputSpec(inputs=inputs)


class PadSpec(InputSpec):
    """Sample padding masks right-padded (left aligned), as a tokenizer would: row i keeps T - i tokens."""

    def sample(self, seed=0, alt=False, batch=None):
        x = super().sample(seed, alt, batch)
        b, t = x[0].shape[:2]
        pad = torch.arange(t).unsqueeze(0) >= (t - torch.arange(b)).unsqueeze(1)
        return x[:1] + (pad,)


def gpt_spec():
    return InputSpec(inputs=(TensorSpec("idx", (Dim("batch", 2, 3), Dim("seq", 11, 7)), dtype="int64",
                                        high=VOCAB),))


def outputs(module, inputs):
    """Eval mode without autograd, as deployment runs it (and as the stock encoder's fast path requires)."""
    with torch.no_grad():
        out = copy.deepcopy(module).eval()(*inputs)
    return out if isinstance(out, tuple) else (out,)


def assert_close(a, b, tol=1e-5):
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert torch.allclose(x, y, atol=tol, rtol=tol), float((x - y).abs().max())


# ----- stock encoders -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_stock_encoder_rewritten_and_equal(batch_first, norm_first, padded):
    torch.manual_seed(0)
    cls = PaddedClassifier if padded else Classifier
    model = cls(batch_first, norm_first)
    spec = PadSpec(inputs=feature_spec(True).inputs) if padded else feature_spec()
    gm, record = capture(model, spec)
    assert record["method"] == "fx"
    assert [r["from"] for r in record["rewrites"]] == ["TransformerEncoder"] + [
        "TransformerEncoderLayer", "MultiheadAttention"] * 2
    assert record["rewrites"][1] == {"module": "encoder.layers.0", "from": "TransformerEncoderLayer",
                                     "to": "edgec.models.stock.EncoderLayer"}
    assert record["check"]["passed"] and record["check"]["rel_error"] <= 1e-4
    assert record["check"]["train_mode"]["passed"]
    assert not gm.training
    for alt in (False, True):
        inputs = spec.sample(seed=3, alt=alt)
        assert_close(outputs(model, inputs), outputs(gm, inputs))
    # Every linear is a graph node now, and HRF sees one FFN per layer.
    linears = {n.target for n in gm.graph.nodes if n.op == "call_module"
               and isinstance(gm.get_submodule(n.target), nn.Linear)}
    assert {f"encoder.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo" if p != "o"} < linears
    assert {f"encoder.layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")} < linears
    ffns = find_ffns(Model(gm, "test", {}, spec))
    assert sorted(f.names[0] for f in ffns) == ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]


def test_padding_positions_match_stock_fast_path():
    """The stock encoder zeroes padded positions in eval mode (nested tensors); the capture does the same."""
    torch.manual_seed(0)
    model = PerPosition()
    spec = PadSpec(inputs=feature_spec(True).inputs)
    gm, record = capture(model, spec)
    x, pad = spec.sample(seed=0)
    ref = outputs(model, (x, pad))[0]
    assert torch.allclose(ref[pad], model.encoder.norm.bias.expand(int(pad.sum()), D))  # LayerNorm(0) = bias
    assert_close(ref, outputs(gm, (x, pad))[0])
    gm.train()
    for m in gm.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        trained = gm(x, pad)  # training mode: no zeroing, as the stock encoder
    assert not torch.allclose(trained[pad], ref[pad])


def test_rewrite_keeps_names_weights_and_dropout():
    torch.manual_seed(0)
    model = Classifier(batch_first=False, norm_first=True)
    gm, record = capture(model, feature_spec())
    old, new = model.state_dict(), gm.state_dict()
    renamed = record["name_map"]
    assert renamed["encoder.layers.1.self_attn.in_proj_weight"] == [
        f"encoder.layers.1.self_attn.{p}_proj.weight" for p in "qkv"]
    assert set(renamed) == {f"encoder.layers.{i}.self_attn.in_proj_{w}" for i in range(2) for w in ("weight", "bias")}
    for name, tensor in old.items():
        if name in renamed:
            assert torch.equal(torch.cat([new[n] for n in renamed[name]]), tensor)
        else:
            assert torch.equal(new[name], tensor), name
    assert len(new) == len(old) + sum(len(v) - 1 for v in renamed.values())
    drops = {n: m.p for n, m in gm.named_modules() if isinstance(m, nn.Dropout)}
    assert drops["encoder.layers.0.dropout"] == drops["encoder.layers.0.self_attn.dropout"] == 0.1
    assert {"encoder.layers.1.dropout1", "encoder.layers.1.dropout2"} <= set(drops)


def test_decoder_and_bare_attention():
    torch.manual_seed(0)
    model = Seq2Seq()
    spec = InputSpec(inputs=(TensorSpec("tgt", (BATCH, TIME, D)), TensorSpec("memory", (BATCH, Dim("mem", 6, 9), D))),
                     outputs=("out", "weights"))
    gm, record = capture(model, spec)
    assert {r["from"] for r in record["rewrites"]} == {"TransformerDecoder", "TransformerDecoderLayer",
                                                       "MultiheadAttention"}
    assert record["name_map"]["pool.in_proj_weight"] == ["pool.q_proj.weight", "pool.k_proj.weight",
                                                         "pool.v_proj.weight"]
    for alt in (False, True):
        inputs = spec.sample(seed=1, alt=alt)
        ref = outputs(model, inputs)
        got = outputs(gm, inputs)
        assert_close(ref, got)
        assert got[1].shape == (inputs[0].shape[0], inputs[0].shape[1], inputs[1].shape[1])  # head-averaged
    ffns = find_ffns(Model(gm, "test", {}, spec))
    assert sorted(f.names[0] for f in ffns) == ["decoder.layers.0.linear1", "decoder.layers.1.linear1"]


def test_nested_containers_masks_and_separate_qkv():
    torch.manual_seed(0)
    model = Blocks()
    spec = InputSpec(inputs=(TensorSpec("x", (BATCH, TIME, D)), TensorSpec("k", (BATCH, Dim("s", 6, 4), 8)),
                             TensorSpec("v", (BATCH, Dim("s", 6, 4), 12))))
    gm, record = capture(model, spec)
    assert [r["module"] for r in record["rewrites"]] == ["cross", "layers.0", "layers.0.self_attn", "seq.0",
                                                         "seq.0.self_attn"]
    assert record["name_map"]["cross.k_proj_weight"] == ["cross.k_proj.weight"]
    assert "layers.0.self_attn.in_proj_bias" not in record["name_map"]  # bias=False
    assert gm.get_submodule("layers.0.self_attn.q_proj").bias is None
    for alt in (False, True):
        inputs = spec.sample(seed=2, alt=alt)
        assert_close(outputs(model, inputs), outputs(gm, inputs))


def test_refuses_bias_kv():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Identity(), nn.MultiheadAttention(D, 2, add_bias_kv=True))

        def forward(self, x):
            return self.body[1](x, x, x)[0]

    with pytest.raises(EdgecError, match=r"body\.1: nn\.MultiheadAttention with add_bias_kv=True"):
        capture(M(), InputSpec(inputs=(TensorSpec("x", (TIME, BATCH, D)),)))


def test_input_module_untouched():
    torch.manual_seed(0)
    model = PaddedClassifier(batch_first=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    capture(model, PadSpec(inputs=feature_spec(True).inputs))
    assert model.training
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


# ----- nanoGPT-style code: the shape-aware tracer ---------------------------------------------------------------


def test_nanogpt_captured_with_shapes():
    torch.manual_seed(0)
    model = GPT()
    spec = gpt_spec()
    gm, record = capture(model, spec)
    assert record["method"] == "fx-shapes"
    assert record["dropped_outputs"] == [1]
    assert record["rewrites"] == [] and record["check"]["passed"]
    # The causal-mask slice and the head reshape stay symbolic: no trace-time sequence length in the graph.
    slices = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "getitem"
              and n.args[0].op == "get_attr"]
    assert slices and all(isinstance(s.stop, torch.fx.Node) for n in slices for s in n.args[1][2:])
    for length in (11, 7, 20):
        idx = torch.randint(0, VOCAB, (2, length))
        out = outputs(gm, (idx,))[0]
        assert isinstance(out, torch.Tensor) and out.shape == (2, length, VOCAB)
        assert_close(outputs(model, (idx,))[0], out)


def test_static_sizes_become_numbers():
    spec = InputSpec(inputs=(TensorSpec("x", (BATCH, TIME, D)),))
    model = StaticSizes()
    gm, record = capture(model, spec)
    assert record["method"] == "fx-shapes" and record["dropped_outputs"] == []
    x = torch.randn(4, 9, D)
    assert_close(outputs(model, (x,)), outputs(gm, (x,)))


def test_untraceable_line_is_named():
    with pytest.raises(EdgecError) as err:
        capture(Untraceable(), InputSpec(inputs=(TensorSpec("x", (BATCH, D)),)), label="net")
    msg = str(err.value)
    line = Untraceable.forward.__code__.co_firstlineno + 2
    assert f"test_capture.py:{line}: `if h.sum() > 0:" in msg and msg.startswith("net: cannot capture")
    assert "tensor's values" in msg and "torch.where" in msg


def test_python_loop_over_dynamic_axis_is_named():
    with pytest.raises(EdgecError) as err:
        capture(PerStep(), InputSpec(inputs=(TensorSpec("x", (BATCH, TIME, D)),)))
    msg = str(err.value)
    line = PerStep.forward.__code__.co_firstlineno + 1
    assert f"test_capture.py:{line}:" in msg and "changes with the input shape (7 vs 5)" in msg
    assert "control flow" not in msg


# ----- ONNX (the nanoGPT export is in tests/e2e/test_user_models.py) ----------------------------------------


def _dynamic_dims(data: bytes) -> list:
    proto = onnx.load_from_string(data)
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]


def test_onnx_export_rewritten_encoder():
    torch.manual_seed(0)
    model = PaddedClassifier(batch_first=True, norm_first=False, layers=1)  # one layer: export is slow
    spec = PadSpec(inputs=feature_spec(True).inputs)
    gm, _ = capture(model, spec)
    data, record = export(Model(gm, "test", {}, spec))
    assert record["checks"]["ort_parity"]["passed"]
    dims = _dynamic_dims(data)
    assert all(isinstance(d, str) for d in dims[0][:2]) and dims[0][2] == 8
