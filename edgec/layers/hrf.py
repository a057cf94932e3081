"""The HRF training scaffold: the expansion ``H x + c`` inserted in front of an FFN's first linear.

Inserted by ``scaffold.hrf`` and folded away by ``fold.hrf`` (see docs/methods.md#hrf).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init

from edgec.core.graph import Scaffold


class HRFExpand(Scaffold):
    """The HRF expansion ``H x + c`` (an nn.Linear(d, r) named ``h``); must be folded by ``fold.hrf``."""

    kind = "hrf"
    folded_by = "fold.hrf"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, init: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if init:
            self.h = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        else:
            self.h = skip_init(nn.Linear, in_features, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def in_features(self) -> int:
        return self.h.in_features

    @property
    def out_features(self) -> int:
        return self.h.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(x)
