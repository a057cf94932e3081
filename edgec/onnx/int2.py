"""Low-bit weights as low-bit data: rewrite an exported ONNX graph so every ternary/binary layer stores 2 bits a weight.

``edgec.layers.lowbit`` layers (``LowBitLinear``, ``LowBitConv1d``, ``LowBitConv2d``) hold int8 ``codes`` in {−1, 0, 1}
(ternary) or {−1, 1} (binary), a per-group ``scale`` α and an optional per-group ``shift`` γ (DLT):
``W = α·codes + γ``. The dynamo exporter writes them as an int8 initializer plus Cast/Mul/Add/Transpose nodes
(1 byte a weight), and its optimizer folds the small ones (with a following BatchNorm) into float32 constants.
So this pass runs on the *unoptimized* export, before onnxscript's optimizer (which never folds
DequantizeLinear): for every low-bit layer it finds the MatMul / Gemm / Conv consuming its weight, evaluates that
constant subgraph with onnx's reference evaluator and checks it equals the torch layer's ``dequantized()`` (the
``<layer>.codes`` initializer name breaks ties), and replaces it with one of two forms:

``dq`` (standard ONNX, opset ≥ 25, IR 13)
    ``INT2`` initializer (4 codes a byte) → ``DequantizeLinear`` with the scale per output channel (``axis``)
    or per group (blocked, ``block_size = group_size``) → [shift: per channel a broadcast ``Add``; per group
    ``Reshape`` to (groups, group_size, N) → ``Add`` of the (groups, 1, N) shift → ``Reshape`` (→ ``Slice``
    if the last group is partial)] → [``Reshape`` to the kernel shape for grouped conv scales] → the original
    MatMul / Gemm / Conv. The shift stays per group in the file: nothing after a DQ can be constant-folded.
    Linear weights are stored in the consumer's layout ((K, N) for MatMul), so ORT's QDQ optimizer fuses
    DQ+MatMul into ``MatMulNBits`` when there is no shift; Conv and shifted weights are dequantized at run
    time. The DQ output is bit-identical to torch's ``dequantized()``: codes·α is exact for codes in {−1, 0, 1}
    and the shift is added with the same single fp32 addition torch does.
``matmulnbits`` (``com.microsoft.MatMulNBits``, bits = 2, Linear layers only)
    codes + 2 packed 4 a byte low-first along K, blocks of ``group_size`` (or, per output channel, the
    power-of-two block in [16, 256] that stores fewest bytes, with α repeated per block), float zero points
    ``2 − γ/α`` (2.0 without a shift) and ``accuracy_level = 0`` (fp32 activations). Float zero points take
    ORT 1.32's unpacked path (dequantize, then SGEMM), which on the 2-core AVX2 reference machine was ~2×
    faster than its prepacked 2-bit kernel at fp32 accuracy. Not exact with a shift (α·(q − zp) rounds
    differently from α·T + γ, ~1 ulp of the weight; recorded per layer as ``weight_max_abs_error``);
    not applicable when the group size is not a power of two in [16, 256], when a shifted group has α = 0,
    or when a Gemm has alpha/beta/transA other than the defaults.

Choice per layer (``forms="measure"``, the default): each applicable form of that layer is timed alone
(``edgec.onnx.session`` protocol, ``threads`` intra-op threads, the layer's own input shape at the model's
example batch, the strict session config below), cached per shape in-process; the standard ``dq`` form is kept
unless ``matmulnbits`` is faster by more than ``PREFER_STANDARD_MARGIN`` (10 %), which also keeps near ties from
flipping between runs. ``forms="dq"`` or ``"matmulnbits"`` forces a form (the latter falls back to ``dq`` where
not applicable) — use a forced form for byte-reproducible builds across machines, since a measured choice may
differ between machines. The chosen form, its ONNX structure and the reason are embedded per layer in the
export record; the timings are returned alongside (``measurements``) but not embedded, because they vary from
run to run and the file must not (same model and same choices → same bytes).

Parity (see ``edgec.onnx.export``): onnxruntime fuses DQ+MatMul into ``MatMulNBits`` with the accuracy level
from the session config ``session.qdq_matmulnbits_accuracy_level``, default 4 = int8-quantized activations
(measured 9e-4 relative on the ternary zoo bert and 3e-3 on the conformer with every layer in ``dq`` form; up to
~3e-2 reported on larger models: that is the runtime's choice, not the file's). The gating parity check therefore
runs with ``STRICT_SESSION_CONFIG`` (level 0: activations are neither quantized nor downcast) at the usual
tolerance (1e-4 relative); the default-session error is measured and recorded for information only.
``matmulnbits`` nodes carry ``accuracy_level = 0`` themselves, so they compute the same in any session.

Run time: ORT keeps DequantizeLinear out of constant folding (so QDQ fusions can see it); a ``dq`` Conv or a
shifted ``dq`` MatMul therefore dequantizes its weight on every run, which dominates small convolutions. A
deployment that wants fp32 speed from the 2-bit file can set the session config ``session.disable_quant_qdq=1``:
ORT then folds the DQ at load (measured: int2 resnet as fast as the fp32 one; memory at run time is then fp32).
Binary/ternary *activations* make any parity check fragile: a pre-activation within rounding error of a
threshold (0 for sign) flips when kernels sum in a different order, so a fp32-exact export can still differ from
torch on some inputs; the export reports it as a parity failure rather than hiding it.

Size accounting: ``int2_bytes`` are the packed code bytes, ``aux_bytes`` the fp32 scales, shifts and zero points
stored with them, ``fp32_bytes`` what the same weights take as float32. Biases stay fp32, as do all layers that are
not low-bit (embeddings, norms, and whatever the scaffold kept full precision: they are listed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgec.core.errors import CheckFailed, EdgecError

WEIGHT_MODES = ("auto", "fp32", "int2")
FORM_CHOICES = ("measure", "dq", "matmulnbits")
FORMS = ("dq", "matmulnbits")
LOWBIT_OPSET = 25  # DequantizeLinear-25 is the first to accept INT2
LOWBIT_IR_VERSION = 13  # onnx's IR version for opset 25
MS_DOMAIN = "com.microsoft"
STRICT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
PREFER_STANDARD_MARGIN = 0.10
MNB_BLOCKS = (16, 32, 64, 128, 256)  # ORT 1.32: 2-bit MatMulNBits block_size is a power of two, 16..256
_CONSUMERS = {"MatMul": "linear", "Gemm": "linear", "Conv": "conv"}
_TIMING = {"warmup": 3, "repeats": 10, "min_seconds": 0.05}
_timing_cache: dict = {}


# --------------------------------------------------------------------------------------------- modes


def lowbit_layer_names(model) -> list[str]:
    from edgec.layers.lowbit import lowbit_layers

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


@dataclass
class _Layer:
    name: str
    module_type: str
    kind: str  # "linear" | "conv"
    bits: int
    group_size: int
    act: str
    weight_shape: tuple
    codes: np.ndarray  # (out, fan_in) int8
    scale: np.ndarray  # (out, groups) float32
    shift: np.ndarray | None  # (out, groups) float32
    w: np.ndarray  # torch's dequantized() in the module's own layout, float32
    input_shape: tuple = ()
    sites: list = field(default_factory=list)

    @property
    def out(self) -> int:
        return self.weight_shape[0]

    @property
    def fan_in(self) -> int:
        return math.prod(self.weight_shape[1:])

    @property
    def groups(self) -> int:
        return self.scale.shape[1]


def _collect(model) -> list[_Layer]:
    import torch

    from edgec.layers.lowbit import LowBitLinear, lowbit_layers

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
        layer = _Layer(name, type(m).__name__, "linear" if isinstance(m, LowBitLinear) else "conv", int(m.bits),
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


@dataclass
class _Site:
    layer: _Layer
    node: object  # ir.Node consuming the weight
    role: str  # "MatMul" | "Gemm" | "Conv"
    layout: str  # "KN" (x @ w), "NK" (Gemm transB=1), "conv"
    exporter_weight_exact: bool


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
    import onnx
    from onnx.reference import ReferenceEvaluator

    import onnx_ir as ir

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


def _attr(node, name, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _expected(layer: _Layer, node) -> tuple[str, np.ndarray] | None:
    """The layout and value the consumer's weight input must have if it is this layer's weight."""
    op = node.op_type
    if _CONSUMERS[op] != layer.kind:
        return None
    if op == "Conv":
        return "conv", layer.w
    if op == "MatMul":
        return "KN", layer.w.T
    return ("NK", layer.w) if _attr(node, "transB", 0) else ("KN", layer.w.T)


def _locate(graph, layers: list[_Layer], opset: int) -> list[_Site]:
    import onnx_ir as ir

    shapes = {}
    for layer in layers:
        for s in {layer.w.shape, layer.w.T.shape}:
            shapes.setdefault(tuple(s), []).append(layer)
    sites = []
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _CONSUMERS or len(node.inputs) < 2:
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
            exp = _expected(layer, node)
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
        site = _Site(layer, node, node.op_type, layout, bool(exact))
        layer.sites.append(site)
        sites.append(site)
    missing = [layer.name for layer in layers if not layer.sites]
    if missing:
        raise EdgecError(f"int2 export: could not find the weight of low-bit layer(s) {', '.join(missing[:5])} in the "
                         f"exported graph (expected a MatMul/Gemm/Conv consuming it); export with --weights fp32")
    return sites


# --------------------------------------------------------------------------------------------- emitting


def _mnb_block(layer: _Layer) -> int | None:
    k = layer.fan_in
    if layer.group_size > 0:
        g = layer.group_size
        return g if g in MNB_BLOCKS else None
    # per output channel: the block that stores fewest bytes (codes + scale + zero point), larger on ties
    return min(MNB_BLOCKS, key=lambda b: (math.ceil(k / b) * (b // 4 + 8), -b))


def _mnb_applicable(site: _Site) -> str | None:
    """None if MatMulNBits can express this site, else the reason it cannot."""
    layer, node = site.layer, site.node
    if site.role == "Conv":
        return "convolution (MatMulNBits is a matmul)"
    if _mnb_block(layer) is None:
        return f"group size {layer.group_size} is not a power of two in [16, 256]"
    if len(layer.input_shape) < 2:
        return "1-D input"
    if site.role == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return "Gemm with non-default transA/alpha/beta"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            if c.shape is None or tuple(c.shape) != (layer.out,):
                return "Gemm bias is not a vector of length N"
    if layer.shift is not None and np.any((layer.scale == 0) & (layer.shift != 0)):
        return "a shifted group has scale 0 (no zero point can express it)"
    return None


class _Emitter:
    """Creates initializers and nodes with names derived from the layer name (deterministic, collision-checked)."""

    def __init__(self, taken: set[str]):
        self.taken = taken
        self.nodes: list = []
        self.initializers: list = []
        self.stored: dict[str, int] = {"int2": 0, "aux": 0}

    def name(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def init(self, base: str, array: np.ndarray, kind: str | None = None):
        import onnx_ir as ir

        name = self.name(base)
        t = ir.tensor(array, name=name)
        v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(t.dtype), const_value=t)
        self.initializers.append(v)
        if kind is not None:
            self.stored[kind] += len(t.tobytes())
        return v

    def node(self, op: str, inputs, out: str, attrs: dict | None = None, domain: str = ""):
        import onnx_ir as ir

        value = ir.Value(name=self.name(out))
        self.nodes.append(ir.node(op, inputs, attributes=attrs or {}, domain=domain, outputs=[value]))
        return value


def _int2(codes: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return codes.astype(np.int8).astype(ml_dtypes.int2)


def _emit_dq_weight(e: _Emitter, layer: _Layer, layout: str):
    """INT2 → DequantizeLinear [→ + shift] [→ Reshape] producing the weight in the consumer's layout.

    The shift is added to the DQ output viewed as (groups, group_size, N) (or (N, groups, group_size)) so it is
    stored per group and never expanded into a constant: onnxscript's constant folder keeps DequantizeLinear, so
    nothing downstream of it can be folded back into a float32 weight.
    """
    p = layer.name
    gs, g = layer.group_size, layer.groups
    desc = []
    if layout == "conv" and gs <= 0:  # per output channel directly on the N-d kernel
        q = e.init(f"{p}.weight_int2", _int2(layer.codes.reshape(layer.weight_shape)), "int2")
        s = e.init(f"{p}.weight_scale", layer.scale[:, 0].copy(), "aux")
        w = e.node("DequantizeLinear", [q, s], f"{p}.weight_dq", {"axis": 0})
        desc.append("DequantizeLinear(INT2, axis=0)")
        if layer.shift is not None:
            shift = layer.shift[:, 0].reshape(-1, *([1] * (len(layer.weight_shape) - 1)))
            w = e.node("Add", [w, e.init(f"{p}.weight_shift", shift, "aux")], f"{p}.weight_shifted")
            desc.append("Add(shift)")
        return w, desc
    kn = layout == "KN"  # (K, N) for x @ w; otherwise (N, K): Gemm transB=1, or a blocked conv kernel flattened
    k = layer.fan_in
    if gs <= 0:
        q = e.init(f"{p}.weight_int2", _int2(layer.codes.T if kn else layer.codes), "int2")
        s = e.init(f"{p}.weight_scale", layer.scale[:, 0].copy(), "aux")
        axis = 1 if kn else 0
        w = e.node("DequantizeLinear", [q, s], f"{p}.weight_dq", {"axis": axis})
        desc.append(f"DequantizeLinear(INT2, axis={axis})")
        if layer.shift is not None:
            shift = layer.shift[:, 0].reshape((1, -1) if kn else (-1, 1))
            w = e.node("Add", [w, e.init(f"{p}.weight_shift", shift, "aux")], f"{p}.weight_shifted")
            desc.append("Add(shift)")
    else:
        kp = g * gs if layer.shift is not None else k  # pad K to whole groups only when groups are reshaped
        codes = np.zeros((layer.out, kp), np.int8)
        codes[:, :k] = layer.codes
        axis = 0 if kn else 1
        q = e.init(f"{p}.weight_int2", _int2(codes.T if kn else codes), "int2")
        s = e.init(f"{p}.weight_scale", np.ascontiguousarray(layer.scale.T if kn else layer.scale), "aux")
        w = e.node("DequantizeLinear", [q, s], f"{p}.weight_dq", {"axis": axis, "block_size": gs})
        desc.append(f"DequantizeLinear(INT2, axis={axis}, block_size={gs})")
        if layer.shift is not None:
            grouped = (g, gs, layer.out) if kn else (layer.out, g, gs)
            shift = layer.shift.T.reshape(g, 1, layer.out) if kn else layer.shift.reshape(layer.out, g, 1)
            flat = (kp, layer.out) if kn else (layer.out, kp)
            w = e.node("Reshape", [w, e.init(f"{p}.weight_grouped_shape", np.array(grouped, np.int64))],
                       f"{p}.weight_grouped")
            w = e.node("Add", [w, e.init(f"{p}.weight_shift", np.ascontiguousarray(shift), "aux")],
                       f"{p}.weight_grouped_shifted")
            w = e.node("Reshape", [w, e.init(f"{p}.weight_flat_shape", np.array(flat, np.int64))],
                       f"{p}.weight_shifted")
            desc.append("Reshape(groups) -> Add(shift) -> Reshape")
            if kp != k:
                w = e.node("Slice", [w, e.init(f"{p}.weight_slice_start", np.array([0], np.int64)),
                                     e.init(f"{p}.weight_slice_end", np.array([k], np.int64)),
                                     e.init(f"{p}.weight_slice_axis", np.array([axis], np.int64))], f"{p}.weight_sliced")
                desc.append("Slice")
    if layout == "conv":
        w = e.node("Reshape", [w, e.init(f"{p}.weight_shape", np.array(layer.weight_shape, np.int64))], f"{p}.weight")
        desc.append("Reshape")
    return w, desc


def _pack_mnb(layer: _Layer, block: int):
    n, k = layer.out, layer.fan_in
    nb = math.ceil(k / block)
    q = np.full((n, nb * block), 2, np.uint8)
    q[:, :k] = (layer.codes + 2).astype(np.uint8)
    q = q.reshape(n, nb, block)
    packed = q[..., 0::4] | (q[..., 1::4] << 2) | (q[..., 2::4] << 4) | (q[..., 3::4] << 6)
    if layer.group_size > 0:
        scale = layer.scale
        shift = layer.shift
    else:
        scale = np.repeat(layer.scale, nb, axis=1)
        shift = None if layer.shift is None else np.repeat(layer.shift, nb, axis=1)
    if shift is None:
        zp = np.full_like(scale, 2.0)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale != 0, 2.0 - shift / np.where(scale != 0, scale, 1.0), 2.0).astype(np.float32)
    # what ORT computes for each weight: scale · (code + 2 − zp); compared with torch's dequantized()
    qf = q.reshape(n, -1)[:, :k].astype(np.float32)
    rep = lambda a: np.repeat(a, block, axis=1)[:, :k]  # noqa: E731
    w_ort = rep(scale) * (qf - rep(zp))
    err = float(np.abs(w_ort - layer.w.reshape(n, k)).max()) if w_ort.size else 0.0
    return packed.astype(np.uint8), np.ascontiguousarray(scale, np.float32), np.ascontiguousarray(zp, np.float32), err


def _emit(e: _Emitter, site: _Site, form: str, x, rest: list):
    """Nodes computing the consumer's output from its activation ``x`` (and bias ``rest``) in ``form``.

    Returns (output value, description, weight max abs error vs torch, keeps_consumer). For "dq" the consumer
    node is kept and only its weight input changes, so the output is the replacement weight value instead.
    """
    layer = site.layer
    if form == "dq":
        w, desc = _emit_dq_weight(e, layer, site.layout)
        return w, " -> ".join(desc + [site.role]), 0.0, True
    if form == "matmulnbits":
        block = _mnb_block(layer)
        packed, scale, zp, err = _pack_mnb(layer, block)
        p = layer.name
        inputs = [x, e.init(f"{p}.weight_nbits", packed, "int2"), e.init(f"{p}.weight_scale", scale, "aux"),
                  e.init(f"{p}.weight_zero_point", zp, "aux")]
        bias = rest[0] if site.role == "Gemm" and rest and rest[0] is not None else None
        if bias is not None:
            inputs += [None, bias]
        y = e.node("MatMulNBits", inputs, f"{p}.matmulnbits", domain=MS_DOMAIN,
                   attrs={"K": layer.fan_in, "N": layer.out, "bits": 2, "block_size": block, "accuracy_level": 0})
        desc = (f"MatMulNBits(bits=2, block_size={block}, float zero_points, accuracy_level=0"
                f"{', bias' if bias is not None else ''})")
        return y, desc, err, False
    raise ValueError(form)


# --------------------------------------------------------------------------------------------- timing


def _layer_model(site: _Site, form: str):
    """A one-layer ONNX model (input x at the layer's example shape) in ``form`` ("fp32" = float weights)."""
    import onnx_ir as ir

    layer, node = site.layer, site.node
    x = ir.Value(name="x", shape=ir.Shape(_timing_shape(site)), type=ir.TensorType(ir.DataType.FLOAT))
    e = _Emitter({"x"})
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
        exp = _expected(layer, node)[1]
        w = e.init("w", np.ascontiguousarray(exp))
        out = e.node(node.op_type, [x, w, *rest], "y", attrs)
    else:
        out, _, _, keep = _emit(e, site, form, x, rest)
        if keep:
            out = e.node(node.op_type, [x, out, *rest], "y", attrs)
    out.type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [out], nodes=e.nodes, initializers=e.initializers,
                     opset_imports={"": LOWBIT_OPSET, MS_DOMAIN: 1}, name="layer")
    return ir.to_proto(ir.Model(graph, ir_version=LOWBIT_IR_VERSION)).SerializeToString()


def _timing_shape(site: _Site) -> tuple:
    """The layer's input at the example batch, as the consumer sees it (Gemm takes 2-D)."""
    shape = tuple(site.layer.input_shape)
    if site.role == "Gemm" and len(shape) != 2:
        shape = (math.prod(shape[:-1]), shape[-1])
    return shape


def _time_key(site: _Site, form: str, threads: int, config: dict) -> tuple:
    layer, node = site.layer, site.node
    attrs = tuple(sorted((a.name, str(a.value)) for a in node.attributes.values()))
    return (form, site.role, attrs, layer.input_shape, layer.weight_shape, layer.group_size, layer.shift is not None,
            len(node.inputs), threads, tuple(sorted(config.items())))


def _time(site: _Site, form: str, threads: int, config: dict) -> float:
    import onnxruntime

    from edgec.onnx.session import measure_onnx

    key = _time_key(site, form, threads, config) + (onnxruntime.__version__,)
    if key not in _timing_cache:
        x = np.random.default_rng(0).standard_normal(_timing_shape(site)).astype(np.float32)
        r = measure_onnx(_layer_model(site, form), {"x": x}, threads=threads, config=config, **_TIMING)
        _timing_cache[key] = round(r["median_ms"], 4)
    return _timing_cache[key]


def _choose(site: _Site, forms: str, threads: int) -> tuple[str, str, dict]:
    why_not = _mnb_applicable(site)
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


# --------------------------------------------------------------------------------------------- the pass


def fp32_layers(model) -> list[dict]:
    """Layers with weights that stay float32 in an int2 export (not low-bit), with their parameter counts."""
    from torch import nn

    from edgec.layers.lowbit import lowbit_layers

    low = {n for n, _ in lowbit_layers(model.gm)}
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
    out = []
    for name, m in model.gm.named_modules():
        if isinstance(m, kinds) and name not in low:
            out.append({"layer": name, "type": type(m).__name__, "weight_params": int(m.weight.numel())})
    return out


def lowbit_rewrite(model, ir_model, forms: str = "measure", threads: int = 1):
    """Rewrite ``ir_model`` (an unoptimized export at opset >= 25, in place) so every low-bit weight is 2-bit data.

    Run it before onnxscript's optimizer: the optimizer folds small constant subgraphs (and BatchNorm into a
    constant Conv weight), which would turn a small layer's codes back into float32 before we could see them,
    while it keeps DequantizeLinear. Returns (embedded report, measurements, storage) where measurements hold
    the per-layer timings (ms) that drove each choice and storage is what ``check_storage`` verifies afterwards.
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    check_forms(forms)
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
    for site in sites:
        layer, node = site.layer, site.node
        form, reason, times = _choose(site, forms, threads)
        e = _Emitter(taken)
        x, rest = node.inputs[0], list(node.inputs[2:])
        out, desc, err, keep = _emit(e, site, form, x, rest)
        for v in e.initializers:
            graph.register_initializer(v)
        graph.insert_before(node, e.nodes)
        if keep:
            node.replace_input_with(1, out)
            checks.append((layer, site.layout, out))
        else:
            old = node.outputs[0]
            old_name = old.name
            old.name = e.name(f"{old_name}.replaced")
            out.name = old_name
            out.type, out.shape = old.type, old.shape
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            used_ms = True
        packed = e.initializers[0]  # the packed codes come first in both forms
        storage.append((layer.name, form, packed.name, packed.const_value.tobytes()))
        key = layer.name if len(layer.sites) == 1 else f"{layer.name}#{layer.sites.index(site)}"
        timings[key] = times
        per_layer.append({
            "layer": key, "module": layer.module_type,
            "values": "ternary" if layer.bits == 2 else "binary",
            "weight_shape": list(layer.weight_shape), "group_size": layer.group_size,
            "shift": layer.shift is not None, "act": layer.act, "consumer": site.role,
            "form": form, "onnx": desc, "chosen_by": reason,
            "int2_bytes": e.stored["int2"], "aux_bytes": e.stored["aux"],
            "fp32_bytes": int(layer.w.size * 4),
            "exporter_weight_exact": site.exporter_weight_exact, "weight_max_abs_error": err,
        })
    _verify_dq_weights(graph, checks, opset)
    if used_ms:
        ir_model.opset_imports[MS_DOMAIN] = 1
    RemoveUnusedNodesPass()(ir_model)
    ir_model.ir_version = max(ir_model.ir_version or 0, LOWBIT_IR_VERSION)
    int2 = sum(r["int2_bytes"] for r in per_layer)
    aux = sum(r["aux_bytes"] for r in per_layer)
    fp32 = sum(r["fp32_bytes"] for r in per_layer)
    report = {
        "forms": forms, "timing": {"threads": threads, "session_config": STRICT_SESSION_CONFIG,
                                   "prefer_standard_margin": PREFER_STANDARD_MARGIN},
        "layers": per_layer,
        "weights": {"int2_bytes": int2, "aux_bytes": aux, "fp32_bytes": fp32,
                    "int2_ratio": int2 / fp32 if fp32 else 0.0, "ratio": (int2 + aux) / fp32 if fp32 else 0.0},
        "fp32_layers": fp32_layers(model),
    }
    return report, timings, storage


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
    DequantizeLinear or as uint8 read by a MatMulNBits (initializers with equal bytes may have been merged)."""
    from onnx import TensorProto

    readers = {}
    for n in proto.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    by_bytes = {}
    for t in proto.graph.initializer:
        by_bytes.setdefault((t.data_type, t.raw_data), []).append(t.name)
    for layer, form, name, raw in storage:
        dtype, op = (TensorProto.INT2, "DequantizeLinear") if form == "dq" else (TensorProto.UINT8, "MatMulNBits")
        names = by_bytes.get((dtype, raw), [])
        if not any(op in readers.get(nm, ()) for nm in names):
            raise CheckFailed(f"int2 export: the packed weight of {layer} ({form}) did not survive optimization")
