"""STTN scaffold and fold (Xu et al., "Soft Threshold Ternary Networks", arXiv 2204.01234).

Scaffold: each selected Conv/Linear becomes two latent kernels W1, W2 (TWN-split init) with
``Ŵ = α·sign(W1) + α·sign(W2)``, ``α = (‖W1‖₁ + ‖W2‖₁) / (2n)`` per output channel.
Fold: ``codes T = (sign W1 + sign W2) / 2 ∈ {−1, 0, 1}``, ``scale = 2α`` — exactly the scaffold's eval weight.
The formula functions (``twn_split``, ``sttn_scale``, ``sttn_codes``) live in ``edgec.layers.ternary``, since the
scaffold's forward computes them too. See docs/methods.md#sttn.
"""
from __future__ import annotations

from edgec.core.pass_manager import Pass
from edgec.layers.ternary import STTNLayer
from edgec.passes.lowbit_common import LowBitFoldPass, LowBitScaffoldPass, as_float, as_int


class STTNScaffold(LowBitScaffoldPass):
    """Make every selected Conv/Linear an STTN layer (two latent binary kernels, optional ternary activations)."""

    name = "scaffold.sttn"
    version = 3  # v2: first_layer (v1 records replay with the first-linear rule); v3: last_layer (v1/v2
    # records replay with the last-linear rule)
    scaffold_fold = "fold.sttn"
    kind = "sttn"
    label = "STTN"
    activations = ("none", "ternary")

    def __init__(self, activations: str = "none", include=("*",), exclude=(), keep_first_last: bool = True,
                 seed: int = 0, clip: float = 1.96, first_layer: str | None = None,
                 last_layer: str | None = None):
        params = self.common_params(include, exclude, keep_first_last, activations, first_layer,
                                    last_layer)
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
