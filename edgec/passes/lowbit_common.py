"""What the ternary/binary scaffold passes share: layer selection, parameter checks and the scaffold and
fold pass templates.

A scaffold replaces each chosen Conv/Linear at the same qualified name by a ``LatentLayer``
(``edgec.layers.latent``); a fold replaces every scaffold of its kind by the LowBit deploy layer it computes
in eval mode (exact, verified at 1e-5). Selection rules: see docs/methods.md#shared-by-the-low-bit-scaffolds.

``keep_first_last`` keeps the *first layer* full precision only when it reads the model input directly (rule
``first_layer="input"``): the first Conv/Linear in graph order is kept when no weight-holding module (an
embedding table, a recurrent layer, another weight layer) or weight parameter lies on a path from a model
input to it. In a token model (decoder LM, BERT) the first layer is the embedding lookup, already fp32, so
every Linear of the blocks is quantized; the output heads (classifier, LM head; see below) stay fp32 unless
``keep_first_last=False``. Records written before the rule existed carry no ``first_layer`` and replay with
the rule they were made with, ``"first-linear"`` (the first Conv/Linear in graph order, whatever precedes it).

What it keeps at the other end is the *head of each model output* (rule ``last_layer="heads"``): for every
graph output, the weight layers from which that output is reached through weight-free ops only, and of those
the last in graph order (a residual stream reaches an output from every block's projections; the last one is
the head). A classifier or LM keeps its one head, a detector its class head and its box head. Records written
before the rule (scaffold versions 1 and 2) carry no ``last_layer`` and replay with ``"last-linear"``: the last
linear layer in graph order, wherever its output goes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from edgec.core.errors import EdgecError
from edgec.core.graph import Model, set_submodule, verify_equivalent
from edgec.core.ops import EQUIVALENCE_TOLERANCE as TOLERANCE
from edgec.core.pass_manager import Pass, PassResult, PostconditionError, PreconditionError, describe_skips, skip
from edgec.layers.latent import LatentLayer
from edgec.layers.lowbit import LowBitLayer, LowBitLinear
from edgec.passes.weights import (
    FUNCTIONAL_REASON,
    first_calls,
    functional_weights,
    has_matrix_weight,
    opaque_reason,
    opaque_weight_layers,
)

SELECTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
LOWBIT = "already low-bit"  # weight_layers' reason for a scaffold or deploy layer: done, so never a skip
# What ``keep_first_last`` calls the first layer: "input" (kept only when it reads the model input directly) or
# "first-linear" (the first Conv/Linear in graph order: the rule of records written without ``first_layer``).
FIRST_LAYER_RULES = ("input", "first-linear")
LEGACY_FIRST_LAYER = "first-linear"
# What it calls the last layers: "heads" (the head of each model output) or "last-linear" (the last linear layer
# in graph order: the rule of records written without ``last_layer``).
LAST_LAYER_RULES = ("heads", "last-linear")
LEGACY_LAST_LAYER = "last-linear"


# ------------------------------------------------------------------------------------------- parameters

def as_globs(value, pass_name: str, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise EdgecError(f"{pass_name}: {what} must be a list of non-empty glob strings, got {value!r}")
    return list(value)


def as_bool(value, pass_name: str, what: str) -> bool:
    if not isinstance(value, bool):
        raise EdgecError(f"{pass_name}: {what} must be true or false, got {value!r}")
    return value


def as_choice(value, choices: tuple, pass_name: str, what: str) -> str:
    if value not in choices:
        raise EdgecError(f"{pass_name}: {what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def as_float(value, pass_name: str, what: str, *, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EdgecError(f"{pass_name}: {what} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise EdgecError(f"{pass_name}: {what} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def as_int(value, pass_name: str, what: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise EdgecError(f"{pass_name}: {what} must be an integer{bound}, got {value!r}")
    return int(value)


# -------------------------------------------------------------------------------------------- selection

def _is_lowbit_layer(m: nn.Module) -> bool:
    return isinstance(m, (LatentLayer, LowBitLayer))


def _tied_modules(gm: nn.Module) -> dict[str, str]:
    """Modules whose parameters are shared with another module or read directly by a get_attr node, with why."""
    owners: dict[int, list[str]] = {}
    for mod_name, mod in gm.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mod_name)
    tied: dict[str, str] = {}
    modules = dict(gm.named_modules())
    for names in owners.values():
        names = list(dict.fromkeys(names))
        for n in names if len(names) > 1 else ():
            others = [o for o in names if o != n]
            tables = [o for o in others if isinstance(modules.get(o), (nn.Embedding, nn.EmbeddingBag))]
            if tables and isinstance(modules.get(n), SELECTABLE):
                # a tied LM head: quantizing it would need the embedding table quantized with it
                tied.setdefault(n, f"weight tied to the embedding table {tables[0]} (tied word embeddings): the "
                                   "head cannot be quantized without the embedding, which stays fp32; kept fp32 "
                                   "(untie them to quantize the head)")
            else:
                shown = ", ".join(o or "<root>" for o in others)
                tied.setdefault(n, f"weight shared with {shown} (tied parameters); kept fp32")
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner = str(node.target).rpartition(".")[0]
            tied.setdefault(owner, f"its parameter '{node.target}' is also read directly by the graph; kept fp32")
    return tied


def weight_layers(model: Model) -> list[tuple[str, nn.Module, str | None]]:
    """(name, module, why it cannot be scaffolded or None) for every Conv/Linear and low-bit layer in graph
    order, each module once. Low-bit layers count for the first/last rule but are never selected."""
    tied = _tied_modules(model.gm)
    out = []
    for name, m in first_calls(model.gm):
        if isinstance(m, SELECTABLE):
            why = tied.get(name)
            if getattr(m, "padding_mode", "zeros") != "zeros":
                why = f"padding_mode='{m.padding_mode}' is not supported by the low-bit layers; kept fp32"
            out.append((name, m, why))
        elif _is_lowbit_layer(m):
            out.append((name, m, LOWBIT))
    return out


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, LowBitLinear)) or (isinstance(m, LatentLayer) and m.op == "linear")


def _weight_holder(node, modules: dict, params: dict) -> bool:
    """A graph node that holds weights: a call of a module with a matrix-like weight (embedding tables, recurrent
    layers, Conv/Linear and low-bit layers) or a parameter of 2 or more dims read directly by the graph."""
    key = str(node.target)
    if node.op == "call_module":
        return key in modules and has_matrix_weight(modules[key])
    return node.op == "get_attr" and key in params and params[key].dim() >= 2


def weighted_ancestors(gm: nn.Module, name: str) -> list[str]:
    """The weight holders on the paths from the model inputs to the first call of module ``name``, in graph
    order: modules with a matrix-like weight (embedding tables, recurrent layers, Conv/Linear and low-bit
    layers) and parameters of 2 or more dims read directly by the graph. Empty: ``name`` reads the input
    through weight-free ops only."""
    modules = dict(gm.named_modules())
    params = dict(gm.named_parameters())
    target = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == name), None)
    if target is None:
        return []
    seen, stack, found = set(), list(target.all_input_nodes), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _weight_holder(node, modules, params):
            found.add(node)
        stack.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [str(n.target) for n in sorted(found, key=order.__getitem__)]


def output_heads(gm: nn.Module, layer_names: set[str]) -> list[tuple[int, str | None]]:
    """Per graph output (in order): ``(position, head)``, the head being the last weight holder in graph order
    from which that output is reached through weight-free ops only (a call of a module with a matrix-like
    weight, or a ≥2-D parameter read by the graph, stops the walk) when it is one of ``layer_names``; None when
    that last holder is something else (an embedding, a functional weight) or when no weight reaches the output."""
    modules = dict(gm.named_modules())
    params = dict(gm.named_parameters())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outputs: list = []
    torch.fx.node.map_arg(out_node.args, outputs.append)
    heads = []
    for pos, value in enumerate(outputs):
        seen, stack, found = set(), [value], []
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if _weight_holder(node, modules, params):
                found.append(node)
                continue
            stack.extend(node.all_input_nodes)
        last = max(found, key=order.__getitem__, default=None)
        head = str(last.target) if last is not None and last.op == "call_module" else None
        heads.append((pos, head if head in layer_names else None))
    return heads


def _first_last(model: Model, layers: list, rule: str, last_rule: str = LEGACY_LAST_LAYER
                ) -> tuple[dict[str, str], dict]:
    """The layers ``keep_first_last`` keeps full precision — the first weight layer (under ``rule``) and the
    output heads (under ``last_rule``; see the module docstring) — and a note on the first layer for the
    selection check."""
    kept: dict[str, str] = {}
    note: dict = {}
    if layers:
        first = layers[0][0]
        before = weighted_ancestors(model.gm, first) if rule == "input" else []
        note = {"rule": rule, "layer": first, "kept": not before}
        if before:
            note["reason"] = (f"{before[0]} ({_kind(model.gm, before[0])}) runs before it on the path from the "
                              "model input, so it is not the input layer: quantized (the input-facing layer is "
                              "already full precision)")
        else:
            kept[first] = "first layer kept fp32 (--keep-first-last)"
        if last_rule == "heads":
            by_name = {n: m for n, m, _ in layers}
            heads = output_heads(model.gm, set(by_name))
            for pos, head in heads:
                if head is None or head in kept:
                    continue
                if len(heads) > 1:
                    kept[head] = f"head of model output {pos} kept fp32 (--keep-first-last)"
                elif _is_linear_like(by_name[head]):
                    kept[head] = "last linear layer kept fp32 (--keep-first-last)"
                else:
                    kept[head] = "output head kept fp32 (--keep-first-last)"
        else:
            linear = [n for n, m, _ in layers if _is_linear_like(m)]
            if linear and linear[-1] not in kept:
                kept[linear[-1]] = "last linear layer kept fp32 (--keep-first-last)"
    return kept, note


def _kind(gm: nn.Module, name: str) -> str:
    """``nn.Embedding`` for a torch module, the class name otherwise, ``parameter`` for a bare parameter."""
    try:
        m = gm.get_submodule(name)
    except AttributeError:
        return "parameter"
    cls = type(m)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


def _glob_reason(name: str, include: list[str], exclude: list[str]) -> str | None:
    """Why the include/exclude globs leave ``name`` out (None: selected)."""
    hit = next((g for g in exclude if fnmatchcase(name, g)), None)
    if hit is not None:
        return f"excluded by --exclude '{hit}'"
    if not any(fnmatchcase(name, g) for g in include):
        return f"not matched by --include {include}"
    return None


@dataclass
class Selection:
    """What a scaffold pass rewrites (``chosen``), the names ``keep_first_last`` keeps, and every weight layer
    it leaves alone with the reason (``skipped``, graph order; layers already low-bit are not listed)."""

    chosen: list[tuple[str, nn.Module]]
    kept: list[str]
    skipped: list[dict]
    first_layer: dict  # keep_first_last's view of the first weight layer: {rule, layer, kept[, reason]}


def _unreachable(model: Model, names: set[str]) -> list[tuple[str, str]]:
    """(name, reason) of the weights no scaffold pass can reach: opaque modules and functional parameters."""
    gm = model.gm
    out = [(n, opaque_reason(m)) for n, m in opaque_weight_layers(gm, SELECTABLE + (LatentLayer, LowBitLayer))]
    owners = names | {n for n, _ in out}
    return out + [(t, FUNCTIONAL_REASON) for t in functional_weights(gm, owners)]


def select_layers(model: Model, params: dict, pass_name: str) -> Selection:
    """The layers to scaffold in graph order, those kept full precision, and the skipped ones with reasons.
    ``params["first_layer"]`` (absent: the legacy rule) says what the first layer is (module docstring)."""
    layers = weight_layers(model)
    rule = params.get("first_layer", LEGACY_FIRST_LAYER)
    last_rule = params.get("last_layer", LEGACY_LAST_LAYER)
    kept, note = _first_last(model, layers, rule, last_rule) if params["keep_first_last"] else ({}, {})
    include, exclude = params["include"], params["exclude"]
    chosen, reasons = [], {}
    for name, m, why in layers:
        if why == LOWBIT:
            continue
        # the user's selection wins, so `--exclude` acknowledges a layer the pass cannot handle (--strict)
        by_options = kept.get(name) or _glob_reason(name, include, exclude)
        if by_options is None and why is None:
            chosen.append((name, m))
        else:
            reasons[name] = (by_options, True) if by_options else (why, False)
    for name, why in _unreachable(model, {n for n, _, _ in layers}):
        by_options = _glob_reason(name, include, exclude)
        reasons[name] = (by_options, True) if by_options else (why, False)
    order = {n.target: i for i, n in reversed(list(enumerate(model.gm.graph.nodes))) if isinstance(n.target, str)}
    skipped = [skip(n, r, deliberate) for n, (r, deliberate) in
               sorted(reasons.items(), key=lambda kv: order.get(kv[0], len(order)))]
    if not chosen:
        _refuse_empty(model, pass_name, layers, list(kept), include, exclude, skipped)
    return Selection(chosen, list(kept), skipped, note)


def _refuse_empty(model, pass_name, layers, kept, include, exclude, skipped) -> None:
    """Nothing selected: say why, naming what was skipped."""
    listed = f"; skipped: {describe_skips(skipped)}" if skipped else ""
    candidates = [n for n, _, why in layers if why is None and n not in kept]
    if not candidates:
        why = ("it has no nn.Linear/nn.Conv1d/nn.Conv2d layer left to quantize"
               + (f" besides the full-precision first/last layer(s) {kept}" if kept else ""))
        raise PreconditionError(f"{pass_name}: nothing to scaffold in {model.arch}: {why}{listed}")
    names = ", ".join(candidates[:4]) + (", ..." if len(candidates) > 4 else "")
    raise PreconditionError(f"{pass_name}: include {include} and exclude {exclude} select none of the "
                            f"{len(candidates)} quantizable layer(s) in {model.arch} (e.g. {names}){listed}")


def ineligible_layers(model: Model) -> list[str]:
    """Conv/Linear layers never selected: tied parameters or a non-zero padding mode."""
    return [n for n, m, why in weight_layers(model) if why is not None and isinstance(m, SELECTABLE)]


# ---------------------------------------------------------------------------------------- pass templates

class LowBitScaffoldPass(Pass):
    """Template: select layers, build one ``make_layer`` scaffold per layer at the same name."""

    structural = True
    kind = ""  # the LatentLayer kind this pass inserts
    label = ""  # for summaries: "STTN", "DLT", "binary"
    activations: tuple = ("none",)

    def common_params(self, include, exclude, keep_first_last, activations, first_layer=None,
                      last_layer=None) -> dict:
        """The selection parameters. ``first_layer``/``last_layer`` None: "input"/"heads" for a new scaffold,
        while a replayed record without them (written before the rules existed) keeps the rules it was made with
        (see :meth:`rule_params`)."""
        self.first_layer_given = first_layer is not None
        self.last_layer_given = last_layer is not None
        return {"include": as_globs(include, self.name, "include"),
                "exclude": as_globs(exclude, self.name, "exclude"),
                "keep_first_last": as_bool(keep_first_last, self.name, "keep_first_last"),
                "first_layer": as_choice("input" if first_layer is None else first_layer, FIRST_LAYER_RULES,
                                         self.name, "first_layer"),
                "last_layer": as_choice("heads" if last_layer is None else last_layer, LAST_LAYER_RULES,
                                        self.name, "last_layer"),
                "activations": as_choice(activations, self.activations, self.name, "activations")}

    def rule_params(self, replay: bool) -> dict:
        """The parameters selection runs with: a replayed record that does not name ``first_layer`` (v1) or
        ``last_layer`` (v1, v2) used the legacy rule."""
        params = self.params
        if replay and not getattr(self, "first_layer_given", True):
            params = {**params, "first_layer": LEGACY_FIRST_LAYER}
        if replay and not getattr(self, "last_layer_given", True):
            params = {**params, "last_layer": LEGACY_LAST_LAYER}
        return params

    def make_layer(self, name: str, layer: nn.Module, index: int, replay: bool) -> LatentLayer:
        raise NotImplementedError

    def describe(self) -> str:
        return ""

    def call(self, model: Model, *, replay: bool = False) -> PassResult:
        gm = model.gm
        sel = select_layers(model, self.rule_params(replay), self.name)
        chosen, kept = sel.chosen, sel.kept
        errors = []
        for i, (name, layer) in enumerate(chosen):
            new = self.make_layer(name, layer, i, replay)
            if not replay:
                with torch.no_grad():
                    w = layer.weight.detach().double()
                    w_hat = new.weight_hat().detach().double().reshape(w.shape)
                    errors.append(float((w_hat - w).norm() / w.norm().clamp_min(1e-30)))
            set_submodule(gm, name, new.train(gm.training))
        gm.recompile()
        n_dw = sum(1 for _, m in chosen if getattr(m, "groups", 1) > 1)
        checks = {}
        if not replay:
            checks["selection"] = {"layers": [n for n, _ in chosen], "count": len(chosen), "full_precision": kept,
                                   "grouped_or_depthwise": n_dw, "ineligible": ineligible_layers(model)}
            if sel.first_layer:
                checks["selection"]["first_layer"] = sel.first_layer
            checks["init"] = {"weight_rel_error_mean": sum(errors) / len(errors),
                              "weight_rel_error_max": max(errors)}
        dw = f" ({n_dw} grouped/depthwise)" if n_dw else ""
        return PassResult(model, modified=True, checks=checks, skipped=[] if replay else sel.skipped,
                          summary=f"inserted {self.label} scaffolds in {len(chosen)} layer(s){dw} "
                                  f"({self.describe()}); {len(chosen)} changed, {len(sel.skipped)} skipped")

    def ensures(self, model: Model) -> None:
        if not any(getattr(m, "kind", None) == self.kind for _, m in model.scaffolds()):
            raise PostconditionError(f"{self.name} inserted no {self.kind} scaffold")


class LowBitFoldPass(Pass):
    """Template: replace every scaffold of ``scaffold_cls`` by its LowBit deploy layer, verify exactness."""

    structural = True
    scaffold_cls: type = LatentLayer
    label = ""
    target = ""

    def found(self, model: Model) -> list[tuple[str, LatentLayer]]:
        return [(n, m) for n, m in model.gm.named_modules() if isinstance(m, self.scaffold_cls)]

    def call(self, model: Model, *, replay: bool = False) -> PassResult:
        found = self.found(model)
        if not found:
            return PassResult(model, modified=False, summary=f"no {self.label} scaffold")
        before = None if replay else model.clone(share_weights=True)  # read-only: the pass replaces modules
        gm = model.gm
        for name, m in found:
            set_submodule(gm, name, m.to_lowbit(fill=not replay))
        gm.recompile()
        checks = {} if replay else {"equivalence": verify_equivalent(before, model, TOLERANCE)}
        return PassResult(model, modified=True, checks=checks,
                          summary=f"folded {len(found)} {self.label} layer(s) into {self.target} LowBit layers")

    def ensures(self, model: Model) -> None:
        left = self.found(model)
        if left:
            raise PostconditionError(f"{self.name} left {len(left)} {self.label} scaffold(s), e.g. '{left[0][0]}'")
