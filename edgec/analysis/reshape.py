"""Channel-analysis rules for ops that regroup dims: ``view``/``reshape``/``flatten`` (merges and splits; how
attention heads become units) and indexing (registered in :mod:`edgec.analysis.rules`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from edgec.analysis.context import Context, Labels, describe, norm_dim
from edgec.analysis.labels import Label


def group_dims(ins: tuple, outs: tuple):
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


# ------------------------------------------------------------------------------------------- reshape

def reshape(cx: Context, node: fx.Node) -> Labels:
    """Labels follow the dim correspondence; see :func:`_split` and :func:`_merge`."""
    x = node.args[0]
    si, so = cx.shape(x), cx.shape(node)
    inp = cx.lab(x)
    if si is None or so is None:
        cx.mark_all([x], f"{describe(node)} reshapes a non-tensor")
        return {}
    groups = group_dims(si, so)
    if groups is None:
        cx.mark_all([x], f"{describe(node)} is a reshape this analysis cannot follow")
        return {}
    out = {}
    for gi, gj in groups:
        labelled = [d for d in gi if d in inp]
        if not labelled:
            continue
        if len(gi) == 1 and len(gj) == 1:
            out[gj[0]] = inp[gi[0]]
        elif len(gi) == 1:
            split = _split(cx, node, inp[gi[0]], gj, so)
            if split is not None:
                out[split[0]] = split[1]
        elif len(gj) == 1:
            merged = _merge(cx, node, x, inp, labelled, gi, si)
            if merged is not None:
                out[gj[0]] = merged
        else:
            for d in labelled:
                cx.mark(inp[d], f"{describe(node)} regroups a channel dim with others")
    _literals(cx, node, out, len(so))
    return out


def _split(cx: Context, node: fx.Node, lab: Label, gj: list[int], so: tuple) -> tuple[int, Label] | None:
    """A channel dim split into static factors: the label goes to the outermost factor of size > 1 and each
    block of inner positions is united (``(B, T, H·dh) -> (B, T, H, dh)``: heads)."""
    big = [o for o in gj if so[o] != 1]
    if not big:
        return None
    o0 = big[0]
    inner = [o for o in gj if o > o0]
    if not all(cx.static(node, o) for o in inner):
        cx.mark(lab, f"{describe(node)} splits a channel dim into dynamic factors")
        return None
    block = len(lab.ids) // so[o0]
    blocks = lab.ids.reshape(so[o0], block)
    for row in blocks:
        cx.unite(Label(np.full(block, row[0])), Label(row), node)
    if block > 1:
        cx.event(lab, "heads")
    return o0, Label(blocks[:, 0].copy(), lab.zero)


def _merge(cx: Context, node: fx.Node, x, inp: Labels, labelled: list[int], gi: list[int], si: tuple) -> Label | None:
    """A channel dim merged with static dims: its label repeats over them (``(B, T, C, F) -> (B, T, C·F)``)."""
    if len(labelled) > 1:
        for d in labelled:
            cx.mark(inp[d], f"{describe(node)} merges two channel dims")
        return None
    d0 = labelled[0]
    if not all(cx.static(x, d) for d in gi if d != d0):
        cx.mark(inp[d0], f"{describe(node)} merges a channel dim with a dynamic dim (e.g. attention heads folded "
                         "into the batch, as deformable attention does for grid_sample): not pruned")
        return None
    sizes = [si[d] for d in gi]
    coord = np.indices(sizes)[gi.index(d0)].reshape(-1)
    return Label(inp[d0].ids[coord], inp[d0].zero)


def _literals(cx: Context, node: fx.Node, out: Labels, rank: int) -> None:
    """Integer size literals at labelled dims of a ``view``/``reshape`` become slots (rewritten on pruning)."""
    if node.op == "call_module" or node.target in ("flatten", torch.flatten):
        return
    rest = list(node.args[1:])
    if node.op == "call_function":  # torch.reshape(x, shape)
        shape, where = (rest[0] if rest else None), "tuple"
    elif len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        shape, where = rest[0], "tuple"
    else:
        shape, where = rest, "args"
    if not isinstance(shape, (list, tuple)) or len(shape) != rank:
        for lab in out.values():
            cx.mark(lab, f"{describe(node)} has a shape argument this analysis cannot rewrite")
        cx.mark_all([n for n in rest if isinstance(n, fx.Node)], f"{describe(node)} has a shape argument this "
                                                                 "analysis cannot follow")
        return
    for k, v in enumerate(shape):
        if isinstance(v, fx.Node) and v in cx.sizes and not _same(out.get(k), cx.sizes[v]):
            cx.mark(cx.sizes[v], f"{describe(node)} uses the size of a channel dim ({describe(v)}) for another "
                                 "dim; its value would change")
    for k, lab in out.items():
        v = shape[k]
        if isinstance(v, int) and v == -1:
            continue
        arg = (1, k) if where == "tuple" else (1 + k,)
        if isinstance(v, int) or (isinstance(v, fx.Node) and cx.static(node, k)):
            # a literal, or a computed value (``C`` in ``reshape(B, N, C)``, ``C // heads``) at a static channel
            # dim: pruning writes the dim's new size there as a literal
            cx.slot("reshape", node.name, lab, node, arg=arg)
        else:
            cx.mark(lab, f"{describe(node)} gives a channel dim's size as a value that changes with the input "
                         "(only integer literals, -1 and values at static dims can be rewritten)")


def _same(a: Label | None, b: Label) -> bool:
    """``a`` and ``b`` name the same elements at every position (so their sizes stay equal when pruned)."""
    return a is not None and len(a.ids) == len(b.ids) and bool(np.array_equal(a.ids, b.ids))


# ------------------------------------------------------------------------------------------- indexing

def _channel_slice(cx: Context, node: fx.Node, lab: Label, sl: slice, k: int | None) -> Label | None:
    """``y[:, a:b]`` on a channel dim with non-negative integer bounds (a C2f block written with slicing): the
    part keeps its positions' labels, and each bound is a ``slice`` slot over the positions before it, so
    pruning writes the number kept there (``y[:, :c]`` / ``y[:, c:]`` stay the two halves). Steps, negative
    or computed bounds make the channels unprunable."""
    n = len(lab.ids)
    bounds = (sl.start, sl.stop)
    if sl.step is not None or not all(b is None or (isinstance(b, int) and not isinstance(b, bool) and b >= 0)
                                      for b in bounds):
        cx.mark(lab, f"{describe(node)} slices a channel dim with a step, a negative or a computed bound")
        return None
    start = 0 if sl.start is None else min(sl.start, n)
    stop = n if sl.stop is None else min(sl.stop, n)
    for field, b in (("start", sl.start), ("stop", sl.stop)):
        if b is not None and 0 < b < n:
            cx.slot("slice", node.name, Label(lab.ids[:b]), node, arg=(1, k, field))
    if stop <= start:
        cx.mark(lab, f"{describe(node)} takes an empty slice of a channel dim")
        return None
    return Label(lab.ids[start:stop], lab.zero)


def getitem(cx: Context, node: fx.Node) -> Labels:
    """``x[...]``: full slices, ``None`` and ``...`` move labels; picking or slicing a channel dim, or advanced
    indexing, makes it unprunable. ``x.shape[i]`` of a channel dim too."""
    x, index = node.args[0], node.args[1]
    if x in cx.shape_nodes:  # x.shape[i] / x.size()[i]
        _size_item(cx, node, cx.shape_nodes[x], index)
        return {}
    if x in cx.parts:  # one part of a split/chunk
        if isinstance(index, int) and -len(cx.parts[x]) <= index < len(cx.parts[x]):
            return dict(cx.parts[x][index])
        cx.mark_all([x], f"{describe(node)} indexes the parts of a split with a computed index")
        return {}
    s = cx.shape(x)
    if s is None:
        cx.mark_all([x], f"{describe(node)} indexes a non-tensor value holding channels")
        return {}
    idx = index if isinstance(index, tuple) else (index,)
    return _index(cx, node, s, cx.lab(x), idx)


def _size_item(cx: Context, node: fx.Node, labs: Labels, index) -> None:
    """``x.shape[i]`` of a channel dim: a size value (:attr:`Context.sizes`); only a reshape that gives that same
    dim its size may use it, anything else makes the channels unprunable (see registry.visit)."""
    if isinstance(index, int):
        d = norm_dim(index, len(cx.shape(node.args[0].args[0])))
        if d in labs:
            cx.sizes[node] = labs[d]
    else:
        for lab in labs.values():
            cx.mark(lab, f"{describe(node)} reads the sizes of a channel tensor")


def _index(cx: Context, node: fx.Node, s: tuple, inp: Labels, idx: tuple) -> Labels:
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, d, o = {}, 0, 0
    for k, i in enumerate(idx):
        if i is Ellipsis:
            for _ in range(len(s) - n_real):
                if d in inp:
                    out[o] = inp[d]
                d, o = d + 1, o + 1
        elif i is None:
            o += 1
        elif isinstance(i, int) and not isinstance(i, bool):
            if d in inp:
                cx.mark(inp[d], f"{describe(node)} picks single channels")
            d += 1
        elif isinstance(i, slice):
            full = i.start is None and i.stop is None and i.step is None
            if d in inp and full:
                out[o] = inp[d]
            elif d in inp:
                part = _channel_slice(cx, node, inp[d], i, k if isinstance(node.args[1], tuple) else None)
                if part is not None:
                    out[o] = part
            d, o = d + 1, o + 1
        else:  # tensor / list / computed index: changes that dim and maybe others
            for lab in inp.values():
                cx.mark(lab, f"{describe(node)} uses advanced indexing on a channel tensor")
            return {}
    while d < len(s):
        if d in inp:
            out[o] = inp[d]
        d, o = d + 1, o + 1
    return out


reshape.reads_sizes = True  # registry.visit: the rule checks size values itself (_literals)
