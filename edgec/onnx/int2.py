"""Low-bit weights as low-bit data: rewrite an exported ONNX graph so every ternary/binary layer stores 2 bits a weight.

Runs on the *unoptimized* export (the optimizer would fold small codes back into float32): each LowBit layer's
weight subgraph is located by value (evaluated with onnx's reference evaluator and compared with torch's
``dequantized()``), replaced by its ``cast``, ``dq`` or ``matmulnbits`` form (``edgec.onnx.emit``, chosen per
layer by ``edgec.onnx.forms``), and the new DQ weights are verified bit-exact (``cast`` is written as DQ until
the optimizer has run, then converted). See docs/methods.md#int2-export.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator
from onnx_ir.passes.common import RemoveUnusedNodesPass
from torch import nn

from edgec.core.errors import CheckFailed, EdgecError
from edgec.layers.lowbit import LowBitLinear, lowbit_layers
from edgec.onnx.emit import (
    CONSUMERS,
    FORMS,
    LOWBIT_IR_VERSION,
    LOWBIT_OPSET,
    MS_DOMAIN,
    Emitter,
    Layer,
    Site,
    emit,
    expected_weight,
)
from edgec.onnx.forms import FORM_CHOICES, MIN_GAIN_MS, PREFER_STANDARD_MARGIN, check_precision, choose

__all__ = ["FORMS", "FORM_CHOICES", "LOWBIT_IR_VERSION", "LOWBIT_OPSET", "MS_DOMAIN", "WEIGHT_MODES",
           "check_forms", "check_storage", "fp32_layers", "lowbit_layer_names", "lowbit_rewrite", "resolve_opset",
           "resolve_weights"]

WEIGHT_MODES = ("auto", "fp32", "int2")


# --------------------------------------------------------------------------------------------- modes


def lowbit_layer_names(model) -> list[str]:
    return [n for n, _ in lowbit_layers(model.gm)]


def resolve_weights(model, weights: str) -> str:
    """"auto" → "int2" when the graph has low-bit layers, else "fp32"; "int2" without any → EdgecError."""
    if weights not in WEIGHT_MODES:
        raise EdgecError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    has = bool(lowbit_layer_names(model))
    if weights == "auto":
        return "int2" if has else "fp32"
    if weights == "int2" and not has:
        raise EdgecError("--weights int2 needs a model with low-bit (ternary/binary) layers, and this one has none; "
                         "scaffold it with `edgec scaffold ternary|binary`, fine-tune and fold it first, "
                         "or export with --weights fp32")
    return weights


def check_forms(forms: str) -> None:
    if forms not in FORM_CHOICES:
        raise EdgecError(f"forms must be one of {', '.join(FORM_CHOICES)}, got {forms!r}")


def resolve_opset(mode: str, opset: int | None, default_fp32: int, requested: str = "int2") -> tuple[str, int]:
    """(weights mode, opset). An explicit opset below 25 turns "auto" into fp32 and is an error for "int2"."""
    if opset is None:
        return mode, (LOWBIT_OPSET if mode == "int2" else default_fp32)
    if mode == "int2" and int(opset) < LOWBIT_OPSET and requested == "auto":
        return "fp32", int(opset)
    if mode == "int2" and int(opset) < LOWBIT_OPSET:
        raise EdgecError(f"int2 weights need opset >= {LOWBIT_OPSET} (DequantizeLinear on INT2), got opset {opset}; "
                         f"leave the opset unset or use --weights fp32")
    return mode, int(opset)


# --------------------------------------------------------------------------------------------- layers


def _collect(model) -> list[Layer]:
    layers, hooks = [], []
    for name, m in lowbit_layers(model.gm):
        with torch.no_grad():
            w = m.dequantized().detach().cpu().numpy().astype(np.float32)
            codes = m.codes.detach().cpu().numpy().reshape(m.weight_shape[0], -1).astype(np.int8)
            scale = m.scale.detach().cpu().numpy().astype(np.float32)
            shift = None if m.shift is None else m.shift.detach().cpu().numpy().astype(np.float32)
        allowed = {-1, 0, 1} if m.bits == 2 else {-1, 1}
        found = set(np.unique(codes).tolist())
        if not found <= allowed:
            kind = "ternary" if m.bits == 2 else "binary"
            raise EdgecError(f"layer {name}: {kind} codes must lie in {sorted(allowed)}, found {sorted(found - allowed)}")
        layer = Layer(name, type(m).__name__, "linear" if isinstance(m, LowBitLinear) else "conv", int(m.bits),
                       int(m.group_size), m.act, tuple(m.weight_shape), codes, scale, shift, w)
        layers.append(layer)
        hooks.append(m.register_forward_pre_hook(
            lambda _m, args, layer=layer: setattr(layer, "input_shape", tuple(args[0].shape))))
    try:
        model.run(model.spec.sample(seed=0))
    finally:
        for h in hooks:
            h.remove()
    return layers


# --------------------------------------------------------------------------------------------- locating


def _ancestors(graph, value):
    """Nodes and initializers the value is computed from, or None if it depends on a graph input."""
    nodes, inits, seen, stack = [], {}, set(), [value]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        producer = v.producer()
        if producer is None:
            if v.const_value is None or v in graph.inputs:
                return None
            inits[v.name] = v
            continue
        if producer.graph is not graph:
            return None
        nodes.append(producer)
        stack.extend(producer.inputs)
    order = {id(n): i for i, n in enumerate(graph)}
    return sorted(set(nodes), key=lambda n: order[id(n)]), inits


def _evaluate(nodes, inits, value, opset: int) -> np.ndarray:
    if not nodes:
        return np.asarray(value.const_value.numpy())
    proto_nodes = [ir.serde.serialize_node(n) for n in nodes]
    tensors = []
    for name, v in sorted(inits.items()):
        t = ir.serde.serialize_tensor(v.const_value)
        t.name = name
        tensors.append(t)
    out = onnx.helper.make_value_info(value.name, onnx.TypeProto())
    g = onnx.helper.make_graph(proto_nodes, "weight", [], [out], tensors)
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=LOWBIT_IR_VERSION)
    return np.asarray(ReferenceEvaluator(m).run(None, {})[0])


def _locate(graph, layers: list[Layer], opset: int) -> list[Site]:
    shapes = {}
    for layer in layers:
        for s in {layer.w.shape, layer.w.T.shape}:
            shapes.setdefault(tuple(s), []).append(layer)
    sites = []
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in CONSUMERS or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None:
            continue
        found = _ancestors(graph, weight)
        if found is None:
            continue
        nodes, inits = found
        if nodes:  # computed from constants: only the low-bit pattern (an int8 codes initializer) is of interest
            if not any(v.const_value.dtype == ir.DataType.INT8 for v in inits.values()):
                continue
        elif tuple(weight.const_value.shape) not in shapes:  # a plain initializer (a folded weight, or fp32)
            continue
        value = _evaluate(nodes, inits, weight, opset)
        named = {n.rsplit(".", 1)[0] for n in inits if n.endswith(".codes")}
        candidates = []
        for layer in layers:
            exp = expected_weight(layer, node)
            if exp is None or exp[1].shape != value.shape:
                continue
            exact = np.array_equal(exp[1], value)
            close = exact or np.allclose(exp[1], value, rtol=1e-6, atol=1e-7 * max(1.0, float(np.abs(exp[1]).max())))
            if close:
                # prefer: the layer this weight was exported from (by buffer name), then not yet placed, then exact
                candidates.append(((layer.name in named), not layer.sites, exact, layer, exp[0]))
        if not candidates:
            continue
        candidates.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)
        _, _, exact, layer, layout = candidates[0]
        site = Site(layer, node, node.op_type, layout, bool(exact))
        layer.sites.append(site)
        sites.append(site)
    missing = [layer.name for layer in layers if not layer.sites]
    if missing:
        raise EdgecError(f"int2 export: could not find the weight of low-bit layer(s) {', '.join(missing[:5])} in the "
                         f"exported graph (expected a MatMul/Gemm/Conv consuming it); export with --weights fp32")
    return sites


# --------------------------------------------------------------------------------------------- the pass


def fp32_layers(model) -> list[dict]:
    """Layers with weights that stay float32 in an int2 export (not low-bit), with their parameter counts."""
    low = {n for n, _ in lowbit_layers(model.gm)}
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
    out = []
    for name, m in model.gm.named_modules():
        if isinstance(m, kinds) and name not in low:
            out.append({"layer": name, "type": type(m).__name__, "weight_params": int(m.weight.numel())})
    return out


def lowbit_rewrite(model, ir_model, forms: str = "auto", threads: int = 1, precision: str = "fp32",
                   config: dict | None = None, overrides: dict | None = None, progress=None):
    """Rewrite ``ir_model`` (an unoptimized export at opset >= 25, in place) so every low-bit weight is 2-bit data.

    Run it before onnxscript's optimizer: the optimizer folds small constant subgraphs (and BatchNorm into a
    constant Conv weight), which would turn a small layer's codes back into float32 before we could see them,
    while it keeps DequantizeLinear. ``precision`` / ``config``: activation precision and the onnxruntime
    session config the forms are chosen for; ``overrides``: {layer key: (form, reason)} replacing a choice.
    Returns (embedded report, measurements, storage) where measurements hold the per-layer timings (ms) that
    drove each choice and storage is what ``check_storage`` verifies (and ``cast_outputs`` converts) afterwards.
    """
    check_forms(forms)
    check_precision(precision)
    opset = ir_model.opset_imports.get("", 0)
    if opset < LOWBIT_OPSET:
        raise EdgecError(f"int2 rewrite needs an export at opset >= {LOWBIT_OPSET}, got {opset}")
    layers = _collect(model)
    graph = ir_model.graph
    sites = _locate(graph, layers, opset)
    taken = {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None}
    taken |= set(graph.initializers) | {v.name for v in graph.inputs}
    per_layer, timings, checks, storage = [], {}, [], []
    used_ms = False
    for i, site in enumerate(sites):
        layer = site.layer
        key = layer.name if len(layer.sites) == 1 else f"{layer.name}#{layer.sites.index(site)}"
        if progress is not None:
            progress(f"form of low-bit layer {i + 1}/{len(sites)}: {key}")
        form, reason, times = choose(site, forms, threads, precision, config)
        if overrides and key in overrides:
            form, reason = overrides[key]
        e, out, desc, err, keep = _replace_site(graph, site, form, taken, precision)
        if keep:
            checks.append((layer, site.layout, out))
        else:
            used_ms = True
        packed = e.initializers[0]  # the packed codes come first in every form
        dq_outs = tuple(n.outputs[0].name for n in e.nodes if n.op_type == "DequantizeLinear")
        storage.append((layer.name, form, packed.name, packed.const_value.tobytes(), dq_outs))
        timings[key] = times
        per_layer.append(_layer_record(site, key, form, desc, reason, e.stored, err))
    _verify_dq_weights(graph, checks, opset)
    if used_ms:
        ir_model.opset_imports[MS_DOMAIN] = 1
    RemoveUnusedNodesPass()(ir_model)
    ir_model.ir_version = max(ir_model.ir_version or 0, LOWBIT_IR_VERSION)
    return _report(model, forms, threads, per_layer, precision, config or {}), timings, storage


def cast_outputs(storage: list) -> set[str]:
    """The DequantizeLinear outputs that ``emit.dq_to_cast`` turns into the ``cast`` form after optimization."""
    return {name for _layer, form, _init, _raw, outs in storage if form == "cast" for name in outs}


def _replace_site(graph, site: Site, form: str, taken: set[str], precision: str):
    """Splice ``form``'s nodes in before the consumer: (emitter, output, description, weight error, kept consumer).

    ``dq`` keeps the consumer and swaps its weight input; ``matmulnbits`` replaces the consumer node itself.
    """
    node = site.node
    e = Emitter(taken)
    x, rest = node.inputs[0], list(node.inputs[2:])
    out, desc, err, keep = emit(e, site, form, x, rest, precision)
    for v in e.initializers:
        graph.register_initializer(v)
    graph.insert_before(node, e.nodes)
    if keep:
        node.replace_input_with(1, out)
    else:
        old = node.outputs[0]
        old_name = old.name
        old.name = e.name(f"{old_name}.replaced")
        out.name = old_name
        out.type, out.shape = old.type, old.shape
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
    return e, out, desc, err, keep


def _layer_record(site: Site, key: str, form: str, desc: str, reason: str, stored: dict, err: float) -> dict:
    """One layer's entry in the embedded report."""
    layer = site.layer
    return {
        "layer": key, "module": layer.module_type,
        "values": "ternary" if layer.bits == 2 else "binary",
        "weight_shape": list(layer.weight_shape), "group_size": layer.group_size,
        "shift": layer.shift is not None, "act": layer.act, "consumer": site.role,
        "form": form, "onnx": desc, "chosen_by": reason,
        "int2_bytes": stored["int2"], "aux_bytes": stored["aux"],
        "fp32_bytes": int(layer.w.size * 4),
        "exporter_weight_exact": site.exporter_weight_exact, "weight_max_abs_error": err,
    }


def _report(model, forms: str, threads: int, per_layer: list[dict], precision: str, config: dict) -> dict:
    """The report embedded in the export record: the choices, the layers and the size accounting."""
    int2 = sum(r["int2_bytes"] for r in per_layer)
    aux = sum(r["aux_bytes"] for r in per_layer)
    fp32 = sum(r["fp32_bytes"] for r in per_layer)
    return {
        "forms": forms, "activation_precision": precision,
        "timing": {"threads": threads, "session_config": dict(sorted(config.items())),
                   "prefer_standard_margin": PREFER_STANDARD_MARGIN, "min_gain_ms": MIN_GAIN_MS},
        "layers": per_layer,
        "weights": {"int2_bytes": int2, "aux_bytes": aux, "fp32_bytes": fp32,
                    "int2_ratio": int2 / fp32 if fp32 else 0.0, "ratio": (int2 + aux) / fp32 if fp32 else 0.0},
        "fp32_layers": fp32_layers(model),
    }


def _verify_dq_weights(graph, checks: list, opset: int) -> None:
    """Evaluate each new DQ weight subgraph with onnx's reference evaluator: it must equal torch's weight bit for bit."""
    for layer, layout, value in checks:
        nodes, inits = _ancestors(graph, value)
        got = _evaluate(nodes, inits, value, opset)
        want = layer.w.T if layout == "KN" else layer.w
        if got.shape != want.shape or not np.array_equal(got, want):
            raise CheckFailed(f"int2 export: the INT2 weight of {layer.name} does not reproduce the torch weight exactly")


def check_storage(proto, storage: list) -> None:
    """After optimization: every low-bit layer's packed codes are still in the file, as INT2 read by a
    DequantizeLinear (``dq``, and ``cast`` before its conversion) or as uint8 read by a MatMulNBits
    (initializers with equal bytes may have been merged)."""
    readers = {}
    for n in proto.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    by_bytes = {}
    for t in proto.graph.initializer:
        by_bytes.setdefault((t.data_type, t.raw_data), []).append(t.name)
    for layer, form, _name, raw, _outs in storage:
        dtype, op = (TensorProto.UINT8, "MatMulNBits") if form == "matmulnbits" else (TensorProto.INT2, "DequantizeLinear")
        names = by_bytes.get((dtype, raw), [])
        if not any(op in readers.get(nm, ()) for nm in names):
            raise CheckFailed(f"int2 export: the packed weight of {layer} ({form}) did not survive optimization")
