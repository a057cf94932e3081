"""The torch-side graph type that passes transform: a traced fx.GraphModule plus what rebuilds it.

``Model`` bundles the ``torch.fx.GraphModule`` with its architecture name and config, the log of
structural passes (the recipe that rebuilds the graph from the zoo on load) and the provenance
records of every pass. Scaffold modules (edgec's training-time layers) are fx leaves, so they
appear as single ``call_module`` nodes that fold passes can find and replace.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from edgec.core.spec import InputSpec


class Leaf(nn.Module):
    """edgec's own modules that stay one node in the traced graph (scaffolds, low-bit deploy layers)."""


class Scaffold(Leaf):
    """Base for training-time modules that must be folded before deployment.

    Subclasses set ``folded_by`` to the name of the fold pass that removes them and ``kind`` to a short
    label (e.g. "hrf"). Export refuses a graph that still contains one.
    """

    folded_by: str = ""
    kind: str = "scaffold"


class EdgecTracer(fx.Tracer):
    """Standard leaves (torch.nn modules) plus edgec's own leaves, so each scaffold is one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Leaf) or super().is_leaf_module(m, qualname)


def trace(module: nn.Module) -> fx.GraphModule:
    graph = EdgecTracer().trace(module)
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    return gm.train(module.training)


def canonical_json(obj) -> str:
    """The one serialisation used for digests and metadata: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def digest_of(arch: str, config: dict, passes: list, state_dict: dict) -> str:
    """sha256 over config, structural pass log and every tensor (name, dtype, shape, bytes), sorted by name."""
    h = hashlib.sha256()
    h.update(canonical_json({"arch": arch, "config": config, "passes": passes}).encode())
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


CONTAINER_FIELDS = ("format", "model", "passes", "provenance", "digest")


def container_digest(container: dict) -> str:
    """sha256 over everything a checkpoint holds besides its tensors (format, model description with spec and
    capture, structural pass log, provenance) plus the model digest, which covers the tensors. ``digest_of``
    stays the model's identity (records name models by it); this one seals the file's story as well."""
    body = {k: container.get(k) for k in CONTAINER_FIELDS}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


@dataclass
class Model:
    gm: fx.GraphModule
    arch: str
    config: dict
    spec: InputSpec
    passes: list = field(default_factory=list)  # structural pass records: {"pass", "version", "params"}
    provenance: list = field(default_factory=list)  # every record, including checks and digests
    capture: dict = field(default_factory=dict)  # how gm was captured from the module (edgec.models.capture)

    def clone(self) -> Model:
        return Model(copy.deepcopy(self.gm), self.arch, copy.deepcopy(self.config), self.spec,
                     copy.deepcopy(self.passes), copy.deepcopy(self.provenance), copy.deepcopy(self.capture))

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.gm.state_dict().items()}

    def digest(self) -> str:
        return digest_of(self.arch, self.config, self.passes, self.gm.state_dict())

    def param_count(self) -> int:
        """Trainable parameters plus the stored weights of low-bit layers (codes, scales, shifts are buffers)."""
        count = sum(p.numel() for p in self.gm.parameters())
        for m in self.gm.modules():
            if isinstance(m, Leaf) and hasattr(m, "codes") and hasattr(m, "bits"):
                count += sum(b.numel() for b in (m.codes, m.scale, getattr(m, "shift", None)) if b is not None)
        return count

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.gm.state_dict().values())

    def scaffolds(self) -> list[tuple[str, Scaffold]]:
        return [(n, m) for n, m in self.gm.named_modules() if isinstance(m, Scaffold)]

    def run(self, inputs) -> tuple[torch.Tensor, ...]:
        """Eval-mode forward; always returns a tuple of tensors."""
        was_training = self.gm.training
        self.gm.eval()
        try:
            with torch.no_grad():
                out = self.gm(*inputs)
        finally:
            self.gm.train(was_training)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def max_error(reference: tuple, candidate: tuple) -> dict:
    """Max absolute error over all outputs, and that error relative to the output scale (max |ref|, floor 1)."""
    abs_err, scale = 0.0, 0.0
    for r, c in zip(reference, candidate):
        r = torch.as_tensor(r, dtype=torch.float64)
        c = torch.as_tensor(c, dtype=torch.float64)
        abs_err = max(abs_err, float((r - c).abs().max()) if r.numel() else 0.0)
        scale = max(scale, float(r.abs().max()) if r.numel() else 0.0)
    # 3 significant digits: the errors are recorded in artifacts, and the last digits vary across CPUs/threads.
    return {k: float(f"{v:.3g}") for k, v in
            {"max_abs_error": abs_err, "output_scale": scale, "rel_error": abs_err / max(scale, 1.0)}.items()}


def verify_equivalent(before: Model, after: Model, tolerance: float, seeds=(0, 1)) -> dict:
    """Run both graphs on sample inputs at the traced shape and the alternative shape; compare outputs."""
    worst = {"max_abs_error": 0.0, "output_scale": 0.0, "rel_error": 0.0}
    for seed in seeds:
        for alt in (False, True):
            inputs = before.spec.sample(seed=seed, alt=alt)
            err = max_error(before.run(inputs), after.run(inputs))
            worst = {k: max(worst[k], err[k]) for k in worst}
    worst["tolerance"] = tolerance
    worst["passed"] = worst["rel_error"] <= tolerance
    return worst


def set_submodule(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, module)
