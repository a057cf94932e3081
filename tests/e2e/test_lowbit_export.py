"""int2 export of ternary/binary layers: real 2-bit data in the file, exact weights, ORT parity, size, provenance."""
import json
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgec.core.errors import EdgecError
from edgec.core.graph import Model, set_submodule, trace
from edgec.core.spec import Dim, InputSpec, TensorSpec
from edgec.layers.lowbit import LowBitConv1d, LowBitConv2d, LowBitLinear, lowbit_layers, lowbit_like
from edgec.models.checkpoint import new_model
from edgec.onnx import int2 as lb
from edgec.onnx.export import PROVENANCE_KEY, export, ort_session, read_provenance

STRICT = {"session.qdq_matmulnbits_accuracy_level": "0"}


def fill(layer, g: torch.Generator):
    """Random codes (ternary or binary), positive scales, shifts and biases: a stand-in for a folded layer."""
    if layer.bits == 2:
        layer.codes.copy_(torch.randint(-1, 2, layer.codes.shape, generator=g).to(torch.int8))
    else:
        layer.codes.copy_((torch.randint(0, 2, layer.codes.shape, generator=g) * 2 - 1).to(torch.int8))
    fan = math.prod(layer.weight_shape[1:])
    layer.scale.copy_((torch.rand(layer.scale.shape, generator=g) + 0.1) / math.sqrt(fan))
    if layer.shift is not None:
        layer.shift.copy_(torch.randn(layer.shift.shape, generator=g) * 0.1 / math.sqrt(fan))
    if layer.bias is not None:
        layer.bias.data.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)
    return layer


class Tiny(nn.Module):
    """Every low-bit flavour: DLT conv2d (shift, groups that do not divide the fan-in), grouped conv1d, ternary
    activations into a per-channel ternary linear (2-D input: a Gemm), binary codes with a shift and binary
    activations into a 3-D linear (a MatMul), and a full-precision classifier."""

    def __init__(self):
        super().__init__()
        self.conv = LowBitConv2d(3, 8, 3, padding=1, group_size=8, shift=True)  # fan-in 27: groups of 8, 8, 8, 3
        self.conv1d = LowBitConv1d(8, 8, 3, padding=1, groups=2, group_size=0, bits=1)
        self.fc1 = LowBitLinear(8, 32, group_size=0, act="ternary")
        self.fc2 = LowBitLinear(32, 32, group_size=16, bits=1, shift=True, act="binary")
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.conv(x))  # (B, 8, H, W)
        h = self.conv1d(h.flatten(2))  # (B, 8, H*W)
        h = self.fc1(h.mean(-1))  # (B, 32)
        h = self.fc2(h.unsqueeze(1) * 2.0).squeeze(1)  # (B, 1, 32) → MatMul
        return self.head(h)


def tiny_model(seed=0) -> Model:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = Tiny().eval()
    for _, layer in lowbit_layers(module):
        fill(layer, g)
    spec = InputSpec((TensorSpec("x", (Dim("batch", 2, 3), 3, Dim("h", 8, 6, min=4, max=64), Dim("w", 8, 7, min=4, max=64))),))
    return Model(trace(module), "tiny-lowbit", {}, spec)


def ternary_bert(seed=0) -> Model:
    """The bert zoo model with every Linear ternary (per output channel) except the classifier; embeddings stay fp32."""
    model = new_model("bert", seed=seed)
    g = torch.Generator().manual_seed(seed)
    for name, mod in list(model.gm.named_modules()):
        if isinstance(mod, nn.Linear) and name != "classifier":
            layer = fill(lowbit_like(mod, group_size=0, bits=2, shift=False, act="none"), g)
            set_submodule(model.gm, name, layer)
    model.gm.recompile()
    return model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def tiny_dq(tiny):
    return export(tiny, forms="dq")


@pytest.fixture(scope="module")
def bert():
    return ternary_bert()


@pytest.fixture(scope="module")
def bert_export(bert):
    return export(bert)  # weights="auto", forms="auto"


def initializers(proto):
    return {t.name: t for t in proto.graph.initializer}


def readers(proto):
    out = {}
    for n in proto.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def assert_no_float_weights(proto, model):
    """Neither a low-bit layer's float32 weight (either layout) nor its int8 codes is left in the file."""
    weights = {}
    for _, m in lowbit_layers(model.gm):
        w = m.dequantized().detach().numpy()
        weights.setdefault(w.size, []).extend([w.reshape(-1), w.reshape(w.shape[0], -1).T.reshape(-1)])
    for t in proto.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8:
            raise AssertionError(f"{t.name}: int8 tensor (codes) remains")
        if t.data_type == onnx.TensorProto.FLOAT and math.prod(t.dims) in weights:
            value = onnx.numpy_helper.to_array(t).reshape(-1)
            assert not any(np.array_equal(value, w) for w in weights[value.size]), f"{t.name}: float weight remains"


def test_int2_initializer_for_every_lowbit_layer(tiny, tiny_dq):
    data, record = tiny_dq
    proto = onnx.load_from_string(data)
    assert {o.domain: o.version for o in proto.opset_import}[""] >= 25 and proto.ir_version >= 13
    inits, uses = initializers(proto), readers(proto)
    for name, layer in lowbit_layers(tiny.gm):
        t = inits[f"{name}.weight_int2"]
        assert t.data_type == onnx.TensorProto.INT2
        assert len(t.raw_data) == math.ceil(math.prod(t.dims) / 4)  # 4 codes a byte
        assert [n.op_type for n in uses[t.name]] == ["DequantizeLinear"]
        codes = onnx.numpy_helper.to_array(t).astype(np.int8)
        allowed = {-1, 0, 1} if layer.bits == 2 else {-1, 1}
        assert set(np.unique(codes).tolist()) <= allowed
    assert_no_float_weights(proto, tiny)
    assert all(r["form"] == "dq" and r["weight_max_abs_error"] == 0.0 for r in record["lowbit"]["layers"])
    assert {r["layer"] for r in record["lowbit"]["layers"]} == {n for n, _ in lowbit_layers(tiny.gm)}
    # the head stays fp32 and is listed as such
    assert [r["layer"] for r in record["lowbit"]["fp32_layers"]] == ["head"]


def test_dq_weights_equal_torch_weights_exactly(tiny, tiny_dq):
    """Evaluate each DequantizeLinear (+ shift) subgraph with onnx's reference evaluator: bit-identical weights."""
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load_from_string(tiny_dq[0])
    uses = readers(proto)
    for name, layer in lowbit_layers(tiny.gm):
        # follow the DQ output through the shift/reshape nodes to the consumer's weight input
        value = uses[f"{name}.weight_int2"][0].output[0]
        while uses[value][0].op_type not in ("Conv", "MatMul", "Gemm"):
            value = uses[value][0].output[0]
        m = onnx.helper.make_model(
            onnx.helper.make_graph(list(proto.graph.node), "g", list(proto.graph.input),
                                   [onnx.helper.make_value_info(value, onnx.TypeProto())], list(proto.graph.initializer)),
            opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
        x = tiny.spec.sample(seed=0)[0].numpy()
        got = ReferenceEvaluator(m).run(None, {"x": x})[0]
        want = layer.dequantized().detach().numpy()
        consumer = uses[value][0]
        if consumer.op_type == "MatMul":
            want = want.T
        np.testing.assert_array_equal(got, want)


def test_parity_two_shapes_and_strict_config(tiny, tiny_dq):
    data, record = tiny_dq
    check = record["checks"]["ort_parity"]
    assert check["passed"] and check["session_config"] == STRICT
    par = check["parity"]
    assert par["traced_shape"]["rel_error"] < 1e-4 and par["alt_shape"]["rel_error"] < 1e-4
    assert par["traced_shape"]["shape"] != par["alt_shape"]["shape"]
    info = record["checks"]["ort_parity_default_session"]
    assert info["informational"] and info["rel_error"] >= 0.0
    # independently: a third shape through ORT with the strict config
    session = ort_session(data, **STRICT)
    x = tiny.spec.sample(seed=5, batch=1)[0]
    got = session.run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), tiny.run((x,))[0], rtol=1e-4, atol=1e-4)


def test_activation_quantizers_are_exact_standard_ops():
    """Identity ternary weights turn each layer into its activation quantizer: ORT must match torch bit for bit,
    including inputs exactly on the thresholds (±0.5 for ternary, 0 for binary)."""

    class Acts(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = LowBitLinear(16, 16, bias=False, act="ternary")
            self.b = LowBitLinear(16, 16, bias=False, act="binary")
            for layer in (self.t, self.b):
                layer.codes.copy_(torch.eye(16, dtype=torch.int8))

        def forward(self, x):
            return self.t(x), self.b(x)

    spec = InputSpec((TensorSpec("x", (Dim("batch", 2, 3), 16)),), outputs=("t", "b"))
    model = Model(trace(Acts().eval()), "acts", {}, spec)
    for forms in ("dq", "matmulnbits"):
        data, _ = export(model, forms=forms)
        proto = onnx.load_from_string(data)
        ops = {n.op_type for n in proto.graph.node}
        assert "Sign" in ops and "Clip" not in ops  # eval-mode forward, no straight-through branch
        x = torch.tensor([[-1.0, -0.5, -0.49, -0.0, 0.0, 0.49, 0.5, 0.51, 2.0, -2.0, 1e-8, -1e-8, 0.25, -0.75, 3.0, -0.5]] * 2)
        for config in (STRICT, {}):
            t, b = ort_session(data, **config).run(None, {"x": x.numpy()})
            rt, rb = model.run((x,))
            np.testing.assert_array_equal(t, rt.numpy())
            np.testing.assert_array_equal(b, rb.numpy())


def test_forms_forced_and_recorded(tiny):
    data, record = export(tiny, forms="matmulnbits")
    proto = onnx.load_from_string(data)
    layers = {r["layer"]: r for r in record["lowbit"]["layers"]}
    assert layers["fc1"]["form"] == layers["fc2"]["form"] == "matmulnbits"
    assert layers["fc1"]["consumer"] == "Gemm" and layers["fc2"]["consumer"] == "MatMul"
    assert layers["conv"]["form"] == layers["conv1d"]["form"] == "cast"
    assert "not applicable" in layers["conv"]["chosen_by"]
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all(n.domain == lb.MS_DOMAIN for n in nbits)
    for n in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["bits"] == 2 and attrs["accuracy_level"] == 0
        b = initializers(proto)[n.input[1]]
        assert b.data_type == onnx.TensorProto.UINT8 and math.prod(b.dims) * 4 >= attrs["N"] * attrs["K"]
    assert_no_float_weights(proto, tiny)
    # a shifted layer through float zero points is not bit-exact, but within a few ulps of the weight
    assert layers["fc2"]["weight_max_abs_error"] < 1e-6
    assert record["checks"]["ort_parity"]["passed"]


def test_bert_size_parity_and_measured_choice(bert, bert_export):
    data, record = bert_export
    assert record["params"]["weights"] == "int2" and record["params"]["opset"] == 25
    report = record["lowbit"]
    names = {n for n, _ in lowbit_layers(bert.gm)}
    assert {r["layer"] for r in report["layers"]} == names and len(names) == 13
    for r in report["layers"]:  # every layer chose by measuring its candidates; timings returned, not embedded
        assert r["form"] in lb.FORMS and r["chosen_by"].startswith("measured")
        times = record["measurements"][r["layer"]]
        assert times["cast"] > 0 and times["matmulnbits"] > 0 and times["fp32 (reference)"] > 0
        assert "dq" not in times  # fp32 activations: a default session would fuse DQ -> MatMul to int8
    # size: 2-bit payload is 1/16 of float32; with scales (and zero points) still <= 0.10 of the ternarised layers
    w = report["weights"]
    assert w["int2_bytes"] * 16 == w["fp32_bytes"]
    assert w["ratio"] <= 0.10
    size = record["size"]
    assert size["file_bytes"] == len(data)
    assert size["fp32_equivalent_file_bytes"] == len(data) - w["int2_bytes"] - w["aux_bytes"] + w["fp32_bytes"]
    assert size["file_ratio"] < 0.4  # embeddings (~145k params) stay fp32 and dominate what is left
    fp32 = {r["layer"]: r["type"] for r in report["fp32_layers"]}
    assert fp32["embeddings.word_embeddings"] == "Embedding" and fp32["classifier"] == "Linear"
    # the packed codes in the file account for the whole payload
    proto = onnx.load_from_string(data)
    packed = [t for t in proto.graph.initializer if t.name.endswith((".weight_int2", ".weight_nbits"))]
    assert sum(len(t.raw_data) for t in packed) == w["int2_bytes"]
    assert_no_float_weights(proto, bert)
    # parity at the traced and the alternative shape, in a default session (what the file targets)
    check = record["checks"]["ort_parity"]
    assert check["passed"] and check["session_config"] == {}
    assert all(check["parity"][k]["rel_error"] < 1e-4 for k in ("traced_shape", "alt_shape"))


def test_provenance_in_metadata_records_each_choice(bert, bert_export):
    data, record = bert_export
    proto = onnx.load_from_string(data)
    assert [p.key for p in proto.metadata_props] == [PROVENANCE_KEY]
    prov = read_provenance(proto)
    last = prov["passes"][-1]
    assert last["pass"] == "export.onnx" and "measurements" not in last and "size" not in last
    embedded = {r["layer"]: (r["form"], r["onnx"], r["chosen_by"]) for r in last["lowbit"]["layers"]}
    assert embedded == {r["layer"]: (r["form"], r["onnx"], r["chosen_by"]) for r in record["lowbit"]["layers"]}
    assert last["checks"]["ort_parity"]["session_config"] == {}  # verified in the default session it targets
    assert "ort_parity_default_session" not in last["checks"]
    assert last["params"]["forms"] == "auto" and last["params"]["activation_precision"] == "fp32"
    assert last["params"]["target_config"] == "default"
    assert json.loads(json.dumps(last)) == last


def test_export_twice_is_byte_identical(tiny):
    for forms in ("cast", "matmulnbits"):  # forms=auto follows measurements (docs/methods.md#int2-export)
        a, _ = export(tiny, forms=forms)
        b, _ = export(tiny_model(), forms=forms)  # a fresh, equal model: same checkpoint → same bytes
        assert a == b


def test_fp32_weights_still_work(tiny):
    data, record = export(tiny, weights="fp32")
    proto = onnx.load_from_string(data)
    assert record["params"] == {"opset": 20, "weights": "fp32"}
    assert not any(t.data_type == onnx.TensorProto.INT2 for t in proto.graph.initializer)
    assert "lowbit" not in record and record["checks"]["ort_parity"]["passed"]
    assert {o.domain: o.version for o in proto.opset_import}[""] == 20


def test_weight_mode_errors():
    plain = new_model("resnet", {"base_width": 8}, seed=0)
    with pytest.raises(EdgecError, match="needs a model with low-bit.*has none"):
        export(plain, weights="int2")
    with pytest.raises(EdgecError, match="weights must be one of"):
        export(plain, weights="int4")
    assert lb.resolve_weights(plain, "auto") == "fp32"
    tiny = tiny_model()
    with pytest.raises(EdgecError, match="opset >= 25"):
        export(tiny, weights="int2", opset=20)
    with pytest.raises(EdgecError, match="forms must be one of"):
        export(tiny, forms="fastest")
    assert lb.resolve_opset("int2", 20, 20, "auto") == ("fp32", 20)
