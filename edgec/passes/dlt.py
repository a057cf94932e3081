"""DLT scaffold and fold: Dual Learnable Ternarization (Chen et al., "TernaryLLM", arXiv 2406.07177).

Scaffold: each selected Conv/Linear keeps a latent W and learns a scale α and shift γ per group, with
``T = sign(W − γ) · 1[|W − γ| > 0.7 · mean_g |W − γ|]`` and ``Ŵ = α·T + γ`` (init: TWN).
Fold: codes T, scale α, shift γ into a LowBit layer — exactly the scaffold's eval weight. The formula
functions (``ternary_codes``, ``dlt_init``) live in ``edgec.layers.ternary``, since the scaffold's forward
computes them too. See docs/methods.md#dlt.
"""
from __future__ import annotations

from edgec.core.pass_manager import Pass
from edgec.layers.ternary import DLTLayer
from edgec.passes.lowbit_common import LowBitFoldPass, LowBitScaffoldPass, as_choice, as_float, as_int


class DLTScaffold(LowBitScaffoldPass):
    """Make every selected Conv/Linear a DLT layer (ternary codes, learnable per-group α and γ)."""

    name = "scaffold.dlt"
    version = 3  # v2: first_layer (v1 records replay with the first-linear rule); v3: last_layer (v1/v2
    # records replay with the last-linear rule)
    scaffold_fold = "fold.dlt"
    kind = "dlt"
    label = "DLT"
    activations = ("none", "ternary")

    def __init__(self, group_size: int = 128, include=("*",), exclude=(), keep_first_last: bool = True,
                 activations: str = "none", shift_init: str = "zero", clip: float = 1.5,
                 first_layer: str | None = None,
                 last_layer: str | None = None):
        params = self.common_params(include, exclude, keep_first_last, activations, first_layer,
                                    last_layer)
        params["group_size"] = as_int(group_size, self.name, "group_size", minimum=0)
        params["shift_init"] = as_choice(shift_init, ("zero", "mean"), self.name, "shift_init")
        params["clip"] = as_float(clip, self.name, "clip", minimum=0.0, strict=True)
        Pass.__init__(self, **params)

    def make_layer(self, name, layer, index, replay):
        p = self.params
        return DLTLayer(layer, p["group_size"], p["activations"], p["shift_init"], p["clip"], init=not replay)

    def describe(self) -> str:
        p = self.params
        return f"group_size={p['group_size']}, shift_init={p['shift_init']}, activations={p['activations']}"


class FoldDLT(LowBitFoldPass):
    """Freeze every DLT layer's codes, α and γ into a ternary LowBit layer with per-group scale and shift."""

    name = "fold.dlt"
    version = 1
    scaffold_cls = DLTLayer
    label = "DLT"
    target = "ternary (per-group scale and shift)"
