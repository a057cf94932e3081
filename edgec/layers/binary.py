"""The binary training scaffold (sign(W)·α weights with a real latent path) and its training-loss API.

Binary layers as in XNOR-Net; the latent path and its loss follow "BNNs fully utilizing latent weights"
(arXiv 2110.05850); see docs/methods.md#binary. ``edgec.train`` uses only the functions below
(``binary_aux_loss``, ``real_mode``, ``binary_latent_weights``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from edgec.core.errors import EdgecError
from edgec.layers.latent import LatentLayer, sign_pm
from edgec.layers.lowbit import quantize_act

EPS = 1e-8


def binary_scale(w2d: torch.Tensor) -> torch.Tensor:
    """α per row: mean |W| over the fan-in, for (out, fan_in) W (the codes are sign(W), 0 -> +1)."""
    return w2d.abs().mean(1, keepdim=True)


class BinaryLayer(LatentLayer):
    """sign(W)·α weights with a real latent path during training; must be folded by ``fold.binary``.

    ``.aux`` is ``(y_b, y_r)`` after a training-mode forward in binary mode, ``.real`` the real-mode flag and
    ``.latent_weight`` the recorded [λ1, λ2].
    """

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

    def weight_hat(self) -> torch.Tensor:
        w2 = self.weight.reshape(self.rows, self.fan_in)
        alpha = binary_scale(w2)  # differentiable: the scale term
        w = self.dequantize(sign_pm(w2).detach(), alpha, None, 0)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            mask = (w2.abs() <= self.clip).to(w.dtype).detach()
            w = w + alpha * ((w2 - w2.detach()) * mask)  # exactly 0 in value; ∂/∂W = α·1[|W| <= clip]
        return w

    def quantized(self):
        with torch.no_grad():
            w2 = self.weight.reshape(self.rows, self.fan_in)
            return sign_pm(w2), binary_scale(w2), None

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


# ------------------------------------------------------------------------------------ training-loss API

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
    """λ2 · mean over binary layers of mean over samples (1 − cos(y_b, y_r)), from each layer's ``aux`` of the
    last training forward; ``lambda2`` None uses each layer's recorded λ2. 0 without a binary scaffold."""
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
    """Every binary scaffold computes with its real latent weight on real inputs inside the block (no aux is
    recorded), for the λ1 · CE(real network) term."""
    layers = binary_layers(gm)
    previous = [m.real for m in layers]
    for m in layers:
        m.real = True
    try:
        yield gm
    finally:
        for m, p in zip(layers, previous):
            m.real = p
