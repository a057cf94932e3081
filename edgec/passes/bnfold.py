"""Fold BatchNorm into the preceding Conv or Linear (the standard inference-time identity; BatchNorm: Ioffe &
Szegedy 2015).

With ``s = γ / sqrt(σ² + ε)`` per output channel: ``W* = W · s`` and ``b* = (b − μ) · s + β``. A low-bit layer
keeps its codes: its per-group ``scale`` and ``shift`` are multiplied by ``s``. See docs/methods.md#batchnorm-fold.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from edgec.core.graph import Model, set_submodule, verify_equivalent
from edgec.core.ops import BATCHNORM as _BN
from edgec.core.ops import CONV as _CONV
from edgec.core.ops import EQUIVALENCE_TOLERANCE as TOLERANCE
from edgec.core.pass_manager import Pass, PassResult, skip
from edgec.layers.lowbit import LowBitConv1d, LowBitConv2d, LowBitLinear

_LOWBIT = (LowBitLinear, LowBitConv1d, LowBitConv2d)

# ------------------------------------------------------------------------------------------------ formulas

def bn_scale(var: torch.Tensor, eps: float, gamma: torch.Tensor | None) -> torch.Tensor:
    """The per-channel factor ``s = γ / sqrt(σ² + ε)`` (``1 / sqrt(σ² + ε)`` without an affine γ)."""
    return gamma / torch.sqrt(var + eps) if gamma is not None else 1.0 / torch.sqrt(var + eps)


def bn_fold_bias(b: torch.Tensor, mean: torch.Tensor, s: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The folded bias ``b* = (b − μ) · s + β``."""
    return (b - mean) * s + beta


def fold_lowbit(layer, bn):
    """A copy of a LowBit layer with BN folded in: ``scale·s``, ``shift·s`` (codes unchanged), bias ``b*``."""
    fused = copy.deepcopy(layer)
    with torch.no_grad():
        s = bn_scale(bn.running_var, bn.eps, bn.weight if bn.affine else None)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        fused.scale.mul_(s[:, None])
        if fused.shift is not None:
            fused.shift.mul_(s[:, None])
        b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias = nn.Parameter(bn_fold_bias(b, bn.running_mean, s, beta))
    return fused


def fold_float(layer, bn):
    """A float Conv/Linear with BN folded in (``torch.nn.utils.fusion``: the same formula, with rsqrt)."""
    fuse = fuse_conv_bn_eval if isinstance(layer, _CONV) else fuse_linear_bn_eval
    return fuse(layer.eval(), bn.eval())


# -------------------------------------------------------------------------------------------------- the pass

def find_pairs(model: Model) -> list[tuple]:
    """(producer node, batchnorm node) pairs that can be folded."""
    return scan_batchnorms(model)[0]


def scan_batchnorms(model: Model) -> tuple[list[tuple], list[dict]]:
    """The foldable (producer node, batchnorm node) pairs, and every other BatchNorm with the reason it stays."""
    gm = model.gm
    modules = dict(gm.named_modules())
    ranks: list = []  # computed once, on the first Linear → BatchNorm1d pair
    pairs, skipped = [], []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), _BN):
            why = _unfoldable(model, modules, node, ranks)
            if why is None:
                pairs.append((node.args[0], node))
            else:
                skipped.append(skip(node.target, f"BatchNorm not folded: {why}"))
    return pairs, skipped


def _unfoldable(model: Model, modules: dict, node, ranks: list) -> str | None:
    """Why the BatchNorm at ``node`` cannot be folded into its producer (None: it can)."""
    bn = modules[node.target]
    if bn.running_mean is None:
        return "no running statistics (track_running_stats=False): it normalises with batch statistics"
    prev = node.args[0] if node.args else None
    if not hasattr(prev, "op"):
        return "its input is not a tensor computed in the graph"
    layer = modules.get(prev.target) if prev.op == "call_module" else None
    if not isinstance(layer, _CONV + (nn.Linear,) + _LOWBIT):
        return f"its input is {_producer(prev, layer)}, not a Conv/Linear output"
    if len(prev.users) != 1:
        others = ", ".join(u.name for u in prev.users if u is not node)
        return f"the output of '{prev.target}' also feeds {others}; folding would change that use"
    width = layer.out_features if isinstance(layer, (nn.Linear, LowBitLinear)) else layer.out_channels
    if width != bn.num_features:
        return f"'{prev.target}' has {width} outputs but the BatchNorm normalises {bn.num_features} channels"
    if isinstance(layer, (nn.Linear, LowBitLinear)):
        if not isinstance(bn, nn.BatchNorm1d):
            return f"{type(bn).__name__} after a Linear layer"
        if not ranks:
            ranks.append(_output_ranks(model))
        if ranks[0].get(prev.name) != 2:
            return (f"'{prev.target}' output has rank {ranks[0].get(prev.name)}; a BatchNorm1d folds into a "
                    "Linear only on (N, C) input")
    return None


def _producer(node, module) -> str:
    if node.op == "placeholder":
        return f"the model input '{node.target}'"
    if module is not None:
        return f"'{node.target}' ({type(module).__name__})"
    if node.op == "call_method":
        return f"'{node.name}' (.{node.target}())"
    return f"'{node.name}' ({getattr(node.target, '__name__', node.target)})"


def _output_ranks(model: Model) -> dict[str, int]:
    gm = model.clone(share_weights=True).gm.eval()  # shape propagation only reads the weights
    with torch.no_grad():
        ShapeProp(gm).propagate(*model.spec.sample(seed=0))
    return {n.name: len(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if hasattr(n.meta.get("tensor_meta"), "shape")}


class FoldBatchNorm(Pass):
    """Fold every BatchNorm that directly follows a Conv/Linear (whose output feeds nothing else) into it."""

    name = "fold.batchnorm"
    version = 1

    def call(self, model: Model, *, replay: bool = False) -> PassResult:
        before = None if replay else model.clone(share_weights=True)  # read-only: the pass replaces modules
        gm = model.gm
        pairs, skipped = scan_batchnorms(model)
        skipped = [] if replay else skipped
        if not pairs:
            return PassResult(model, modified=False, skipped=skipped,
                              summary="no BatchNorm follows a Conv/Linear"
                                      + (f"; {len(skipped)} skipped" if skipped else ""))
        modules = dict(gm.named_modules())
        for prev, bn_node in pairs:
            layer, bn = modules[prev.target], modules[bn_node.target]
            lowbit = isinstance(layer, _LOWBIT)
            fused = fold_lowbit(layer, bn) if lowbit else fold_float(layer, bn)
            set_submodule(gm, prev.target, fused)
            bn_node.replace_all_uses_with(prev)
            gm.graph.erase_node(bn_node)
            gm.delete_submodule(bn_node.target)
        gm.graph.lint()
        gm.recompile()
        checks = {} if replay else {"equivalence": verify_equivalent(before, model, TOLERANCE)}
        return PassResult(model, modified=True, checks=checks, skipped=skipped,
                          summary=f"folded {len(pairs)} BatchNorm layer(s) into the preceding Conv/Linear; "
                                  f"{len(pairs)} changed, {len(skipped)} skipped")
