"""Per-op rules of the channel analysis, each registered for the ops it handles (:mod:`edgec.analysis.registry`).

Supporting a new op is one small function decorated with ``@register(op, ...)``. The rules and their
reasoning are described in docs/methods.md#coupled-channel-groups.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from edgec.analysis import reshape as reshape_rules
from edgec.analysis.context import Context, Labels, arg, describe, flat_nodes, norm_dim
from edgec.analysis.labels import Label
from edgec.analysis.registry import register, unsupported, visit
from edgec.core.ops import (
    ADD_FUNCTIONS,
    ADD_METHODS,
    BATCHNORM,
    CONV,
    DIV_FUNCTIONS,
    DIV_METHODS,
    LIKE_FUNCTIONS,
    MATMUL_FUNCTIONS,
    MUL_FUNCTIONS,
    MUL_METHODS,
    POOL_DIMS,
    REDUCE_FUNCTIONS,
    REDUCE_METHODS,
    SOFTMAX_FUNCTIONS,
    SOFTMAX_METHODS,
    UNARY_FUNCTIONS,
    UNARY_METHODS,
    UNARY_MODULES,
)
from edgec.layers.lowbit import LowBitLayer

_NOT_PRUNABLE = "combines these channels with a tensor whose channels are not prunable"

# ------------------------------------------------------------------------------------------- producers


@register(nn.Linear, *CONV, nn.Embedding, always=True)
def producer(cx: Context, node: fx.Node) -> Labels:
    """Linear / Conv / Embedding: fresh elements for the output rows; the input channel dim is a slot."""
    m = cx.module(node)
    x = node.args[0] if node.args else None
    inp = cx.lab(x)
    shape = cx.shape(node)
    if shape is None:
        cx.mark_all([x], f"{describe(node)} has no tensor output")
        return {}
    rank = len(shape)
    if isinstance(m, nn.Embedding):
        return _embedding(cx, node, m, x, inp, rank)
    if len(node.args) != 1 or node.kwargs:
        cx.mark_all([x], f"{describe(node)} is called with extra arguments")
        return {}
    if isinstance(m, nn.Linear):
        return _dense(cx, node, inp, shape, rank - 1, "linear")
    cdim = rank - (len(m.kernel_size) + 1)
    if m.groups != 1:
        return _grouped_conv(cx, node, m, inp, cdim)
    return _dense(cx, node, inp, shape, cdim, "conv")


def _embedding(cx: Context, node: fx.Node, m: nn.Embedding, x, inp: Labels, rank: int) -> Labels:
    out = dict(inp)
    if inp:
        cx.mark_all([x], f"{describe(node)} indexes an embedding with channel values")
        out = {}
    out[rank - 1] = cx.new_label(node, "embedding", m.embedding_dim)
    cx.slot("embedding", node.target, out[rank - 1], node)
    return out


def _dense(cx: Context, node: fx.Node, inp: Labels, shape: tuple, cdim: int, kind: str) -> Labels:
    """A Linear (acting on the last dim) or an ungrouped conv (channel dim ``cdim``)."""
    out = {}
    for d, lab in inp.items():
        if d == cdim:
            cx.slot("in", node.target, lab, node)
            if not lab.zero:
                cx.mark_nonzero(lab, f"masked channels are not zero at {describe(node)}")
        elif kind == "linear":
            out[d] = lab  # a Linear acts on the last dim only
        else:
            cx.mark(lab, f"{describe(node)} convolves over a channel dim")
    out[cdim] = cx.new_label(node, kind, shape[cdim])
    cx.slot("out", node.target, out[cdim], node)
    return out


def _grouped_conv(cx: Context, node: fx.Node, m, inp: Labels, cdim: int) -> Labels:
    """Depthwise convs follow their input channels; other grouped convs make them unprunable."""
    lab = inp.get(cdim)
    extra = [d for d in inp if d != cdim]
    if extra:
        cx.mark_all([node.args[0]], f"{describe(node)} convolves over a channel dim")
    if lab is not None and m.groups == m.in_channels == m.out_channels:
        cx.slot("channel", node.target, lab, node)
        cx.event(lab, "depthwise")
        return {cdim: lab.with_zero(True)}
    if lab is not None:
        cx.mark(lab, f"{describe(node)} is a grouped conv (groups={m.groups}); only depthwise convs follow "
                     "their input channels")
    space = cx.new_label(node, "conv", m.out_channels)
    cx.mark(space, f"{describe(node)} is a grouped conv (groups={m.groups}); its outputs are not prunable")
    return {}


@register(LowBitLayer, always=True)
def lowbit(cx: Context, node: fx.Node) -> Labels:
    x = node.args[0] if node.args else None
    cx.mark_all([x], f"{describe(node)} is a low-bit layer (not sliced by channel pruning yet)")
    return {}


# ------------------------------------------------------------------------------------------- per-channel modules

@register(*BATCHNORM)
def batchnorm(cx: Context, node: fx.Node) -> Labels:
    m = cx.module(node)
    inp = cx.lab(node.args[0])
    out = dict(inp)
    lab = inp.get(1)
    if lab is not None:
        cx.slot("channel", node.target, lab, node)
        if not m.affine:
            cx.mark_nonzero(lab, f"{describe(node)} has no affine parameters to zero")
        out[1] = lab.with_zero(m.affine)
    return out


@register(nn.LayerNorm)
def layernorm(cx: Context, node: fx.Node) -> Labels:
    m = cx.module(node)
    inp = cx.lab(node.args[0])
    rank = len(cx.shape(node))
    k = len(m.normalized_shape)
    for d, lab in inp.items():
        if d >= rank - k:
            cx.mark(lab, f"LayerNorm {describe(node)} normalises over this channel dim")
    return {d: lab.with_zero(False) for d, lab in inp.items()}


@register(nn.GLU)
def glu(cx: Context, node: fx.Node) -> Labels:
    """Channel ``i`` and ``i + C/2`` of the GLU dim go together."""
    m = cx.module(node)
    x = node.args[0]
    inp = cx.lab(x)
    gd = norm_dim(m.dim, len(cx.shape(x)))
    out = {}
    for d, lab in inp.items():
        if d == gd:
            half = len(lab.ids) // 2
            cx.unite(Label(lab.ids[:half]), Label(lab.ids[half:]), node)
            cx.event(lab, "glu")
            out[d] = Label(lab.ids[:half], lab.zero)
        else:
            out[d] = lab.with_zero(False)
    return out


@register(*POOL_DIMS, exact=True)
def pool(cx: Context, node: fx.Node) -> Labels:
    x = node.args[0]
    rank = len(cx.shape(x))
    spatial = POOL_DIMS[type(cx.module(node))]
    out = {}
    for d, lab in cx.lab(x).items():
        if d >= rank - spatial:
            cx.mark(lab, f"{describe(node)} pools over a channel dim")
        else:
            out[d] = lab
    return out


# ------------------------------------------------------------------------------------------- unary elementwise

def unary(cx: Context, node: fx.Node, zero_preserving: bool) -> Labels:
    """Labels pass through; masked zeros stay zero when the op maps 0 to 0."""
    inp = cx.lab(node.args[0])
    params = () if node.target in ("to", "type_as") else (node.args[1:], node.kwargs)
    for n in flat_nodes(params):
        if n in cx.labels:
            cx.mark_all([n], f"{describe(node)} takes a channel tensor as a parameter")
    return {d: lab.with_zero(lab.zero and zero_preserving) for d, lab in inp.items()}


def keeps_zero(cx: Context, node: fx.Node) -> Labels:
    return unary(cx, node, True)


def loses_zero(cx: Context, node: fx.Node) -> Labels:
    return unary(cx, node, False)


for _table, _exact in ((UNARY_MODULES, True), (UNARY_FUNCTIONS, False), (LIKE_FUNCTIONS, False),
                       (UNARY_METHODS, False)):
    register(*(op for op, zero in _table.items() if zero), exact=_exact)(keeps_zero)
    register(*(op for op, zero in _table.items() if not zero), exact=_exact)(loses_zero)


@register(nn.PReLU)
def prelu(cx: Context, node: fx.Node) -> Labels:
    """A PReLU with one shared slope is elementwise; one slope per channel is not sliced."""
    if cx.module(node).num_parameters == 1:
        return unary(cx, node, True)
    return unsupported(cx, node)


@register(operator.pow, torch.pow, "pow")
def pow_(cx: Context, node: fx.Node) -> Labels:
    exp = arg(node, 1, "exponent")
    if isinstance(exp, (int, float)) and exp > 0:
        return unary(cx, node, True)
    if isinstance(exp, (int, float)):
        return unary(cx, node, False)
    return elementwise(cx, node, "other")


@register(torch.clamp, torch.clip, "clamp", "clip")
def clamp(cx: Context, node: fx.Node) -> Labels:
    lo, hi = arg(node, 1, "min"), arg(node, 2, "max")
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        return elementwise(cx, node, "other")
    return unary(cx, node, (lo is None or lo <= 0) and (hi is None or hi >= 0))


# ------------------------------------------------------------------------------------------- broadcasting

def _broadcast_dim(cx: Context, operands, k: int, out_shape: tuple):
    """For output dim ``k``: the operands' labels there, whether an unlabelled operand has the full extent
    (``fixed``), whether each operand is zero at masked positions, and whether a scalar operand is 0."""
    rank = len(out_shape)
    labs, fixed, zeros, scalar_zero = [], False, [], False
    for a in operands:
        s = cx.shape(a)
        if s is None:
            if isinstance(a, (int, float)) and a == 0:
                scalar_zero = True
            zeros.append(False)
            continue
        d = k - (rank - len(s))
        lab = cx.lab(a).get(d) if d >= 0 else None
        if lab is not None and s[d] == out_shape[k]:
            labs.append(lab)
            zeros.append(lab.zero)
        else:
            fixed = fixed or (d >= 0 and s[d] == out_shape[k] and out_shape[k] != 1)
            zeros.append(False)
    return labs, fixed, zeros, scalar_zero


def _zero_after(kind: str, zeros: list[bool], scalar_zero: bool, n_operands: int) -> bool:
    if kind == "add":
        return all(zeros) or (n_operands == 2 and any(zeros) and scalar_zero)
    if kind == "mul":
        return any(zeros) or scalar_zero
    if kind == "div":
        return zeros[0]
    return False


def elementwise(cx: Context, node: fx.Node, kind: str) -> Labels:
    """Broadcasting ops: operands' labels on each output dim are united (add: residual, mul: gated)."""
    out_shape = cx.shape(node)
    if out_shape is None:
        cx.mark_all(flat_nodes(node.args), f"{describe(node)} has no tensor output")
        return {}
    operands = list(node.args[:2]) if kind != "other" else list(node.args)
    out = {}
    for k in range(len(out_shape)):
        labs, fixed, zeros, scalar_zero = _broadcast_dim(cx, operands, k, out_shape)
        if not labs:
            continue
        cx.unite_all(labs, node)
        if len(labs) > 1:
            cx.event(labs[0], "residual" if kind == "add" else "gated")
        if fixed:
            cx.mark(labs[0], f"{describe(node)} {_NOT_PRUNABLE}")
        out[k] = labs[0].with_zero(_zero_after(kind, zeros, scalar_zero, len(operands)))
    for a in flat_nodes((node.args[2:] if kind != "other" else (), node.kwargs)):
        cx.mark_all([a], f"{describe(node)} takes a channel tensor as a parameter")
    return out


@register(*ADD_FUNCTIONS, *ADD_METHODS)
def add(cx: Context, node: fx.Node) -> Labels:
    return elementwise(cx, node, "add")


@register(*MUL_FUNCTIONS, *MUL_METHODS)
def mul(cx: Context, node: fx.Node) -> Labels:
    return elementwise(cx, node, "mul")


@register(*DIV_FUNCTIONS, *DIV_METHODS)
def div(cx: Context, node: fx.Node) -> Labels:
    return elementwise(cx, node, "div")


@register(*MATMUL_FUNCTIONS, "matmul")
def matmul(cx: Context, node: fx.Node) -> Labels:
    """Batch dims broadcast like a product; the contracted dims are united (``qk`` when nothing else)."""
    a, b = node.args[0], node.args[1]
    sa, sb, so = cx.shape(a), cx.shape(b), cx.shape(node)
    la, lb = cx.lab(a), cx.lab(b)
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        cx.mark_all([a, b], f"{describe(node)} is a matmul with a vector operand")
        return {}
    ro = len(so)
    out = {}
    for k in range(ro - 2):
        labs, fixed, zeros, _ = _broadcast_dim(cx, (a, b), k, so)
        if labs:
            cx.unite_all(labs, node)
            if fixed:
                cx.mark(labs[0], f"{describe(node)} {_NOT_PRUNABLE}")
            out[k] = labs[0].with_zero(any(zeros))
    ka, kb = la.get(len(sa) - 1), lb.get(len(sb) - 2)
    if ka is not None and kb is not None:
        cx.unite(ka, kb, node)
        cx.event(ka, "contracted")
    elif ka is not None or kb is not None:
        cx.mark(ka or kb, f"{describe(node)} contracts a channel dim with a tensor whose channels are not "
                          "prunable")
    if len(sa) - 2 in la:
        out[ro - 2] = la[len(sa) - 2]
    if len(sb) - 1 in lb:
        out[ro - 1] = lb[len(sb) - 1]
    return out


# ------------------------------------------------------------------------------------------- reductions

@register(nn.Softmax, *SOFTMAX_FUNCTIONS, *SOFTMAX_METHODS)
def softmax(cx: Context, node: fx.Node) -> Labels:
    x = node.args[0]
    rank = len(cx.shape(x))
    dim = cx.module(node).dim if node.op == "call_module" else arg(node, 1, "dim")
    if dim is None:
        cx.mark_all([x], f"{describe(node)} has an implicit dim")
        return {}
    dim = norm_dim(dim, rank)
    out = {}
    for d, lab in cx.lab(x).items():
        if d == dim:
            cx.mark(lab, f"{describe(node)} normalises over a channel dim")
        out[d] = lab.with_zero(False)
    return out


@register(*REDUCE_FUNCTIONS, *REDUCE_METHODS)
def reduce(cx: Context, node: fx.Node) -> Labels:
    x = node.args[0]
    rank = len(cx.shape(x))
    dims = arg(node, 1, "dim")
    keep = bool(arg(node, 2, "keepdim", False))
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):
        dims = list(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    if not all(isinstance(d, int) for d in dims):
        cx.mark_all([x], f"{describe(node)} reduces over computed dims")
        return {}
    dims = {norm_dim(d, rank) for d in dims}
    out = {}
    for d, lab in cx.lab(x).items():
        if d in dims:
            cx.mark(lab, f"{describe(node)} reduces over a channel dim")
            continue
        nd = d if keep else d - sum(1 for r in dims if r < d)
        out[nd] = lab
    return out


# ------------------------------------------------------------------------------------------- joining

@register(torch.cat, torch.concat, torch.concatenate)
def cat(cx: Context, node: fx.Node) -> Labels:
    """Labels are concatenated along the cat dim (unlabelled parts fixed) and united on the others."""
    tensors = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    so = cx.shape(node)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or so is None:
        cx.mark_all(flat_nodes(node.args), f"{describe(node)} is a concatenation this analysis cannot follow")
        return {}
    dim = norm_dim(dim, len(so))
    out = {}
    for k in range(len(so)):
        if k == dim:
            lab = _concatenated(cx, tensors, k)
            if lab is not None:
                out[k] = lab
                cx.event(lab, "concat")
            continue
        lab = _joined(cx, node, [cx.lab(t).get(k) for t in tensors], "concatenates")
        if lab is not None:
            out[k] = lab
    return out


def _concatenated(cx: Context, tensors, k: int) -> Label | None:
    parts, zero, any_lab = [], True, False
    for t in tensors:
        lab = cx.lab(t).get(k)
        if lab is not None:
            parts.append(lab.ids)
            zero = zero and lab.zero
            any_lab = True
        else:
            parts.append(np.full(cx.shape(t)[k], -1, dtype=np.int64))
    return Label(np.concatenate(parts), zero) if any_lab else None


def _joined(cx: Context, node: fx.Node, labs: list, verb: str) -> Label | None:
    """The labels of one dim shared by joined tensors: united; an unlabelled tensor makes them unprunable."""
    present = [lab for lab in labs if lab is not None]
    if not present:
        return None
    cx.unite_all(present, node)
    if len(present) < len(labs):
        cx.mark(present[0], f"{describe(node)} {verb} channel tensors with unlabelled ones")
    return present[0].with_zero(all(lab.zero for lab in present))


@register(torch.stack)
def stack(cx: Context, node: fx.Node) -> Labels:
    tensors = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    so = cx.shape(node)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or so is None:
        cx.mark_all(flat_nodes(node.args), f"{describe(node)} is a stack this analysis cannot follow")
        return {}
    dim = norm_dim(dim, len(so))
    out = {}
    for k in range(len(so) - 1):
        lab = _joined(cx, node, [cx.lab(t).get(k) for t in tensors], "stacks")
        if lab is not None:
            out[k if k < dim else k + 1] = lab
    return out


# ------------------------------------------------------------------------------------------- splitting

@register(torch.split, torch.chunk, "split", "chunk")
def split(cx: Context, node: fx.Node) -> Labels:
    """``split``/``chunk`` into parts (a tuple: :attr:`Context.parts`, read by ``getitem``). Other dims keep
    their labels. A channel dim split by a list of integer sizes gives each part its slice of the label, and each
    size is a literal rewritten on pruning (a C2f block's ``split((c, c), 1)``: the parts' channels couple with
    wherever each part goes, and through a later ``cat`` with their offsets there). Equal parts (``chunk(n)``,
    ``split(c)``) stay equal only if they lose the same units: position ``i`` of every part is one unit (like
    GLU halves), and ``split(c)``'s ``c`` is rewritten."""
    x = node.args[0]
    s, inp = cx.shape(x), cx.lab(x)
    sizes = arg(node, 1, "split_size_or_sections" if node.target in (torch.split, "split") else "chunks")
    dim = arg(node, 2, "dim", 0)
    if s is None or not isinstance(dim, int) or node.kwargs.get("split_size") is not None:
        cx.mark_all([x], f"{describe(node)} is a split this analysis cannot follow")
        return {}
    dim = norm_dim(dim, len(s))
    n = s[dim]
    chunked = node.target in (torch.chunk, "chunk")
    if isinstance(sizes, int) and not isinstance(sizes, bool) and sizes > 0:
        per = -(-n // sizes) if chunked else sizes
        widths = [min(per, n - i) for i in range(0, n, per)]
    elif isinstance(sizes, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
        widths = list(sizes)
    else:
        cx.mark_all([x], f"{describe(node)} splits with computed sizes")
        return {}
    if sum(widths) != n:
        cx.mark_all([x], f"{describe(node)} has sizes that do not add up to the split dim")
        return {}
    lab = inp.get(dim)
    parts, start = [], 0
    for w in widths:
        part = {d: la for d, la in inp.items() if d != dim}
        if lab is not None:
            part[dim] = Label(lab.ids[start:start + w], lab.zero)
        parts.append(part)
        start += w
    if lab is not None and len(widths) > 1:
        if isinstance(sizes, (list, tuple)):
            where = 1 if len(node.args) > 1 else None
            for i, part in enumerate(parts):
                if where is None:
                    cx.mark(lab, f"{describe(node)} gives its split sizes as a keyword")
                    break
                cx.slot("reshape", node.name, part[dim], node, arg=(where, i))
        elif len(set(widths)) != 1:
            cx.mark(lab, f"{describe(node)} splits a channel dim into unequal parts")
        else:
            for part in parts[1:]:
                cx.unite(parts[0][dim], part[dim], node)
            cx.event(lab, "split")
            if not chunked:
                if len(node.args) > 1:
                    cx.slot("reshape", node.name, parts[0][dim], node, arg=(1,))
                else:
                    cx.mark(lab, f"{describe(node)} gives its split size as a keyword")
    cx.parts[node] = parts
    return {}


# ------------------------------------------------------------------------------------------- sampling

@register(torch.nn.functional.grid_sample)
def grid_sample(cx: Context, node: fx.Node) -> Labels:
    """``grid_sample(input [N, C, *spatial], grid [N, *out, k])``: each output channel interpolates the same
    input channel (zeros stay zero, whatever the padding mode), so input channels pass to output dim 1. The
    grid's last dim holds sampling coordinates: whatever produced them (a deformable attention's
    sampling-offset head, whose width is heads x levels x points x 2) must never be pruned, so every channel
    the grid carries is unprunable, as are labels on the input's batch or spatial dims."""
    x, grid = arg(node, 0, "input"), arg(node, 1, "grid")
    cx.mark_all([grid], f"{describe(node)} reads sampling coordinates from these channels (their widths encode "
                        "geometry: heads x levels x points x 2)")
    for n in flat_nodes((node.args[2:], {k: v for k, v in node.kwargs.items() if k not in ("input", "grid")})):
        cx.mark_all([n], f"{describe(node)} takes a channel tensor as a parameter")
    out = {}
    for d, lab in cx.lab(x).items():
        if d == 1:
            out[1] = lab
        else:
            cx.mark(lab, f"{describe(node)} samples over a channel dim (only the input's dim 1 passes through)")
    return out


# ------------------------------------------------------------------------------------------- moving dims

@register(torch.transpose, torch.swapaxes, "transpose", "swapaxes")
def transpose(cx: Context, node: fx.Node) -> Labels:
    x = node.args[0]
    rank = len(cx.shape(x))
    a, b = norm_dim(arg(node, 1, "dim0"), rank), norm_dim(arg(node, 2, "dim1"), rank)
    swap = {a: b, b: a}
    return {swap.get(d, d): lab for d, lab in cx.lab(x).items()}


@register(torch.permute, "permute")
def permute(cx: Context, node: fx.Node) -> Labels:
    x = node.args[0]
    rank = len(cx.shape(x))
    perm = node.args[1:] if node.op == "call_method" else (node.args[1],) if len(node.args) > 1 else ()
    if len(perm) == 1 and isinstance(perm[0], (tuple, list)):
        perm = tuple(perm[0])
    if not perm and "dims" in node.kwargs:
        perm = tuple(node.kwargs["dims"])
    perm = [norm_dim(p, rank) for p in perm]
    inv = {p: k for k, p in enumerate(perm)}
    return {inv[d]: lab for d, lab in cx.lab(x).items()}


@register(torch.unsqueeze, "unsqueeze")
def unsqueeze(cx: Context, node: fx.Node) -> Labels:
    x = node.args[0]
    d0 = norm_dim(arg(node, 1, "dim"), len(cx.shape(x)) + 1)
    return {(d if d < d0 else d + 1): lab for d, lab in cx.lab(x).items()}


@register(torch.squeeze, "squeeze")
def squeeze(cx: Context, node: fx.Node) -> Labels:
    x = node.args[0]
    s = cx.shape(x)
    dims = arg(node, 1, "dim")
    if dims is None:
        dims = [i for i, n in enumerate(s) if n == 1]
    elif isinstance(dims, int):
        dims = [dims]
    dims = {norm_dim(d, len(s)) for d in dims if s[norm_dim(d, len(s))] == 1}
    return {d - sum(1 for r in dims if r < d): lab for d, lab in cx.lab(x).items() if d not in dims}


register(nn.Flatten, torch.flatten, torch.reshape, "view", "reshape", "flatten")(reshape_rules.reshape)
register(operator.getitem)(reshape_rules.getitem)


# ------------------------------------------------------------------------------------------- sizes and attributes

@register("size")
def size(cx: Context, node: fx.Node) -> Labels:
    """``x.size()`` remembers which dims hold channels; ``x.size(c)`` of a channel dim is a size value, usable
    only as that same dim's size in a reshape (reshape._literals)."""
    x = node.args[0]
    inp = cx.lab(x)
    dim = arg(node, 1, "dim")
    if dim is None:
        if inp:
            cx.shape_nodes[node] = dict(inp)
        return {}
    dim = norm_dim(dim, len(cx.shape(x)))
    if dim in inp:
        cx.sizes[node] = inp[dim]  # checked where it is used (registry.visit, reshape._literals)
    return {}


@register("dim")
def rank(cx: Context, node: fx.Node) -> Labels:
    return {}


@register(getattr)
def getattr_(cx: Context, node: fx.Node) -> Labels:
    x, name = node.args[0], node.args[1]
    if name in ("device", "dtype", "ndim", "is_cuda", "requires_grad"):
        return {}
    if name == "shape" and x in cx.labels:
        cx.shape_nodes[node] = dict(cx.labels[x])
        return {}
    cx.mark_all([x], f"{describe(node)} reads attribute '{name}' of a channel tensor")
    return {}


# ------------------------------------------------------------------------------------------- the walk

def propagate(cx: Context) -> None:
    """Run every node's rule in graph order; channels reaching the model output are unprunable."""
    for node in cx.gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            _mark_outputs(cx, node)
            continue
        out = {d: lab for d, lab in (visit(cx, node) or {}).items() if (lab.ids >= 0).any()}
        if out:
            cx.labels[node] = out


def _mark_outputs(cx: Context, node: fx.Node) -> None:
    for n in flat_nodes(node.args):
        for lab in cx.labels.get(n, {}).values():
            cx.mark(lab, f"reaches the model output ({describe(n)})")
        for lab in cx.shape_nodes.get(n, {}).values():
            cx.mark(lab, f"its size reaches the model output ({describe(n)})")
        if n in cx.sizes:
            cx.mark(cx.sizes[n], f"its size reaches the model output ({describe(n)})")
        for part in cx.parts.get(n, ()):
            for lab in part.values():
                cx.mark(lab, f"reaches the model output ({describe(n)})")
