"""Fold BatchNorm into the preceding Conv or Linear (standard inference-time folding).

In eval mode BatchNorm is the affine map ``y = γ (x − μ) / sqrt(σ² + ε) + β``. When it directly follows a
convolution or linear layer ``x = W u + b`` whose output feeds nothing else, the two compose into one layer:

    s  = γ / sqrt(σ² + ε)            (per output channel)
    W* = W · s   (scaling each output channel's kernel)
    b* = (b − μ) · s + β

(Ioffe & Szegedy 2015 for BatchNorm; the folding is the standard deployment identity, cf.
``torch.nn.utils.fusion``.) A low-bit layer (``edgec.layers.lowbit``) folds too without leaving its code book:
its weight is ``scale · codes + shift`` per output-channel group, so multiplying ``scale`` and ``shift``
by the per-channel ``s`` keeps the codes unchanged. The pass matches ``call_module`` Conv{1,2,3}d/Linear → BatchNorm{1,2,3}d in
the traced graph, requires the BatchNorm to have running statistics, and for Linear → BatchNorm1d
requires the Linear output to be 2-D (checked by shape propagation), since BatchNorm1d normalises
dim 1. The folded graph is verified against the input on sample inputs at two shapes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from edgec.core.graph import Model, set_submodule, verify_equivalent
from edgec.layers.lowbit import LowBitConv1d, LowBitConv2d, LowBitLinear
from edgec.core.pass_manager import Pass, PassResult

TOLERANCE = 1e-5
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def find_pairs(model: Model) -> list[tuple]:
    """(producer node, batchnorm node) pairs that can be folded."""
    gm = model.gm
    modules = dict(gm.named_modules())
    shapes = None
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
            continue
        bn = modules[node.target]
        if bn.running_mean is None or not node.args or not hasattr(node.args[0], "op"):
            continue
        prev = node.args[0]
        if prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer = modules[prev.target]
        if isinstance(layer, _CONV + (LowBitConv1d, LowBitConv2d)) and layer.out_channels == bn.num_features:
            pairs.append((prev, node))
        elif isinstance(layer, (nn.Linear, LowBitLinear)) and isinstance(bn, nn.BatchNorm1d) \
                and layer.out_features == bn.num_features:
            if shapes is None:
                shapes = _output_ranks(model)
            if shapes.get(prev.name) == 2:
                pairs.append((prev, node))
    return pairs


def _output_ranks(model: Model) -> dict[str, int]:
    gm = model.clone().gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(*model.spec.sample(seed=0))
    return {n.name: len(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if hasattr(n.meta.get("tensor_meta"), "shape")}


def _fuse_lowbit(layer, bn):
    """Scale and shift of a low-bit layer absorb BN's per-channel factor; the codes stay as they are."""
    import copy

    fused = copy.deepcopy(layer)
    with torch.no_grad():
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        fused.scale.mul_(s[:, None])
        if fused.shift is not None:
            fused.shift.mul_(s[:, None])
        b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias = nn.Parameter((b - bn.running_mean) * s + beta)
    return fused


class FoldBatchNorm(Pass):
    name = "fold.batchnorm"
    version = 1

    def call(self, model: Model, *, replay: bool = False) -> PassResult:
        before = None if replay else model.clone()
        gm = model.gm
        pairs = find_pairs(model)
        if not pairs:
            return PassResult(model, modified=False, summary="no BatchNorm follows a Conv/Linear")
        modules = dict(gm.named_modules())
        for prev, bn_node in pairs:
            layer, bn = modules[prev.target], modules[bn_node.target]
            if isinstance(layer, (LowBitLinear, LowBitConv1d, LowBitConv2d)):
                fused = _fuse_lowbit(layer, bn)
            else:
                fuse = fuse_conv_bn_eval if isinstance(layer, _CONV) else fuse_linear_bn_eval
                fused = fuse(layer.eval(), bn.eval())
            set_submodule(gm, prev.target, fused)
            bn_node.replace_all_uses_with(prev)
            gm.graph.erase_node(bn_node)
            gm.delete_submodule(bn_node.target)
        gm.graph.lint()
        gm.recompile()
        checks = {} if replay else {"equivalence": verify_equivalent(before, model, TOLERANCE)}
        return PassResult(model, modified=True, checks=checks,
                          summary=f"folded {len(pairs)} BatchNorm layer(s) into the preceding Conv/Linear")
