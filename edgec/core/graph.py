"""The torch-side graph type that passes transform: a traced fx.GraphModule plus what rebuilds it.

``Model`` bundles the ``torch.fx.GraphModule`` with its architecture name and config, the log of
structural passes (the recipe that rebuilds the graph from the zoo on load) and the provenance
records of every pass. Scaffold modules (edgec's training-time layers) are fx leaves, so they
appear as single ``call_module`` nodes that fold passes can find and replace.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import json
import weakref
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


# Model.digest() hashes every tensor; inside ``digest_cache()`` a Model remembers its digest, keyed to the very
# tensors it holds (weak references) and their version counters, plus arch/config/pass log. In-place writes
# through ``.data`` bypass version counters, so the cache is only on where edgec owns the model end to end
# (file-to-file commands), never for models handed to user code.
_DIGEST_CACHE = contextvars.ContextVar("edgec_digest_cache", default=False)


@contextlib.contextmanager
def digest_cache():
    """Within this block ``Model.digest()`` is computed once per model state (see ``_DIGEST_CACHE``)."""
    token = _DIGEST_CACHE.set(True)
    try:
        yield
    finally:
        _DIGEST_CACHE.reset(token)


def _fingerprint(model) -> tuple:
    """What a remembered digest is valid for: the description, and each tensor by identity and version."""
    state = model.gm.state_dict(keep_vars=True)
    return (canonical_json({"arch": model.arch, "config": model.config, "passes": model.passes}),
            tuple((name, weakref.ref(t), t._version) for name, t in state.items()))


def _same_fingerprint(a: tuple, b: tuple) -> bool:
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    return all(na == nb and ra() is not None and ra() is rb() and va == vb
               for (na, ra, va), (nb, rb, vb) in zip(a[1], b[1]))


def shared_copy(gm: fx.GraphModule, frozen: bool = False) -> fx.GraphModule:
    """A new GraphModule (modules, graph, attributes copied) whose parameters and buffers share storage with
    ``gm``'s: no tensor bytes are copied. ``frozen``: new Parameter objects with ``requires_grad=False``
    (still the same storage), so setting that flag does not touch ``gm``."""
    memo: dict = {}
    for p in gm.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False) if frozen else p
    for b in gm.buffers():
        memo[id(b)] = b
    return copy.deepcopy(gm, memo)


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
    _digest_memo: tuple | None = field(default=None, repr=False, compare=False)  # (fingerprint, digest)

    def clone(self, share_weights: bool = False) -> Model:
        """An independent copy. ``share_weights``: the module tree, graph and records are copied but parameters
        and buffers are the same tensors (no bytes copied): for a read-only reference, e.g. the "before" side
        of a pass's equivalence check, when the pass replaces modules rather than writing into tensors."""
        gm = shared_copy(self.gm) if share_weights else copy.deepcopy(self.gm)
        out = Model(gm, self.arch, copy.deepcopy(self.config), self.spec, copy.deepcopy(self.passes),
                    copy.deepcopy(self.provenance), copy.deepcopy(self.capture))
        known = self._remembered()
        if known is not None:  # same content by construction: keep the digest, keyed to the copy's tensors
            out.remember_digest(known)
        return out

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.gm.state_dict().items()}

    def state_to_save(self) -> dict:
        """A detached state dict for writing at once: each tensor that is the whole of its own storage is shared
        (saving writes the same bytes as for a copy), any other (a view, a second name of a storage) copied."""
        out, seen = {}, set()
        for k, v in self.gm.state_dict().items():
            v = v.detach()
            storage = v.untyped_storage()
            whole = (v.is_contiguous() and v.storage_offset() == 0
                     and v.numel() * v.element_size() == storage.nbytes())
            if not whole or storage.data_ptr() in seen or v.numel() == 0:
                v = v.clone()
            else:
                seen.add(storage.data_ptr())
            out[k] = v
        return out

    def digest(self) -> str:
        known = self._remembered() if _DIGEST_CACHE.get() else None
        if known is not None:
            return known
        value = digest_of(self.arch, self.config, self.passes, self.gm.state_dict())
        self.remember_digest(value)
        return value

    def remember_digest(self, value: str) -> None:
        """Record ``value`` as the digest of the current state (used inside ``digest_cache()`` only)."""
        self._digest_memo = (_fingerprint(self), value)

    def _remembered(self) -> str | None:
        memo = self._digest_memo
        if memo is None or not _same_fingerprint(memo[0], _fingerprint(self)):
            return None
        return memo[1]

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
    """Run both graphs on sample inputs at two shapes and two seeds; compare outputs. The shapes are the spec's
    small check shapes (``InputSpec.check_sample``: long dynamic axes shortened, two sizes each), which
    run the same code as the traced shape at a fraction of the cost. Each graph runs all four inputs in turn
    with its derived weights computed once (``derived_weights_cached``)."""
    inputs = [before.spec.check_sample(seed=seed, alt=alt) for seed in seeds for alt in (False, True)]
    with derived_weights_cached(before.gm):
        reference = [before.run(x) for x in inputs]
    with derived_weights_cached(after.gm):
        candidate = [after.run(x) for x in inputs]
    worst = {"max_abs_error": 0.0, "output_scale": 0.0, "rel_error": 0.0}
    for ref, got in zip(reference, candidate):
        err = max_error(ref, got)
        worst = {k: max(worst[k], err[k]) for k in worst}
    worst["tolerance"] = tolerance
    worst["passed"] = worst["rel_error"] <= tolerance
    return worst


# Methods of edgec's layers that derive a layer's effective weight from its stored tensors (latent scaffolds:
# ``weight_hat``; low-bit deploy layers: ``dequantized``): pure functions of the weights, recomputed on every
# forward. Checks run several forwards on fixed weights, so they compute each once.
_DERIVED = ("weight_hat", "dequantized")


@contextlib.contextmanager
def derived_weights_cached(gm: nn.Module):
    """Within this block (no-grad forwards on unchanged weights only), each Leaf's derived weight is computed on
    its first use and reused: the same values, computed once instead of once per forward."""
    patched = []
    for m in gm.modules():
        if not isinstance(m, Leaf):
            continue
        for name in _DERIVED:
            if callable(getattr(type(m), name, None)) and name not in m.__dict__:
                m.__dict__[name] = _once(getattr(m, name))
                patched.append((m, name))
    try:
        yield
    finally:
        for m, name in patched:
            m.__dict__.pop(name, None)


def _once(fn):
    memo = []

    def call():
        if not memo:
            memo.append(fn())
        return memo[0]

    return call


def set_submodule(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, module)
