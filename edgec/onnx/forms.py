"""Choose each low-bit layer's ONNX form (``cast``, ``dq`` or ``matmulnbits``) by timing it alone in onnxruntime.

Each form a layer can take is built as a one-layer model at the layer's example input shape; the forms and the
float32 layer are timed side by side (``edgec.onnx.session.measure_interleaved``) in the session the artifact
targets (a default session unless ``--target-config`` names another; cached per shape in-process). ``cast``
(standard ops; folded to float32 weights when the session loads) is kept unless another form is faster by more
than ``PREFER_STANDARD_MARGIN`` and ``MIN_GAIN_MS``. Forms whose result in that session would not honour the
activation precision are not candidates: under ``fp32``, ``dq`` on a MatMul/Gemm is fused by onnxruntime into
an int8-activation MatMulNBits. See docs/methods.md#int2-export.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import onnxruntime

from edgec.core.errors import EdgecError
from edgec.onnx.emit import (
    LOWBIT_IR_VERSION,
    LOWBIT_OPSET,
    MS_DOMAIN,
    Emitter,
    Site,
    dq_to_cast,
    emit,
    expected_weight,
    mnb_applicable,
)
from edgec.onnx.session import measure_interleaved

FORM_CHOICES = ("auto", "cast", "dq", "matmulnbits")
PRECISIONS = ("fp32", "int8")
PREFER_STANDARD_MARGIN = 0.10
MIN_GAIN_MS = 0.003  # and by this much: below it a one-layer timing is timer and dispatch noise
QDQ_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
TARGET_CONFIGS = {"default": {}, "disable_quant_qdq": {"session.disable_quant_qdq": "1"}}
_TIMING = {"warmup": 3, "repeats": 15, "min_seconds": 0.03}  # per form: interleaved rounds run them all
_timing_cache: dict = {}


def parse_target_config(value) -> tuple[str, dict]:
    """(label, onnxruntime session config entries) from None, a name in ``TARGET_CONFIGS``, a dict, or
    ``"key=value,key=value"``."""
    if value is None or value == "":
        return "default", {}
    if isinstance(value, dict):
        entries = {str(k): str(v) for k, v in value.items()}
    elif isinstance(value, str) and value.strip() in TARGET_CONFIGS:
        return value.strip(), dict(TARGET_CONFIGS[value.strip()])
    elif isinstance(value, str):
        entries = {}
        for part in value.split(","):
            key, sep, val = part.partition("=")
            if not sep or not key.strip() or not val.strip():
                raise EdgecError(f"target config: expected one of {', '.join(TARGET_CONFIGS)} or key=value[,key=value] "
                                 f"(onnxruntime session config entries), got {value!r}")
            entries[key.strip()] = val.strip()
    else:
        raise EdgecError(f"target config must be a string or a table, got {type(value).__name__}")
    for key in entries:
        if not key.startswith(("session.", "optimization.", "mlas.", "ep.")):
            raise EdgecError(f"target config: {key!r} is not an onnxruntime session config key "
                             f"(they start with session., optimization., mlas. or ep.)")
    label = next((n for n, c in TARGET_CONFIGS.items() if c == entries), None)
    return label or ",".join(f"{k}={v}" for k, v in sorted(entries.items())), entries


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise EdgecError(f"activation precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def dq_fused_int8(config: dict) -> bool:
    """Whether onnxruntime fuses DQ -> MatMul into an int8-activation MatMulNBits in this session config."""
    return config.get("session.disable_quant_qdq") != "1" and config.get(QDQ_ACCURACY_KEY, "4") != "0"


def int8_activation_layers(layers: list[dict], config: dict) -> int:
    """How many of an export's low-bit layers (its report rows) run with int8 activations in a session with
    ``config``: MatMulNBits at accuracy level 4, and DQ -> MatMul where onnxruntime fuses it that way."""
    return sum(1 for r in layers if (r["form"] == "matmulnbits" and "accuracy_level=4" in r["onnx"])
               or (r["form"] == "dq" and r["consumer"] != "Conv" and dq_fused_int8(config)))


def _layer_model(site: Site, form: str, precision: str):
    """A one-layer ONNX model (input x at the layer's example shape) in ``form`` ("fp32" = float weights)."""
    layer, node = site.layer, site.node
    x = ir.Value(name="x", shape=ir.Shape(_timing_shape(site)), type=ir.TensorType(ir.DataType.FLOAT))
    e = Emitter({"x"})
    rest = []
    for i, v in enumerate(node.inputs[2:]):
        if v is None:
            rest.append(None)
        elif v.const_value is not None:
            rest.append(e.init(f"rest{i}", np.asarray(v.const_value.numpy())))
        else:
            shape = [d if isinstance(d, int) else 1 for d in v.shape or (layer.out,)]
            rest.append(e.init(f"rest{i}", np.zeros(shape, np.float32)))
    attrs = {a.name: ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()}
    if form == "fp32":
        exp = expected_weight(layer, node)[1]
        w = e.init("w", np.ascontiguousarray(exp))
        out = e.node(node.op_type, [x, w, *rest], "y", attrs)
    else:
        out, _, _, keep = emit(e, site, form, x, rest, precision)
        if keep:
            out = e.node(node.op_type, [x, out, *rest], "y", attrs)
    out.type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [out], nodes=e.nodes, initializers=e.initializers,
                     opset_imports={"": LOWBIT_OPSET, MS_DOMAIN: 1}, name="layer")
    proto = ir.to_proto(ir.Model(graph, ir_version=LOWBIT_IR_VERSION))
    if form == "cast":
        dq_to_cast(proto, {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output})
    return proto.SerializeToString()


def _timing_shape(site: Site) -> tuple:
    """The layer's input at the example batch, as the consumer sees it (Gemm takes 2-D)."""
    shape = tuple(site.layer.input_shape)
    if site.role == "Gemm" and len(shape) != 2:
        shape = (math.prod(shape[:-1]), shape[-1])
    return shape


def _time_key(site: Site, form: str, precision: str, threads: int, config: dict) -> tuple:
    layer, node = site.layer, site.node
    attrs = tuple(sorted((a.name, str(a.value)) for a in node.attributes.values()))
    return (form, precision, site.role, attrs, layer.input_shape, layer.weight_shape, layer.group_size,
            layer.shift is not None, len(node.inputs), threads, tuple(sorted(config.items())))


def _times(site: Site, forms: list[str], precision: str, threads: int, config: dict) -> dict[str, float]:
    """Median ms of each form of this layer alone, timed side by side (interleaved runs: machine load falls
    on every form alike, so their ratios are stable); cached per layer shape and session."""
    key = _time_key(site, tuple(forms), precision, threads, config) + (onnxruntime.__version__,)
    if key not in _timing_cache:
        x = np.random.default_rng(0).standard_normal(_timing_shape(site)).astype(np.float32)
        runs = measure_interleaved([_layer_model(site, f, precision) for f in forms], {"x": x}, threads=threads,
                                   config=config, **_TIMING)
        _timing_cache[key] = {f: round(r["median_ms"], 4) for f, r in zip(forms, runs)}
    return _timing_cache[key]


def candidates(site: Site, precision: str, config: dict) -> tuple[list[str], dict]:
    """(forms ``auto`` may pick for this site, {form: why it is not a candidate})."""
    out, why_not = ["cast", "dq"], {}
    if site.role == "Conv":
        why_not["matmulnbits"] = "convolution (MatMulNBits is a matmul)"
    else:
        reason = mnb_applicable(site)
        if reason:
            why_not["matmulnbits"] = reason
        else:
            out.append("matmulnbits")
        if precision == "fp32" and dq_fused_int8(config):
            out.remove("dq")
            why_not["dq"] = "onnxruntime would fuse it into an int8-activation MatMulNBits (fp32 activations asked)"
    return out, why_not


def choose(site: Site, forms: str, threads: int, precision: str = "fp32", config: dict | None = None):
    """(form, reason, timings in ms) for one site; ``forms`` is one of ``FORM_CHOICES``."""
    config = config or {}
    if forms in ("cast", "dq"):
        return forms, f"forced (forms='{forms}')", {}
    if forms == "matmulnbits":
        why_not = "convolution (MatMulNBits is a matmul)" if site.role == "Conv" else mnb_applicable(site)
        return ("cast", f"forced matmulnbits not applicable: {why_not}", {}) if why_not else \
            ("matmulnbits", "forced (forms='matmulnbits')", {})
    forms_ok, why_not = candidates(site, precision, config)
    timings = dict(_times(site, [*forms_ok, "fp32"], precision, threads, config))
    timings["fp32 (reference)"] = timings.pop("fp32")
    others = [f for f in forms_ok if f != "cast"]
    best = min(others, key=lambda f: timings[f]) if others else None
    if best is not None and timings[best] < (1.0 - PREFER_STANDARD_MARGIN) * timings["cast"] \
            and timings["cast"] - timings[best] > MIN_GAIN_MS:
        return best, f"measured: {best} {timings['cast'] / timings[best]:.2f}x faster than cast", timings
    skipped = "; ".join(f"{f}: {r}" for f, r in why_not.items())
    return "cast", ("measured: cast (standard ops, float32 kernels after load) within "
                    f"{PREFER_STANDARD_MARGIN:.0%} (or {MIN_GAIN_MS * 1000:.0f} us) of or faster than " +
                    (", ".join(others) or "nothing else") +
                    (f" ({skipped})" if skipped else "")), timings
