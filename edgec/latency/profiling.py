"""Per-unit latency profiling in onnxruntime: the measurements behind ``edgec profile`` and latency tables.

Each prunable :class:`~edgec.latency.units.Unit` is timed as one small ONNX graph of its layers at a grid of
densities and patterns (``channel``, ``simd:N``); the dense model is timed too (the remainder), and a layer
shrunk by two units gets an interaction slope. Measuring beats guessing: MLAS's speed is not proportional
to FLOPs. Timing graph, calibration, known gaps: see docs/methods.md#latency-tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgec.analysis.groups import find_groups
from edgec.core.errors import EdgecError
from edgec.latency import simd as simd_mod
from edgec.latency import table as table_mod
from edgec.latency.shapes import make_inputs, resolve_shapes
from edgec.latency.units import Unit, as_unit
from edgec.onnx.export import to_onnx
from edgec.onnx.session import create_session, measure_session

DEFAULT_DENSITIES = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0625)  # 1/16: a floor low enough that
# every budget uniform pruning reaches is inside the grid
DEFAULT_PATTERNS = ("channel",)
INTERACTION_DENSITY = 0.5  # where a shared layer's slopes are measured
OPSET = 20


# --- units ------------------------------------------------------------------------------------------


def group_units(model) -> list[Unit]:
    """The prunable coupled-channel groups of ``model`` (``edgec.analysis.groups``) as units."""
    return [as_unit(g) for g in find_groups(model) if g.prunable]


def resolve_units(model, units, shapes: dict, layers: dict) -> list[Unit]:
    """``units`` (None / "layers" / "groups" / a list) as checked :class:`Unit` objects."""
    if units is None or (isinstance(units, str) and units == "layers"):
        out = layer_units(model, shapes, layers)
    elif isinstance(units, str) and units == "groups":
        out = group_units(model)
    elif isinstance(units, str):
        raise EdgecError(f"units must be 'layers', 'groups' or a list of units, got '{units}'")
    else:
        out = [as_unit(u) for u in units]
    if not out:
        raise EdgecError("nothing to profile: the model has no prunable unit"
                         + (" (no prunable channel group)" if units == "groups" else ""))
    check_units(out, layers, model)
    return out


# --- shapes and inputs ------------------------------------------------------------------------------


# --- layers as the traced graph sees them -----------------------------------------------------------

@dataclass
class LayerInfo:
    name: str
    kind: str  # "linear" | "conv1d" | "conv2d"
    module: object
    in_shapes: list = field(default_factory=list)  # one input shape per call
    out_shapes: list = field(default_factory=list)

    @property
    def out_channels(self) -> int:
        m = self.module
        return m.out_features if self.kind == "linear" else m.out_channels

    @property
    def in_channels(self) -> int:
        m = self.module
        return m.in_features if self.kind == "linear" else m.in_channels

    @property
    def groups(self) -> int:
        return 1 if self.kind == "linear" else int(self.module.groups)

    @property
    def depthwise(self) -> bool:
        return self.kind != "linear" and self.groups > 1 and self.groups == self.in_channels == self.out_channels

    def simd_eligible(self) -> bool:
        if self.kind == "linear":
            return True
        m = self.module
        return (self.groups == 1 and all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride)
                and not isinstance(m.padding, str) and all(p == 0 for p in m.padding))

    def describe(self) -> dict:
        m = self.module
        return {"kind": self.kind, "weight": list(m.weight.shape), "bias": m.bias is not None,
                "groups": self.groups, "input_shapes": [list(s) for s in self.in_shapes]}


def _layer_kind(module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def trace_layers(model, shapes: dict) -> dict[str, LayerInfo]:
    """Every Linear/Conv1d/Conv2d call in the traced graph with the input/output shape it sees when the model
    runs (eval mode) on inputs of ``shapes`` — a shape propagation over the fx graph that does not write
    node metadata. Returns ``{module name: LayerInfo}`` in graph order."""
    spec = model.spec
    feed = make_inputs(spec, shapes)
    args = [torch.from_numpy(feed[t.name]) for t in spec.inputs]
    found: dict[str, LayerInfo] = {}

    class Recorder(fx.Interpreter):
        def call_module(self, target, args_, kwargs):
            out = super().call_module(target, args_, kwargs)
            module = self.fetch_attr(target)
            kind = _layer_kind(module)
            if kind is not None and args_ and hasattr(args_[0], "shape"):
                info = found.setdefault(target, LayerInfo(target, kind, module))
                info.in_shapes.append(tuple(args_[0].shape))
                info.out_shapes.append(tuple(out.shape))
            return out

    gm = model.gm
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            Recorder(gm).run(*args)
    except EdgecError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise EdgecError(f"the model does not run on inputs of shape {dict(shapes)}: {msg}") from None
    finally:
        gm.train(was_training)
    return found


def layer_units(model, shapes: dict | None = None, layers: dict | None = None) -> list[Unit]:
    """The generic default units: each Linear/Conv1d/Conv2d layer alone (producer only), width = its outputs."""
    if layers is None:
        layers = trace_layers(model, shapes if shapes is not None else resolve_shapes(model.spec))
    units = []
    for name, info in layers.items():
        kind = ("dw" + info.kind) if info.depthwise else info.kind
        units.append(Unit(name, (name,), info.out_channels, (), kind))
    return units


# --- tiny ONNX graphs per unit ----------------------------------------------------------------------

def _keep(dim: int, frac: float) -> int:
    return max(1, min(int(dim), int(math.floor(dim * frac + 0.5))))


def _conv_pads(module, spatial_rank: int) -> list[int]:
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return [0] * (2 * spatial_rank)
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        begin = [t // 2 for t in total]
        return begin + [t - b for t, b in zip(total, begin)]
    return list(pad) + list(pad)


def _layer_nodes(info: LayerInfo, call: int, prefix: str, *, out_frac: float = 1.0, in_frac: float = 1.0,
                 simd: tuple[int, float] | None = None, rng=None):
    """Nodes for one layer call with shrunk widths (or the SIMD path); returns (nodes, inits, x_vi, y_vi, x)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    in_shape = list(info.in_shapes[call])
    c_in, c_out, g = info.in_channels, info.out_channels, info.groups
    if info.kind == "linear":
        c_in2, c_out2, g2 = _keep(c_in, in_frac), _keep(c_out, out_frac), 1
    elif info.depthwise:
        c_in2 = c_out2 = g2 = _keep(c_in, min(in_frac, out_frac))
    elif g > 1:  # grouped conv: shrink every group alike
        c_in2, c_out2, g2 = _keep(c_in // g, in_frac) * g, _keep(c_out // g, out_frac) * g, g
    else:
        c_in2, c_out2, g2 = _keep(c_in, in_frac), _keep(c_out, out_frac), 1
    axis = len(in_shape) - 1 if info.kind == "linear" else 1
    in_shape[axis] = c_in2
    x_name, y_name = f"{prefix}.x", f"{prefix}.y"
    x = rng.standard_normal(in_shape).astype(np.float32)
    bias = info.module.bias is not None
    nodes, inits = [], []
    if simd is not None:
        n, density = simd
        w = (rng.standard_normal((c_out2, c_in2)) * 0.05).astype(np.float32)
        mask = simd_mod.random_mask(c_out2, c_in2, n, density, seed=int(rng.integers(1 << 30)))
        b = rng.standard_normal(c_out2).astype(np.float32) if bias else None
        nodes, inits = simd_mod.simd_nodes(x_name, y_name, w, mask, n, bias=b,
                                           layout="linear" if info.kind == "linear" else "conv", prefix=prefix)
    elif info.kind == "linear":
        w = (rng.standard_normal((c_out2, c_in2)) * 0.05).astype(np.float32)
        if len(in_shape) == 2 and bias:
            inits.append(numpy_helper.from_array(w, f"{prefix}.w"))
            inits.append(numpy_helper.from_array(rng.standard_normal(c_out2).astype(np.float32), f"{prefix}.b"))
            nodes.append(helper.make_node("Gemm", [x_name, f"{prefix}.w", f"{prefix}.b"], [y_name], transB=1))
        else:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{prefix}.wt"))
            if bias:
                inits.append(numpy_helper.from_array(rng.standard_normal(c_out2).astype(np.float32), f"{prefix}.b"))
                nodes.append(helper.make_node("MatMul", [x_name, f"{prefix}.wt"], [f"{prefix}.mm"]))
                nodes.append(helper.make_node("Add", [f"{prefix}.mm", f"{prefix}.b"], [y_name]))
            else:
                nodes.append(helper.make_node("MatMul", [x_name, f"{prefix}.wt"], [y_name]))
    else:
        m = info.module
        spatial = len(in_shape) - 2
        w = (rng.standard_normal([c_out2, c_in2 // g2, *m.kernel_size]) * 0.05).astype(np.float32)
        inputs = [x_name, f"{prefix}.w"]
        inits.append(numpy_helper.from_array(w, f"{prefix}.w"))
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(c_out2).astype(np.float32), f"{prefix}.b"))
            inputs.append(f"{prefix}.b")
        nodes.append(helper.make_node("Conv", inputs, [y_name], kernel_shape=list(m.kernel_size),
                                      strides=list(m.stride), dilations=list(m.dilation),
                                      pads=_conv_pads(m, spatial), group=g2))
    x_vi = helper.make_tensor_value_info(x_name, TensorProto.FLOAT, in_shape)
    y_vi = helper.make_tensor_value_info(y_name, TensorProto.FLOAT, [None] * len(in_shape))
    return nodes, inits, x_vi, y_vi, x


def _roles(unit: Unit, layers: dict) -> list[tuple[str, str]]:
    """(layer, role) for every timed member; a layer listed twice keeps its first role."""
    roles = {}
    for names, role in ((unit.layers, "producer"), (unit.consumers, "consumer"), (unit.per_channel, "per_channel")):
        for name in names:
            if name in layers and name not in roles:
                roles[name] = role
    return list(roles.items())


def untimed(unit: Unit, layers: dict) -> list[str]:
    return [n for n in unit.members if n not in layers]


def unit_onnx(unit: Unit, layers: dict[str, LayerInfo], frac: float = 1.0, simd: tuple[int, float] | None = None,
              seed: int = 0):
    """The timing graph of ``unit``: producers with ``frac`` of their outputs and consumers with ``frac`` of
    their inputs (channel pattern), or producers through the SIMD path at ``simd = (N, density)``.
    Returns ``(ModelProto, feed)``."""
    rng = np.random.default_rng(seed)
    nodes, inits, ins, outs, feed = [], [], [], [], {}
    for i, (name, role) in enumerate(_roles(unit, layers)):
        info = layers[name]
        for call in range(len(info.in_shapes)):
            prefix = f"u{i}c{call}"
            kwargs = {}
            if simd is not None:
                if role == "producer" and info.simd_eligible():
                    kwargs["simd"] = simd
            elif role == "producer":
                kwargs["out_frac"] = frac
            elif role == "consumer":
                kwargs["in_frac"] = frac
            else:
                kwargs["out_frac"] = kwargs["in_frac"] = frac
            n, ini, x_vi, y_vi, x = _layer_nodes(info, call, prefix, rng=rng, **kwargs)
            nodes += n
            inits += ini
            ins.append(x_vi)
            outs.append(y_vi)
            feed[x_vi.name] = x
    graph = helper.make_graph(nodes, f"unit_{unit.name}", ins, outs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgec")
    proto.ir_version = min(proto.ir_version, 10)
    onnx.checker.check_model(proto)
    return proto, feed


def check_units(units: list[Unit], layers: dict[str, LayerInfo], model=None) -> None:
    """Refuse duplicate unit names and members that are no module of ``model`` (or, without ``model``, no
    traced Linear/Conv layer). Modules that exist but are not timed are allowed (``untimed``)."""
    modules = set(dict(model.gm.named_modules())) if model is not None else set()
    names = set()
    for u in units:
        if u.name in names:
            raise EdgecError(f"two prunable units are named '{u.name}'")
        names.add(u.name)
        for layer in u.members:
            if layer not in layers and layer not in modules:
                known = ", ".join(list(layers)[:8]) + (" ..." if len(layers) > 8 else "")
                raise EdgecError(f"unit '{u.name}': '{layer}' is not a module of the model "
                                 f"(timed layers: {known})")


# --- profiling --------------------------------------------------------------------------------------

def _points(unit: Unit, layers: dict, densities, pattern: str):
    """The distinct configurations of one unit under one pattern: [(density, kept, config key)], density desc."""
    kind, n = simd_mod.parse_pattern(pattern)
    points, seen = [], set()
    for s in sorted({float(d) for d in densities}, reverse=True):
        if kind == "channel":
            k = _keep(unit.width, s)
            actual, cfg = k / unit.width, ("channel", k)
            if k == unit.width:
                cfg = ("dense",)
        else:
            eligible = [layers[name] for name in unit.layers if name in layers and layers[name].simd_eligible()]
            if not eligible:
                return []
            kept = sum(simd_mod.kept_vectors(i.in_channels, s) * simd_mod.n_blocks(i.out_channels, n) for i in eligible)
            total = sum(i.in_channels * simd_mod.n_blocks(i.out_channels, n) for i in eligible)
            k = kept
            actual = kept / total
            cfg = ("dense",) if kept == total else ("simd", n, s)
        if cfg in seen:
            continue
        seen.add(cfg)
        points.append((actual, k, cfg))
    return points


def _stat_median(results: list[dict]) -> dict:
    return {k: float(np.median([r[k] for r in results])) for k in ("median_ms", "p10_ms", "p90_ms")}


def profile(model, units=None, densities=DEFAULT_DENSITIES, threads: int = 1, batch: int = 1, shapes=None,
            patterns=DEFAULT_PATTERNS, *, warmup: int = 3, repeats: int = 15, min_seconds: float = 0.05,
            rounds: int = 2, dense_repeats: int = 30, dense_min_seconds: float = 0.3, seed: int = 0,
            dense_onnx=None, progress=None) -> dict:
    """Measure a latency table (format: :mod:`edgec.latency.table`) for ``model`` (an ``edgec.core.graph.Model``).

    ``units``: None / "layers" (each Linear/Conv layer alone), "groups", or a list (see :func:`as_unit` and
    docs/methods.md#latency-tables). ``densities``: the grid (1.0 is always added). ``shapes``/``batch``: input shapes (see :func:`resolve_shapes`).
    ``patterns``: "channel" and/or "simd:N". ``warmup``/``repeats``/``min_seconds``: per configuration and
    round (:func:`measure_session`); ``rounds``: repetitions of each unit's sweep, medians kept.
    ``dense_onnx``: the model's ONNX (bytes/proto/path) if already exported, else ``to_onnx(model)``.
    ``progress``: optional callable taking a one-line message.
    """
    if int(rounds) < 1:
        raise EdgecError(f"rounds must be >= 1, got {rounds}")
    say = progress or (lambda _msg: None)
    grid = table_mod.normalise_densities(densities)
    patterns = table_mod.normalise_patterns(patterns)
    shapes = resolve_shapes(model.spec, shapes, batch)
    layers = trace_layers(model, shapes)
    units = resolve_units(model, units, shapes, layers)
    key = table_mod.table_key(model, threads, shapes)
    feed = make_inputs(model.spec, shapes, seed)

    if dense_onnx is None:
        say("exporting the dense model")
        dense_onnx = to_onnx(model)
    dense_session = create_session(dense_onnx, threads)

    def time_dense():
        return measure_session(dense_session, feed, threads=threads, warmup=warmup,
                               repeats=dense_repeats, min_seconds=dense_min_seconds)

    say("timing the dense model")
    dense_runs = [time_dense()]
    overhead = _run_overhead(threads, warmup, repeats, min_seconds)

    timing = {"threads": threads, "warmup": warmup, "repeats": repeats, "min_seconds": min_seconds}
    entries = []
    for ui, unit in enumerate(units):
        say(f"unit {ui + 1}/{len(units)}: {unit.name}")
        entries.append(_profile_unit(unit, layers, grid, patterns, rounds, seed, timing))

    shared = shared_layers(units, layers)
    interactions = []
    for li, layer in enumerate(dict.fromkeys(name for name, _, _ in shared)):
        say(f"shared layer {li + 1}: {layer}")
        interactions += _interactions(layer, shared, layers, overhead, rounds, seed, timing)

    say("timing the dense model again")
    dense_runs.append(time_dense())
    dense = _stat_median(dense_runs)
    dense["runs_ms"] = [r["median_ms"] for r in dense_runs]
    units_sum = float(sum(e["dense_ms"] for e in entries))
    request = table_mod.table_request(units, grid, patterns)
    return table_mod.make_table(
        key=key, request=request, model=model, units=entries, dense=dense, units_sum=units_sum,
        overhead=overhead, inputs=table_mod.inputs_json(model.spec, shapes), interactions=interactions,
        protocol={"warmup": int(warmup), "repeats": int(repeats), "min_seconds": float(min_seconds),
                  "rounds": int(rounds), "dense_repeats": int(dense_repeats),
                  "dense_min_seconds": float(dense_min_seconds), "opset": OPSET, "seed": int(seed)})


def _profile_unit(unit: Unit, layers: dict, grid, patterns, rounds: int, seed: int, timing: dict) -> dict:
    """One unit's table entry: every pattern's density points timed (medians over ``rounds`` sweeps)."""
    threads = timing["threads"]
    plan = {p: _points(unit, layers, grid, p) for p in patterns}
    timed = bool(_roles(unit, layers))
    configs = {}
    for pts in plan.values():
        for _, _, cfg in pts:
            if cfg not in configs and timed:
                if cfg[0] == "dense":
                    proto, x = unit_onnx(unit, layers, 1.0, seed=seed)
                elif cfg[0] == "channel":
                    proto, x = unit_onnx(unit, layers, cfg[1] / unit.width, seed=seed)
                else:
                    proto, x = unit_onnx(unit, layers, simd=(cfg[1], cfg[2]), seed=seed)
                configs[cfg] = (create_session(proto, threads), x)
    stats = _measure_configs(configs, rounds, **timing)
    if not timed:  # only untimed members (Embedding, BatchNorm ...): no measurable cost of its own
        stats = {cfg: {"median_ms": 0.0, "p10_ms": 0.0, "p90_ms": 0.0} for pts in plan.values() for _, _, cfg in pts}
    entry = unit.to_json()
    entry["layer_info"] = {name: layers[name].describe() for name in unit.members if name in layers}
    entry["untimed"] = untimed(unit, layers)
    entry["patterns"] = {}
    for p, pts in plan.items():
        if not pts:
            continue
        entry["patterns"][p] = {
            "density": [round(a, 6) for a, _, _ in pts],
            "kept": [int(k) for _, k, _ in pts],
            "median_ms": [stats[c]["median_ms"] for _, _, c in pts],
            "p10_ms": [stats[c]["p10_ms"] for _, _, c in pts],
            "p90_ms": [stats[c]["p90_ms"] for _, _, c in pts],
        }
    entry["dense_ms"] = stats[("dense",)]["median_ms"]
    return entry


def interaction_slope(dense_ms: float, out_ms: float, out_frac: float, in_ms: float, in_frac: float,
                      overhead_ms: float) -> tuple[float, float, float]:
    """``(c_out, c_in, slope)`` of a layer shared by two units (docs/methods.md#latency-tables): linear savings
    ``c_out = (ℓ(1,1) − ℓ(a,1)) / (1 − a)``, ``c_in`` likewise, and ``slope = c_out·c_in / (ℓ(1,1) − overhead)``,
    capped at the layer's own measured time ``ℓ(1,1)``: the correction ``slope·(1 − a)(1 − b)`` can never exceed
    what the layer costs. Without the cap a layer whose time is within noise of the run overhead (a 1×1 shortcut
    conv: 0.017 ms against 0.013–0.016 ms) divided by ~0 and claimed seconds of interaction.
    """
    c_out = max(0.0, (dense_ms - out_ms) / (1 - out_frac)) if out_frac < 1 else 0.0
    c_in = max(0.0, (dense_ms - in_ms) / (1 - in_frac)) if in_frac < 1 else 0.0
    return c_out, c_in, min(c_out * c_in / max(dense_ms - overhead_ms, 1e-9), dense_ms)


def _interactions(layer: str, shared: list, layers: dict, overhead: float, rounds: int, seed: int,
                  timing: dict) -> list[dict]:
    """A layer shared by two units, timed alone (dense, outputs and inputs at ``INTERACTION_DENSITY``): the
    slope of its two-sided saving, one record per (out unit, in unit) pair (docs/methods.md#latency-tables)."""
    info = layers[layer]
    ref = INTERACTION_DENSITY
    out_frac = _keep(info.out_channels, ref) / info.out_channels
    in_frac = _keep(info.in_channels, ref) / info.in_channels
    alone = {"dense": unit_onnx(Unit(layer, (layer,), 1), layers, 1.0, seed=seed),
             "out": unit_onnx(Unit(layer, (layer,), 1), layers, out_frac, seed=seed),
             "in": unit_onnx(Unit(layer, (), 1, (layer,)), layers, in_frac, seed=seed)}
    configs = {k: (create_session(proto, timing["threads"]), x) for k, (proto, x) in alone.items()}
    st = _measure_configs(configs, rounds, **timing)
    dense_ms = st["dense"]["median_ms"]
    c_out, c_in, slope = interaction_slope(dense_ms, st["out"]["median_ms"], out_frac, st["in"]["median_ms"],
                                           in_frac, overhead)
    return [{"layer": layer, "out_unit": out_unit, "in_unit": in_unit, "slope_ms": slope,
             "out_slope_ms": c_out, "in_slope_ms": c_in, "dense_ms": dense_ms, "ref_density": ref,
             "out_ms": st["out"]["median_ms"], "in_ms": st["in"]["median_ms"]}
            for name, out_unit, in_unit in shared if name == layer]


def _measure_configs(configs: dict, rounds: int, **options) -> dict:
    """Time every ``{key: (session, feed)}`` in ``rounds`` alternating sweeps; medians over rounds."""
    results = {cfg: [] for cfg in configs}
    order = list(configs)
    for r in range(int(rounds)):
        for cfg in (order if r % 2 == 0 else order[::-1]):
            session, x = configs[cfg]
            results[cfg].append(measure_session(session, x, **options))
    return {cfg: _stat_median(res) for cfg, res in results.items()}


def shared_layers(units: list[Unit], layers: dict) -> list[tuple[str, str, str]]:
    """``(layer, out_unit, in_unit)`` for every timed layer whose outputs shrink with one unit (producer or
    per-channel) and whose inputs shrink with another (consumer): the layers the additive model counts twice."""
    outs, ins = {}, {}
    for u in units:
        for name in u.layers + u.per_channel:
            outs.setdefault(name, []).append(u.name)
        for name in u.consumers:
            ins.setdefault(name, []).append(u.name)
    found = []
    for name in layers:
        for a in dict.fromkeys(outs.get(name, [])):
            for b in dict.fromkeys(ins.get(name, [])):
                if a != b:
                    found.append((name, a, b))
    return found


def _run_overhead(threads, warmup, repeats, min_seconds) -> float:
    """Median time of ``session.run`` on a trivial graph (1-element Identity): the fixed cost in every unit."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "overhead",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = min(proto.ir_version, 10)
    session = create_session(proto, threads)
    return measure_session(session, {"x": np.zeros(1, np.float32)}, warmup=warmup, repeats=repeats,
                           min_seconds=min_seconds)["median_ms"]
