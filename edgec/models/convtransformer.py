"""ConvTransformer: a Conv1d front-end over log-mel frames followed by a pre-LN Transformer encoder.

The lightweight speech-emotion model of the HRF paper (Transformer re-parameterization for on-device SER,
arXiv 2411.09339) in the usual shape: a few Conv1d+BatchNorm+ReLU layers extract local spectral patterns
and halve the frame rate, a small Transformer encoder (Vaswani et al. 2017, pre-LN as in Xiong et al. 2020)
models the utterance, and mean pooling over time feeds a linear classifier.
"""
from __future__ import annotations

import torch
from torch import nn

from edgec.models.blocks import FeedForward, MultiHeadSelfAttention, positional_encoding, speech_input_spec


class EncoderBlock(nn.Module):
    """Pre-LN Transformer block: ``x + MHSA(LN(x))`` then ``x + FFN(LN(x))``."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, act: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadSelfAttention(d_model, num_heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_dim, dropout, act)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout1(self.attn(self.norm1(x)))
        return x + self.dropout2(self.ffn(self.norm2(x)))


class ConvFrontEnd(nn.Module):
    """``num_convs`` x (Conv1d -> BatchNorm1d -> ReLU) over (B, n_mels, T); the first ``num_strided`` stride 2."""

    def __init__(self, n_mels: int, d_model: int, kernel_size: int, num_convs: int, num_strided: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_convs):
            stride = 2 if i < num_strided else 1
            layers += [
                # bias=False: the BatchNorm right after supplies the shift (and BN folding adds it back).
                nn.Conv1d(n_mels if i == 0 else d_model, d_model, kernel_size, stride, kernel_size // 2, bias=False),
                nn.BatchNorm1d(d_model),
                nn.ReLU(),
            ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvTransformer(nn.Module):
    """Log-mel (B, T, n_mels) -> Conv1d front-end -> positions -> pre-LN encoder -> mean pool -> LN -> logits."""

    summary = "Conv1d front-end + pre-LN Transformer encoder for utterance classification (speech, ~170k params)"

    @staticmethod
    def default_config() -> dict:
        return {
            "n_mels": 40,
            "num_classes": 4,
            "d_model": 64,
            "num_layers": 3,
            "num_heads": 4,
            "ffn_dim": 256,
            "dropout": 0.1,
            "activation": "gelu",
            "conv_kernel": 3,
            "num_convs": 2,
            "num_strided": 1,  # front-end convs with stride 2 (each halves the frame rate)
            "pos_encoding": "sinusoidal",  # sinusoidal | learned | none
            "max_len": 2048,  # learned positions only
        }

    def __init__(self, n_mels=40, num_classes=4, d_model=64, num_layers=3, num_heads=4, ffn_dim=256, dropout=0.1,
                 activation="gelu", conv_kernel=3, num_convs=2, num_strided=1, pos_encoding="sinusoidal", max_len=2048):
        super().__init__()
        self.n_mels = n_mels
        self.num_strided = num_strided
        self.max_len = max_len
        self.pos_encoding = pos_encoding
        self.frontend = ConvFrontEnd(n_mels, d_model, conv_kernel, num_convs, num_strided)
        self.pos = positional_encoding(pos_encoding, d_model, max_len)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(d_model, num_heads, ffn_dim, dropout, activation) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.classifier = nn.Linear(d_model, num_classes)

    def input_spec(self):
        # Learned positions bound the (subsampled) length by max_len.
        time_max = 2048 if self.pos_encoding != "learned" else min(2048, self.max_len * 2**self.num_strided)
        return speech_input_spec(self.n_mels, time_max=time_max, num_classes=self.classifier.out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.frontend(features.transpose(1, 2)).transpose(1, 2)  # (B, T', d)
        x = self.dropout(self.pos(x))
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.norm(x.mean(dim=1)))
