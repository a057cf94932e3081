"""Conformer (Gulati et al. 2020, "Conformer: Convolution-augmented Transformer for Speech Recognition").

Block: ``x + 0.5 FFN1`` -> ``x + MHSA`` -> ``x + Conv`` -> ``x + 0.5 FFN2`` -> LayerNorm, each pre-normalised;
conv module LN -> pointwise(d, 2d) -> GLU -> depthwise -> BatchNorm -> SiLU -> pointwise(d, d). Edge choices:
absolute sinusoidal positions (plain attention keeps the patterns passes match), a bias-free depthwise conv
feeding only its BatchNorm (so BN folding sees ``Conv -> BN``), a pooled linear head.
"""
from __future__ import annotations

import torch
from torch import nn

from edgec.models.blocks import FeedForward, MultiHeadSelfAttention, positional_encoding, speech_input_spec


class Conv2dSubsampling(nn.Module):
    """Two 3x3 stride-2 Conv2d + ReLU over (time, mel), then Linear to d_model: the frame rate drops 4x."""

    def __init__(self, n_mels: int, channels: int, d_model: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, 2), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, 2), nn.ReLU(),
        )
        freq = ((n_mels - 1) // 2 - 1) // 2  # mel bins left after two unpadded stride-2 3x3 convs
        self.out = nn.Linear(channels * freq, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.unsqueeze(1))  # (B, C, T', F')
        return self.out(x.transpose(1, 2).flatten(2))  # (B, T', C*F') -> (B, T', d)


class ConvModule(nn.Module):
    """Conformer convolution module over (B, T, d); returns (B, T, d) (residual added by the block)."""

    def __init__(self, d_model: int, kernel_size: int, dropout: float):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel must be odd to keep the length ('same' padding), got {kernel_size}")
        self.norm = nn.LayerNorm(d_model)
        self.pointwise1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.glu = nn.GLU(dim=1)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model, bias=False)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.activation = nn.SiLU()
        self.pointwise2 = nn.Conv1d(d_model, d_model, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.glu(self.pointwise1(self.norm(x).transpose(1, 2)))
        x = self.activation(self.batch_norm(self.depthwise(x)))
        return self.dropout(self.pointwise2(x)).transpose(1, 2)


class ConformerBlock(nn.Module):
    """Macaron block: half-step FFN, MHSA, conv module, half-step FFN, final LayerNorm."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, conv_kernel: int, dropout: float, act: str):
        super().__init__()
        self.ffn1_norm = nn.LayerNorm(d_model)
        self.ffn1 = FeedForward(d_model, ffn_dim, dropout, act)
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = MultiHeadSelfAttention(d_model, num_heads, dropout)
        self.conv = ConvModule(d_model, conv_kernel, dropout)
        self.ffn2_norm = nn.LayerNorm(d_model)
        self.ffn2 = FeedForward(d_model, ffn_dim, dropout, act)
        self.final_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.dropout(self.ffn1(self.ffn1_norm(x)))
        x = x + self.dropout(self.attn(self.attn_norm(x)))
        x = x + self.conv(x)
        x = x + 0.5 * self.dropout(self.ffn2(self.ffn2_norm(x)))
        return self.final_norm(x)


class Conformer(nn.Module):
    """Log-mel (B, T, n_mels) -> Conv2d subsampling (4x) -> positions -> Conformer blocks -> mean pool -> logits."""

    summary = "Conformer (Gulati et al. 2020): macaron FFNs + MHSA + conv module, utterance classifier (~220k params)"

    @staticmethod
    def default_config() -> dict:
        return {
            "n_mels": 40,
            "num_classes": 4,
            "d_model": 64,
            "num_layers": 2,
            "num_heads": 4,
            "ffn_dim": 256,
            "conv_kernel": 15,
            "subsampling_channels": 32,
            "dropout": 0.1,
            "activation": "silu",  # Swish, as in the paper
            "pos_encoding": "sinusoidal",  # sinusoidal | learned | none
        }

    def __init__(self, n_mels=40, num_classes=4, d_model=64, num_layers=2, num_heads=4, ffn_dim=256, conv_kernel=15,
                 subsampling_channels=32, dropout=0.1, activation="silu", pos_encoding="sinusoidal"):
        super().__init__()
        if n_mels < 7:
            raise ValueError(f"Conv2d subsampling needs n_mels >= 7, got {n_mels}")
        self.n_mels = n_mels
        self.subsampling = Conv2dSubsampling(n_mels, subsampling_channels, d_model)
        self.pos = positional_encoding(pos_encoding, d_model, 512)  # learned: 512 frames after 4x subsampling
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            ConformerBlock(d_model, num_heads, ffn_dim, conv_kernel, dropout, activation) for _ in range(num_layers)
        )
        self.classifier = nn.Linear(d_model, num_classes)

    def input_spec(self):
        # Subsampling needs at least 7 frames; 16 keeps a few frames for attention and the depthwise conv.
        return speech_input_spec(self.n_mels, time_min=16, time_max=2048,
                                 num_classes=self.classifier.out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.pos(self.subsampling(features)))
        for block in self.blocks:
            x = block(x)
        # Each block ends in LayerNorm, so the pooled vector goes straight to the classifier.
        return self.classifier(x.mean(dim=1))
