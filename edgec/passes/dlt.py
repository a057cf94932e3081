"""DLT scaffold and fold: ternary weights with learnable per-group scale and shift (TernaryLLM).

Source: Chen et al., "TernaryLLM: Ternarized Large Language Model" (arXiv 2406.07177), Dual Learnable
Ternarization. (Its OFF feature distillation lives in the training loop, ``edgec.train``.)

**Training (scaffold.dlt).** Each selected Conv/Linear keeps a real latent weight W (``weight``, initialised
from the layer's weight) and gets a learnable scale α (``alpha``) and shift γ (``gamma``) per group. A
group is ``group_size`` consecutive entries of one output row's flattened fan-in (``in_features``, or
``in/groups · kH · kW`` for a convolution; the last group of a row may be shorter); ``group_size`` 0, or a
group size >= the fan-in, means one group per row (choice: such a layer simply uses its whole row, and
its deploy layer records group_size 0). Each forward recomputes, from the current W::

    Δ_g = 0.7 · mean_{j∈g} |W_j − γ_g|                     (TWN rule)
    T_j = sign(W_j − γ_g) · 1[|W_j − γ_g| > Δ_g] ∈ {−1, 0, 1}
    Ŵ_j = α_g · T_j + γ_g

with straight-through gradients ∂Ŵ/∂W = 1 where |W − γ| <= ``clip`` · |α| and 0 beyond (choice:
1.5 |α| is where rounding to the nearest of γ−α, γ, γ+α would saturate, so latents far outside the
quantizer's range stop drifting), ∂Ŵ/∂α = T, ∂Ŵ/∂γ = 1. The bias stays a real parameter.

**Initialisation.** γ = 0 (``shift_init="zero"``, default) or the group mean of W (``"mean"``, choice);
then TWN: Δ as above and α_g = mean |W − γ_g| over the group's entries above Δ_g (TWN's optimal scale),
so a trained layer starts as its TWN ternarization.

Optional ternary input activations (``activations="ternary"``, as STTN's; default ``"none"``: TernaryLLM
keeps 16-bit activations).

**Fold (fold.dlt).** Freeze T (int8 codes), α (scale) and γ (shift) into a LowBit layer with bits 2 and
the layer's group size: W = α·T + γ per group, exactly the scaffold's eval-mode weight (same tensor
operations), so the fold is exact; it is verified on sample inputs (relative error <= 1e-5).
The dequantized weight takes at most the three values {γ−α, γ, γ+α} in each group.

Selection, ``include``/``exclude``/``keep_first_last``: see ``edgec.passes.lowbit_common``.
"""
from __future__ import annotations

import torch
from torch import nn

from edgec.core.pass_manager import Pass
from edgec.passes.lowbit_common import (LatentLayer, LowBitFoldPass, LowBitScaffoldPass, as_choice, as_float, as_int,
                                        effective_group_size, group_mean)
from edgec.layers.lowbit import expand_groups, n_groups

TWN_FACTOR = 0.7


def ternary_codes(w2d: torch.Tensor, gamma: torch.Tensor, group_size: int) -> torch.Tensor:
    """T = sign(W − γ) · 1[|W − γ| > 0.7 · mean|W − γ|] per group, for (out, fan_in) W (no gradient)."""
    fan_in = w2d.shape[1]
    d = w2d - expand_groups(gamma, fan_in, group_size)
    delta = TWN_FACTOR * group_mean(d.abs(), group_size)
    keep = d.abs() > expand_groups(delta, fan_in, group_size)
    return torch.sign(d) * keep.to(d.dtype)


class DLTLayer(LatentLayer):
    """Ternary codes with learnable per-group scale and shift; must be folded by ``fold.dlt``."""

    kind = "dlt"
    folded_by = "fold.dlt"
    bits = 2

    def __init__(self, layer: nn.Module, group_size: int = 128, act: str = "none", shift_init: str = "zero",
                 clip: float = 1.5, init: bool = True):
        super().__init__(layer, act)
        self.group_size = effective_group_size(self.fan_in, group_size)
        self.clip = float(clip)
        w = layer.weight
        g = n_groups(self.fan_in, self.group_size)
        self.weight = self._new_param(w, value=w.detach() if init else None)
        self.alpha = self._new_param(w, shape=(self.rows, g))
        self.gamma = self._new_param(w, shape=(self.rows, g))
        if init:
            with torch.no_grad():
                w2 = w.detach().double().reshape(self.rows, self.fan_in)
                gamma = group_mean(w2, self.group_size) if shift_init == "mean" else torch.zeros_like(w2[:, :g])
                t = ternary_codes(w2, gamma, self.group_size)
                d = (w2 - expand_groups(gamma, self.fan_in, self.group_size)).abs()
                alpha = group_mean(d, self.group_size, t != 0)
                self.alpha.copy_(alpha)
                self.gamma.copy_(gamma)

    def weight_hat(self) -> torch.Tensor:
        w2 = self.weight.reshape(self.rows, self.fan_in)
        with torch.no_grad():
            codes = ternary_codes(w2, self.gamma, self.group_size)
        w = self.dequantize(codes, self.alpha, self.gamma, self.group_size)  # ∂/∂α = T, ∂/∂γ = 1
        if torch.is_grad_enabled() and self.weight.requires_grad:
            with torch.no_grad():
                gs = self.group_size
                dist = (w2 - expand_groups(self.gamma, self.fan_in, gs)).abs()
                mask = (dist <= self.clip * expand_groups(self.alpha.abs(), self.fan_in, gs)).to(w.dtype)
            w = w + (w2 - w2.detach()) * mask  # exactly 0 in value; ∂Ŵ/∂W = 1 (clipped)
        return w

    def quantized(self):
        with torch.no_grad():
            w2 = self.weight.reshape(self.rows, self.fan_in)
            codes = ternary_codes(w2, self.gamma, self.group_size)
        return codes, self.alpha.detach(), self.gamma.detach()

    def lowbit_spec(self) -> dict:
        return {"group_size": self.group_size, "bits": 2, "shift": True, "act": self.act}


class DLTScaffold(LowBitScaffoldPass):
    """Make every selected Conv/Linear a DLT layer (ternary codes, learnable per-group α and γ)."""

    name = "scaffold.dlt"
    version = 1
    scaffold_fold = "fold.dlt"
    kind = "dlt"
    label = "DLT"
    activations = ("none", "ternary")

    def __init__(self, group_size: int = 128, include=("*",), exclude=(), keep_first_last: bool = True,
                 activations: str = "none", shift_init: str = "zero", clip: float = 1.5):
        params = self.common_params(include, exclude, keep_first_last, activations)
        params["group_size"] = as_int(group_size, self.name, "group_size", minimum=0)
        params["shift_init"] = as_choice(shift_init, ("zero", "mean"), self.name, "shift_init")
        params["clip"] = as_float(clip, self.name, "clip", minimum=0.0, strict=True)
        Pass.__init__(self, **params)

    def make_layer(self, name, layer, index, replay):
        p = self.params
        return DLTLayer(layer, p["group_size"], p["activations"], p["shift_init"], p["clip"], init=not replay)

    def describe(self) -> str:
        p = self.params
        return f"group_size={p['group_size']}, shift_init={p['shift_init']}, activations={p['activations']}"


class FoldDLT(LowBitFoldPass):
    """Freeze every DLT layer's codes, α and γ into a ternary LowBit layer with per-group scale and shift."""

    name = "fold.dlt"
    version = 1
    scaffold_cls = DLTLayer
    label = "DLT"
    target = "ternary (per-group scale and shift)"
