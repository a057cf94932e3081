"""The two ONNX forms of a low-bit weight: ``dq`` (INT2 -> DequantizeLinear, standard ONNX) and ``matmulnbits``
(``com.microsoft.MatMulNBits``, 2 bits), built as nodes that replace a layer's MatMul / Gemm / Conv weight.

Used by the INT2 rewrite (``edgec.onnx.int2``) and by the per-layer timing (``edgec.onnx.forms``); see
docs/methods.md#int2-export.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_ir as ir

FORMS = ("dq", "matmulnbits")
LOWBIT_OPSET = 25  # DequantizeLinear-25 is the first to accept INT2
LOWBIT_IR_VERSION = 13  # onnx's IR version for opset 25
MS_DOMAIN = "com.microsoft"
MNB_BLOCKS = (16, 32, 64, 128, 256)  # ORT 1.32: 2-bit MatMulNBits block_size is a power of two, 16..256
CONSUMERS = {"MatMul": "linear", "Gemm": "linear", "Conv": "conv"}


@dataclass
class Layer:
    """One LowBit layer's weight as numpy data, with torch's dequantized weight and the graph sites that read it."""

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


@dataclass
class Site:
    """One MatMul / Gemm / Conv node of the exported graph that consumes a low-bit layer's weight."""

    layer: Layer
    node: object  # ir.Node consuming the weight
    role: str  # "MatMul" | "Gemm" | "Conv"
    layout: str  # "KN" (x @ w), "NK" (Gemm transB=1), "conv"
    exporter_weight_exact: bool


def attr(node, name, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def expected_weight(layer: Layer, node) -> tuple[str, np.ndarray] | None:
    """The layout and value the consumer's weight input must have if it is this layer's weight."""
    op = node.op_type
    if CONSUMERS[op] != layer.kind:
        return None
    if op == "Conv":
        return "conv", layer.w
    if op == "MatMul":
        return "KN", layer.w.T
    return ("NK", layer.w) if attr(node, "transB", 0) else ("KN", layer.w.T)


# --------------------------------------------------------------------------------------------- emitting


def _mnb_block(layer: Layer) -> int | None:
    k = layer.fan_in
    if layer.group_size > 0:
        g = layer.group_size
        return g if g in MNB_BLOCKS else None
    # per output channel: the block that stores fewest bytes (codes + scale + zero point), larger on ties
    return min(MNB_BLOCKS, key=lambda b: (math.ceil(k / b) * (b // 4 + 8), -b))


def mnb_applicable(site: Site) -> str | None:
    """None if MatMulNBits can express this site, else the reason it cannot."""
    layer, node = site.layer, site.node
    if site.role == "Conv":
        return "convolution (MatMulNBits is a matmul)"
    if _mnb_block(layer) is None:
        return f"group size {layer.group_size} is not a power of two in [16, 256]"
    if len(layer.input_shape) < 2:
        return "1-D input"
    if site.role == "Gemm":
        if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
            return "Gemm with non-default transA/alpha/beta"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            if c.shape is None or tuple(c.shape) != (layer.out,):
                return "Gemm bias is not a vector of length N"
    if layer.shift is not None and np.any((layer.scale == 0) & (layer.shift != 0)):
        return "a shifted group has scale 0 (no zero point can express it)"
    return None


class Emitter:
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
        name = self.name(base)
        t = ir.tensor(array, name=name)
        v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(t.dtype), const_value=t)
        self.initializers.append(v)
        if kind is not None:
            self.stored[kind] += len(t.tobytes())
        return v

    def node(self, op: str, inputs, out: str, attrs: dict | None = None, domain: str = ""):
        value = ir.Value(name=self.name(out))
        self.nodes.append(ir.node(op, inputs, attributes=attrs or {}, domain=domain, outputs=[value]))
        return value


def _int2(codes: np.ndarray) -> np.ndarray:
    return codes.astype(np.int8).astype(ml_dtypes.int2)


def _emit_dq_weight(e: Emitter, layer: Layer, layout: str):
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


def _pack_mnb(layer: Layer, block: int):
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


def emit(e: Emitter, site: Site, form: str, x, rest: list):
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
