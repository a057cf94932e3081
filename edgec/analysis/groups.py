"""Coupled-channel analysis: which output channels / hidden units / heads must be removed together.

Pruning a channel means deleting one output row of every layer that produces it, one input column of every
layer that reads it, and one entry of every per-channel layer in between. Which rows and columns belong
together is a property of the dataflow, so it is computed on the traced ``torch.fx`` graph, with shapes from
``ShapeProp`` run twice (at the spec's traced shape and at its alternative shape: a dim whose size differs
is dynamic — batch, time, image size — and is never a channel dim).

**Model.** Every producer (``nn.Linear`` / ``nn.Conv{1,2,3}d`` with ``groups == 1`` / ``nn.Embedding``)
creates fresh *elements*, one per output row. Every tensor value carries, for each of its dims that holds
channels, a *label*: the element behind each position of that dim (-1 = a position no producer made, e.g.
model inputs, constants: never removed). Labels flow through the graph by per-op rules, and ops that force
positions to be removed together *unite* their elements (union-find):

* elementwise ops with broadcasting (``+ - * /``, activations, dropout): the operands' labels on each output
  dim are united position by position — residual additions couple the channels of all operands, GEGLU's
  ``gelu(w_g x) * w_v x`` couples w_g and w_v units; an operand that has the full channel extent but no label
  (a constant, a model input, the output of an op this analysis does not understand) makes the channels
  unprunable;
* per-channel layers pass labels through and are sliced: BatchNorm (dim 1; weight, bias, running stats),
  depthwise Conv (``groups == in_channels == out_channels``; its channels follow its input), pools;
* ``nn.GLU(dim)`` unites channel ``i`` with ``i + C/2`` on that dim (both halves of the producer go together);
* ``cat`` concatenates labels (offsets); ``transpose``/``permute``/``unsqueeze``/``squeeze``/indexing move them;
* ``view``/``reshape``/``flatten``: a labelled dim *merged* with static dims repeats its label (conformer's
  ``(B, T, C, F) -> (B, T, C·F)`` before a Linear: each channel owns F consecutive input columns); a labelled
  dim *split* into static factors (``(B, T, H·dh) -> (B, T, H, dh)``) keeps the label on its outermost factor
  and unites each block of ``dh`` positions — this is how attention heads become prunable units: the q/k/v
  head dims meet in ``matmul`` batch dims (united), the merge back ``(B, T, H, dh) -> (B, T, H·dh)`` spreads
  the head label over out_proj's input columns, and integer size literals in ``view``/``reshape`` arguments
  at a labelled dim (``view(B, -1, 4, 16)``, ``reshape(B, -1, 64)``) are recorded and rewritten on pruning;
* ``matmul``: batch dims as elementwise, the contracted dims united (both sides must be labelled). With a
  single head (H = 1, e.g. after pruning to one head) the split's outermost factor of size > 1 is ``dh``
  itself, so the analysis then offers the query/key width (kind ``qk``, united by q·kᵀ) and the value width
  (v rows + out_proj columns) as two groups; the 1/sqrt(dh) scale stays the trained constant;
* LayerNorm over a labelled dim, softmax/mean/sum over a labelled dim, indexing or slicing a labelled dim,
  reading its size (``x.size(c)``), a labelled dim reaching the model output, low-bit layers
  (``edgec.layers.lowbit``: their per-group codes are not sliced yet), grouped (non-depthwise) convs, and every op
  not listed here make the channels they touch *unprunable*, with a reason naming the node. Parameters and
  constants read with ``get_attr`` carry no label, so a per-channel parameter applied outside a module
  (``x * self.gamma``, a learned position table added to the stream) also makes the channels unprunable
  (choice: such tensors are not sliced yet). A module called more than once shares its rows/columns: the
  labels of all its calls are united.

Channels whose elements end up united form one *unit* (a channel, a hidden unit, a head); units whose
producers are connected form one :class:`Group`. A group is named after its first producer in graph order
(``blocks.0.ffn.linear1``, ``blocks.0.attn.q_proj`` ...): names depend only on the graph structure, so they are
stable across replays and repeated pruning.

What this gives on the zoo (details in the tests): FFN hidden units, GEGLU pairs, conformer's
pointwise1 → GLU → depthwise → BatchNorm → pointwise2 channels, attention heads (q/k/v rows + out_proj
columns), conv front-end channels, ResNet block-internal widths and ResNet *stage* widths (the stem /
shortcut conv / every block's conv2 of a stage are united by the residual adds: one group per stage, pruned
together). Residual streams normalised by LayerNorm (every transformer here, HAFFormer's MSDC depthwise
convs which follow that stream, BERT embeddings) are unprunable: LayerNorm's statistics run over the channel
dim, so removing a channel changes every other channel's value. Classifier outputs reach the model output
and are unprunable.

**Mask equivalence.** Zeroing a unit's producer rows and biases and its per-channel parameters (BatchNorm
γ/β, depthwise kernels) makes its positions exactly zero at every consumer when the ops on the way map 0 to
0 (ReLU/GELU/SiLU/tanh, products with a zero factor, BatchNorm with γ = β = 0 ...). Then the physically
pruned model computes exactly what the masked original computes. ``Group.zero_exact`` says whether this
holds (tracked per label: e.g. attention scores of a zeroed head are softmaxed to non-zero values, but the
product with the zeroed values restores zero); :func:`zero_channels` builds the masked model.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from edgec.core.errors import EdgecError
from edgec.core.graph import Model

# ------------------------------------------------------------------------------------------- op tables

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOLS = {nn.AvgPool1d: 1, nn.MaxPool1d: 1, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1,
          nn.AvgPool2d: 2, nn.MaxPool2d: 2, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveMaxPool2d: 2,
          nn.AvgPool3d: 3, nn.MaxPool3d: 3, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool3d: 3}
# unary elementwise modules; True: maps 0 to 0
_UNARY_MODULES = {
    nn.ReLU: True, nn.ReLU6: True, nn.GELU: True, nn.SiLU: True, nn.Mish: True, nn.Tanh: True, nn.LeakyReLU: True,
    nn.ELU: True, nn.SELU: True, nn.CELU: True, nn.Hardswish: True, nn.Hardtanh: True, nn.Softsign: True,
    nn.Tanhshrink: True, nn.Softshrink: True, nn.Hardshrink: True,
    nn.Dropout: True, nn.Dropout1d: True, nn.Dropout2d: True, nn.Dropout3d: True, nn.AlphaDropout: True,
    nn.FeatureAlphaDropout: True, nn.Identity: True,
    nn.Sigmoid: False, nn.Softplus: False, nn.Hardsigmoid: False, nn.LogSigmoid: False,
}
_UNARY_FUNCTIONS = {
    F.relu: True, F.relu6: True, F.gelu: True, F.silu: True, F.mish: True, F.leaky_relu: True, F.elu: True,
    F.selu: True, F.celu: True, F.hardswish: True, F.hardtanh: True, F.softsign: True, F.tanh: True,
    F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True, F.alpha_dropout: True,
    torch.relu: True, torch.tanh: True, torch.selu: True, torch.celu: True, torch.neg: True, operator.neg: True,
    torch.abs: True, operator.abs: True, torch.sin: True, torch.sqrt: True, torch.square: True, torch.erf: True,
    torch.clone: True, torch.detach: True,
    F.sigmoid: False, torch.sigmoid: False, torch.exp: False, torch.cos: False, F.softplus: False,
    F.hardsigmoid: False, F.logsigmoid: False,
}
_UNARY_METHODS = {
    "relu": True, "relu_": True, "tanh": True, "tanh_": True, "neg": True, "abs": True, "sin": True, "sqrt": True,
    "square": True, "erf": True, "contiguous": True, "clone": True, "detach": True, "float": True, "to": True,
    "type_as": True, "double": True, "half": True, "bfloat16": True, "requires_grad_": True,
    "sigmoid": False, "sigmoid_": False, "exp": False, "cos": False,
}
_ADD_FUNCTIONS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, torch.subtract}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul, torch.multiply}
_DIV_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_METHODS = {"mul", "mul_"}
_DIV_METHODS = {"div", "div_"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var"}
_SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax, torch.log_softmax, F.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
_LIKE_FUNCTIONS = {torch.zeros_like: True, torch.ones_like: False, torch.empty_like: False, torch.full_like: False,
                   torch.rand_like: False, torch.randn_like: False}


def _lowbit_types():
    from edgec.layers.lowbit import LowBitLayer

    return (LowBitLayer,)


# ------------------------------------------------------------------------------------------- results

@dataclass
class Slot:
    """One sliceable place: a module's output rows (``out``), input columns (``in``), per-channel entries
    (``channel``: BatchNorm / depthwise conv), an embedding's columns (``embedding``), or a size literal in a
    ``view``/``reshape`` node (``reshape``; ``target`` is the node name, ``arg`` where the literal sits).
    ``gid[p]``/``unit[p]``: the group and unit of position ``p`` (-1: a fixed position, never removed)."""

    kind: str
    target: str
    arg: tuple | None
    ids: np.ndarray
    gid: np.ndarray | None = None
    unit: np.ndarray | None = None

    def kept_positions(self, keep: dict[int, set]) -> list[int]:
        """Positions that survive when group ``g`` keeps units ``keep[g]`` (groups not in ``keep`` keep all)."""
        out = []
        for p, (g, u) in enumerate(zip(self.gid.tolist(), self.unit.tolist())):
            if g < 0 or g not in keep or u in keep[g]:
                out.append(p)
        return out


@dataclass
class Group:
    """Channels that are removed together.

    ``kind``: ``heads`` (attention heads: q/k/v rows of a head + out_proj columns), ``residual`` (channels
    coupled by additions), ``glu`` (both GLU halves), ``gated`` (GEGLU/SwiGLU w_g + w_v units), ``qk``
    (query/key width of single-head attention, contracted in q·kᵀ), ``conv`` / ``hidden`` / ``embedding``
    (one producer's channels). ``size``: the number of prunable units (channels, hidden units or heads); ``keep`` lists index units
    0..size-1, ordered by their first producer's rows. ``width``: rows of the first producer per unit (1 for a
    channel, head_dim for a head). ``prunable``: False with ``reasons`` (each naming the node) when some op
    couples these channels to something that cannot shrink. ``zero_exact``: zeroing a unit's producer rows and
    per-channel parameters zeroes it at every consumer (so mask and physical pruning agree exactly).
    """

    name: str
    kind: str
    size: int
    width: int
    producers: list[str]
    consumers: list[str]
    per_channel: list[str]
    reshapes: list[str]
    prunable: bool
    reasons: list[str]
    zero_exact: bool
    index: int = -1
    slots: list[Slot] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        state = "prunable" if self.prunable else "UNPRUNABLE: " + "; ".join(self.reasons[:2]) + (
            f" (+{len(self.reasons) - 2} more)" if len(self.reasons) > 2 else "")
        mid = f" via {', '.join(self.per_channel)}" if self.per_channel else ""
        return (f"{self.name} [{self.kind}] size={self.size}"
                + (f" x{self.width}" if self.width != 1 else "")
                + f": {', '.join(self.producers)} -> {', '.join(self.consumers) or '(none)'}{mid}; {state}")


@dataclass
class Analysis:
    groups: list[Group]
    slots: list[Slot]

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise EdgecError(f"no channel group named '{name}'; groups: {', '.join(g.name for g in self.groups)}")

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]


# ------------------------------------------------------------------------------------------- labels

class _Label:
    """The elements behind each position of one tensor dim (-1: fixed); ``zero``: in the masked model the
    positions of masked units are exactly zero here."""

    __slots__ = ("ids", "zero")

    def __init__(self, ids: np.ndarray, zero: bool = True):
        self.ids = ids
        self.zero = zero

    def with_zero(self, zero: bool) -> "_Label":
        return _Label(self.ids, zero)


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        what = f"module '{node.target}'"
    elif node.op == "call_method":
        what = f"method .{node.target}()"
    elif node.op == "call_function":
        what = f"function {getattr(node.target, '__name__', str(node.target))}()"
    else:
        what = node.op
    return f"node '{node.name}' ({what})"


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _flat_nodes(obj) -> list[fx.Node]:
    out = []
    fx.node.map_arg(obj, lambda n: out.append(n))
    return out


def _group_dims(ins: tuple, outs: tuple):
    """Pair consecutive in-dims with consecutive out-dims of equal product (a reshape's dim correspondence)."""
    groups, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        gi, gj, pi, pj = [i], [j], ins[i], outs[j]
        while pi != pj:
            if pi < pj:
                i += 1
                if i >= len(ins):
                    return None
                gi.append(i)
                pi *= ins[i]
            else:
                j += 1
                if j >= len(outs):
                    return None
                gj.append(j)
                pj *= outs[j]
        groups.append((gi, gj))
        i, j = i + 1, j + 1
    for k in range(i, len(ins)):
        if ins[k] != 1 or not groups:
            return None
        groups[-1][0].append(k)
    for k in range(j, len(outs)):
        if outs[k] != 1 or not groups:
            return None
        groups[-1][1].append(k)
    return groups


# ------------------------------------------------------------------------------------------- analyser

class _Analyser:
    def __init__(self, model: Model):
        self.model = model
        self.gm = model.gm
        self.modules = dict(self.gm.named_modules())
        self.parent: list[int] = []  # element union-find
        self.elem_space: list[int] = []
        self.spaces: list[dict] = []  # {"target", "node", "kind", "size", "base"}
        self.space_parent: list[int] = []
        self.reasons: dict[int, list[str]] = {}
        self.nonzero: dict[int, list[str]] = {}
        self.events: dict[int, set] = {}
        self.slots: dict[tuple, Slot] = {}
        self.labels: dict[fx.Node, dict[int, _Label]] = {}
        self.shape_nodes: dict[fx.Node, dict[int, _Label]] = {}  # size()/shape results that read labelled dims
        self.shapes_a, self.shapes_b = self._shapes()

    # -- shapes
    def _shapes(self):
        def run(alt: bool):
            gm = copy.deepcopy(self.gm).eval()
            with torch.no_grad():
                try:
                    ShapeProp(gm).propagate(*self.model.spec.sample(seed=0, alt=alt))
                except Exception as exc:  # noqa: BLE001 - any failure of the forward is the user's model
                    raise EdgecError(f"channel analysis: the model does not run on its sample inputs ({exc})") from None
            return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
                    if isinstance(n.meta.get("tensor_meta"), TensorMetadata)}

        return run(False), run(True)

    def shape(self, node) -> tuple | None:
        return self.shapes_a.get(node.name) if isinstance(node, fx.Node) else None

    def static(self, node, dim: int) -> bool:
        a, b = self.shapes_a.get(node.name), self.shapes_b.get(node.name)
        return a is not None and b is not None and len(a) == len(b) and a[dim] == b[dim]

    # -- union-find
    def new_space(self, node: fx.Node, target: str, kind: str, size: int) -> np.ndarray:
        sid, base = len(self.spaces), len(self.parent)
        self.spaces.append({"target": target, "node": node.name, "kind": kind, "size": size, "base": base})
        self.space_parent.append(sid)
        self.parent.extend(range(base, base + size))
        self.elem_space.extend([sid] * size)
        return np.arange(base, base + size, dtype=np.int64)

    def find(self, e: int) -> int:
        parent = self.parent
        root = e
        while parent[root] != root:
            root = parent[root]
        while parent[e] != root:
            parent[e], e = root, parent[e]
        return root

    def find_space(self, s: int) -> int:
        sp = self.space_parent
        while sp[s] != s:
            sp[s] = sp[sp[s]]
            s = sp[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra
        sa, sb = self.find_space(self.elem_space[a]), self.find_space(self.elem_space[b])
        if sa != sb:
            if sb < sa:
                sa, sb = sb, sa
            self.space_parent[sb] = sa

    def spaces_of(self, ids: np.ndarray) -> list[int]:
        return sorted({self.elem_space[e] for e in np.unique(ids[ids >= 0]).tolist()})

    def mark(self, label: _Label, reason: str) -> None:
        for s in self.spaces_of(label.ids):
            self.reasons.setdefault(s, []).append(reason)

    def mark_nonzero(self, label: _Label, reason: str) -> None:
        for s in self.spaces_of(label.ids):
            self.nonzero.setdefault(s, []).append(reason)

    def event(self, label: _Label, kind: str) -> None:
        for s in self.spaces_of(label.ids):
            self.events.setdefault(s, set()).add(kind)

    def unite(self, a: _Label, b: _Label, node: fx.Node) -> None:
        """Position-wise union; a labelled position against a fixed one makes the channel unprunable."""
        if len(a.ids) != len(b.ids):
            self.mark(a, f"{_describe(node)} combines dims of different sizes")
            self.mark(b, f"{_describe(node)} combines dims of different sizes")
            return
        fixed_a, fixed_b = a.ids < 0, b.ids < 0
        mixed = fixed_a ^ fixed_b
        if mixed.any():
            bad = _Label(np.where(fixed_a, b.ids, a.ids)[mixed])
            self.mark(bad, f"{_describe(node)} combines these channels with a tensor whose channels are not prunable")
        for x, y in zip(a.ids[~(fixed_a | fixed_b)].tolist(), b.ids[~(fixed_a | fixed_b)].tolist()):
            if x != y:
                self.union(x, y)

    def slot(self, kind: str, target: str, label: _Label, node: fx.Node, arg=None) -> None:
        key = (kind, target, arg)
        if key in self.slots:  # a module called more than once: its rows/columns are shared
            self.unite(_Label(self.slots[key].ids), label, node)
        else:
            self.slots[key] = Slot(kind, target, arg, label.ids.copy())

    def mark_all(self, nodes, reason: str) -> None:
        for n in nodes:
            for lab in self.labels.get(n, {}).values():
                self.mark(lab, reason)
            for lab in self.shape_nodes.get(n, {}).values():
                self.mark(lab, reason)

    # -- main loop
    def run(self) -> Analysis:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                out = {}
            elif node.op == "output":
                for n in _flat_nodes(node.args):
                    for lab in self.labels.get(n, {}).values():
                        self.mark(lab, f"reaches the model output ({_describe(n)})")
                    for lab in self.shape_nodes.get(n, {}).values():
                        self.mark(lab, f"its size reaches the model output ({_describe(n)})")
                continue
            else:
                out = self.visit(node)
            out = {d: lab for d, lab in (out or {}).items() if (lab.ids >= 0).any()}
            if out:
                self.labels[node] = out
        return self.finish()

    def visit(self, node: fx.Node) -> dict:
        inputs = _flat_nodes((node.args, node.kwargs))
        labelled = [n for n in inputs if n in self.labels or n in self.shape_nodes]
        if node.op == "call_module":
            m = self.modules.get(node.target)
            if isinstance(m, _lowbit_types()):
                return self.lowbit(node, m)
            if isinstance(m, (nn.Linear, _CONV, nn.Embedding)):
                return self.layer(node, m)
        if not labelled:
            return {}
        handler = self.handler(node)
        if handler is None:
            self.mark_all(labelled, f"{_describe(node)} is an op the channel analysis does not understand")
            return {}
        return handler(node)

    def handler(self, node: fx.Node):
        op, t = node.op, node.target
        if op == "call_module":
            m = self.modules.get(t)
            if isinstance(m, _BN):
                return self.batchnorm
            if isinstance(m, nn.LayerNorm):
                return self.layernorm
            if isinstance(m, nn.GLU):
                return self.glu
            if type(m) in _UNARY_MODULES or (isinstance(m, nn.PReLU) and m.num_parameters == 1):
                return lambda n: self.unary(n, _UNARY_MODULES.get(type(m), True))
            if type(m) in _POOLS:
                return self.pool
            if isinstance(m, nn.Flatten):
                return self.reshape
            if isinstance(m, nn.Softmax):
                return self.softmax
            return None
        if op == "call_function":
            if t in _ADD_FUNCTIONS:
                return lambda n: self.elementwise(n, "add")
            if t in _MUL_FUNCTIONS:
                return lambda n: self.elementwise(n, "mul")
            if t in _DIV_FUNCTIONS:
                return lambda n: self.elementwise(n, "div")
            if t in (operator.pow, torch.pow):
                return self.pow
            if t in (torch.clamp, torch.clip):
                return self.clamp
            if t in _UNARY_FUNCTIONS:
                return lambda n: self.unary(n, _UNARY_FUNCTIONS[t])
            if t in _LIKE_FUNCTIONS:
                return lambda n: self.unary(n, _LIKE_FUNCTIONS[t])
            if t in _REDUCE_FUNCTIONS:
                return self.reduce
            if t in _SOFTMAX_FUNCTIONS:
                return self.softmax
            if t in _MATMUL_FUNCTIONS:
                return self.matmul
            if t in (torch.cat, torch.concat, torch.concatenate):
                return self.cat
            if t is torch.stack:
                return self.stack
            if t in (torch.transpose, torch.swapaxes):
                return self.transpose
            if t is torch.permute:
                return self.permute
            if t is torch.unsqueeze:
                return self.unsqueeze
            if t is torch.squeeze:
                return self.squeeze
            if t in (torch.flatten, torch.reshape):
                return self.reshape
            if t is operator.getitem:
                return self.getitem
            if t is getattr:
                return self.getattr_
            return None
        if op == "call_method":
            if t in _ADD_METHODS:
                return lambda n: self.elementwise(n, "add")
            if t in _MUL_METHODS:
                return lambda n: self.elementwise(n, "mul")
            if t in _DIV_METHODS:
                return lambda n: self.elementwise(n, "div")
            if t == "pow":
                return self.pow
            if t in ("clamp", "clip"):
                return self.clamp
            if t in _UNARY_METHODS:
                return lambda n: self.unary(n, _UNARY_METHODS[t])
            if t in _REDUCE_METHODS:
                return self.reduce
            if t in _SOFTMAX_METHODS:
                return self.softmax
            if t == "matmul":
                return self.matmul
            if t in ("transpose", "swapaxes"):
                return self.transpose
            if t == "permute":
                return self.permute
            if t == "unsqueeze":
                return self.unsqueeze
            if t == "squeeze":
                return self.squeeze
            if t in ("view", "reshape", "flatten"):
                return self.reshape
            if t == "size":
                return self.size
            if t == "dim":
                return lambda n: {}
            return None
        return None

    # -- helpers
    def lab(self, node) -> dict[int, _Label]:
        return self.labels.get(node, {}) if isinstance(node, fx.Node) else {}

    def src(self, node: fx.Node) -> fx.Node:
        return node.args[0]

    # -- layers
    def layer(self, node: fx.Node, m: nn.Module) -> dict:
        x = node.args[0] if node.args else None
        inp = self.lab(x)
        shape = self.shape(node)
        if shape is None:
            self.mark_all([x], f"{_describe(node)} has no tensor output")
            return {}
        rank = len(shape)
        if isinstance(m, nn.Embedding):
            out = dict(inp)
            if inp:
                self.mark_all([x], f"{_describe(node)} indexes an embedding with channel values")
                out = {}
            out[rank - 1] = _Label(self.new_space(node, node.target, "embedding", m.embedding_dim))
            self.slot("embedding", node.target, out[rank - 1], node)
            return out
        if len(node.args) != 1 or node.kwargs:
            self.mark_all([x], f"{_describe(node)} is called with extra arguments")
            return {}
        if isinstance(m, nn.Linear):
            cdim = rank - 1
            kind = "linear"
        else:
            cdim = rank - (len(m.kernel_size) + 1)
            kind = "conv"
            if m.groups != 1:
                return self.grouped_conv(node, m, inp, cdim)
        out = {}
        for d, lab in inp.items():
            if d == cdim:
                self.slot("in", node.target, lab, node)
                if not lab.zero:
                    self.mark_nonzero(lab, f"masked channels are not zero at {_describe(node)}")
            elif kind == "linear":
                out[d] = lab  # a Linear acts on the last dim only
            else:
                self.mark(lab, f"{_describe(node)} convolves over a channel dim")
        out[cdim] = _Label(self.new_space(node, node.target, kind, shape[cdim]))
        self.slot("out", node.target, out[cdim], node)
        return out

    def grouped_conv(self, node, m, inp, cdim) -> dict:
        lab = inp.get(cdim)
        extra = [d for d in inp if d != cdim]
        if extra:
            self.mark_all([node.args[0]], f"{_describe(node)} convolves over a channel dim")
        if lab is not None and m.groups == m.in_channels == m.out_channels:  # depthwise: channels follow the input
            self.slot("channel", node.target, lab, node)
            self.event(lab, "depthwise")
            return {cdim: lab.with_zero(True)}
        if lab is not None:
            self.mark(lab, f"{_describe(node)} is a grouped conv (groups={m.groups}); only depthwise convs follow "
                           "their input channels")
        space = _Label(self.new_space(node, node.target, "conv", m.out_channels))
        self.mark(space, f"{_describe(node)} is a grouped conv (groups={m.groups}); its outputs are not prunable")
        return {}

    def lowbit(self, node, m) -> dict:
        x = node.args[0] if node.args else None
        self.mark_all([x], f"{_describe(node)} is a low-bit layer (not sliced by channel pruning yet)")
        return {}

    def batchnorm(self, node) -> dict:
        m = self.modules[node.target]
        inp = self.lab(self.src(node))
        out = dict(inp)
        lab = inp.get(1)
        if lab is not None:
            self.slot("channel", node.target, lab, node)
            if not m.affine:
                self.mark_nonzero(lab, f"{_describe(node)} has no affine parameters to zero")
            out[1] = lab.with_zero(m.affine)
        return out

    def layernorm(self, node) -> dict:
        m = self.modules[node.target]
        inp = self.lab(self.src(node))
        rank = len(self.shape(node))
        k = len(m.normalized_shape)
        for d, lab in inp.items():
            if d >= rank - k:
                self.mark(lab, f"LayerNorm {_describe(node)} normalises over this channel dim")
        return {d: lab.with_zero(False) for d, lab in inp.items()}

    def glu(self, node) -> dict:
        m = self.modules[node.target]
        inp = self.lab(self.src(node))
        rank = len(self.shape(self.src(node)))
        gd = _norm_dim(m.dim, rank)
        out = {}
        for d, lab in inp.items():
            if d == gd:
                half = len(lab.ids) // 2
                self.unite(_Label(lab.ids[:half]), _Label(lab.ids[half:]), node)
                self.event(lab, "glu")
                out[d] = _Label(lab.ids[:half], lab.zero)
            else:
                out[d] = lab.with_zero(False)
        return out

    def unary(self, node, zero_preserving: bool) -> dict:
        inp = self.lab(self.src(node))
        params = () if node.target in ("to", "type_as") else (node.args[1:], node.kwargs)
        for n in _flat_nodes(params):
            if n in self.labels:
                self.mark_all([n], f"{_describe(node)} takes a channel tensor as a parameter")
        return {d: lab.with_zero(lab.zero and zero_preserving) for d, lab in inp.items()}

    def pow(self, node) -> dict:
        exp = _arg(node, 1, "exponent")
        if isinstance(exp, (int, float)) and exp > 0:
            return self.unary(node, True)
        if isinstance(exp, (int, float)):
            return self.unary(node, False)
        return self.elementwise(node, "other")

    def clamp(self, node) -> dict:
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
        if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
            return self.elementwise(node, "other")
        return self.unary(node, (lo is None or lo <= 0) and (hi is None or hi >= 0))

    def elementwise(self, node, kind: str) -> dict:
        out_shape = self.shape(node)
        if out_shape is None:
            self.mark_all(_flat_nodes(node.args), f"{_describe(node)} has no tensor output")
            return {}
        rank = len(out_shape)
        operands = list(node.args[:2]) if kind != "other" else list(node.args)
        out = {}
        for k in range(rank):
            labs, fixed, zeros, scalar_zero = [], False, [], False
            for i, a in enumerate(operands):
                s = self.shape(a)
                if s is None:
                    if isinstance(a, (int, float)) and a == 0:
                        scalar_zero = True
                    zeros.append((i, False))
                    continue
                d = k - (rank - len(s))
                if d < 0:
                    zeros.append((i, False))
                    continue
                lab = self.lab(a).get(d)
                if lab is not None and s[d] == out_shape[k]:
                    labs.append(lab)
                    zeros.append((i, lab.zero))
                elif s[d] == out_shape[k] and out_shape[k] != 1:
                    fixed = True
                    zeros.append((i, False))
                else:
                    zeros.append((i, False))
            if not labs:
                continue
            base = labs[0]
            for other in labs[1:]:
                self.unite(base, other, node)
            if len(labs) > 1:
                self.event(base, "residual" if kind == "add" else "gated")
            if fixed:
                self.mark(base, f"{_describe(node)} combines these channels with a tensor whose channels are not "
                                "prunable")
            if kind == "add":
                zero = all(z for _, z in zeros) or (len(operands) == 2 and any(z for _, z in zeros) and scalar_zero)
            elif kind == "mul":
                zero = any(z for _, z in zeros) or scalar_zero
            elif kind == "div":
                zero = zeros[0][1]
            else:
                zero = False
            out[k] = base.with_zero(zero)
        for a in _flat_nodes((node.args[2:] if kind != "other" else (), node.kwargs)):
            self.mark_all([a], f"{_describe(node)} takes a channel tensor as a parameter")
        return out

    def pool(self, node) -> dict:
        m = self.modules[node.target]
        inp = self.lab(self.src(node))
        rank = len(self.shape(self.src(node)))
        spatial = _POOLS[type(m)]
        out = {}
        for d, lab in inp.items():
            if d >= rank - spatial:
                self.mark(lab, f"{_describe(node)} pools over a channel dim")
            else:
                out[d] = lab
        return out

    def softmax(self, node) -> dict:
        x = self.src(node)
        rank = len(self.shape(x))
        if node.op == "call_module":
            dim = self.modules[node.target].dim
        else:
            dim = _arg(node, 1, "dim")
        if dim is None:
            self.mark_all([x], f"{_describe(node)} has an implicit dim")
            return {}
        dim = _norm_dim(dim, rank)
        out = {}
        for d, lab in self.lab(x).items():
            if d == dim:
                self.mark(lab, f"{_describe(node)} normalises over a channel dim")
            out[d] = lab.with_zero(False)
        return out

    def reduce(self, node) -> dict:
        x = self.src(node)
        rank = len(self.shape(x))
        dims = _arg(node, 1, "dim")
        keep = bool(_arg(node, 2, "keepdim", False))
        if dims is None or (isinstance(dims, (tuple, list)) and not dims):
            dims = list(range(rank))
        if isinstance(dims, int):
            dims = [dims]
        if not all(isinstance(d, int) for d in dims):
            self.mark_all([x], f"{_describe(node)} reduces over computed dims")
            return {}
        dims = {_norm_dim(d, rank) for d in dims}
        out = {}
        for d, lab in self.lab(x).items():
            if d in dims:
                self.mark(lab, f"{_describe(node)} reduces over a channel dim")
                continue
            nd = d if keep else d - sum(1 for r in dims if r < d)
            out[nd] = lab
        return out

    def matmul(self, node) -> dict:
        a, b = node.args[0], node.args[1]
        sa, sb, so = self.shape(a), self.shape(b), self.shape(node)
        la, lb = self.lab(a), self.lab(b)
        if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
            self.mark_all([a, b], f"{_describe(node)} is a matmul with a vector operand")
            return {}
        ro = len(so)
        out = {}
        # batch dims: broadcast like an elementwise product
        for k in range(ro - 2):
            labs, fixed, zero = [], False, False
            for s, lb_ in ((sa, la), (sb, lb)):
                d = k - (ro - len(s))
                if d < 0:
                    continue
                lab = lb_.get(d)
                if lab is not None and s[d] == so[k]:
                    labs.append(lab)
                    zero = zero or lab.zero
                elif s[d] == so[k] and so[k] != 1:
                    fixed = True
            if labs:
                for other in labs[1:]:
                    self.unite(labs[0], other, node)
                if fixed:
                    self.mark(labs[0], f"{_describe(node)} combines these channels with a tensor whose channels "
                                       "are not prunable")
                out[k] = labs[0].with_zero(zero)
        ka, kb = la.get(len(sa) - 1), lb.get(len(sb) - 2)
        if ka is not None and kb is not None:
            self.unite(ka, kb, node)
            self.event(ka, "contracted")
        elif ka is not None or kb is not None:
            self.mark(ka or kb, f"{_describe(node)} contracts a channel dim with a tensor whose channels are not "
                                "prunable")
        if len(sa) - 2 in la:
            out[ro - 2] = la[len(sa) - 2]
        if len(sb) - 1 in lb:
            out[ro - 1] = lb[len(sb) - 1]
        return out

    def cat(self, node) -> dict:
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        so = self.shape(node)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or so is None:
            self.mark_all(_flat_nodes(node.args), f"{_describe(node)} is a concatenation this analysis cannot follow")
            return {}
        rank = len(so)
        dim = _norm_dim(dim, rank)
        out = {}
        for k in range(rank):
            if k == dim:
                parts, zero, any_lab = [], True, False
                for t in tensors:
                    s = self.shape(t)
                    lab = self.lab(t).get(k)
                    if lab is not None:
                        parts.append(lab.ids)
                        zero = zero and lab.zero
                        any_lab = True
                    else:
                        parts.append(np.full(s[k], -1, dtype=np.int64))
                if any_lab:
                    out[k] = _Label(np.concatenate(parts), zero)
                    self.event(out[k], "concat")
                continue
            labs = [self.lab(t).get(k) for t in tensors]
            present = [lab for lab in labs if lab is not None]
            if present:
                for other in present[1:]:
                    self.unite(present[0], other, node)
                if len(present) < len(labs):
                    self.mark(present[0], f"{_describe(node)} concatenates channel tensors with unlabelled ones")
                out[k] = present[0].with_zero(all(lab.zero for lab in present))
        return out

    def stack(self, node) -> dict:
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        so = self.shape(node)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or so is None:
            self.mark_all(_flat_nodes(node.args), f"{_describe(node)} is a stack this analysis cannot follow")
            return {}
        dim = _norm_dim(dim, len(so))
        out = {}
        for k in range(len(so) - 1):
            labs = [self.lab(t).get(k) for t in tensors]
            present = [lab for lab in labs if lab is not None]
            if present:
                for other in present[1:]:
                    self.unite(present[0], other, node)
                if len(present) < len(labs):
                    self.mark(present[0], f"{_describe(node)} stacks channel tensors with unlabelled ones")
                out[k if k < dim else k + 1] = present[0].with_zero(all(lab.zero for lab in present))
        return out

    def transpose(self, node) -> dict:
        x = self.src(node)
        rank = len(self.shape(x))
        a, b = _norm_dim(_arg(node, 1, "dim0"), rank), _norm_dim(_arg(node, 2, "dim1"), rank)
        swap = {a: b, b: a}
        return {swap.get(d, d): lab for d, lab in self.lab(x).items()}

    def permute(self, node) -> dict:
        x = self.src(node)
        rank = len(self.shape(x))
        perm = node.args[1:] if node.op == "call_method" else (node.args[1],) if len(node.args) > 1 else ()
        if len(perm) == 1 and isinstance(perm[0], (tuple, list)):
            perm = tuple(perm[0])
        if not perm and "dims" in node.kwargs:
            perm = tuple(node.kwargs["dims"])
        perm = [_norm_dim(p, rank) for p in perm]
        inv = {p: k for k, p in enumerate(perm)}
        return {inv[d]: lab for d, lab in self.lab(x).items()}

    def unsqueeze(self, node) -> dict:
        x = self.src(node)
        d0 = _norm_dim(_arg(node, 1, "dim"), len(self.shape(x)) + 1)
        return {(d if d < d0 else d + 1): lab for d, lab in self.lab(x).items()}

    def squeeze(self, node) -> dict:
        x = self.src(node)
        s = self.shape(x)
        dims = _arg(node, 1, "dim")
        if dims is None:
            dims = [i for i, n in enumerate(s) if n == 1]
        elif isinstance(dims, int):
            dims = [dims]
        dims = {_norm_dim(d, len(s)) for d in dims if s[_norm_dim(d, len(s))] == 1}
        return {d - sum(1 for r in dims if r < d): lab for d, lab in self.lab(x).items() if d not in dims}

    def size(self, node) -> dict:
        x = self.src(node)
        inp = self.lab(x)
        dim = _arg(node, 1, "dim")
        if dim is None:
            if inp:
                self.shape_nodes[node] = dict(inp)
            return {}
        dim = _norm_dim(dim, len(self.shape(x)))
        if dim in inp:
            self.mark(inp[dim], f"{_describe(node)} reads the size of a channel dim (its value would change)")
        return {}

    def getattr_(self, node) -> dict:
        x, name = node.args[0], node.args[1]
        if name in ("device", "dtype", "ndim", "is_cuda", "requires_grad"):
            return {}
        if name == "shape" and x in self.labels:
            self.shape_nodes[node] = dict(self.labels[x])
            return {}
        self.mark_all([x], f"{_describe(node)} reads attribute '{name}' of a channel tensor")
        return {}

    def getitem(self, node) -> dict:
        x, index = node.args[0], node.args[1]
        if x in self.shape_nodes:  # x.shape[i] / x.size()[i]
            labs = self.shape_nodes[x]
            if isinstance(index, int):
                d = _norm_dim(index, len(self.shape(x.args[0])))
                if d in labs:
                    self.mark(labs[d], f"{_describe(node)} reads the size of a channel dim (its value would change)")
            else:
                for lab in labs.values():
                    self.mark(lab, f"{_describe(node)} reads the sizes of a channel tensor")
            return {}
        s = self.shape(x)
        inp = self.lab(x)
        if s is None:
            self.mark_all([x], f"{_describe(node)} indexes a non-tensor value holding channels")
            return {}
        idx = index if isinstance(index, tuple) else (index,)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        out, d, o = {}, 0, 0
        for i in idx:
            if i is Ellipsis:
                skip = len(s) - n_real
                for _ in range(skip):
                    if d in inp:
                        out[o] = inp[d]
                    d, o = d + 1, o + 1
            elif i is None:
                o += 1
            elif isinstance(i, int) and not isinstance(i, bool):
                if d in inp:
                    self.mark(inp[d], f"{_describe(node)} picks single channels")
                d += 1
            elif isinstance(i, slice) and i.start is None and i.stop is None and i.step is None:
                if d in inp:
                    out[o] = inp[d]
                d, o = d + 1, o + 1
            elif isinstance(i, slice):
                if d in inp:
                    self.mark(inp[d], f"{_describe(node)} slices a channel dim")
                d, o = d + 1, o + 1
            else:  # tensor / list / computed index: changes that dim and maybe others
                for dd, lab in inp.items():
                    self.mark(lab, f"{_describe(node)} uses advanced indexing on a channel tensor")
                return {}
        while d < len(s):
            if d in inp:
                out[o] = inp[d]
            d, o = d + 1, o + 1
        return out

    # -- reshape
    def reshape(self, node) -> dict:
        x = self.src(node)
        si, so = self.shape(x), self.shape(node)
        inp = self.lab(x)
        if si is None or so is None:
            self.mark_all([x], f"{_describe(node)} reshapes a non-tensor")
            return {}
        groups = _group_dims(si, so)
        if groups is None:
            self.mark_all([x], f"{_describe(node)} is a reshape this analysis cannot follow")
            return {}
        out = {}
        for gi, gj in groups:
            labelled = [d for d in gi if d in inp]
            if not labelled:
                continue
            if len(gi) == 1 and len(gj) == 1:
                out[gj[0]] = inp[gi[0]]
            elif len(gi) == 1:  # split: the label goes to the outermost factor; blocks are united
                lab = inp[gi[0]]
                big = [o for o in gj if so[o] != 1]
                if not big:
                    continue
                o0 = big[0]
                inner = [o for o in gj if o > o0]
                if not all(self.static(node, o) for o in inner):
                    self.mark(lab, f"{_describe(node)} splits a channel dim into dynamic factors")
                    continue
                block = len(lab.ids) // so[o0]
                blocks = lab.ids.reshape(so[o0], block)
                for row in blocks:
                    self.unite(_Label(np.full(block, row[0])), _Label(row), node)
                if block > 1:
                    self.event(lab, "heads")
                out[o0] = _Label(blocks[:, 0].copy(), lab.zero)
            elif len(gj) == 1:  # merge: the label repeats over the other (static) dims
                if len(labelled) > 1:
                    for d in labelled:
                        self.mark(inp[d], f"{_describe(node)} merges two channel dims")
                    continue
                d0 = labelled[0]
                if not all(self.static(x, d) for d in gi if d != d0):
                    self.mark(inp[d0], f"{_describe(node)} merges a channel dim with a dynamic dim")
                    continue
                sizes = [si[d] for d in gi]
                coord = np.indices(sizes)[gi.index(d0)].reshape(-1)
                out[gj[0]] = _Label(inp[d0].ids[coord], inp[d0].zero)
            else:
                for d in labelled:
                    self.mark(inp[d], f"{_describe(node)} regroups a channel dim with others")
        self.reshape_literals(node, out, len(so))
        return out

    def reshape_literals(self, node, out: dict, rank: int) -> None:
        if not out or node.op == "call_module" or node.target in ("flatten", torch.flatten):
            return
        rest = list(node.args[1:])
        if node.op == "call_function":  # torch.reshape(x, shape)
            shape, where, base = (rest[0] if rest else None), "tuple", 1
        elif len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            shape, where, base = rest[0], "tuple", 1
        else:
            shape, where, base = rest, "args", 1
        if not isinstance(shape, (list, tuple)) or len(shape) != rank:
            for lab in out.values():
                self.mark(lab, f"{_describe(node)} has a shape argument this analysis cannot rewrite")
            return
        for k, lab in out.items():
            v = shape[k]
            if isinstance(v, int) and v == -1:
                continue
            if isinstance(v, int):
                arg = (base, k) if where == "tuple" else (base + k,)
                self.slot("reshape", node.name, lab, node, arg=arg)
            else:
                self.mark(lab, f"{_describe(node)} gives a channel dim's size as a computed value "
                               "(only integer literals and -1 can be rewritten)")

    # -- results
    def finish(self) -> Analysis:
        n_spaces = len(self.spaces)
        comp = [self.find_space(s) for s in range(n_spaces)]
        roots = sorted(set(comp))
        # units: element roots, ordered by their smallest element (first producer's row order)
        elem_root = [self.find(e) for e in range(len(self.parent))]
        first_elem: dict[int, int] = {}
        for e, r in enumerate(elem_root):
            first_elem.setdefault(r, e)
        units_of: dict[int, list[int]] = {r: [] for r in roots}
        for r, e in first_elem.items():
            units_of[comp[self.elem_space[e]]].append(r)
        groups, gindex, uindex = [], {}, {}
        for gi, root in enumerate(roots):
            units = sorted(units_of[root], key=lambda r: first_elem[r])
            gindex[root] = gi
            for k, r in enumerate(units):
                uindex[r] = k
        slots = list(self.slots.values())
        for s in slots:
            valid = s.ids >= 0
            s.gid = np.full(len(s.ids), -1, dtype=np.int64)
            s.unit = np.full(len(s.ids), -1, dtype=np.int64)
            for p in np.nonzero(valid)[0].tolist():
                e = int(s.ids[p])
                r = elem_root[e]
                s.gid[p] = gindex[comp[self.elem_space[e]]]
                s.unit[p] = uindex[r]
        for gi, root in enumerate(roots):
            members = [s for s in range(n_spaces) if comp[s] == root]
            producers = [self.spaces[s]["target"] for s in members]
            first = self.spaces[members[0]]
            reasons = [r for s in members for r in self.reasons.get(s, [])]
            nonzero = [r for s in members for r in self.nonzero.get(s, [])]
            events = set().union(*(self.events.get(s, set()) for s in members))
            gslots = [s for s in slots if (s.gid == gi).any()]
            consumers = [s.target for s in gslots if s.kind == "in"]
            per_channel = [s.target for s in gslots if s.kind == "channel"]
            reshapes = sorted({s.target for s in gslots if s.kind == "reshape"})
            kinds = {self.spaces[s]["kind"] for s in members}
            if "heads" in events:
                kind = "heads"
            elif "residual" in events:
                kind = "residual"
            elif "glu" in events:
                kind = "glu"
            elif "gated" in events:
                kind = "gated"
            elif "contracted" in events:
                kind = "qk"  # a single-head attention's query/key width, contracted in q·kᵀ
            elif kinds == {"conv"}:
                kind = "conv"
            elif kinds == {"embedding"}:
                kind = "embedding"
            else:
                kind = "hidden"
            size = len(units_of[root])
            width = max(1, first["size"] // size) if size else 1
            if size and first["size"] % size:
                width = 1
            groups.append(Group(
                name=first["target"], kind=kind, size=size, width=width,
                producers=_dedupe(producers), consumers=_dedupe(consumers), per_channel=_dedupe(per_channel),
                reshapes=reshapes, prunable=not reasons, reasons=_dedupe(reasons), zero_exact=not nonzero,
                index=gi, slots=gslots))
        return Analysis(groups, slots)


def _dedupe(items):
    return list(dict.fromkeys(items))


# ------------------------------------------------------------------------------------------- public API

def analyse(model: Model) -> Analysis:
    """Every channel group of ``model`` (prunable or not) with the slots that pruning slices."""
    return _Analyser(model).run()


def find_groups(model: Model) -> list[Group]:
    """Coupled-channel groups of ``model`` in graph order (see the module docstring)."""
    return analyse(model).groups


def describe_groups(groups) -> str:
    """One line per group (``Group.describe``)."""
    if isinstance(groups, Analysis):
        groups = groups.groups
    return "\n".join(g.describe() for g in groups)


def _weight_of(module: nn.Module, kind: str) -> torch.Tensor:
    w = module.weight.detach().double()
    if kind == "embedding":
        return w.t()
    return w


def importance(model: Model, group: Group | str, analysis: Analysis | None = None) -> torch.Tensor:
    """Per-unit importance: for each producer, the L2 norm of the weight rows of the unit (all rows of a head;
    embedding columns), summed over the group's coupled producers. Biases are not counted. float64, (size,)."""
    if isinstance(group, str):
        group = (analysis or analyse(model)).group(group)
    modules = dict(model.gm.named_modules())
    total = torch.zeros(group.size, dtype=torch.float64)
    for s in group.slots:
        if s.kind not in ("out", "embedding"):
            continue
        w = _weight_of(modules[s.target], s.kind).reshape(len(s.ids), -1)
        sq = torch.zeros(group.size, dtype=torch.float64)
        sel = torch.from_numpy(np.nonzero(s.gid == group.index)[0])
        units = torch.from_numpy(s.unit[sel.numpy()])
        sq.index_add_(0, units, (w[sel] ** 2).sum(dim=1))
        total += sq.sqrt()
    return total


def keep_from_counts(model: Model, counts: dict[str, int], analysis: Analysis | None = None) -> dict[str, list[int]]:
    """``{group: number of units to keep}`` -> ``{group: sorted kept unit indices}``: the most important
    units by :func:`importance` (ties: lower index first)."""
    analysis = analysis or analyse(model)
    keep = {}
    for name, n in counts.items():
        g = analysis.group(name)
        n = int(n)
        if not 1 <= n <= g.size:
            raise EdgecError(f"group '{name}' has {g.size} units; cannot keep {n} (keep at least 1)")
        scores = importance(model, g, analysis)
        order = sorted(range(g.size), key=lambda i: (-float(scores[i]), i))
        keep[name] = sorted(order[:n])
    return keep


def resolve_keep(analysis: Analysis, keep: dict) -> dict[int, set]:
    """Validate ``{group name: kept unit indices}`` -> ``{group index: set(kept units)}`` (only groups that lose
    units). Asking to remove units of an unprunable group is an error naming the node(s) that block it."""
    out = {}
    for name, kept in keep.items():
        g = analysis.group(name)
        if not isinstance(kept, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
            raise EdgecError(f"keep['{name}'] must be a list of unit indices")
        kept = list(kept)
        if kept != sorted(set(kept)):
            raise EdgecError(f"keep['{name}'] must be sorted and without duplicates")
        if not kept:
            raise EdgecError(f"keep['{name}'] is empty; keep at least one unit of a group")
        if kept[0] < 0 or kept[-1] >= g.size:
            raise EdgecError(f"keep['{name}'] has an index outside 0..{g.size - 1}")
        if len(kept) == g.size:
            continue
        if not g.prunable:
            raise EdgecError(f"cannot prune channel group '{name}': {g.reasons[0]}"
                             + (f" (and {len(g.reasons) - 1} more reason(s))" if len(g.reasons) > 1 else ""))
        out[g.index] = set(kept)
    return out


def zero_channels(model: Model, keep: dict, analysis: Analysis | None = None) -> Model:
    """A copy of ``model`` whose removed units are zeroed instead of removed: producer rows and biases,
    BatchNorm γ/β, depthwise kernels and biases, embedding columns. For groups with ``zero_exact`` this equals
    the physically pruned model."""
    analysis = analysis or analyse(model)
    keep_idx = resolve_keep(analysis, keep)
    out = model.clone()
    modules = dict(out.gm.named_modules())
    with torch.no_grad():
        for s in analysis.slots:
            if s.kind not in ("out", "channel", "embedding"):
                continue
            kept = set(s.kept_positions(keep_idx))
            drop = [p for p in range(len(s.ids)) if p not in kept]
            if not drop:
                continue
            m = modules[s.target]
            idx = torch.tensor(drop)
            if s.kind == "embedding":
                m.weight[:, idx] = 0
                continue
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                if t is not None:
                    t[idx] = 0
    return out


__all__ = ["Analysis", "Group", "Slot", "analyse", "describe_groups", "find_groups", "importance",
           "keep_from_counts", "resolve_keep", "zero_channels"]
