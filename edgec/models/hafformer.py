"""HAFFormer: hierarchical attention-free transformer (Dong et al., arXiv 2405.03952).

``X <- X + MSDC(LN(X))`` with MSDC = pointwise(sum_k DWConv1d_k) (kernel sizes 3, 5, 7: choice) replaces
attention, and ``X <- X + GEGLU(LN(X))`` with GEGLU = w_o(GELU(w_g X) * w_v X) replaces the FFN; levels
(frame -> utterance -> dialogue) are reached by average-pooling, a Linear and a LayerNorm. Here one feature
sequence plays all three levels; pool sizes and widths are config.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgec.models.blocks import speech_input_spec


class MSDC(nn.Module):
    """Multi-scale depthwise conv over (B, T, d): parallel 'same'-padded depthwise Conv1d, summed, then 1x1."""

    def __init__(self, d_model: int, kernel_sizes: tuple[int, ...]):
        super().__init__()
        for k in kernel_sizes:
            if k % 2 == 0:
                raise ValueError(f"MSDC kernel sizes must be odd to keep the length, got {k}")
        self.dwconvs = nn.ModuleList(nn.Conv1d(d_model, d_model, k, padding=k // 2, groups=d_model) for k in kernel_sizes)
        self.pointwise = nn.Conv1d(d_model, d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        y = self.dwconvs[0](x)
        for conv in self.dwconvs[1:]:
            y = y + conv(x)
        return self.pointwise(y).transpose(1, 2)


class GEGLU(nn.Module):
    """``w_o(dropout(GELU(w_g x) * w_v x))`` (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.w_g = nn.Linear(d_model, hidden)
        self.w_v = nn.Linear(d_model, hidden)
        self.w_o = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_o(self.dropout(F.gelu(self.w_g(x)) * self.w_v(x)))


class HAFBlock(nn.Module):
    def __init__(self, d_model: int, kernel_sizes: tuple[int, ...], ffn_mult: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.msdc = MSDC(d_model, kernel_sizes)
        self.norm2 = nn.LayerNorm(d_model)
        self.geglu = GEGLU(d_model, int(round(d_model * ffn_mult)), dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.msdc(self.norm1(x)))
        return x + self.dropout(self.geglu(self.norm2(x)))


class Merge(nn.Module):
    """Average ``pool`` consecutive tokens (the last window may be partial: ceil_mode, so any T >= 1 works),
    then Linear to the next level's width and LayerNorm."""

    def __init__(self, d_in: int, d_out: int, pool: int):
        super().__init__()
        self.pool = nn.AvgPool1d(pool, pool, ceil_mode=True)
        self.proj = nn.Linear(d_in, d_out)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.pool(x.transpose(1, 2)).transpose(1, 2)))


class HAFFormer(nn.Module):
    """Log-mel (B, T, n_mels) -> Linear embed -> frame blocks -> merge -> utterance blocks -> merge ->
    dialogue blocks -> mean pool -> LayerNorm -> logits."""

    summary = "HAFFormer (arXiv 2405.03952): attention-free MSDC + GEGLU blocks in a 3-level hierarchy (~190k params)"

    @staticmethod
    def default_config() -> dict:
        return {
            "n_mels": 40,
            "num_classes": 4,
            "dims": [64, 80, 96],  # width per level: frame, utterance, dialogue
            "depths": [2, 1, 1],  # blocks per level
            "pool_sizes": [4, 4],  # tokens merged between consecutive levels
            "kernel_sizes": [3, 5, 7],  # MSDC depthwise kernels (choice)
            "ffn_mult": 2.0,  # GEGLU hidden width = ffn_mult * dim
            "dropout": 0.1,
        }

    def __init__(self, n_mels=40, num_classes=4, dims=(64, 80, 96), depths=(2, 1, 1), pool_sizes=(4, 4),
                 kernel_sizes=(3, 5, 7), ffn_mult=2.0, dropout=0.1):
        super().__init__()
        dims, depths, pool_sizes, kernel_sizes = list(dims), list(depths), list(pool_sizes), tuple(kernel_sizes)
        if not (len(dims) == len(depths) == len(pool_sizes) + 1):
            raise ValueError(f"need len(dims) == len(depths) == len(pool_sizes) + 1, got {dims}, {depths}, {pool_sizes}")
        self.n_mels = n_mels
        self.embed = nn.Linear(n_mels, dims[0])
        self.levels = nn.ModuleList(
            nn.Sequential(*(HAFBlock(d, kernel_sizes, ffn_mult, dropout) for _ in range(n))) for d, n in zip(dims, depths)
        )
        self.merges = nn.ModuleList(Merge(dims[i], dims[i + 1], p) for i, p in enumerate(pool_sizes))
        self.norm = nn.LayerNorm(dims[-1])
        self.classifier = nn.Linear(dims[-1], num_classes)

    def input_spec(self):
        # ceil_mode pooling keeps at least one token per level, so even a single frame is valid.
        return speech_input_spec(self.n_mels, time_min=1, time_max=2048, num_classes=self.classifier.out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.levels[0](self.embed(features))
        for merge, level in zip(self.merges, self.levels[1:]):
            x = level(merge(x))
        return self.classifier(self.norm(x.mean(dim=1)))
