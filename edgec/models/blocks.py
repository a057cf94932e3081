"""Shared building blocks for the zoo, written so that torch.fx traces them and passes can match them.

Conventions other passes rely on (do not "simplify" them away):

* :class:`FeedForward` is exactly ``linear1 -> activation -> dropout -> linear2`` (HRF inserts a linear in
  front of ``linear1``; pruning shrinks the hidden width shared by ``linear1``/``linear2``).
* :class:`MultiHeadSelfAttention` has separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linear modules and
  writes scaled dot-product attention by hand (``nn.MultiheadAttention`` does not trace with fx and hides
  the projections in one fused weight).
* Shapes are read with ``x.size(i)`` and ``-1`` so that both fx proxies and torch.export symbols flow through;
  nothing branches on a tensor value or shape.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from edgec.core.spec import Dim, InputSpec, TensorSpec

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish}


def activation(name: str) -> nn.Module:
    """An activation module by config name (``gelu``, ``relu``, ``silu``, ``relu6``, ``hardswish``)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation '{name}'; known: {', '.join(sorted(_ACTIVATIONS))}") from None


class FeedForward(nn.Module):
    """Position-wise FFN ``linear2(dropout(act(linear1(x))))`` (Vaswani et al. 2017)."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.1, act: str = "gelu"):
        super().__init__()
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.activation = activation(act)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over (batch, time, d_model), no mask (utterance-level inputs are unpadded)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor, batch) -> torch.Tensor:
        # (B, T, d) -> (B, H, T, d_head); -1 keeps the time axis symbolic.
        return x.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)
        q = self._heads(self.q_proj(x), batch)
        k = self._heads(self.k_proj(x), batch)
        v = self._heads(self.v_proj(x), batch)
        scores = self._mask(torch.matmul(q, k.transpose(-2, -1)) * self.scale, x)
        attn = self.attn_dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(attn, v).transpose(1, 2).reshape(batch, -1, self.num_heads * self.head_dim)
        return self.out_proj(out)

    def _mask(self, scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The attention scores a subclass restricts (e.g. to a window); here all keys are visible."""
        return scores


class SinusoidalPositionalEncoding(nn.Module):
    """Adds fixed sin/cos positions (Vaswani et al. 2017), computed for the actual length.

    Computing the table from ``arange(T)`` instead of slicing a precomputed ``max_len`` buffer keeps the
    exported graph valid for any length (no hidden ``T <= max_len`` guard) and the checkpoint free of a
    large constant. Layout is ``[sin | cos]`` halves rather than interleaved: equivalent up to a fixed
    permutation of channels, and cheaper to build.
    """

    def __init__(self, d_model: int, base: float = 10000.0):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {d_model}")
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(base) / d_model))
        # Not persistent: derived from the config, so checkpoints do not carry it.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.size(1), device=x.device, dtype=x.dtype)
        angles = pos.unsqueeze(1) * self.inv_freq.unsqueeze(0)  # (T, d/2)
        return x + torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).unsqueeze(0)


class LearnedPositionalEncoding(nn.Module):
    """Adds a learned position table sliced to the input length; inputs longer than ``max_len`` are refused
    at export time by the length bound."""

    def __init__(self, d_model: int, max_len: int = 2048):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.randn(1, max_len, d_model) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[:, : x.size(1)]


def positional_encoding(kind: str, d_model: int, max_len: int = 2048) -> nn.Module:
    """``sinusoidal`` | ``learned`` | ``none`` (identity)."""
    if kind == "sinusoidal":
        return SinusoidalPositionalEncoding(d_model)
    if kind == "learned":
        return LearnedPositionalEncoding(d_model, max_len)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown positional encoding '{kind}'; known: sinusoidal, learned, none")


def speech_input_spec(n_mels: int, *, time_min: int = 16, time_max: int = 2048, extra: dict | None = None,
                      num_classes: int | None = None):
    """The shared spec of the speech zoo: ``features`` (batch, time, n_mels) float32 log-mel -> ``logits``.
    Task "classification", or "regression" when ``num_classes`` is 1 (one output: a dimension such as arousal,
    as Hugging Face reads ``num_labels == 1``; a one-class classifier would be meaningless)."""
    batch = Dim("batch", example=2, alt=3, min=1, max=1024)
    time = Dim("time", example=200, alt=137, min=time_min, max=time_max)
    return InputSpec(
        inputs=(TensorSpec("features", (batch, time, n_mels)),),
        outputs=("logits",),
        task="regression" if num_classes == 1 else "classification",
        extra={"features": "log-mel", "n_mels": n_mels, **(extra or {})},
    )


__all__ = [
    "FeedForward",
    "LearnedPositionalEncoding",
    "MultiHeadSelfAttention",
    "SinusoidalPositionalEncoding",
    "activation",
    "positional_encoding",
    "speech_input_spec",
]
