"""What the ternary/binary scaffold passes share: layer selection, parameter checks and the scaffold and
fold pass templates.

A scaffold replaces each chosen Conv/Linear at the same qualified name by a ``LatentLayer``
(``edgec.layers.latent``); a fold replaces every scaffold of its kind by the LowBit deploy layer it computes
in eval mode (exact, verified at 1e-5). Selection rules: see docs/methods.md#sttn.
"""
from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch
from torch import nn

from edgec.core.errors import EdgecError
from edgec.core.graph import Model, set_submodule, verify_equivalent
from edgec.core.ops import EQUIVALENCE_TOLERANCE as TOLERANCE
from edgec.core.pass_manager import Pass, PassResult, PostconditionError, PreconditionError
from edgec.layers.latent import LatentLayer
from edgec.layers.lowbit import LowBitLayer, LowBitLinear

SELECTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


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


def _tied_modules(gm: nn.Module) -> set[str]:
    """Modules whose parameters are shared with another module or read directly by a get_attr node."""
    owners: dict[int, set[str]] = {}
    for mod_name, mod in gm.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(mod_name)
    tied = {n for names in owners.values() if len(names) > 1 for n in names}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            tied.add(str(node.target).rpartition(".")[0])
    return tied


def weight_layers(model: Model) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, selectable) for every weight layer in graph order, each module once."""
    gm = model.gm
    modules = dict(gm.named_modules())
    tied = _tied_modules(gm)
    seen, out = set(), []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        m = modules.get(node.target)
        if isinstance(m, SELECTABLE):
            ok = getattr(m, "padding_mode", "zeros") == "zeros" and node.target not in tied
            out.append((node.target, m, ok))
        elif _is_lowbit_layer(m):
            out.append((node.target, m, False))
        else:
            continue
        seen.add(node.target)
    return out


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, LowBitLinear)) or (isinstance(m, LatentLayer) and m.op == "linear")


def select_layers(model: Model, params: dict, pass_name: str) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The layers to scaffold, in graph order, and the names kept full precision by ``keep_first_last``."""
    layers = weight_layers(model)
    kept: list[str] = []
    if params["keep_first_last"] and layers:
        kept.append(layers[0][0])
        linear = [n for n, m, _ in layers if _is_linear_like(m)]
        if linear and linear[-1] not in kept:
            kept.append(linear[-1])
    include, exclude = params["include"], params["exclude"]

    def matches(name: str, globs) -> bool:
        return any(fnmatchcase(name, g) for g in globs)

    candidates = [(n, m) for n, m, ok in layers if ok and n not in kept]
    chosen = [(n, m) for n, m in candidates if matches(n, include) and not matches(n, exclude)]
    if not chosen:
        if not candidates:
            why = ("it has no nn.Linear/nn.Conv1d/nn.Conv2d layer left to quantize"
                   + (f" besides the full-precision first/last layer(s) {kept}" if kept else ""))
            raise PreconditionError(f"{pass_name}: nothing to scaffold in {model.arch}: {why}")
        names = ", ".join(n for n, _ in candidates[:4]) + (", ..." if len(candidates) > 4 else "")
        held = [n for n in kept if matches(n, include) and not matches(n, exclude)]
        note = f"; {', '.join(held)} stay full precision (keep_first_last)" if held else ""
        raise PreconditionError(f"{pass_name}: include {include} and exclude {exclude} select none of the "
                                f"{len(candidates)} quantizable layer(s) in {model.arch} (e.g. {names}){note}")
    return chosen, kept


def ineligible_layers(model: Model) -> list[str]:
    """Conv/Linear layers never selected: tied parameters or a non-zero padding mode."""
    return [n for n, m, ok in weight_layers(model) if not ok and isinstance(m, SELECTABLE)]


# ---------------------------------------------------------------------------------------- pass templates

class LowBitScaffoldPass(Pass):
    """Template: select layers, build one ``make_layer`` scaffold per layer at the same name."""

    structural = True
    kind = ""  # the LatentLayer kind this pass inserts
    label = ""  # for summaries: "STTN", "DLT", "binary"
    activations: tuple = ("none",)

    def common_params(self, include, exclude, keep_first_last, activations) -> dict:
        return {"include": as_globs(include, self.name, "include"),
                "exclude": as_globs(exclude, self.name, "exclude"),
                "keep_first_last": as_bool(keep_first_last, self.name, "keep_first_last"),
                "activations": as_choice(activations, self.activations, self.name, "activations")}

    def make_layer(self, name: str, layer: nn.Module, index: int, replay: bool) -> LatentLayer:
        raise NotImplementedError

    def describe(self) -> str:
        return ""

    def call(self, model: Model, *, replay: bool = False) -> PassResult:
        gm = model.gm
        chosen, kept = select_layers(model, self.params, self.name)
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
            checks["init"] = {"weight_rel_error_mean": sum(errors) / len(errors),
                              "weight_rel_error_max": max(errors)}
        dw = f" ({n_dw} grouped/depthwise)" if n_dw else ""
        fp = f"; kept full precision: {', '.join(kept)}" if kept else ""
        return PassResult(model, modified=True, checks=checks,
                          summary=f"inserted {self.label} scaffolds in {len(chosen)} layer(s){dw} "
                                  f"({self.describe()}){fp}")

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
        before = None if replay else model.clone()
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
