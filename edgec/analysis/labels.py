"""Channel labels and their coupling: the union-find core of the channel analysis.

A producer creates one *element* per output row, grouped in a *space* (its rows); tensors carry, per channel
dim, a :class:`Label` naming the element behind each position. Ops that force positions to go together unite
their elements; spaces whose elements meet are united too (they become one group). See
docs/methods.md#coupled-channel-groups.
"""
from __future__ import annotations

import numpy as np


class Label:
    """The elements behind each position of one tensor dim (-1: fixed); ``zero``: in the masked model the
    positions of masked units are exactly zero here."""

    __slots__ = ("ids", "zero")

    def __init__(self, ids: np.ndarray, zero: bool = True):
        self.ids = ids
        self.zero = zero

    def with_zero(self, zero: bool) -> Label:
        return Label(self.ids, zero)


class Coupling:
    """Union-find over elements (units) and over spaces (groups), plus what was recorded per space:
    ``reasons`` (unprunable), ``nonzero`` (masking is not exact), ``events`` (what coupled it: heads, glu ...)."""

    def __init__(self):
        self.parent: list[int] = []  # element union-find
        self.elem_space: list[int] = []
        self.spaces: list[dict] = []  # {"target", "node", "kind", "size", "base"}
        self.space_parent: list[int] = []
        self.reasons: dict[int, list[str]] = {}
        self.nonzero: dict[int, list[str]] = {}
        self.events: dict[int, set] = {}

    def new_space(self, node_name: str, target: str, kind: str, size: int) -> np.ndarray:
        """Fresh elements for ``size`` output rows of producer ``target``; returns their ids."""
        sid, base = len(self.spaces), len(self.parent)
        self.spaces.append({"target": target, "node": node_name, "kind": kind, "size": size, "base": base})
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
        """Unite elements ``a`` and ``b`` (the smaller id becomes the root) and their spaces."""
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

    def mark(self, label: Label, reason: str) -> None:
        """The spaces behind ``label`` are unprunable, because of ``reason``."""
        for s in self.spaces_of(label.ids):
            self.reasons.setdefault(s, []).append(reason)

    def mark_nonzero(self, label: Label, reason: str) -> None:
        """Masking the spaces behind ``label`` does not give exact zeros, because of ``reason``."""
        for s in self.spaces_of(label.ids):
            self.nonzero.setdefault(s, []).append(reason)

    def event(self, label: Label, kind: str) -> None:
        for s in self.spaces_of(label.ids):
            self.events.setdefault(s, set()).add(kind)

    def unite(self, a: Label, b: Label, where: str) -> None:
        """Position-wise union; a labelled position against a fixed one makes the channel unprunable.
        ``where`` names the node, for the reasons."""
        if len(a.ids) != len(b.ids):
            self.mark(a, f"{where} combines dims of different sizes")
            self.mark(b, f"{where} combines dims of different sizes")
            return
        fixed_a, fixed_b = a.ids < 0, b.ids < 0
        mixed = fixed_a ^ fixed_b
        if mixed.any():
            bad = Label(np.where(fixed_a, b.ids, a.ids)[mixed])
            self.mark(bad, f"{where} combines these channels with a tensor whose channels are not prunable")
        for x, y in zip(a.ids[~(fixed_a | fixed_b)].tolist(), b.ids[~(fixed_a | fixed_b)].tolist()):
            if x != y:
                self.union(x, y)
