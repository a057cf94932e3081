"""Binary scaffold and fold, with the real-valued latent weights used as an auxiliary feature extractor.

Source: "BNNs fully utilizing latent weights" (arXiv 2110.05850); binary layers as in XNOR-Net.

**Training (scaffold.binary).** Each selected Conv/Linear keeps its real latent weight W (``weight``,
initialised from the layer's weight) and computes with::

    α_o = mean |W_o|  (per output channel)         W_b = α · sign(W)       (sign 0 -> +1)

straight-through: ∂W_b/∂W = α · 1[|W| <= ``clip``] (default 1, the BinaryConnect/XNOR clip) plus the
scale term through α (autograd: ∂α/∂W = sign(W)/n). The bias stays a real parameter. With
``activations="binary"`` the layer input goes through sign(x) ∈ {−1, 1} (STE, gradient zero where |x| > 1;
``edgec.layers.lowbit.binary_act``); otherwise inputs stay real (binary weights, real activations: choice).

**The latent path.** In training mode (``module.training``) each binary layer also computes the real
output ``y_r = layer(x; W)`` (real input x, real latent W, same bias) next to the binary output
``y_b`` and stores ``module.aux = (y_b, y_r)`` (both in the autograd graph). The supervision
(METHODS.md marks it a choice) is::

    L = CE(binary network) + λ1 · CE(real network) + λ2 · mean over binary layers (1 − cos(y_b, y_r))

with ``latent_weight = [λ1, λ2]`` (default [0.5, 0.5], choice) recorded on every scaffold. The cosine is
taken per sample over all of a layer's output features flattened (choice: per layer rather than per
block, so it supervises every latent kernel directly and costs no extra network pass; block-level
cosines are available through the OFF feature distillation of ``edgec.train``), and gradients flow into
both paths (choice: the real path is a feature extractor being trained, not a frozen teacher). The
"real network" is the same graph with every binary layer computing ``layer(x; W)`` on real inputs:
run it under :func:`real_mode`.

API for the training loop (documented; ``edgec.train`` uses only this):

* ``binary_aux_loss(gm, lambda2=None) -> Tensor`` — the λ2 term above from the ``aux`` of the last
  training forward: λ2 · mean over binary layers of mean over samples (1 − cos(y_b, y_r)); ``lambda2``
  None uses each layer's recorded λ2. 0 (a tensor) when the graph has no binary scaffold.
* ``real_mode(gm)`` — context manager: inside it every binary scaffold computes with its real latent
  weights on real inputs (no aux is recorded), for the λ1 · CE(real head) term.
* ``binary_latent_weights(gm) -> (λ1, λ2) | None`` — the recorded weights (None: no binary scaffold).
* each :class:`BinaryLayer` exposes ``.aux`` (``(y_b, y_r)`` after a training-mode forward in binary mode,
  else None until then; real-mode forwards leave it as it is), ``.real`` (the real-mode flag) and
  ``.latent_weight`` ([λ1, λ2]).

**Fold (fold.binary).** Drop the latent path: codes sign(W) ∈ {−1, 1} (int8), scale α per output channel,
bits 1, no shift, bias and activation quantizer copied — exactly the scaffold's eval-mode computation, so
the fold is exact (verified on sample inputs, relative error <= 1e-5).

Selection, ``include``/``exclude``/``keep_first_last``: see ``edgec.passes.lowbit_common``.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from edgec.core.errors import EdgecError
from edgec.layers.lowbit import quantize_act
from edgec.core.pass_manager import Pass
from edgec.passes.lowbit_common import LatentLayer, LowBitFoldPass, LowBitScaffoldPass, as_float, sign_pm

EPS = 1e-8


class BinaryLayer(LatentLayer):
    """sign(W)·α weights with a real latent path during training; must be folded by ``fold.binary``."""

    kind = "binary"
    folded_by = "fold.binary"
    bits = 1

    def __init__(self, layer: nn.Module, act: str = "none", latent_weight=(0.5, 0.5), clip: float = 1.0,
                 init: bool = True):
        super().__init__(layer, act)
        self.latent_weight = [float(v) for v in latent_weight]
        self.clip = float(clip)
        self.weight = self._new_param(layer.weight, value=layer.weight.detach() if init else None)
        self.real = False
        self.aux: tuple[torch.Tensor, torch.Tensor] | None = None

    def _alpha(self, w2d: torch.Tensor) -> torch.Tensor:
        return w2d.abs().mean(1, keepdim=True)

    def weight_hat(self) -> torch.Tensor:
        w2 = self.weight.reshape(self.rows, self.fan_in)
        alpha = self._alpha(w2)  # differentiable: the scale term
        w = self.dequantize(sign_pm(w2).detach(), alpha, None, 0)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            mask = (w2.abs() <= self.clip).to(w.dtype).detach()
            w = w + alpha * ((w2 - w2.detach()) * mask)  # exactly 0 in value; ∂/∂W = α·1[|W| <= clip]
        return w

    def quantized(self):
        with torch.no_grad():
            w2 = self.weight.reshape(self.rows, self.fan_in)
            return sign_pm(w2), self._alpha(w2), None

    def lowbit_spec(self) -> dict:
        return {"group_size": 0, "bits": 1, "shift": False, "act": self.act}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.real:
            return self._op(x, self.weight)
        y_b = self._op(quantize_act(x, self.act), self.weight_hat().reshape(self.weight_shape))
        if self.training:
            self.aux = (y_b, self._op(x, self.weight))
        return y_b

    def __getstate__(self):
        # aux holds non-leaf tensors of the last training step: not state, and not deep-copyable
        state = self.__dict__.copy()
        state["aux"] = None
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + f", latent_weight={self.latent_weight}"


def binary_layers(gm: nn.Module) -> list[BinaryLayer]:
    return [m for m in gm.modules() if isinstance(m, BinaryLayer)]


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean over samples of 1 − cos(a_i, b_i), features flattened; exactly 0 when a == b."""
    a = a.reshape(a.shape[0], -1).float()
    b = b.reshape(b.shape[0], -1).float()
    dot = (a * b).sum(1)
    norms = (a * a).sum(1) * (b * b).sum(1)
    cos = dot / torch.sqrt(norms.clamp_min(EPS * EPS))
    return (1 - cos).clamp_min(0).mean()


def binary_aux_loss(gm: nn.Module, lambda2: float | None = None) -> torch.Tensor:
    """λ2 · mean over binary layers of (1 − cos(y_b, y_r)) from each layer's ``aux`` (see module docstring)."""
    layers = binary_layers(gm)
    if not layers:
        return torch.zeros(())
    missing = [m for m in layers if m.aux is None]
    if missing:
        raise EdgecError(f"binary_aux_loss: {len(missing)} binary layer(s) have no auxiliary output yet; "
                         "run a training-mode forward (outside real_mode) first")
    terms = []
    for m in layers:
        weight = m.latent_weight[1] if lambda2 is None else float(lambda2)
        terms.append(weight * cosine_distance(*m.aux))
    return torch.stack(terms).mean()


def binary_latent_weights(gm: nn.Module) -> tuple[float, float] | None:
    """(λ1, λ2) recorded on the binary scaffolds (the first one's), or None without a binary scaffold."""
    layers = binary_layers(gm)
    return tuple(layers[0].latent_weight) if layers else None


@contextlib.contextmanager
def real_mode(gm: nn.Module):
    """Every binary scaffold computes with its real latent weight on real inputs inside the block."""
    layers = binary_layers(gm)
    previous = [m.real for m in layers]
    for m in layers:
        m.real = True
    try:
        yield gm
    finally:
        for m, p in zip(layers, previous):
            m.real = p


def _latent_weight(value, pass_name: str) -> list[float]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
        try:
            value = [float(v) for v in value]
        except ValueError:
            raise EdgecError(f"{pass_name}: latent_weight must be two numbers 'λ1,λ2', got {value!r}") from None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise EdgecError(f"{pass_name}: latent_weight must be two numbers [λ1, λ2], got {value!r}")
    return [as_float(v, pass_name, "latent_weight", minimum=0.0) for v in value]


class BinaryScaffold(LowBitScaffoldPass):
    """Make every selected Conv/Linear a binary layer (sign·α) whose latent weights also run a real path."""

    name = "scaffold.binary"
    version = 1
    scaffold_fold = "fold.binary"
    kind = "binary"
    label = "binary"
    activations = ("none", "binary")

    def __init__(self, activations: str = "none", latent_weight=(0.5, 0.5), include=("*",), exclude=(),
                 keep_first_last: bool = True, clip: float = 1.0):
        params = self.common_params(include, exclude, keep_first_last, activations)
        params["latent_weight"] = _latent_weight(latent_weight, self.name)
        params["clip"] = as_float(clip, self.name, "clip", minimum=0.0, strict=True)
        Pass.__init__(self, **params)

    def make_layer(self, name, layer, index, replay):
        p = self.params
        return BinaryLayer(layer, p["activations"], p["latent_weight"], p["clip"], init=not replay)

    def describe(self) -> str:
        p = self.params
        return f"activations={p['activations']}, latent_weight λ1,λ2={p['latent_weight']}"


class FoldBinary(LowBitFoldPass):
    """Drop the latent path of every binary layer: a LowBit layer with codes sign(W) and scale α."""

    name = "fold.binary"
    version = 1
    scaffold_cls = BinaryLayer
    label = "binary"
    target = "binary"
