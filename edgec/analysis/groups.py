"""Coupled-channel groups: which output channels, hidden units or attention heads must be removed together.

The analysis runs the per-op rules (:mod:`edgec.analysis.rules`) over the traced graph, then reads the
union-find coupling (:mod:`edgec.analysis.labels`) back as :class:`Group` s, each with the :class:`Slot` s that
pruning slices. Model, rules and the mask-equivalence argument: docs/methods.md#coupled-channel-groups.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edgec.analysis.context import Context
from edgec.analysis.labels import Coupling
from edgec.analysis.rules import propagate
from edgec.core.errors import EdgecError
from edgec.core.graph import Model

# ------------------------------------------------------------------------------------------- results

@dataclass
class Slot:
    """One sliceable place: a module's output rows (``out``), input columns (``in``), per-channel entries
    (``channel``: BatchNorm / depthwise conv), an embedding's columns (``embedding``), or a size literal in a
    ``view``/``reshape``/``split`` node (``reshape``; ``target`` is the node name, ``arg`` where the literal sits),
    or a slice bound on a channel dim (``slice``; ``arg`` = (arg index, index item or None, "start"/"stop")).
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


# ------------------------------------------------------------------------------------------- building groups

@dataclass
class _Partition:
    """The coupling read back: spaces -> groups, elements -> units, both numbered."""

    comp: list[int]  # space -> the root space of its group
    roots: list[int]  # group roots, in group order (ascending: the first producer in graph order)
    elem_root: list[int]  # element -> the root element of its unit
    units_of: dict[int, list[int]]  # group root -> its unit roots
    gindex: dict[int, int]  # group root -> group index
    uindex: dict[int, int]  # unit root -> unit index within its group


def _partition(cp: Coupling) -> _Partition:
    comp = [cp.find_space(s) for s in range(len(cp.spaces))]
    roots = sorted(set(comp))
    # units: element roots, ordered by their smallest element (first producer's row order)
    elem_root = [cp.find(e) for e in range(len(cp.parent))]
    first_elem: dict[int, int] = {}
    for e, r in enumerate(elem_root):
        first_elem.setdefault(r, e)
    units_of: dict[int, list[int]] = {r: [] for r in roots}
    for r, e in first_elem.items():
        units_of[comp[cp.elem_space[e]]].append(r)
    gindex, uindex = {}, {}
    for gi, root in enumerate(roots):
        units = sorted(units_of[root], key=lambda r: first_elem[r])
        gindex[root] = gi
        for k, r in enumerate(units):
            uindex[r] = k
    return _Partition(comp, roots, elem_root, units_of, gindex, uindex)


def _numbered_slot(key: tuple, ids: np.ndarray, cp: Coupling, part: _Partition) -> Slot:
    """The slot with the group and unit of each of its positions (-1: fixed)."""
    s = Slot(key[0], key[1], key[2], ids)
    s.gid = np.full(len(s.ids), -1, dtype=np.int64)
    s.unit = np.full(len(s.ids), -1, dtype=np.int64)
    for p in np.nonzero(s.ids >= 0)[0].tolist():
        e = int(s.ids[p])
        s.gid[p] = part.gindex[part.comp[cp.elem_space[e]]]
        s.unit[p] = part.uindex[part.elem_root[e]]
    return s


def _kind(events: set, producer_kinds: set) -> str:
    for event, kind in (("heads", "heads"), ("residual", "residual"), ("glu", "glu"), ("gated", "gated"),
                        ("contracted", "qk")):  # qk: a single-head attention's query/key width
        if event in events:
            return kind
    if producer_kinds == {"conv"}:
        return "conv"
    if producer_kinds == {"embedding"}:
        return "embedding"
    return "hidden"


def _group(cp: Coupling, part: _Partition, gi: int, slots: list[Slot]) -> Group:
    root = part.roots[gi]
    members = [s for s in range(len(cp.spaces)) if part.comp[s] == root]
    first = cp.spaces[members[0]]
    reasons = [r for s in members for r in cp.reasons.get(s, [])]
    nonzero = [r for s in members for r in cp.nonzero.get(s, [])]
    events = set().union(*(cp.events.get(s, set()) for s in members))
    gslots = [s for s in slots if (s.gid == gi).any()]
    size = len(part.units_of[root])
    width = max(1, first["size"] // size) if size else 1
    if size and first["size"] % size:
        width = 1
    return Group(
        name=first["target"], kind=_kind(events, {cp.spaces[s]["kind"] for s in members}), size=size, width=width,
        producers=_dedupe([cp.spaces[s]["target"] for s in members]),
        consumers=_dedupe([s.target for s in gslots if s.kind == "in"]),
        per_channel=_dedupe([s.target for s in gslots if s.kind == "channel"]),
        reshapes=sorted({s.target for s in gslots if s.kind in ("reshape", "slice")}), prunable=not reasons,
        reasons=_dedupe(reasons), zero_exact=not nonzero, index=gi, slots=gslots)


def _dedupe(items):
    return list(dict.fromkeys(items))


# ------------------------------------------------------------------------------------------- public API

def analyse(model: Model) -> Analysis:
    """Every channel group of ``model`` (prunable or not) with the slots that pruning slices."""
    cx = Context(model)
    propagate(cx)
    part = _partition(cx.coupling)
    slots = [_numbered_slot(key, ids, cx.coupling, part) for key, ids in cx.slots.items()]
    groups = [_group(cx.coupling, part, gi, slots) for gi in range(len(part.roots))]
    return Analysis(groups, slots)


def find_groups(model: Model) -> list[Group]:
    """Coupled-channel groups of ``model`` in graph order (see docs/methods.md#coupled-channel-groups)."""
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
