"""ResNet-18-style CNN for small images (He et al. 2016, "Deep Residual Learning for Image Recognition").

CIFAR-style stem (3x3 conv, stride 1, no max-pool) so 8x8 images such as scikit-learn's digits keep spatial
extent; four stages of BasicBlocks with widths base, 2base, 4base, 8base (stride 2 from stage 2 on); every
conv is ``Conv2d(bias=False) -> BatchNorm2d`` so BN folding and channel pruning see clean pairs; adaptive
average pooling lets the input size vary.
"""
from __future__ import annotations

import torch
from torch import nn

from edgec.core.spec import Dim, InputSpec, TensorSpec


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``; the shortcut is conv1x1+BN when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Pixels (B, C, H, W) -> stem -> 4 stages of BasicBlocks -> global average pool -> logits."""

    summary = "ResNet-18-style CNN for small images (CIFAR stem, width 16, ~700k params)"

    @staticmethod
    def default_config() -> dict:
        return {
            "in_channels": 1,
            "num_classes": 10,
            "base_width": 16,
            "blocks_per_stage": [2, 2, 2, 2],
            "image_size": 8,  # sklearn digits; the exported graph accepts other sizes too
        }

    def __init__(self, in_channels=1, num_classes=10, base_width=16, blocks_per_stage=(2, 2, 2, 2), image_size=8):
        super().__init__()
        self.in_channels = in_channels
        self.image_size = image_size
        self.stem = nn.Sequential(*conv_bn(in_channels, base_width, 3, 1), nn.ReLU())
        stages, c_in = [], base_width
        for i, n in enumerate(blocks_per_stage):
            c_out = base_width * 2**i
            stages.append(nn.Sequential(*(BasicBlock(c_in if j == 0 else c_out, c_out, 2 if i > 0 and j == 0 else 1)
                                          for j in range(n))))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def input_spec(self):
        s = self.image_size
        batch = Dim("batch", example=2, alt=3, min=1, max=1024)
        height = Dim("height", example=s, alt=s + 3, min=4, max=512)
        width = Dim("width", example=s, alt=s + 5, min=4, max=512)
        return InputSpec(
            inputs=(TensorSpec("pixels", (batch, self.in_channels, height, width)),),
            outputs=("logits",),
            task="classification",
            extra={"image_size": s},
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(pixels)))
        return self.classifier(x.flatten(1))
