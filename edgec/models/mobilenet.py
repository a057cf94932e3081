"""MobileNetV2-style keyword-spotting CNN (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks").

Log-mel features (B, T, n_mels) are read as a one-channel image (B, 1, T, n_mels): a 3x3 stride-2 stem, stages
of inverted residual blocks (1x1 expand -> BN -> act -> depthwise 3x3 -> BN -> act -> 1x1 project -> BN, the
projection linear; ``x + block(x)`` when the stride is 1 and the width unchanged), a final 1x1 conv -> BN -> act,
global average pooling over time and frequency, and a Linear classifier. Edge choices: every conv is bias-free
and feeds only its BatchNorm (so BN folding and channel pruning see clean ``Conv -> BN`` pairs); "same" padding
everywhere, so any length and mel count >= 1 is valid; ReLU6 as in the paper (exports as ``Clip``).

Widths are config: ``width`` (stem), ``stage_channels`` (the residual width of each stage), ``expand_ratio``
(hidden = ratio x input width, rounded; a ratio of 1 drops the expand conv, as in the paper's first block) and
``last_channels`` (the 1x1 conv before pooling).
"""
from __future__ import annotations

import torch
from torch import nn

from edgec.models.blocks import activation as _act
from edgec.models.blocks import speech_input_spec


def conv_bn_act(c_in: int, c_out: int, kernel: int, stride: int, act: str | None, groups: int = 1) -> nn.Sequential:
    """``Conv2d(bias=False) -> BatchNorm2d [-> activation]`` with "same" padding."""
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    if act is not None:
        layers.append(_act(act))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """``[expand 1x1 -> BN -> act] -> depthwise 3x3 -> BN -> act -> project 1x1 -> BN`` (+ x when shapes match).

    With ``hidden == c_in`` and no expand conv (``expand=False``) the depthwise conv reads the input directly."""

    def __init__(self, c_in: int, c_out: int, hidden: int, stride: int, act: str, expand: bool = True):
        super().__init__()
        if not expand and hidden != c_in:
            raise ValueError(f"a block without expand conv keeps its input width ({c_in}), got hidden={hidden}")
        self.use_residual = stride == 1 and c_in == c_out
        self.expand = conv_bn_act(c_in, hidden, 1, 1, act) if expand else nn.Identity()
        self.depthwise = conv_bn_act(hidden, hidden, 3, stride, act, groups=hidden)
        self.project = conv_bn_act(hidden, c_out, 1, 1, None)  # linear bottleneck: no activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class MobileNet(nn.Module):
    """Log-mel (B, T, n_mels) -> (B, 1, T, n_mels) -> stem -> inverted residual stages -> 1x1 conv -> pool -> logits."""

    summary = "MobileNetV2-style KWS CNN (Sandler et al. 2018): inverted residuals over log-mel (~180k params)"

    @staticmethod
    def default_config() -> dict:
        return {
            "n_mels": 40,
            "num_classes": 4,
            "width": 16,  # stem output channels
            "stage_channels": [16, 24, 48, 96],  # residual width of each stage
            "blocks_per_stage": [1, 2, 2, 2],
            "strides": [1, 2, 2, 1],  # first block of each stage; the stem adds a stride of 2
            "expand_ratio": 4,
            "last_channels": 256,
            "dropout": 0.1,
            "activation": "relu6",  # relu6 | relu | hardswish
        }

    def __init__(self, n_mels=40, num_classes=4, width=16, stage_channels=(16, 24, 48, 96),
                 blocks_per_stage=(1, 2, 2, 2), strides=(1, 2, 2, 1), expand_ratio=4, last_channels=256,
                 dropout=0.1, activation="relu6"):
        super().__init__()
        stage_channels, blocks_per_stage, strides = list(stage_channels), list(blocks_per_stage), list(strides)
        if not (len(stage_channels) == len(blocks_per_stage) == len(strides)) or not stage_channels:
            raise ValueError("stage_channels, blocks_per_stage and strides need one entry per stage (at least one), "
                             f"got {len(stage_channels)}, {len(blocks_per_stage)}, {len(strides)}")
        if any(s not in (1, 2) for s in strides):
            raise ValueError(f"strides must be 1 or 2, got {strides}")
        if any(not isinstance(n, int) or n < 1 for n in blocks_per_stage):
            raise ValueError(f"blocks_per_stage must be integers >= 1, got {blocks_per_stage}")
        if not isinstance(expand_ratio, (int, float)) or expand_ratio < 1:
            raise ValueError(f"expand_ratio must be >= 1, got {expand_ratio}")
        self.n_mels = n_mels
        self.stem = conv_bn_act(1, width, 3, 2, activation)
        blocks, c_in = [], width
        for c_out, n, stride in zip(stage_channels, blocks_per_stage, strides):
            for j in range(n):
                hidden = int(round(c_in * expand_ratio))
                blocks.append(InvertedResidual(c_in, c_out, hidden, stride if j == 0 else 1, activation,
                                               expand=expand_ratio != 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn_act(c_in, last_channels, 1, 1, activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def input_spec(self):
        # "Same" padding everywhere: a single frame is valid.
        return speech_input_spec(self.n_mels, time_min=1, time_max=2048, num_classes=self.classifier.out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(features.unsqueeze(1))))
        return self.classifier(self.dropout(self.pool(x).flatten(1)))
