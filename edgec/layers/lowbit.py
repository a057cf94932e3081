"""Low-bit building blocks shared by the ternary/binary scaffolds, their folds and the low-bit export.

Deployable layers (what folds produce): ``LowBitLinear``, ``LowBitConv1d``, ``LowBitConv2d``. Each stores
its weight as integer codes with a scale (and optionally a shift) per group, so the file format and the
math are explicit::

    W[o, j] = scale[o, g(j)] · codes[o, j] + shift[o, g(j)]        g(j) = j // group_size

``j`` runs over the flattened fan-in of output channel ``o`` (``in_features``, or ``in/groups · kH · kW``
for a convolution); ``group_size = 0`` means one group per output channel. ``codes`` are int8 holding
{-1, 0, 1} (ternary, ``bits = 2``) or {-1, 1} (binary, ``bits = 1``). ``shift`` is None unless the
method learns one (DLT). An optional input activation quantizer (``act``: "ternary" or "binary") runs
on the layer's input, as STTN and binary networks quantize activations layer by layer.

Straight-through estimators used by the scaffolds live here too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgec.core.graph import Leaf

ACTS = ("none", "ternary", "binary")


# ---------------------------------------------------------------------------------------------- quantizers

def ternary_act(x: torch.Tensor) -> torch.Tensor:
    """a(x) = ½(sign(x − ½) + sign(x + ½)) ∈ {−1, 0, 1} (STTN), with STE gradient 1 on |x| ≤ 1, else 0."""
    q = 0.5 * (torch.sign(x - 0.5) + torch.sign(x + 0.5))
    if not x.requires_grad:
        return q
    clipped = x.clamp(-1.0, 1.0)
    return clipped + (q - clipped).detach()


def binary_act(x: torch.Tensor) -> torch.Tensor:
    """sign(x) ∈ {−1, 1} (0 maps to +1), with STE gradient 1 on |x| ≤ 1, else 0."""
    q = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    if not x.requires_grad:
        return q
    clipped = x.clamp(-1.0, 1.0)
    return clipped + (q - clipped).detach()


def quantize_act(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "ternary":
        return ternary_act(x)
    if act == "binary":
        return binary_act(x)
    return x


# ------------------------------------------------------------------------------------------------ groups

def n_groups(fan_in: int, group_size: int) -> int:
    return 1 if group_size <= 0 else math.ceil(fan_in / group_size)


def expand_groups(per_group: torch.Tensor, fan_in: int, group_size: int) -> torch.Tensor:
    """(out, n_groups) → (out, fan_in), each group's value repeated over its columns."""
    if group_size <= 0:
        return per_group.expand(per_group.shape[0], fan_in)
    return per_group.repeat_interleave(group_size, dim=1)[:, :fan_in]


def group_view(w2d: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, fan_in) → (out, n_groups, group_size) zero-padded; with group_size 0, (out, 1, fan_in)."""
    out, fan_in = w2d.shape
    if group_size <= 0:
        return w2d.reshape(out, 1, fan_in)
    pad = n_groups(fan_in, group_size) * group_size - fan_in
    return F.pad(w2d, (0, pad)).reshape(out, -1, group_size)


# ------------------------------------------------------------------------------------------ deploy layers

class LowBitLayer(Leaf):
    """Common storage and dequantization; subclasses apply the op."""

    def _init_lowbit(self, weight_shape, bias: bool, group_size: int, bits: int, shift: bool, act: str):
        if bits not in (1, 2):
            raise ValueError(f"bits must be 1 (binary) or 2 (ternary), got {bits}")
        if act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, got {act!r}")
        out = weight_shape[0]
        fan_in = math.prod(weight_shape[1:])
        g = n_groups(fan_in, group_size)
        self.weight_shape = tuple(weight_shape)
        self.group_size, self.bits, self.act = int(group_size), int(bits), act
        self.register_buffer("codes", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out, g))
        self.register_buffer("shift", torch.zeros(out, g) if shift else None)
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None

    def dequantized(self) -> torch.Tensor:
        out = self.weight_shape[0]
        fan_in = math.prod(self.weight_shape[1:])
        codes = self.codes.reshape(out, fan_in).to(self.scale.dtype)
        w = codes * expand_groups(self.scale, fan_in, self.group_size)
        if self.shift is not None:
            w = w + expand_groups(self.shift, fan_in, self.group_size)
        return w.reshape(self.weight_shape)

    def extra_repr(self) -> str:
        kind = {1: "binary", 2: "ternary"}[self.bits]
        return (f"{kind}, weight={list(self.weight_shape)}, group_size={self.group_size}, "
                f"shift={self.shift is not None}, act={self.act}, bias={self.bias is not None}")


class LowBitLinear(LowBitLayer):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 0,
                 bits: int = 2, shift: bool = False, act: str = "none"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_lowbit((out_features, in_features), bias, group_size, bits, shift, act)

    def forward(self, x):
        return F.linear(quantize_act(x, self.act), self.dequantized(), self.bias)


def _as_tuple(v, dims: int) -> tuple:
    return (v,) * dims if isinstance(v, int) else tuple(v)


class _LowBitConv(LowBitLayer):
    _conv = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, group_size: int = 0, bits: int = 2, shift: bool = False,
                 act: str = "none"):
        super().__init__()
        dims = 1 if self._conv is F.conv1d else 2
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _as_tuple(kernel_size, dims)
        self.stride, self.dilation = _as_tuple(stride, dims), _as_tuple(dilation, dims)
        self.padding = padding if isinstance(padding, str) else _as_tuple(padding, dims)
        self._init_lowbit((out_channels, in_channels // groups, *self.kernel_size), bias, group_size, bits, shift, act)

    def forward(self, x):
        return type(self)._conv(quantize_act(x, self.act), self.dequantized(), self.bias, self.stride,
                                self.padding, self.dilation, self.groups)


class LowBitConv1d(_LowBitConv):
    _conv = F.conv1d


class LowBitConv2d(_LowBitConv):
    _conv = F.conv2d


def lowbit_like(layer: nn.Module, *, group_size: int, bits: int, shift: bool, act: str) -> LowBitLayer:
    """An empty low-bit layer with the geometry of ``layer`` (nn.Linear / nn.Conv1d / nn.Conv2d)."""
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return LowBitLinear(layer.in_features, layer.out_features, bias, group_size, bits, shift, act)
    cls = {nn.Conv1d: LowBitConv1d, nn.Conv2d: LowBitConv2d}.get(type(layer))
    if cls is None:
        raise TypeError(f"no low-bit form for {type(layer).__name__}")
    return cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
               layer.dilation, layer.groups, bias, group_size, bits, shift, act)


def lowbit_layers(gm: nn.Module) -> list[tuple[str, LowBitLayer]]:
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, LowBitLayer)]
