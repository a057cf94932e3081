"""What the ternary/binary scaffold passes share: layer selection, the latent-layer base module, the
scaffold and fold pass templates, and group statistics.

**Selectable layers.** Every ``call_module`` node in the traced graph whose module is an ``nn.Linear``,
``nn.Conv1d`` or ``nn.Conv2d`` (depthwise and grouped convolutions included: they have few weights, so
ternarising them saves little, but they are allowed), in graph order, each module once, except

* convolutions with ``padding_mode`` other than ``"zeros"`` (the low-bit deploy layers pad with zeros);
* layers whose parameters are tied: read by a ``get_attr`` node elsewhere in the graph, or the same
  Parameter object held by another module (replacing one copy would untie them).

**Selection** (every pass records all of these explicitly, so replay never depends on defaults):

* ``keep_first_last`` (default True, as STTN's reference): the first weight layer in graph order and the
  last linear layer (the classifier) stay full precision. "Weight layer" counts selectable layers and
  layers already made low-bit (edgec scaffolds and ``edgec.layers.lowbit`` deploy layers), so scaffolding in two
  steps (two include sets) keeps the same first and last layer. On BERT-like encoders whose first layer
  is an attention projection, that projection is the one kept; use ``exclude`` for finer control.
* ``include`` / ``exclude``: fnmatch globs (case-sensitive, ``*`` also matches dots) over module names;
  a layer is chosen when it matches an include glob and no exclude glob (default include ``["*"]``).

No layer chosen -> ``PreconditionError`` (one line, naming a few candidates).

**Scaffolds** replace each chosen layer at the *same* qualified name (so state-dict names, feature
distillation by block name and the graph are unchanged) by a :class:`LatentLayer` leaf: a Scaffold that
keeps the layer's geometry and real bias, quantizes its input when asked (``act``), and computes its
weight from latent parameters. Its ``quantized()`` gives ``(codes, scale, shift)`` in the exact layout of
``edgec.layers.lowbit``; in eval mode the forward uses ``codes · scale (+ shift)`` computed with the same tensor
operations as ``LowBitLayer.dequantized``, so the fold is exact (the measured error is 0). In training the
straight-through terms are added as ``(v − v.detach()) · mask``, which is exactly 0 in value, so the
training forward uses the same quantized weight and only the gradients differ.

**Folds** replace every scaffold of their kind by a LowBit layer (``lowbit_spec()`` gives bits,
group size, shift, activation quantizer) at the same name, verified in eval mode against the scaffolded
graph (relative error <= 1e-5). No scaffold of the kind -> a quiet no-op (``edgec fold`` tries every
fold pass). Replay builds the structure only; the checkpoint's state dict then fills codes/scale/shift.
"""
from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from edgec.core.errors import EdgecError
from edgec.core.graph import Model, Scaffold, set_submodule, verify_equivalent
from edgec.layers.lowbit import LowBitConv1d, LowBitConv2d, LowBitLinear, LowBitLayer, expand_groups, group_view, quantize_act
from edgec.core.pass_manager import Pass, PassResult, PostconditionError, PreconditionError

TOLERANCE = 1e-5
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


# ------------------------------------------------------------------------------------------------ groups

def effective_group_size(fan_in: int, group_size: int) -> int:
    """0 (one group per output row) when ``group_size`` is 0 or covers the whole fan-in."""
    return 0 if group_size <= 0 or group_size >= fan_in else int(group_size)


def group_mean(values: torch.Tensor, group_size: int, where: torch.Tensor | None = None,
               empty: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Mean of (out, fan_in) ``values`` per (row, group) over real entries (and ``where``); ``empty``
    where a group has no such entry. Returns (out, n_groups)."""
    mask = torch.ones_like(values, dtype=torch.bool) if where is None else where
    v = group_view(values * mask, group_size)
    count = group_view(mask.to(values.dtype), group_size).sum(-1)
    total = v.sum(-1)
    empty_t = torch.as_tensor(empty, dtype=values.dtype, device=values.device).expand_as(total)
    return torch.where(count > 0, total / count.clamp_min(1), empty_t)


def sign_pm(x: torch.Tensor) -> torch.Tensor:
    """sign with 0 -> +1, so every binary kernel entry is ±1."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


# ---------------------------------------------------------------------------------------- latent layers

class LatentLayer(Scaffold):
    """Base of the ternary/binary training layers: geometry of the replaced layer, real bias, input
    quantizer ``act``, and the op. Subclasses implement ``weight_hat()`` (the training weight, with
    straight-through gradients), ``quantized()`` (detached codes, scale, shift in LowBit layout) and
    ``lowbit_spec()``.
    """

    bits: int = 2

    def __init__(self, layer: nn.Module, act: str = "none"):
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.op = "linear"
            self.in_features, self.out_features = layer.in_features, layer.out_features
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            self.op = "conv1d" if isinstance(layer, nn.Conv1d) else "conv2d"
            self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
            self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
            self.dilation, self.groups = layer.dilation, layer.groups
        else:
            raise TypeError(f"no latent low-bit form for {type(layer).__name__}")
        self.act = act
        self.weight_shape = tuple(layer.weight.shape)
        self.fan_in = math.prod(self.weight_shape[1:])
        if layer.bias is not None:
            self.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
        else:
            self.register_parameter("bias", None)

    @property
    def rows(self) -> int:
        return self.weight_shape[0]

    def _new_param(self, like: torch.Tensor, shape=None, value: torch.Tensor | None = None) -> nn.Parameter:
        data = value.detach().clone() if value is not None else torch.zeros(
            shape if shape is not None else like.shape, dtype=like.dtype, device=like.device)
        return nn.Parameter(data.to(dtype=like.dtype, device=like.device), requires_grad=like.requires_grad)

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.op == "linear":
            return F.linear(x, weight, self.bias)
        conv = F.conv1d if self.op == "conv1d" else F.conv2d
        return conv(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def dequantize(self, codes2d: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
                   group_size: int) -> torch.Tensor:
        """``codes · scale (+ shift)`` with exactly the operations of ``LowBitLayer.dequantized``."""
        w = codes2d * expand_groups(scale, self.fan_in, group_size)
        if shift is not None:
            w = w + expand_groups(shift, self.fan_in, group_size)
        return w

    def weight_hat(self) -> torch.Tensor:
        raise NotImplementedError

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(codes (out, fan_in) float in {-1,0,1}, scale (out, G), shift (out, G) or None), detached."""
        raise NotImplementedError

    def lowbit_spec(self) -> dict:
        """LowBit constructor options: group_size, bits, shift, act."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(quantize_act(x, self.act), self.weight_hat().reshape(self.weight_shape))

    def to_lowbit(self, fill: bool = True) -> LowBitLayer:
        """The deploy layer with this geometry; ``fill``: copy codes/scale/shift/bias (else structure only)."""
        spec = self.lowbit_spec()
        bias = self.bias is not None
        if self.op == "linear":
            low = LowBitLinear(self.in_features, self.out_features, bias, **spec)
        else:
            cls = LowBitConv1d if self.op == "conv1d" else LowBitConv2d
            low = cls(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                      self.dilation, self.groups, bias, **spec)
        ref = next(self.parameters())
        low = low.to(device=ref.device, dtype=ref.dtype)
        if fill:
            codes, scale, shift = self.quantized()
            with torch.no_grad():
                low.codes.copy_(codes.reshape(self.weight_shape).round().to(torch.int8))
                low.scale.copy_(scale)
                if shift is not None:
                    low.shift.copy_(shift)
                if bias:
                    low.bias.copy_(self.bias.detach())
        if bias:
            low.bias.requires_grad_(self.bias.requires_grad)
        return low.train(self.training)

    def extra_repr(self) -> str:
        return (f"{self.kind}, weight={list(self.weight_shape)}, act={self.act}, "
                f"bias={self.bias is not None}, folded_by={self.folded_by}")


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
