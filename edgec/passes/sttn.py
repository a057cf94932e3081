"""STTN scaffold and fold: Soft Threshold Ternary Networks.

Source: Xu et al., "Soft Threshold Ternary Networks" (arXiv 2204.01234; reference code WeixiangXu/STTN).

**Training (scaffold.sttn).** Each selected Conv/Linear weight becomes two real latent tensors W1, W2 of
the layer's weight shape (parameters ``w1``, ``w2``). With n the fan-in of output channel o::

    α_o = (‖W1_o‖₁ + ‖W2_o‖₁) / (2n)          B_k = α · sign(W_k)          Ŵ = B1 + B2 ∈ {−2α, 0, +2α}

so the ternary threshold is learned implicitly ("soft") instead of being a hand-set Δ. sign maps 0 to +1,
so each B_k is truly binary. Gradients (as the reference ``BinOp``): the latents are clamped to [−1, 1]
(in place, before each training forward, as the reference clamps before binarizing; the forward also
reads them through ``clamp`` so an out-of-range latent loaded from elsewhere behaves the same in eval
and in the fold); sign is straight-through, zeroed where |W_k| > ``clip`` (1.96 in the reference; with
latents clamped to [−1, 1] it only acts for a clip below 1); α depends on the latents, so autograd adds
the XNOR-style scale term ∂α/∂W_k = sign(W_k)/(2n). The bias stays a real parameter.

Ternary activations (``activations="ternary"``, optional): the input of every selected layer goes through
a(x) = ½(sign(x − ½) + sign(x + ½)) ∈ {−1, 0, 1}, STE gradient zero where |x| > 1
(``edgec.layers.lowbit.ternary_act``). The first layer is kept full precision by default (``keep_first_last``),
so raw inputs stay real.

**Initialisation (choice, ``seed``).** From a trained weight W, per output channel o:
Δ_o = 0.7 · mean|W_o| (TWN threshold), r = ±1 uniformly at random (layer i in selection order draws from
its own generator seeded with ``seed · 1000003 + i``; the global RNG is untouched), and::

    W1 = a_o · (W + Δ_o r)        W2 = a_o · (W − Δ_o r)

Where |W| > Δ both latents have the sign of W (code ±1); where |W| < Δ they have opposite signs (code 0):
the initial ternary weight has exactly TWN's ternary pattern. a_o is chosen so that the initial scale
2α_o equals TWN's optimal scale mean(|W| : |W| > Δ) (a_o = that / (2 · mean max(|W|, Δ))), so a trained
layer starts as its TWN ternarization (the scaffold pass records the relative weight error in its
``init`` check). W1 ≠ W2 everywhere (the r term), as STTN requires: identical inits stay identical and
collapse to binary. Latents are not rescaled to fit [−1, 1]: α is a function of the latents, so their
scale is the weight's scale; trained Conv/Linear weights lie well inside ±1 (a_o < 1 shrinks them
further), and any entry beyond is clamped at the first training forward.

**Fold (fold.sttn).** T = (sign(W1) + sign(W2)) / 2 ∈ {−1, 0, 1} as int8 codes, scale = 2α per output
channel (group_size 0), bits 2, no shift, bias and activation quantizer copied: W = scale · T = B1 + B2,
exactly the scaffold's eval-mode weight (same tensor operations), so the fold is exact; it is verified
on sample inputs (relative error <= 1e-5, recorded in provenance).

Selection, ``include``/``exclude``/``keep_first_last``: see ``edgec.passes.lowbit_common``.
"""
from __future__ import annotations

import torch
from torch import nn

from edgec.core.pass_manager import Pass
from edgec.passes.lowbit_common import (LatentLayer, LowBitFoldPass, LowBitScaffoldPass, as_float, as_int, group_mean,
                                        sign_pm)

CLAMP = 1.0
TWN_FACTOR = 0.7


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

    def _alpha(self, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
        n = self.fan_in
        return (c1.reshape(self.rows, n).abs().sum(1, keepdim=True)
                + c2.reshape(self.rows, n).abs().sum(1, keepdim=True)) / (2 * n)

    def weight_hat(self) -> torch.Tensor:
        c1, c2 = self._latents()
        scale = 2 * self._alpha(c1, c2)  # (out, 1), differentiable: the XNOR scale term
        c1f, c2f = c1.reshape(self.rows, -1), c2.reshape(self.rows, -1)
        codes = ((sign_pm(c1f) + sign_pm(c2f)) / 2).detach()
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
            scale = 2 * self._alpha(c1, c2)
            codes = (sign_pm(c1.reshape(self.rows, -1)) + sign_pm(c2.reshape(self.rows, -1))) / 2
        return codes, scale, None

    def lowbit_spec(self) -> dict:
        return {"group_size": 0, "bits": 2, "shift": False, "act": self.act}


def twn_split(w: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two latents whose STTN weight is W's TWN ternarization (see the module docstring)."""
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


class STTNScaffold(LowBitScaffoldPass):
    """Make every selected Conv/Linear an STTN layer (two latent binary kernels, optional ternary activations)."""

    name = "scaffold.sttn"
    version = 1
    scaffold_fold = "fold.sttn"
    kind = "sttn"
    label = "STTN"
    activations = ("none", "ternary")

    def __init__(self, activations: str = "none", include=("*",), exclude=(), keep_first_last: bool = True,
                 seed: int = 0, clip: float = 1.96):
        params = self.common_params(include, exclude, keep_first_last, activations)
        params["seed"] = as_int(seed, self.name, "seed")
        params["clip"] = as_float(clip, self.name, "clip", minimum=0.0, strict=True)
        Pass.__init__(self, **params)

    def make_layer(self, name, layer, index, replay):
        seed = None if replay else self.params["seed"] * 1_000_003 + index
        return STTNLayer(layer, self.params["activations"], self.params["clip"], seed)

    def describe(self) -> str:
        return f"activations={self.params['activations']}, TWN-split init, seed={self.params['seed']}"


class FoldSTTN(LowBitFoldPass):
    """Sum the two binary kernels of every STTN layer into one ternary LowBit layer {−2α, 0, 2α}."""

    name = "fold.sttn"
    version = 1
    scaffold_cls = STTNLayer
    label = "STTN"
    target = "ternary"
