"""The three ONNX forms of a low-bit weight, built as nodes that replace a layer's MatMul / Gemm / Conv weight:

* ``cast``: INT2 -> Cast(float) -> Mul(scale) [-> Add(shift)], standard ONNX. onnxruntime constant-folds the
  chain when it loads the file (it only keeps DequantizeLinear out of folding), so the file is 2-bit and the
  session runs the float32 kernels at float32 speed, with no session option.
* ``dq``: INT2 -> DequantizeLinear [-> Add(shift)], standard QDQ, for execution providers with QDQ kernels. In
  a default CPU session the DQ is *not* folded (Conv dequantizes every run) and DQ -> MatMul is fused into an
  int8-activation MatMulNBits.
* ``matmulnbits``: ``com.microsoft.MatMulNBits`` (bits=2) replacing the consumer; ``accuracy_level`` 0 computes
  in float32, 4 quantizes activations to int8 (onnxruntime's fast low-bit kernels).

``cast`` is emitted as ``dq`` before onnxscript's optimizer runs (which would fold a Cast of a small constant
back into float32) and converted afterwards by :func:`dq_to_cast`. Used by the INT2 rewrite
(``edgec.onnx.int2``) and by the per-layer timing (``edgec.onnx.forms``); see docs/methods.md#int2-export.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, numpy_helper

FORMS = ("cast", "dq", "matmulnbits")
ACCURACY_LEVEL = {"fp32": 0, "int8": 4}  # MatMulNBits accuracy_level per activation precision
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
    # per output channel any block expresses the scale; 128 (or the smallest block covering K) was the fastest
    # 2-bit kernel measured on AVX2 at both accuracy levels, and stores within 3 % of the fewest bytes
    return next((b for b in MNB_BLOCKS if b >= k), 128) if k < 128 else 128


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


def _pack_mnb(layer: Layer, block: int, zero_points: bool):
    """(packed codes, scale, float zero points or None, weight error vs torch) for MatMulNBits at ``block``.

    Codes are stored as ``code + 2``. Without zero points onnxruntime uses its default of 2, i.e. ``scale · code``
    (the symmetric layout its int8-activation kernels need); with them, ``2 − shift / scale`` puts the shift in
    the weight (exact, but onnxruntime then computes in float32). The error is for the weight as emitted: without
    zero points a layer's shift is added by the correction term of :func:`_emit_mnb`.
    """
    n, k = layer.out, layer.fan_in
    nb = math.ceil(k / block)
    q = np.full((n, nb * block), 2, np.uint8)
    q[:, :k] = (layer.codes + 2).astype(np.uint8)
    q = q.reshape(n, nb, block)
    packed = q[..., 0::4] | (q[..., 1::4] << 2) | (q[..., 2::4] << 4) | (q[..., 3::4] << 6)
    if layer.group_size > 0:
        scale, shift = layer.scale, layer.shift
    else:
        scale = np.repeat(layer.scale, nb, axis=1)
        shift = None if layer.shift is None else np.repeat(layer.shift, nb, axis=1)
    rep = lambda a: np.repeat(a, block, axis=1)[:, :k]  # noqa: E731
    qf = q.reshape(n, -1)[:, :k].astype(np.float32)
    zp = None
    if zero_points and shift is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale != 0, 2.0 - shift / np.where(scale != 0, scale, 1.0), 2.0).astype(np.float32)
        w_ort = rep(scale) * (qf - rep(zp))
    else:  # what ORT computes is scale · (q − 2); the shift (if any) comes from the correction term
        w_ort = rep(scale) * (qf - 2.0) + (0.0 if shift is None else rep(shift))
    err = float(np.abs(w_ort - layer.w.reshape(n, k)).max()) if w_ort.size else 0.0
    zp = None if zp is None else np.ascontiguousarray(zp, np.float32)
    return packed.astype(np.uint8), np.ascontiguousarray(scale, np.float32), zp, err


def _shift_correction(e: Emitter, site: Site, x, y):
    """``y + Σ_group(x) · shift``: a layer's per-group shift as a term on the activations, so the weight itself
    stays symmetric (``x @ (s·q + shift) = x @ (s·q) + Σ_g(x_g) · shift_g``). None when K is not whole groups."""
    layer, p = site.layer, site.layer.name
    rank = 2 if site.role == "Gemm" else len(layer.input_shape)
    axes = e.init(f"{p}.shift_axes", np.array([-1], np.int64))
    if layer.groups == 1:
        sums = e.node("ReduceSum", [x, axes], f"{p}.input_sum", {"keepdims": 1})
        corr = e.node("Mul", [sums, e.init(f"{p}.weight_shift", layer.shift[:, 0].copy(), "aux")], f"{p}.shift_term")
    elif layer.groups * layer.group_size == layer.fan_in:
        shape = np.array([0] * (rank - 1) + [layer.groups, layer.group_size], np.int64)
        grouped = e.node("Reshape", [x, e.init(f"{p}.input_grouped_shape", shape)], f"{p}.input_grouped")
        sums = e.node("ReduceSum", [grouped, axes], f"{p}.input_group_sums", {"keepdims": 0})
        shift = np.ascontiguousarray(layer.shift.T)  # (groups, N)
        corr = e.node("MatMul", [sums, e.init(f"{p}.weight_shift", shift, "aux")], f"{p}.shift_term")
    else:
        return None
    return e.node("Add", [y, corr], f"{p}.matmulnbits_shifted")


def _emit_mnb(e: Emitter, site: Site, x, rest: list, precision: str):
    """MatMulNBits for one site: (output, description, weight error). With int8 activations a shifted layer keeps a
    symmetric weight and adds its shift as a correction term (float zero points would disable the int8 kernels)."""
    layer, p = site.layer, site.layer.name
    level = ACCURACY_LEVEL[precision]
    block = _mnb_block(layer)
    shifted = layer.shift is not None
    correct = shifted and level > 0 and (layer.groups == 1 or layer.groups * layer.group_size == layer.fan_in)
    packed, scale, zp, err = _pack_mnb(layer, block, zero_points=shifted and not correct)
    inputs = [x, e.init(f"{p}.weight_nbits", packed, "int2"), e.init(f"{p}.weight_scale", scale, "aux"),
              None if zp is None else e.init(f"{p}.weight_zero_point", zp, "aux")]
    bias = rest[0] if site.role == "Gemm" and rest and rest[0] is not None else None
    if bias is not None:
        inputs += [None, bias]
    while inputs[-1] is None:
        inputs.pop()
    y = e.node("MatMulNBits", inputs, f"{p}.matmulnbits", domain=MS_DOMAIN,
               attrs={"K": layer.fan_in, "N": layer.out, "bits": 2, "block_size": block, "accuracy_level": level})
    parts = [f"bits=2, block_size={block}", "float zero_points" if zp is not None else "symmetric",
             f"accuracy_level={level}"] + (["bias"] if bias is not None else [])
    desc = f"MatMulNBits({', '.join(parts)})"
    if correct:
        y = _shift_correction(e, site, x, y)
        desc += " -> Add(shift term)"
    return y, desc, err


def emit(e: Emitter, site: Site, form: str, x, rest: list, precision: str = "fp32"):
    """Nodes computing the consumer's output from its activation ``x`` (and bias ``rest``) in ``form``.

    Returns (output value, description, weight max abs error vs torch, keeps_consumer). For "dq" and "cast"
    the consumer node is kept and only its weight input changes, so the output is the replacement weight value;
    "cast" is written as "dq" here and converted after optimization (:func:`dq_to_cast`).
    """
    if form in ("dq", "cast"):
        w, desc = _emit_dq_weight(e, site.layer, site.layout)
        if form == "cast":
            desc = [d.replace("DequantizeLinear(INT2", "Cast(INT2 -> float) -> Mul(scale").replace(
                ", axis=0)", ")").replace(", axis=1)", ")") for d in desc]
        return w, " -> ".join(desc + [site.role]), 0.0, True
    if form == "matmulnbits":
        y, desc, err = _emit_mnb(e, site, x, rest, precision)
        return y, desc, err, False
    raise ValueError(form)


# --------------------------------------------------------------------------------------------- cast form


def dq_to_cast(proto, dq_outputs: set[str]) -> int:
    """Turn each DequantizeLinear producing one of ``dq_outputs`` into Cast(float) -> Mul(scale) in place
    (Reshape around the Mul when the DQ is blocked); returns how many were converted.

    Exact: the DQ has no zero point, so it computes ``float(q) · scale``, the same single rounding-free product
    (q ∈ {-1, 0, 1}). Run after onnxscript's optimizer, which would otherwise fold the Cast of a small constant.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.input}

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def const(base: str, array: np.ndarray) -> str:
        t = numpy_helper.from_array(np.ascontiguousarray(array), fresh(base))
        graph.initializer.append(t)
        return t.name

    out, done = [], 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or node.output[0] not in dq_outputs:
            out.append(node)
            continue
        q, s = inits[node.input[0]], numpy_helper.to_array(inits[node.input[1]])
        a = {at.name: onnx.helper.get_attribute_value(at) for at in node.attribute}
        shape, axis, block = list(q.dims), a.get("axis", 1), a.get("block_size", 0)
        axis = axis % len(shape)
        base = node.output[0]
        qname, nb = q.name, (-(-shape[axis] // block) if block else 0)
        if block and nb * block != shape[axis]:  # a ragged last block: pad the codes (still INT2), slice back below
            pad = [(0, 0)] * len(shape)
            pad[axis] = (0, nb * block - shape[axis])
            qname = const(f"{q.name}.padded", np.pad(numpy_helper.to_array(q), pad))
        qf = fresh(f"{base}.float")
        out.append(onnx.helper.make_node("Cast", [qname], [qf], to=TensorProto.FLOAT))
        if s.ndim == 0:
            out.append(onnx.helper.make_node("Mul", [qf, const(f"{base}.scale", s)], [node.output[0]]))
        elif not block:  # per-axis scale: broadcast along ``axis``
            bshape = [1] * len(shape)
            bshape[axis] = shape[axis]
            out.append(onnx.helper.make_node("Mul", [qf, const(f"{base}.scale", s.reshape(bshape))], [node.output[0]]))
        else:  # blocked along ``axis``: split it into (blocks, block), scale per block, join back
            padded = shape[:axis] + [nb * block] + shape[axis + 1:]
            split = shape[:axis] + [nb, block] + shape[axis + 1:]
            sb = s.reshape(shape[:axis] + [nb, 1] + shape[axis + 1:])
            r1, m = fresh(f"{base}.blocked"), fresh(f"{base}.blocked_scaled")
            joined = fresh(f"{base}.padded") if padded != shape else node.output[0]
            out += [onnx.helper.make_node("Reshape", [qf, const(f"{base}.block_shape", np.array(split, np.int64))],
                                          [r1]),
                    onnx.helper.make_node("Mul", [r1, const(f"{base}.scale", sb)], [m]),
                    onnx.helper.make_node("Reshape", [m, const(f"{base}.flat_shape", np.array(padded, np.int64))],
                                          [joined])]
            if padded != shape:
                out.append(onnx.helper.make_node(
                    "Slice", [joined, const(f"{base}.start", np.array([0], np.int64)),
                              const(f"{base}.end", np.array([shape[axis]], np.int64)),
                              const(f"{base}.axis", np.array([axis], np.int64))], [node.output[0]]))
        done += 1
    if done:
        del graph.node[:]
        graph.node.extend(out)
        used = {i for n in graph.node for i in n.input}
        keep = [t for t in graph.initializer if t.name in used or t.name in {o.name for o in graph.output}]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return done
