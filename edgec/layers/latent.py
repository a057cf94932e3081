"""Base of the ternary/binary training scaffolds (STTN, DLT, binary) and the group statistics they share.

A :class:`LatentLayer` replaces a Conv/Linear at the same name, keeps its geometry and real bias, and computes
its weight from latent parameters; its eval-mode weight uses exactly the operations of
``LowBitLayer.dequantized``, so folding it into a LowBit deploy layer is exact (see docs/methods.md#sttn).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgec.core.graph import Scaffold
from edgec.layers.lowbit import (
    LowBitConv1d,
    LowBitConv2d,
    LowBitLayer,
    LowBitLinear,
    expand_groups,
    group_view,
    quantize_act,
)


def effective_group_size(fan_in: int, group_size: int) -> int:
    """0 (one group per output row) when ``group_size`` is 0 or covers the whole fan-in."""
    return 0 if group_size <= 0 or group_size >= fan_in else int(group_size)


def group_mean(values: torch.Tensor, group_size: int, where: torch.Tensor | None = None,
               empty: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Mean of (out, fan_in) ``values`` per (row, group) over real entries (and ``where``); ``empty``
    where a group has no such entry. Returns (out, n_groups)."""
    mask = torch.ones_like(values, dtype=torch.bool) if where is None else where
    v = group_view(values * mask, group_size)
    count = group_view(mask.to(values.dtype), group_size).sum(-1)
    total = v.sum(-1)
    empty_t = torch.as_tensor(empty, dtype=values.dtype, device=values.device).expand_as(total)
    return torch.where(count > 0, total / count.clamp_min(1), empty_t)


def sign_pm(x: torch.Tensor) -> torch.Tensor:
    """sign with 0 -> +1, so every binary kernel entry is ±1."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class LatentLayer(Scaffold):
    """Base of the ternary/binary training layers: geometry of the replaced layer, real bias, input
    quantizer ``act``, and the op. Subclasses implement ``weight_hat()`` (the training weight, with
    straight-through gradients), ``quantized()`` (detached codes, scale, shift in LowBit layout) and
    ``lowbit_spec()``.
    """

    bits: int = 2

    def __init__(self, layer: nn.Module, act: str = "none"):
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.op = "linear"
            self.in_features, self.out_features = layer.in_features, layer.out_features
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            self.op = "conv1d" if isinstance(layer, nn.Conv1d) else "conv2d"
            self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
            self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
            self.dilation, self.groups = layer.dilation, layer.groups
        else:
            raise TypeError(f"no latent low-bit form for {type(layer).__name__}")
        self.act = act
        self.weight_shape = tuple(layer.weight.shape)
        self.fan_in = math.prod(self.weight_shape[1:])
        if layer.bias is not None:
            self.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
        else:
            self.register_parameter("bias", None)

    @property
    def rows(self) -> int:
        return self.weight_shape[0]

    def _new_param(self, like: torch.Tensor, shape=None, value: torch.Tensor | None = None) -> nn.Parameter:
        data = value.detach().clone() if value is not None else torch.zeros(
            shape if shape is not None else like.shape, dtype=like.dtype, device=like.device)
        return nn.Parameter(data.to(dtype=like.dtype, device=like.device), requires_grad=like.requires_grad)

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.op == "linear":
            return F.linear(x, weight, self.bias)
        conv = F.conv1d if self.op == "conv1d" else F.conv2d
        return conv(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def dequantize(self, codes2d: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
                   group_size: int) -> torch.Tensor:
        """``codes · scale (+ shift)`` with exactly the operations of ``LowBitLayer.dequantized``."""
        w = codes2d * expand_groups(scale, self.fan_in, group_size)
        if shift is not None:
            w = w + expand_groups(shift, self.fan_in, group_size)
        return w

    def weight_hat(self) -> torch.Tensor:
        raise NotImplementedError

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(codes (out, fan_in) float in {-1,0,1}, scale (out, G), shift (out, G) or None), detached."""
        raise NotImplementedError

    def lowbit_spec(self) -> dict:
        """LowBit constructor options: group_size, bits, shift, act."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(quantize_act(x, self.act), self.weight_hat().reshape(self.weight_shape))

    def to_lowbit(self, fill: bool = True) -> LowBitLayer:
        """The deploy layer with this geometry; ``fill``: copy codes/scale/shift/bias (else structure only)."""
        spec = self.lowbit_spec()
        bias = self.bias is not None
        if self.op == "linear":
            low = LowBitLinear(self.in_features, self.out_features, bias, **spec)
        else:
            cls = LowBitConv1d if self.op == "conv1d" else LowBitConv2d
            low = cls(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                      self.dilation, self.groups, bias, **spec)
        ref = next(self.parameters())
        low = low.to(device=ref.device, dtype=ref.dtype)
        if fill:
            codes, scale, shift = self.quantized()
            with torch.no_grad():
                low.codes.copy_(codes.reshape(self.weight_shape).round().to(torch.int8))
                low.scale.copy_(scale)
                if shift is not None:
                    low.shift.copy_(shift)
                if bias:
                    low.bias.copy_(self.bias.detach())
        if bias:
            low.bias.requires_grad_(self.bias.requires_grad)
        return low.train(self.training)

    def extra_repr(self) -> str:
        return (f"{self.kind}, weight={list(self.weight_shape)}, act={self.act}, "
                f"bias={self.bias is not None}, folded_by={self.folded_by}")
