"""Graph capture of a user's nn.Module: stock-layer rewrite, fx tracing, output clean-up, equivalence check.

``capture`` never touches the module it is given. It swaps torch's opaque stock transformer layers for
traceable stand-ins (``edgec.models.stock``), traces with edgec's fx tracer and, when plain fx fails,
with :class:`ShapeTracer`: the same symbolic trace, but every proxy also carries the values the op takes on
real sample inputs at two input shapes. That settles what plain fx cannot (``B, T, C = x.size()``,
``math.sqrt(k.size(-1))``, ``assert T <= block_size``) while sizes stay graph nodes wherever Python does not
force a number; a Python decision that differs between the two shapes is refused, naming the user's line.
The result is checked against the original module on both shapes whenever anything was rewritten or the
fallback tracer was used.
"""
from __future__ import annotations

import copy
import inspect
import operator
import os
import traceback

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from edgec.core.errors import EdgecError, first_line
from edgec.core.graph import EdgecTracer, max_error
from edgec.models.stock import rewrite_stock

TOLERANCE = 1e-4  # relative to the output scale (edgec.core.graph.max_error)
_SHADOW = "edgec_shadow"
# Frames in these directories are never "the user's line": torch itself and edgec (this file's package root).
_SKIP_DIRS = (os.path.dirname(torch.__file__) + os.sep,
              os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)


def capture(module: nn.Module, spec, *, label: str = "model") -> tuple[fx.GraphModule, dict]:
    """``(gm, record)``: the traced GraphModule (eval mode) and the capture record.

    record: ``{"method": "fx"|"fx-shapes", "rewrites": [{module, from, to}], "name_map": {old: [new]},
    "dropped_outputs": [positions], "check": {...} (only when rewritten or traced with shapes)}``.
    """
    work, rewrites, name_map = rewrite_stock(copy.deepcopy(module).eval())
    concrete = _concrete_args(work, spec, label)
    try:
        gm, method = _fx_trace(work, concrete), "fx"
    except Exception:  # noqa: BLE001 - any failure of plain fx sends us to the shape-aware tracer
        work = rewrite_stock(copy.deepcopy(module).eval())[0]  # fresh: the failed trace may have left state
        samples = (spec.sample(seed=0, alt=False), spec.sample(seed=0, alt=True))
        gm, method = _shapes_trace(work, concrete, samples, label), "fx-shapes"
    dropped = _drop_none_outputs(gm)
    _eliminate_dead_code(gm)
    gm.recompile()
    record = {"method": method, "rewrites": rewrites, "name_map": name_map, "dropped_outputs": dropped}
    if rewrites or method == "fx-shapes":
        record["check"] = check_capture(module, gm, spec, label, method, train_mode=bool(rewrites))
    return gm.eval(), record


def _concrete_args(module: nn.Module, spec, label: str) -> dict:
    """Forward parameters beyond the spec's inputs, fixed to their defaults (``forward(idx, targets=None)``)."""
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    n = len(spec.inputs)
    positional = [p for p in params if p.kind != p.KEYWORD_ONLY]
    if len(positional) < n and not any(p.kind == p.VAR_POSITIONAL
                                       for p in inspect.signature(module.forward).parameters.values()):
        raise EdgecError(f"{label}: forward takes {len(positional)} input(s) but the input spec gives {n}; "
                         "give one --input-shape per forward argument")
    rest = [p for p in params if p not in positional[:n]]
    missing = [p.name for p in rest if p.default is inspect.Parameter.empty]
    if missing:
        raise EdgecError(f"{label}: forward argument(s) {', '.join(missing)} have no default and no input "
                         "spec; give an --input-shape for each, in forward's order")
    return {p.name: p.default for p in rest}


def _fx_trace(module: nn.Module, concrete: dict, tracer: fx.Tracer | None = None) -> fx.GraphModule:
    tracer = tracer or EdgecTracer()
    graph = tracer.trace(module, concrete_args=concrete or None)
    for node in graph.nodes:
        # fx would emit `wrap("torch.ones")` into the code, which breaks every later fx trace in the process.
        if node.op == "call_function" and any(node.target is f for f in _FACTORIES):
            node.meta.pop("is_wrapped", None)
    gm = fx.GraphModule(tracer.root, graph, class_name=type(module).__name__)
    _strip_concrete_placeholders(gm, concrete)
    return gm


def _strip_concrete_placeholders(gm: fx.GraphModule, concrete: dict) -> None:
    """fx keeps a placeholder per concrete argument, feeding only an "is still the default" assert; drop both,
    so the graph takes exactly the spec's inputs."""
    if not concrete:
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders[len(placeholders) - len(concrete):]:
        _erase_with_users(gm.graph, node)
    gm.recompile()


def _erase_with_users(graph: fx.Graph, node: fx.Node) -> None:
    for user in list(node.users):
        _erase_with_users(graph, user)
    graph.erase_node(node)


def _drop_none_outputs(gm: fx.GraphModule) -> list[int]:
    """Remove constant ``None`` entries of a tuple/list output; a single remaining entry is returned bare."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    if not isinstance(value, (tuple, list)):
        return []
    dropped = [i for i, v in enumerate(value) if v is None]
    if not dropped:
        return []
    kept = [v for v in value if v is not None]
    out.args = (kept[0] if len(kept) == 1 else type(value)(kept),)
    return dropped


def _eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Drop unused nodes (comparisons of passed asserts, unused attention weights); in-place ops stay."""
    def impure(node: fx.Node) -> bool:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        inplace = (name.endswith("_") and not name.endswith("__")) or node.target in _INPLACE_OPERATORS
        return node.is_impure() or (node.op in ("call_method", "call_function") and inplace)

    gm.graph.eliminate_dead_code(is_impure_node=impure)


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.iand, operator.ior, operator.ixor, operator.setitem}


# ----- the shape-aware tracer -------------------------------------------------------------------------------


def _user_site(frames) -> tuple[str, int, str] | None:
    """(file, line, code) of the innermost frame outside torch and edgec; file relative to cwd when inside it."""
    skip = _SKIP_DIRS
    for fr in reversed(list(frames)):
        path = os.path.abspath(fr.filename)
        if path.startswith(skip) or fr.filename.startswith("<"):
            continue
        rel = os.path.relpath(path)
        return (rel if not rel.startswith("..") else os.path.basename(path)), fr.lineno, (fr.line or "").strip()
    return None


def _site_text(site) -> str:
    return f"{site[0]}:{site[1]}: `{site[2]}`" if site else "(no user code on the stack)"


def _fail(label: str, what: str, fix: str):
    site = _user_site(traceback.extract_stack()[:-1])
    raise EdgecError(f"{label}: cannot capture {_site_text(site)}: {what}; {fix}")


class _Concrete:
    """Python conversions of a proxy: the traced value when it is the same at both shapes, else an error."""

    def _static(self, kind: str, convert):
        a, b = _shadow(self.node)
        if isinstance(a, torch.Tensor) and kind != "len":
            _fail(self.tracer.label, f"{kind}() of a tensor value needs its data, which capture cannot follow",
                  "keep it a tensor operation (no int()/float()/item() on tensors in forward)")
        va, vb = convert(a), convert(b)
        if va != vb:
            _fail(self.tracer.label, f"{kind}() turns a size into a Python number, but it changes with the input "
                  f"shape ({va} vs {vb})", "keep sizes as x.size(i) expressions (reshape with -1, slice with "
                  "the size) instead of Python numbers, or make this axis static")
        return va

    def __len__(self):
        return self._static("len", len)

    def __int__(self):
        return self._static("int", int)

    def __index__(self):
        return self._static("index", operator.index)

    def __float__(self):
        return self._static("float", float)

    def __getattr__(self, k):
        return _ShapeAttribute(self, k)


class ShapeProxy(_Concrete, fx.Proxy):
    pass


class _ShapeAttribute(_Concrete, fx.proxy.Attribute):
    pass


_FACTORIES = (torch.ones, torch.zeros, torch.full, torch.empty, torch.rand, torch.randn, torch.randint,
              torch.arange, torch.eye, torch.linspace, torch.tril_indices, torch.triu_indices)


def _shadow(node: fx.Node):
    return node.meta[_SHADOW]


class ShapeTracer(EdgecTracer):
    """EdgecTracer whose nodes carry shadow values: the op run on real inputs at two shapes (no grad)."""

    # Buffers as graph nodes too, so slicing one by a size (self.bias[:, :, :T, :T]) stays symbolic.
    proxy_buffer_attributes = True

    def __init__(self, samples: tuple, label: str = "model"):
        super().__init__()
        self.samples, self.label = samples, label
        self._shadowing = False  # while running an op on real values, module calls and attributes are plain
        # torch factories called with sizes (torch.ones(t, t)) do not dispatch on proxies: record them as fx
        # records math functions (plain calls pass through untouched).
        self._autowrap_function_ids.update(id(f) for f in _FACTORIES)
        self._autowrap_search.append(torch)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapeProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind != "output":
            node.meta[_SHADOW] = tuple(self._run(node, variant) for variant in (0, 1))
        return node

    def _run(self, node: fx.Node, variant: int):
        if node.op == "placeholder":
            i = [n for n in self.graph.nodes if n.op == "placeholder"].index(node)
            inputs = self.samples[variant]
            return inputs[i] if i < len(inputs) else (node.args[0] if node.args else None)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _shadow(n)[variant])
        self._shadowing = True
        try:
            with torch.no_grad():
                if node.op == "get_attr":  # a copy: an in-place op in forward must not change the weights
                    value = operator.attrgetter(node.target)(self.root)
                    return value.detach().clone() if isinstance(value, torch.Tensor) else value
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                return self.root.get_submodule(node.target)(*args, **kwargs)
        finally:
            self._shadowing = False

    def call_module(self, m, forward, args, kwargs):
        if self._shadowing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._shadowing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def iter(self, obj: fx.Proxy):
        a, b = _shadow(obj.node)
        if len(a) != len(b):
            _fail(self.label, f"iterates over an axis whose length changes with the input shape ({len(a)} vs "
                  f"{len(b)})", "write the loop as a tensor operation over that axis, or make the axis static")
        return iter([obj[i] for i in range(len(a))])

    def to_bool(self, obj: fx.Proxy) -> bool:
        a, b = _shadow(obj.node)
        if isinstance(a, torch.Tensor):
            _fail(self.label, "Python control flow (if/while/assert/and/or) on a tensor's values, which a graph "
                  "cannot capture", "use tensor operations instead (torch.where, masking), or move the check "
                  "out of forward")
        if bool(a) != bool(b):
            _fail(self.label, f"control flow on a size that changes with the input shape ({bool(a)} at one "
                  f"shape, {bool(b)} at the other)", "make the branch not depend on that size, or make the "
                  "axis static")
        return bool(a)


def _shapes_trace(module: nn.Module, concrete: dict, samples: tuple, label: str) -> fx.GraphModule:
    tracer = ShapeTracer(samples, label)
    try:
        gm = _fx_trace(module, concrete, tracer)
    except EdgecError:
        raise
    except Exception as exc:  # noqa: BLE001 - report the user's line whatever went wrong
        site = _user_site(traceback.extract_tb(exc.__traceback__))
        raise EdgecError(f"{label}: cannot capture {_site_text(site)}: {type(exc).__name__}: "
                         f"{first_line(exc, 200)}; rewrite this line with tensor operations that torch.fx can "
                         "record (sizes as x.size(i), no Python loops or branches on tensor values)") from None
    for node in gm.graph.nodes:
        node.meta.pop(_SHADOW, None)
    return gm


# ----- verification -----------------------------------------------------------------------------------------


def _tensors(out) -> tuple:
    return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _compare(reference: nn.Module, gm: fx.GraphModule, spec, alts=(False, True)) -> dict:
    worst = {"max_abs_error": 0.0, "output_scale": 0.0, "rel_error": 0.0}
    for alt in alts:
        inputs = spec.sample(seed=0, alt=alt)
        with torch.no_grad():
            ref, got = _tensors(reference(*inputs)), _tensors(gm(*inputs))
        if [tuple(t.shape) for t in ref] != [tuple(t.shape) for t in got]:
            worst["shape_mismatch"] = [[list(t.shape) for t in ref], [list(t.shape) for t in got]]
            worst["rel_error"] = float("inf")
            continue
        err = max_error(ref, got)
        worst = {**worst, **{k: max(worst[k], err[k]) for k in err}}
    return worst


def _no_dropout(module: nn.Module) -> nn.Module:
    module = copy.deepcopy(module).train()
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        elif isinstance(m, nn.MultiheadAttention):  # its attention dropout is a float, not a module
            m.dropout = 0.0
    return module


def check_capture(module: nn.Module, gm: fx.GraphModule, spec, label: str = "model", method: str = "fx",
                  train_mode: bool = False) -> dict:
    """Eval-mode outputs of ``gm`` against the original module at both sample shapes (raises on mismatch).

    ``train_mode``: also compare in training mode with dropout off (recorded, not enforced: a model that
    branches on ``self.training`` is captured in eval mode by design).
    """
    reference = copy.deepcopy(module).eval()
    check = _compare(reference, gm.eval(), spec)
    check.update(tolerance=TOLERANCE, passed=check["rel_error"] <= TOLERANCE,
                 shapes=[[list(t.shape) for t in spec.sample(seed=0, alt=alt)] for alt in (False, True)])
    if train_mode:
        train = _compare(_no_dropout(module), _no_dropout(gm), spec)
        check["train_mode"] = {"rel_error": train["rel_error"], "passed": train["rel_error"] <= TOLERANCE}
    if not check["passed"]:
        how = "the stock-layer rewrite" if method == "fx" else "shape-aware tracing"
        raise EdgecError(f"{label}: the captured graph differs from the module (relative error "
                         f"{check['rel_error']:.3g} > {TOLERANCE:g}) after {how}; the model may branch on input "
                         "values or on sizes the two sample shapes do not reveal")
    return check
