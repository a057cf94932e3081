"""Which layers of a traced graph hold matmul-like weights that a pass cannot reach, and why.

The scaffold passes rewrite ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` call sites. Other weight holders — an
embedding table, a recurrent layer, a stock module that fx left opaque, a parameter used by a functional op —
stay full precision; these helpers name them so that the passes can report them as skipped instead of
leaving them out silently. Norms and other per-channel parameters (1-D) are not worth reporting.
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from edgec.core.graph import Scaffold


def first_calls(gm: fx.GraphModule) -> list[tuple[str, nn.Module]]:
    """(name, module) of every ``call_module`` node in graph order, each module once."""
    modules = dict(gm.named_modules())
    seen: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in seen and node.target in modules:
            seen[node.target] = modules[node.target]
    return list(seen.items())


def has_matrix_weight(module: nn.Module) -> bool:
    """Some parameter of ``module`` (or its children) has two or more dims: a matmul-like weight."""
    return any(p.dim() >= 2 for p in module.parameters())


def opaque_reason(module: nn.Module) -> str:
    """Why a weight-holding module that is not a Linear/Conv1d/Conv2d call site stays full precision."""
    kind = type(module).__name__
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"nn.{kind} lookup table is not a matmul layer; kept fp32"
    if isinstance(module, nn.RNNBase):
        return f"recurrent layer nn.{kind} is one opaque module (only Linear/Conv1d/Conv2d are rewritten); kept fp32"
    if isinstance(module, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                           nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)):
        return f"nn.{kind} left opaque by graph capture (its Linear layers are not visible); kept fp32"
    if isinstance(module, Scaffold):
        return f"training scaffold {kind} ({module.kind}); fold it first"
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Conv3d, nn.Bilinear)):
        return f"nn.{kind} is not supported by the low-bit layers (only Linear/Conv1d/Conv2d); kept fp32"
    return f"{kind} holds weights but is not an nn.Linear/Conv1d/Conv2d layer; kept fp32"


def opaque_weight_layers(gm: fx.GraphModule, handled: tuple) -> list[tuple[str, nn.Module]]:
    """Called modules holding matmul-like weights that are not instances of ``handled``, in graph order."""
    return [(n, m) for n, m in first_calls(gm) if not isinstance(m, handled) and has_matrix_weight(m)]


def functional_weights(gm: fx.GraphModule, owners: set[str]) -> list[str]:
    """Parameters (2-D or more) read directly by ``get_attr`` nodes — used by a functional op, not a layer —
    whose owning module is not in ``owners``, in graph order."""
    params = dict(gm.named_parameters())
    found = []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in found:
            continue
        p = params.get(str(node.target))
        if p is not None and p.dim() >= 2 and str(node.target).rpartition(".")[0] not in owners:
            found.append(str(node.target))
    return found


FUNCTIONAL_REASON = "parameter used directly by a functional op (not an nn.Linear/Conv module); kept fp32"
