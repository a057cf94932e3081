"""Ternary training scaffolds: STTN (two latent binary kernels) and DLT (learnable per-group scale and shift).

Each is a :class:`~edgec.layers.latent.LatentLayer` whose eval-mode weight is exactly its fold's LowBit weight;
the formulas are the module-level functions below (see docs/methods.md#sttn and docs/methods.md#dlt).
"""
from __future__ import annotations

import torch
from torch import nn

from edgec.layers.latent import LatentLayer, effective_group_size, group_mean, sign_pm
from edgec.layers.lowbit import expand_groups, n_groups

CLAMP = 1.0
TWN_FACTOR = 0.7


# ------------------------------------------------------------------------------------------------ formulas

def sttn_scale(c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """STTN scale 2α per row, α = (‖W1‖₁ + ‖W2‖₁) / (2n), for clamped (out, n) latents."""
    n = c1.shape[1]
    return 2 * ((c1.abs().sum(1, keepdim=True) + c2.abs().sum(1, keepdim=True)) / (2 * n))


def sttn_codes(c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """STTN ternary codes T = (sign W1 + sign W2) / 2 ∈ {−1, 0, 1} (sign 0 -> +1), for (out, n) latents."""
    return (sign_pm(c1) + sign_pm(c2)) / 2


def twn_split(w: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two STTN latents whose STTN weight is W's TWN ternarization:
    W1 = a·(W + Δr), W2 = a·(W − Δr), Δ = 0.7·mean|W|, r = ±1 at random, 2α = TWN's scale."""
    shape, rows = w.shape, w.shape[0]
    wd = w.detach().double().cpu().reshape(rows, -1)  # drawn on the CPU: the same latents on any device
    g = torch.Generator().manual_seed(int(seed))
    r = torch.where(torch.rand(wd.shape, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    delta = TWN_FACTOR * wd.abs().mean(1, keepdim=True)
    above = wd.abs() > delta
    target = group_mean(wd.abs(), 0, above)  # TWN scale, per row
    current = torch.maximum(wd.abs(), delta).mean(1, keepdim=True) * 2  # 2α of the unscaled split
    a = torch.where(current > 0, target / current.clamp_min(1e-300), torch.ones_like(current))
    w1, w2 = a * (wd + delta * r), a * (wd - delta * r)
    return (w1.reshape(shape).to(device=w.device, dtype=w.dtype),
            w2.reshape(shape).to(device=w.device, dtype=w.dtype))


def ternary_codes(w2d: torch.Tensor, gamma: torch.Tensor, group_size: int) -> torch.Tensor:
    """DLT codes T = sign(W − γ) · 1[|W − γ| > 0.7 · mean|W − γ|] per group, for (out, fan_in) W (no gradient)."""
    fan_in = w2d.shape[1]
    d = w2d - expand_groups(gamma, fan_in, group_size)
    delta = TWN_FACTOR * group_mean(d.abs(), group_size)
    keep = d.abs() > expand_groups(delta, fan_in, group_size)
    return torch.sign(d) * keep.to(d.dtype)


def dlt_init(w2d: torch.Tensor, group_size: int, shift_init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DLT's initial (α, γ) per group: γ = 0 or the group mean of W; α = mean |W − γ| over the codes ≠ 0 (TWN)."""
    fan_in = w2d.shape[1]
    g = n_groups(fan_in, group_size)
    gamma = group_mean(w2d, group_size) if shift_init == "mean" else torch.zeros_like(w2d[:, :g])
    t = ternary_codes(w2d, gamma, group_size)
    d = (w2d - expand_groups(gamma, fan_in, group_size)).abs()
    alpha = group_mean(d, group_size, t != 0)
    return alpha, gamma


# -------------------------------------------------------------------------------------------------- layers

class STTNLayer(LatentLayer):
    """Two binary kernels with a shared per-output-channel scale; must be folded by ``fold.sttn``."""

    kind = "sttn"
    folded_by = "fold.sttn"
    bits = 2

    def __init__(self, layer: nn.Module, act: str = "none", clip: float = 1.96, seed: int | None = None):
        super().__init__(layer, act)
        self.clip = float(clip)
        w = layer.weight
        self.w1 = self._new_param(w)
        self.w2 = self._new_param(w)
        if seed is not None:
            w1, w2 = twn_split(w.detach(), seed)
            with torch.no_grad():
                self.w1.copy_(w1)
                self.w2.copy_(w2)

    def _latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():  # the reference clamps the latents themselves before each forward
                for p in (self.w1, self.w2):
                    if bool((p.abs() > CLAMP).any()):  # only when needed: a shared layer's 2nd call keeps versions
                        p.clamp_(-CLAMP, CLAMP)
        return self.w1.clamp(-CLAMP, CLAMP), self.w2.clamp(-CLAMP, CLAMP)

    def weight_hat(self) -> torch.Tensor:
        c1, c2 = self._latents()
        c1f, c2f = c1.reshape(self.rows, -1), c2.reshape(self.rows, -1)
        scale = sttn_scale(c1f, c2f)  # (out, 1), differentiable: the XNOR scale term
        codes = sttn_codes(c1f, c2f).detach()
        w = self.dequantize(codes, scale, None, 0)
        if torch.is_grad_enabled() and (self.w1.requires_grad or self.w2.requires_grad):
            m1 = (self.w1.reshape(self.rows, -1).abs() <= self.clip).to(w.dtype)
            m2 = (self.w2.reshape(self.rows, -1).abs() <= self.clip).to(w.dtype)
            ste = ((c1f - c1f.detach()) * m1 + (c2f - c2f.detach()) * m2) * 0.5  # exactly 0 in value
            w = w + scale * ste  # ∂Ŵ/∂W_k = α · 1[|W_k| <= clip]
        return w

    def quantized(self):
        with torch.no_grad():
            c1, c2 = self.w1.clamp(-CLAMP, CLAMP), self.w2.clamp(-CLAMP, CLAMP)
            c1f, c2f = c1.reshape(self.rows, -1), c2.reshape(self.rows, -1)
            scale = sttn_scale(c1f, c2f)
            codes = sttn_codes(c1f, c2f)
        return codes, scale, None

    def lowbit_spec(self) -> dict:
        return {"group_size": 0, "bits": 2, "shift": False, "act": self.act}


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
                alpha, gamma = dlt_init(w2, self.group_size, shift_init)
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
