"""Choose each low-bit layer's ONNX form (``dq`` or ``matmulnbits``) by timing it alone in onnxruntime.

Each applicable form of a layer is built as a one-layer model at the layer's example input shape and timed with
``edgec.onnx.session`` (cached per shape in-process); ``dq`` (standard ops) is kept unless ``matmulnbits`` is
faster by more than ``PREFER_STANDARD_MARGIN``. See docs/methods.md#int2-export.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import onnxruntime

from edgec.onnx.emit import (
    LOWBIT_IR_VERSION,
    LOWBIT_OPSET,
    MS_DOMAIN,
    Emitter,
    Site,
    emit,
    expected_weight,
    mnb_applicable,
)
from edgec.onnx.session import measure_onnx

STRICT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
PREFER_STANDARD_MARGIN = 0.10
_TIMING = {"warmup": 3, "repeats": 10, "min_seconds": 0.05}
_timing_cache: dict = {}


def _layer_model(site: Site, form: str):
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
        out, _, _, keep = emit(e, site, form, x, rest)
        if keep:
            out = e.node(node.op_type, [x, out, *rest], "y", attrs)
    out.type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [out], nodes=e.nodes, initializers=e.initializers,
                     opset_imports={"": LOWBIT_OPSET, MS_DOMAIN: 1}, name="layer")
    return ir.to_proto(ir.Model(graph, ir_version=LOWBIT_IR_VERSION)).SerializeToString()


def _timing_shape(site: Site) -> tuple:
    """The layer's input at the example batch, as the consumer sees it (Gemm takes 2-D)."""
    shape = tuple(site.layer.input_shape)
    if site.role == "Gemm" and len(shape) != 2:
        shape = (math.prod(shape[:-1]), shape[-1])
    return shape


def _time_key(site: Site, form: str, threads: int, config: dict) -> tuple:
    layer, node = site.layer, site.node
    attrs = tuple(sorted((a.name, str(a.value)) for a in node.attributes.values()))
    return (form, site.role, attrs, layer.input_shape, layer.weight_shape, layer.group_size, layer.shift is not None,
            len(node.inputs), threads, tuple(sorted(config.items())))


def _time(site: Site, form: str, threads: int, config: dict) -> float:
    key = _time_key(site, form, threads, config) + (onnxruntime.__version__,)
    if key not in _timing_cache:
        x = np.random.default_rng(0).standard_normal(_timing_shape(site)).astype(np.float32)
        r = measure_onnx(_layer_model(site, form), {"x": x}, threads=threads, config=config, **_TIMING)
        _timing_cache[key] = round(r["median_ms"], 4)
    return _timing_cache[key]


def choose(site: Site, forms: str, threads: int) -> tuple[str, str, dict]:
    """(form, reason, timings in ms) for one site; ``forms`` is "measure", "dq" or "matmulnbits"."""
    why_not = mnb_applicable(site)
    applicable = ["dq"] if why_not else ["dq", "matmulnbits"]
    timings = {}
    if forms == "measure":
        for f in applicable:
            timings[f] = _time(site, f, threads, STRICT_SESSION_CONFIG)
        timings["fp32 (reference)"] = _time(site, "fp32", threads, {})
        if site.role != "Conv" and site.layer.shift is None:
            timings["dq (default session, int8 activations)"] = _time(site, "dq", threads, {})
    if forms == "dq":
        return "dq", "forced (forms='dq')", timings
    if forms == "matmulnbits":
        return ("dq", f"forced matmulnbits not applicable: {why_not}", timings) if why_not else \
            ("matmulnbits", "forced (forms='matmulnbits')", timings)
    if why_not:
        return "dq", f"only applicable form (matmulnbits: {why_not})", timings
    if timings["matmulnbits"] < (1.0 - PREFER_STANDARD_MARGIN) * timings["dq"]:
        return "matmulnbits", "measured: matmulnbits more than 10% faster than dq", timings
    return "dq", "measured: dq (standard ops) within 10% of or faster than matmulnbits", timings
