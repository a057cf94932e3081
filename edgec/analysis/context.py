"""The state of one channel analysis: the traced graph, its shapes at two input sizes, the labels each node
carries, the sliceable slots found so far, and the coupling (:mod:`edgec.analysis.labels`). Op rules
(:mod:`edgec.analysis.rules`) read and update it."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from edgec.analysis.labels import Coupling, Label
from edgec.core.errors import EdgecError
from edgec.core.graph import Model

Labels = dict[int, Label]  # dim -> label, for the labelled dims of one value


# ------------------------------------------------------------------------------------------- fx helpers

def describe(node: fx.Node) -> str:
    """``node 'name' (what)``: how reasons name a node."""
    if node.op == "call_module":
        what = f"module '{node.target}'"
    elif node.op == "call_method":
        what = f"method .{node.target}()"
    elif node.op == "call_function":
        what = f"function {getattr(node.target, '__name__', str(node.target))}()"
    else:
        what = node.op
    return f"node '{node.name}' ({what})"


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``index`` of ``node``, or keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def flat_nodes(obj) -> list[fx.Node]:
    out = []
    fx.node.map_arg(obj, lambda n: out.append(n))
    return out


def _propagate_shapes(model: Model, alt: bool) -> dict[str, tuple]:
    gm = copy.deepcopy(model.gm).eval()
    with torch.no_grad():
        try:
            ShapeProp(gm).propagate(*model.spec.sample(seed=0, alt=alt))
        except Exception as exc:  # noqa: BLE001 - any failure of the forward is the user's model
            raise EdgecError(f"channel analysis: the model does not run on its sample inputs ({exc})") from None
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if isinstance(n.meta.get("tensor_meta"), TensorMetadata)}


# ------------------------------------------------------------------------------------------- context

class Context:
    """Shapes at the spec's traced and alternative inputs (a dim whose size differs is dynamic), labels per
    node, slots (``(kind, target, arg) -> element ids``) and the coupling."""

    def __init__(self, model: Model):
        self.model = model
        self.gm = model.gm
        self.modules = dict(self.gm.named_modules())
        self.coupling = Coupling()
        self.slots: dict[tuple, np.ndarray] = {}
        self.labels: dict[fx.Node, Labels] = {}
        self.shape_nodes: dict[fx.Node, Labels] = {}  # size()/shape results that read labelled dims
        self.sizes: dict[fx.Node, Label] = {}  # ints read from the size of one channel dim (x.shape[-1])
        self.parts: dict[fx.Node, list[Labels]] = {}  # tuple results (split/chunk): the labels of each part
        self.shapes_a = _propagate_shapes(model, False)
        self.shapes_b = _propagate_shapes(model, True)

    # -- shapes and labels
    def shape(self, node) -> tuple | None:
        return self.shapes_a.get(node.name) if isinstance(node, fx.Node) else None

    def static(self, node, dim: int) -> bool:
        a, b = self.shapes_a.get(node.name), self.shapes_b.get(node.name)
        return a is not None and b is not None and len(a) == len(b) and a[dim] == b[dim]

    def lab(self, node) -> Labels:
        return self.labels.get(node, {}) if isinstance(node, fx.Node) else {}

    def module(self, node: fx.Node):
        return self.modules.get(node.target)

    # -- coupling
    def new_label(self, node: fx.Node, kind: str, size: int) -> Label:
        """A fresh label for the ``size`` output rows of the producer module called by ``node``."""
        return Label(self.coupling.new_space(node.name, node.target, kind, size))

    def mark(self, label: Label, reason: str) -> None:
        self.coupling.mark(label, reason)

    def mark_nonzero(self, label: Label, reason: str) -> None:
        self.coupling.mark_nonzero(label, reason)

    def event(self, label: Label, kind: str) -> None:
        self.coupling.event(label, kind)

    def unite(self, a: Label, b: Label, node: fx.Node) -> None:
        self.coupling.unite(a, b, describe(node))

    def unite_all(self, labels: list[Label], node: fx.Node) -> None:
        """Unite every label of ``labels`` with the first."""
        for other in labels[1:]:
            self.unite(labels[0], other, node)

    def mark_all(self, nodes, reason: str) -> None:
        """Every channel that the values ``nodes`` carry (or whose sizes they hold, or that their parts carry)
        is unprunable."""
        for n in nodes:
            for lab in self.labels.get(n, {}).values():
                self.mark(lab, reason)
            for lab in self.shape_nodes.get(n, {}).values():
                self.mark(lab, reason)
            if n in self.sizes:
                self.mark(self.sizes[n], reason)
            for part in self.parts.get(n, ()):
                for lab in part.values():
                    self.mark(lab, reason)

    def carries(self, node) -> bool:
        """``node`` carries channels, sizes of channel dims or parts holding channels."""
        return node in self.labels or node in self.shape_nodes or node in self.sizes or node in self.parts

    def slot(self, kind: str, target: str, label: Label, node: fx.Node, arg=None) -> None:
        """Record a sliceable place; a module called more than once shares its rows/columns."""
        key = (kind, target, arg)
        if key in self.slots:
            self.unite(Label(self.slots[key]), label, node)
        else:
            self.slots[key] = label.ids.copy()
