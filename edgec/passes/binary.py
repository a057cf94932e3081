"""Binary scaffold and fold (XNOR-style binary layers; latent path from "BNNs fully utilizing latent
weights", arXiv 2110.05850).

Scaffold: each selected Conv/Linear keeps a real latent W and computes with ``W_b = α · sign(W)``,
``α = mean |W|`` per output channel, plus a real path ``layer(x; W)`` for the training loss
(``edgec.layers.binary``: ``binary_aux_loss``, ``real_mode``, ``binary_latent_weights``).
Fold: codes sign(W) (0 -> +1), scale α, bits 1 — exactly the scaffold's eval weight. The formula functions
(``binary_scale``, ``sign_pm``) live in ``edgec.layers``, since the scaffold's forward computes them too.
See docs/methods.md#binary.
"""
from __future__ import annotations

from edgec.core.errors import EdgecError
from edgec.core.pass_manager import Pass
from edgec.layers.binary import BinaryLayer
from edgec.passes.lowbit_common import LowBitFoldPass, LowBitScaffoldPass, as_float


def _latent_weight(value, pass_name: str) -> list[float]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
        try:
            value = [float(v) for v in value]
        except ValueError:
            raise EdgecError(f"{pass_name}: latent_weight must be two numbers 'λ1,λ2', got {value!r}") from None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise EdgecError(f"{pass_name}: latent_weight must be two numbers [λ1, λ2], got {value!r}")
    return [as_float(v, pass_name, "latent_weight", minimum=0.0) for v in value]


class BinaryScaffold(LowBitScaffoldPass):
    """Make every selected Conv/Linear a binary layer (sign·α) whose latent weights also run a real path."""

    name = "scaffold.binary"
    version = 3  # v2: first_layer (v1 records replay with the first-linear rule); v3: last_layer (v1/v2
    # records replay with the last-linear rule)
    scaffold_fold = "fold.binary"
    kind = "binary"
    label = "binary"
    activations = ("none", "binary")

    def __init__(self, activations: str = "none", latent_weight=(0.5, 0.5), include=("*",), exclude=(),
                 keep_first_last: bool = True, clip: float = 1.0, first_layer: str | None = None,
                 last_layer: str | None = None):
        params = self.common_params(include, exclude, keep_first_last, activations, first_layer,
                                    last_layer)
        params["latent_weight"] = _latent_weight(latent_weight, self.name)
        params["clip"] = as_float(clip, self.name, "clip", minimum=0.0, strict=True)
        Pass.__init__(self, **params)

    def make_layer(self, name, layer, index, replay):
        p = self.params
        return BinaryLayer(layer, p["activations"], p["latent_weight"], p["clip"], init=not replay)

    def describe(self) -> str:
        p = self.params
        return f"activations={p['activations']}, latent_weight λ1,λ2={p['latent_weight']}"


class FoldBinary(LowBitFoldPass):
    """Drop the latent path of every binary layer: a LowBit layer with codes sign(W) and scale α."""

    name = "fold.binary"
    version = 1
    scaffold_cls = BinaryLayer
    label = "binary"
    target = "binary"
