"""The three ONNX forms of a low-bit layer (cast, dq, matmulnbits), forms=auto's choice and its whole-file check,
activation precision, target session configs, and both precisions scored on the task."""
import json

import numpy as np
import onnx
import pytest
import torch
from gate_helpers import run_main
from test_lowbit_export import fill, tiny_model
from torch import nn

from edgec.core.errors import EdgecError
from edgec.core.graph import Model, trace
from edgec.core.spec import Dim, InputSpec, TensorSpec
from edgec.layers.lowbit import LowBitConv2d, LowBitLinear, lowbit_layers
from edgec.onnx import export as ex
from edgec.onnx import forms as fm
from edgec.onnx.export import export, ort_session, read_provenance

STRICT_TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def _ops(proto_or_path) -> list[str]:
    proto = onnx.load(proto_or_path) if isinstance(proto_or_path, str) else proto_or_path
    return [n.op_type for n in proto.graph.node]


class ConvNet(nn.Module):
    """A ternary conv model (DLT: per-channel scale and shift) with a fp32 head."""

    def __init__(self):
        super().__init__()
        self.c1 = LowBitConv2d(3, 16, 3, padding=1, group_size=0, shift=True)
        self.c2 = LowBitConv2d(16, 16, 3, padding=1, group_size=0, shift=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def conv_model() -> Model:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = ConvNet().eval()
    for _, layer in lowbit_layers(module):
        fill(layer, g)
    spec = InputSpec((TensorSpec("x", (Dim("batch", 1, 2), 3, Dim("h", 16, 12, min=4, max=64),
                                       Dim("w", 16, 12, min=4, max=64))),))
    return Model(trace(module), "convnet", {}, spec)


class Shifted(nn.Module):
    """Linear layers with shifts per channel and per group (K whole groups), a MatMul and a Gemm."""

    def __init__(self):
        super().__init__()
        self.a = LowBitLinear(64, 64, group_size=0, shift=True)
        self.b = LowBitLinear(64, 32, group_size=16, shift=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))).mean(1))


def shifted_model() -> Model:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    module = Shifted().eval()
    for _, layer in lowbit_layers(module):
        fill(layer, g)
    spec = InputSpec((TensorSpec("x", (Dim("batch", 1, 2), Dim("t", 8, 5, min=1, max=64), 64)),))
    return Model(trace(module), "shifted", {}, spec)


def test_default_conv_export_is_int2_in_the_file_and_has_no_dq_after_onnxruntime_loads_it(tmp_path):
    model = conv_model()
    data, record = export(model)  # weights auto, forms auto, default session
    proto = onnx.load_from_string(data)
    layers = {r["layer"]: r for r in record["lowbit"]["layers"]}
    assert {r["form"] for r in layers.values()} == {"cast"}
    inits = {t.name: t for t in proto.graph.initializer}
    uses = {}
    for n in proto.graph.node:
        for i in n.input:
            uses.setdefault(i, []).append(n.op_type)
    for name in layers:  # the weights are stored as INT2 and read by a Cast (no DequantizeLinear in the file)
        t = inits[f"{name}.weight_int2"]
        assert t.data_type == onnx.TensorProto.INT2 and uses[t.name] == ["Cast"]
    assert "DequantizeLinear" not in _ops(proto)
    optimized = str(tmp_path / "optimized.onnx")
    opts = __import__("onnxruntime").SessionOptions()
    opts.optimized_model_filepath = optimized
    __import__("onnxruntime").InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    after = onnx.load(optimized)
    assert "DequantizeLinear" not in _ops(after) and "Cast" not in _ops(after)  # folded at load
    assert not any(t.data_type == onnx.TensorProto.INT2 for t in after.graph.initializer)
    check = record["checks"]["ort_parity"]
    assert check["session_config"] == {} and check["rel_error"] <= STRICT_TOL
    assert record["lowbit"]["whole_model"]["checked"] is False  # cast only: the fp32 graph once folded
    assert record["params"]["target_config"] == "default"


def test_cast_weights_equal_torch_weights_exactly(tiny):
    """The Cast -> Mul (+ block reshapes, ragged-block padding and slice, + shift) subgraphs, evaluated by onnx's
    reference evaluator, reproduce torch's dequantized weights bit for bit."""
    from onnx.reference import ReferenceEvaluator

    data, record = export(tiny, forms="cast")
    proto = onnx.load_from_string(data)
    uses = {}
    for n in proto.graph.node:
        for i in n.input:
            uses.setdefault(i, []).append(n)
    inits = {t.name for t in proto.graph.initializer}
    for name, layer in lowbit_layers(tiny.gm):
        codes = next(i for i in (f"{name}.weight_int2.padded", f"{name}.weight_int2") if i in inits)
        value = uses[codes][0].output[0]
        while uses[value][0].op_type not in ("Conv", "MatMul", "Gemm"):
            value = uses[value][0].output[0]
        m = onnx.helper.make_model(
            onnx.helper.make_graph(list(proto.graph.node), "g", list(proto.graph.input),
                                   [onnx.helper.make_value_info(value, onnx.TypeProto())],
                                   list(proto.graph.initializer)),
            opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
        got = ReferenceEvaluator(m).run(None, {"x": tiny.spec.sample(seed=0)[0].numpy()})[0]
        want = layer.dequantized().detach().numpy()
        if uses[value][0].op_type == "MatMul":
            want = want.T
        np.testing.assert_array_equal(got, want)
    assert record["checks"]["ort_parity"]["rel_error"] <= STRICT_TOL


@pytest.mark.parametrize("forms", ["cast", "dq", "matmulnbits"])
def test_each_form_matches_torch_at_the_strict_tolerance_with_fp32_activations(forms):
    model = shifted_model()
    data, record = export(model, forms=forms)
    check = record["checks"]["ort_parity"]
    assert check["passed"] and check["rel_error"] <= STRICT_TOL
    assert record["lowbit"]["int8_activation_layers"] == 0
    if forms == "dq":  # DQ -> MatMul is verified as fp32: onnxruntime's fusion pinned to accuracy level 0
        assert check["session_config"] == {fm.QDQ_ACCURACY_KEY: "0"} and "int8 activations" in check["note"]
    # a third input, directly
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(3))
    got = ort_session(data, **check["session_config"]).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model.run((x,))[0], rtol=1e-4, atol=1e-4)


def test_int8_activations_set_accuracy_level_4_with_a_symmetric_weight_and_a_shift_term():
    model = shifted_model()
    data, record = export(model, forms="matmulnbits", activation_precision="int8")
    proto = onnx.load_from_string(data)
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2
    for n in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["accuracy_level"] == 4 and attrs["bits"] == 2
        assert len(n.input) < 4 or n.input[3] == ""  # no zero points: the layout the int8 kernels need
    layers = {r["layer"]: r for r in record["lowbit"]["layers"]}
    assert all("Add(shift term)" in layers[k]["onnx"] and "symmetric" in layers[k]["onnx"] for k in ("a", "b"))
    assert all(layers[k]["weight_max_abs_error"] < 1e-6 for k in ("a", "b"))  # weight + shift term = torch's
    assert record["lowbit"]["int8_activation_layers"] == 2
    check = record["checks"]["ort_parity"]
    assert check["tolerance"] == ex.INT8_TOLERANCE and check["passed"]
    assert read_provenance(proto)["passes"][-1]["params"]["activation_precision"] == "int8"


def test_target_config_is_parsed_used_and_recorded(tiny):
    assert fm.parse_target_config(None) == ("default", {})
    assert fm.parse_target_config("disable_quant_qdq") == ("disable_quant_qdq", {"session.disable_quant_qdq": "1"})
    assert fm.parse_target_config("session.disable_quant_qdq=1") == (
        "disable_quant_qdq", {"session.disable_quant_qdq": "1"})
    assert fm.parse_target_config("session.intra_op.allow_spinning=0,session.disable_quant_qdq=1")[0] == \
        "session.disable_quant_qdq=1,session.intra_op.allow_spinning=0"
    for bad, message in [("fast", "expected one of default, disable_quant_qdq"), ("color=red", "not an onnxruntime"),
                         ("session.x=", "expected one of")]:
        with pytest.raises(EdgecError, match=message):
            fm.parse_target_config(bad)
    data, record = export(tiny, forms="dq", target_config="disable_quant_qdq")
    check = record["checks"]["ort_parity"]
    assert check["session_config"] == {"session.disable_quant_qdq": "1"} and check["rel_error"] <= STRICT_TOL
    assert "note" not in check  # no fusion in that session: dq Linear layers stay fp32
    assert record["checks"]["ort_parity_default_session"]["informational"]
    params = read_provenance(onnx.load_from_string(data))["passes"][-1]["params"]
    assert params["target_config"] == "disable_quant_qdq"
    assert params["session_config"] == {"session.disable_quant_qdq": "1"}
    with pytest.raises(EdgecError, match="activation precision must be one of"):
        export(tiny, activation_precision="int4")


def test_auto_falls_back_to_cast_while_the_whole_file_is_slower_than_fp32(monkeypatch):
    """A choice that is fast alone but slow in the whole file: half the layers go back to cast, then all."""
    model = shifted_model()
    monkeypatch.setattr("edgec.onnx.int2.choose", lambda site, *a, **k: (
        "matmulnbits", "measured (test)", {"matmulnbits": 1.0 if site.layer.name == "a" else 0.5,
                                           "fp32 (reference)": 2.0, "cast": 2.0}))
    calls = []

    def slow(models, feed, **kw):
        calls.append(kw.get("config"))
        return [{"median_ms": 2.0}, {"median_ms": 1.0}]  # the candidate always measures 2x fp32

    monkeypatch.setattr("edgec.onnx.export.measure_interleaved", slow)
    data, record = export(model, activation_precision="int8")
    whole = record["lowbit"]["whole_model"]
    assert whole["checked"] and whole["fallback_rounds"] == 2 and not whole["passed"]
    assert whole["cast_fallbacks"] == ["a", "b"]
    layers = {r["layer"]: r for r in record["lowbit"]["layers"]}
    assert {r["form"] for r in layers.values()} == {"cast"}
    assert layers["a"]["chosen_by"].startswith("fallback round 1")  # least gain alone (2x) goes first
    assert layers["b"]["chosen_by"].startswith("fallback round 2")
    assert [r["cast_layers"] for r in record["measurements"]["whole_model"]] == [[], ["a"], ["a", "b"]]
    assert len(calls) == 3 and "MatMulNBits" not in _ops(onnx.load_from_string(data))


def test_auto_keeps_a_faster_form_when_the_whole_file_is_within_noise(monkeypatch):
    model = shifted_model()
    monkeypatch.setattr("edgec.onnx.int2.choose", lambda site, *a, **k: (
        "matmulnbits", "measured (test)", {"matmulnbits": 0.5, "fp32 (reference)": 1.0, "cast": 1.0}))
    monkeypatch.setattr("edgec.onnx.export.measure_interleaved",
                        lambda models, feed, **kw: [{"median_ms": 1.02}, {"median_ms": 1.0}])
    _, record = export(model, activation_precision="int8")
    whole = record["lowbit"]["whole_model"]
    assert whole["passed"] and whole["fallback_rounds"] == 0 and whole["cast_fallbacks"] == []
    assert {r["form"] for r in record["lowbit"]["layers"]} == {"matmulnbits"}


def test_candidates_honour_the_activation_precision(tiny):
    from edgec.onnx.int2 import _collect, _locate

    program = torch.onnx.export(tiny.clone().gm.eval(), tiny.spec.sample(seed=0), dynamo=True, opset_version=25,
                                optimize=False, verbose=False)
    sites = _locate(program.model.graph, _collect(tiny), 25)
    by_role = {s.role: s for s in sites}
    assert fm.candidates(by_role["Conv"], "fp32", {})[0] == ["cast", "dq"]
    forms, why = fm.candidates(by_role["MatMul"], "fp32", {})
    assert forms == ["cast", "matmulnbits"] and "int8-activation" in why["dq"]
    assert fm.candidates(by_role["MatMul"], "int8", {})[0] == ["cast", "dq", "matmulnbits"]
    assert "dq" in fm.candidates(by_role["MatMul"], "fp32", {"session.disable_quant_qdq": "1"})[0]


def _int8_project(folder):
    """A ternary MLP and data whose targets are its own predictions."""
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    module = nn.Sequential(LowBitLinear(32, 128, group_size=0), nn.ReLU(), LowBitLinear(128, 128, group_size=0),
                           nn.ReLU(), nn.Linear(128, 4)).eval()
    for _, layer in lowbit_layers(module):
        fill(layer, g)
    x = torch.randn(80, 32, generator=g) * 3
    with torch.no_grad():
        y = module(x).argmax(1)
    torch.save({"inputs": x[:40], "targets": y[:40], "test_inputs": x[40:], "test_targets": y[40:]}, folder / "d.pt")
    spec = InputSpec((TensorSpec("x", (Dim("batch", 1, 3), 32)),), task="classification")
    return Model(trace(module), "mlp", {}, spec)


def test_with_data_both_activation_precisions_are_scored_on_the_task(tmp_path):
    from edgec.app.python_api import export as api_export

    model = _int8_project(tmp_path)
    res = api_export(model, tmp_path / "m.onnx", data=str(tmp_path / "d.pt"), forms="matmulnbits",
                     activation_precision="int8")
    scores = res.activation_precisions
    assert scores["chosen"] == "int8" and set(scores["precisions"]) == {"int8", "fp32"}
    int8, fp32 = scores["precisions"]["int8"], scores["precisions"]["fp32"]
    assert int8["int8_activation_layers"] == 2 and fp32["int8_activation_layers"] == 0
    assert fp32["metrics"]["accuracy"] == 1.0  # exact: the targets are the model's own predictions
    assert 0.5 <= int8["metrics"]["accuracy"] <= 1.0 and int8["parity_rel_error"] > fp32["parity_rel_error"]
    assert res.forms["activation_precision"] == "int8" and res.forms["layers"] == {"matmulnbits": 2}
    card = (tmp_path / "m.card.md").read_text()  # the card says how the file runs and where it was verified
    assert "## Runtime" in card and "matmulnbits × 2" in card and "2 layer(s) with int8 activations" in card


def test_cli_forms_options_and_bad_values(tmp_path, monkeypatch, capsys):
    from edgec.app.python_api import fold, save, scaffold_ternary
    from edgec.models.checkpoint import new_model

    model, _ = fold(scaffold_ternary(new_model("resnet", {"base_width": 8}, seed=0), method="dlt")[0])
    save(model, tmp_path / "t.pt")
    n = len(lowbit_layers(model.gm))
    code, out, _ = run_main(monkeypatch, capsys, "export", tmp_path / "t.pt", "-o", tmp_path / "t.onnx",
                            "--forms", "cast", "--activation-precision", "int8", "--json")
    assert code == 0, out
    res = json.loads(out)
    assert res["forms"]["requested"] == "cast" and res["forms"]["layers"] == {"cast": n}
    assert res["forms"]["activation_precision"] == "int8" and res["forms"]["int8_activation_layers"] == 0
    code, out, err = run_main(monkeypatch, capsys, "export", tmp_path / "t.pt", "-o", tmp_path / "u.onnx",
                              "--activation-precision", "int4")
    assert code == 2 and "Traceback" not in out + err and "int4" in out + err
    code, out, err = run_main(monkeypatch, capsys, "export", tmp_path / "t.pt", "-o", tmp_path / "u.onnx",
                              "--target-config", "color=red")
    assert code == 2 and "not an onnxruntime session config key" in out + err and not (tmp_path / "u.onnx").exists()
