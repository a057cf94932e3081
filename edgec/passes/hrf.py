"""HRF scaffold and deHRF fold: re-parameterize an FFN's first linear for training, fold it back for deployment.

Source: "Transformer re-parameterization for on-device speech emotion recognition" (arXiv 2411.09339).
Training: ``W1 x + b1 -> W1' (H x + c) + b1`` with H ∈ R^{K·d × d}; deHRF: ``W1* = W1'·H``,
``b1* = W1'·c + b1`` (exact up to rounding; float64, then cast). FFNs are found by dataflow (Linear ->
activation -> Linear back to the input width, or a gated GEGLU/SwiGLU pair). See docs/methods.md#hrf and
docs/methods.md#dehrf-fold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import skip_init

from edgec.core.errors import EdgecError
from edgec.core.graph import Model, set_submodule, verify_equivalent
from edgec.core.ops import EQUIVALENCE_TOLERANCE as TOLERANCE
from edgec.core.ops import FFN_ACTIVATION_FUNCTIONS as _ACT_FUNCTIONS
from edgec.core.ops import FFN_ACTIVATION_METHODS as _ACT_METHODS
from edgec.core.ops import FFN_ACTIVATION_MODULES as _ACT_MODULES
from edgec.core.ops import FFN_DROPOUT_FUNCTIONS as _DROP_FUNCTIONS
from edgec.core.ops import FFN_DROPOUT_MODULES as _DROP_MODULES
from edgec.core.ops import FFN_MUL_FUNCTIONS as _MUL_FUNCTIONS
from edgec.core.pass_manager import Pass, PassResult, PostconditionError, PreconditionError
from edgec.layers.hrf import HRFExpand

SUFFIX = "_hrf"


# ------------------------------------------------------------------------------------------------ formulas

def dehrf(w1: torch.Tensor, b1: torch.Tensor | None, h: torch.Tensor,
          c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """deHRF: ``W1* = W1'·H``, ``b1* = W1'·c + b1`` in float64 (b None when neither W1' nor H has a bias)."""
    w = w1.double()
    weight = w @ h.double()
    if b1 is None and c is None:
        return weight, None
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    if c is not None:
        b += w @ c.double()
    if b1 is not None:
        b += b1.double()
    return weight, b


def orthonormal_columns(r: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """Q ∈ R^{r×d} (float64) with QᵀQ = I_d: reduced QR of a Gaussian, signs fixed so Q is unique."""
    q, rr = torch.linalg.qr(torch.randn(r, d, generator=generator, dtype=torch.float64), mode="reduced")
    signs = torch.sign(torch.diagonal(rr))
    signs[signs == 0] = 1.0
    return q * signs


def preserve_init(w1: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Function-preserving init: with H = Q (QᵀQ = I_d) and c = 0, ``W1' = W1·Qᵀ`` gives ``W1'·H = W1``."""
    return w1.double() @ q.T


# --------------------------------------------------------------------------------------------- finding FFNs

@dataclass
class FFN:
    """One FFN found in the graph: its input node, input projection nodes (W1 first) and W2 node."""

    x: fx.Node
    inputs: list[fx.Node]  # [W1] or [W_g, W_v]
    w2: fx.Node
    gated: bool = False
    names: list[str] = field(default_factory=list)

    @property
    def w1(self) -> fx.Node:
        return self.inputs[0]


def _module(modules: dict, node, types) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, types):
            return m
    return None


def _is_act(modules: dict, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _ACT_MODULES)
    if node.op == "call_function":
        return node.target in _ACT_FUNCTIONS
    return node.op == "call_method" and node.target in _ACT_METHODS


def _is_drop(modules: dict, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _DROP_MODULES)
    return node.op == "call_function" and node.target in _DROP_FUNCTIONS


def _is_mul(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _MUL_FUNCTIONS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target == "mul" and len(node.args) == 2 and not node.kwargs


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _skip_drops_forward(modules: dict, node: fx.Node) -> fx.Node | None:
    """The node after ``node`` once single-user dropouts are skipped (None when the value fans out)."""
    nxt = _only_user(node)
    while nxt is not None and _is_drop(modules, nxt) and nxt.args and nxt.args[0] is node:
        node, nxt = nxt, _only_user(nxt)
    return nxt


def _skip_drops_backward(modules: dict, node) -> fx.Node | None:
    """The producer behind a chain of single-user dropouts ending at ``node``."""
    while isinstance(node, fx.Node) and _is_drop(modules, node) and node.args and len(node.users) == 1:
        node = node.args[0]
    return node if isinstance(node, fx.Node) else None


def _linear_input(modules: dict, node: fx.Node) -> fx.Node | None:
    """The input of a ``call_module`` nn.Linear called with one positional argument, else None."""
    if _module(modules, node, nn.Linear) is None or len(node.args) != 1 or node.kwargs:
        return None
    return node.args[0] if isinstance(node.args[0], fx.Node) else None


def _returns_to_width(modules: dict, w1: fx.Node, w2: fx.Node) -> bool:
    """An FFN maps d → f → d; a classifier head (Linear → tanh → Linear to the labels) does not.
    (Behind an HRF expansion, d is the expansion's input width.)"""
    src = w1.args[0]
    hrf = _module(modules, src, HRFExpand) if isinstance(src, fx.Node) else None
    d = hrf.h.in_features if hrf is not None else modules[w1.target].in_features
    return modules[w2.target].out_features == d


def _call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How often each submodule is called in the graph (a shared module cannot be rewritten alone)."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def find_ffns(model: Model) -> list[FFN]:
    """Every FFN (plain or gated) in graph order; see the module docstring for the rules."""
    gm = model.gm
    modules = dict(gm.named_modules())
    calls = _call_counts(gm)
    ffns: list[FFN] = []
    for node in gm.graph.nodes:
        x = _linear_input(modules, node)
        if x is None or calls[node.target] != 1:
            continue
        act = _only_user(node)
        if act is None or not _is_act(modules, act) or not act.args or act.args[0] is not node:
            continue
        nxt = _skip_drops_forward(modules, act)
        if nxt is None:
            continue
        if _linear_input(modules, nxt) is not None:
            if _returns_to_width(modules, node, nxt):
                ffns.append(FFN(x, [node], nxt, names=[node.target]))
            continue
        if not _is_mul(nxt):
            continue
        # Gated: the other factor of the product is W_v x (through dropouts), W_v reading the same x.
        mine = 0 if _skip_drops_backward(modules, nxt.args[0]) is act else 1
        other = _skip_drops_backward(modules, nxt.args[1 - mine])
        if (other is None or other is node or _linear_input(modules, other) is not x or calls[other.target] != 1
                or _only_user(other) is None):
            continue
        w2 = _skip_drops_forward(modules, nxt)
        if w2 is None or _linear_input(modules, w2) is None or not _returns_to_width(modules, node, w2):
            continue
        ffns.append(FFN(x, [node, other], w2, gated=True, names=[node.target, other.target]))
    return ffns


def _is_hrf_node(modules: dict, node) -> bool:
    return _module(modules, node, HRFExpand) is not None


def hrf_nodes(model: Model) -> list[fx.Node]:
    modules = dict(model.gm.named_modules())
    return [n for n in model.gm.graph.nodes if _is_hrf_node(modules, n)]


def _as_list(value, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise EdgecError(f"scaffold.hrf: {what} must be a list of non-empty glob strings, got {value!r}")
    return list(value)


class HRFScaffold(Pass):
    """Insert an HRF expansion H (d -> K·d) in front of every selected FFN's first linear(s)."""

    name = "scaffold.hrf"
    version = 1
    structural = True
    scaffold_fold = "fold.hrf"

    def __init__(self, expand: int = 4, include=("*",), exclude=(), init: str = "default", seed: int = 0):
        if isinstance(expand, bool) or not isinstance(expand, int) or expand < 1:
            raise EdgecError(f"scaffold.hrf: expand must be a positive integer (the paper uses 1, 2, 4, 8), "
                             f"got {expand!r}")
        if init not in ("default", "preserve"):
            raise EdgecError(f"scaffold.hrf: init must be 'default' or 'preserve', got {init!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise EdgecError(f"scaffold.hrf: seed must be an integer, got {seed!r}")
        # Every parameter is recorded explicitly, so replay never depends on this version's defaults.
        super().__init__(expand=expand, include=_as_list(include, "include"), exclude=_as_list(exclude, "exclude"),
                         init=init, seed=seed)

    def select(self, model: Model) -> list[FFN]:
        """The FFNs to scaffold; raises PreconditionError when there are none."""
        ffns = find_ffns(model)
        if not ffns:
            raise PreconditionError(f"no FFN found (Linear → activation → Linear) in {model.arch}")
        include, exclude = self.params["include"], self.params["exclude"]

        def matches(ffn: FFN, globs) -> bool:
            return any(fnmatchcase(name, g) for name in ffn.names for g in globs)

        chosen = [f for f in ffns if matches(f, include) and not matches(f, exclude)]
        if not chosen:
            names = ", ".join(f.w1.target for f in ffns[:4]) + (", ..." if len(ffns) > 4 else "")
            raise PreconditionError(
                f"scaffold.hrf: include {include} and exclude {exclude} select none of the {len(ffns)} FFN(s) "
                f"in {model.arch} (their first linears: {names})")
        modules = dict(model.gm.named_modules())
        fresh = [f for f in chosen if not _is_hrf_node(modules, f.x)]
        if not fresh:
            raise PreconditionError(f"scaffold.hrf: all {len(chosen)} selected FFN(s) in {model.arch} already "
                                    "carry an HRF scaffold; fold it first (edgec fold)")
        return fresh

    def call(self, model: Model, *, replay: bool = False) -> PassResult:
        k, init = self.params["expand"], self.params["init"]
        preserve = init == "preserve" and not replay
        before = model.clone() if preserve else None
        gm = model.gm
        ffns = self.select(model)
        modules = dict(gm.named_modules())
        gen = torch.Generator().manual_seed(self.params["seed"]) if preserve else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.params["seed"])
            for ffn in ffns:
                self._insert(model, ffn, modules, gen, replay)
        gm.graph.lint()
        gm.recompile()
        checks = {"equivalence": verify_equivalent(before, model, TOLERANCE)} if preserve else {}
        gated = sum(f.gated for f in ffns)
        kinds = f" ({gated} gated, one shared H each)" if gated else ""
        return PassResult(model, modified=True, checks=checks,
                          summary=f"inserted HRF (K={k}, init={init}) in front of {len(ffns)} FFN(s){kinds}")

    def _insert(self, model: Model, ffn: FFN, modules: dict, gen, replay: bool) -> None:
        """Insert one HRF node in front of ``ffn`` and swap its input projection(s) for (r -> f) linears."""
        gm, k, init = model.gm, self.params["expand"], self.params["init"]
        preserve = init == "preserve" and not replay
        olds = [modules[n.target] for n in ffn.inputs]
        w1 = olds[0]
        d = w1.in_features
        if any(m.in_features != d for m in olds):
            raise PreconditionError(f"scaffold.hrf: gated FFN {ffn.names} input projections disagree on width")
        r = k * d
        bias = all(m.bias is not None for m in olds)
        factory = {"device": w1.weight.device, "dtype": w1.weight.dtype}
        hrf_name = ffn.w1.target + SUFFIX
        if hrf_name in modules:
            raise PreconditionError(f"scaffold.hrf: module name '{hrf_name}' is already taken in {model.arch}")
        fresh_init = init == "default" and not replay
        hrf, news = _expanded_modules(olds, d, r, bias, fresh_init, factory)  # default init: H, W1', W_v' in order
        if preserve:
            _init_preserving(hrf, olds, news, orthonormal_columns(r, d, gen))
        for old, new in zip(olds, news):
            new.requires_grad_(old.weight.requires_grad)
        _rewire(gm, ffn, hrf_name, hrf, news)

    def ensures(self, model: Model) -> None:
        _check_hrf_users(model, PostconditionError)


def _expanded_modules(olds: list[nn.Linear], d: int, r: int, bias: bool, fresh_init: bool,
                      factory: dict) -> tuple[HRFExpand, list[nn.Linear]]:
    """The HRF expansion H (d -> r) and the (r -> f) replacements of the input projection(s), in that order."""
    hrf = HRFExpand(d, r, bias, init=fresh_init, **factory)
    news = []
    for old in olds:
        if fresh_init:
            new = nn.Linear(r, old.out_features, bias=old.bias is not None, **factory)
        else:
            new = skip_init(nn.Linear, r, old.out_features, bias=old.bias is not None, **factory)
        news.append(new)
    return hrf, news


def _init_preserving(hrf: HRFExpand, olds: list[nn.Linear], news: list[nn.Linear], q: torch.Tensor) -> None:
    """H = Q, c = 0, W1' = W1 Qᵀ (b1 unchanged): the scaffolded FFN computes what the original did."""
    with torch.no_grad():
        hrf.h.weight.copy_(q)
        if hrf.h.bias is not None:
            hrf.h.bias.zero_()
        for old, new in zip(olds, news):
            new.weight.copy_(preserve_init(old.weight.detach(), q))
            if new.bias is not None:
                new.bias.copy_(old.bias.detach())


def _rewire(gm: fx.GraphModule, ffn: FFN, hrf_name: str, hrf: HRFExpand, news: list[nn.Linear]) -> None:
    """Register H and the new projections, and route the FFN's input through H."""
    gm.add_submodule(hrf_name, hrf.train(gm.training))
    for node, new in zip(ffn.inputs, news):
        set_submodule(gm, node.target, new.train(gm.training))
    first = min(ffn.inputs, key=_node_order(gm))
    with gm.graph.inserting_before(first):
        h_node = gm.graph.call_module(hrf_name, (ffn.x,))
    for node in ffn.inputs:
        node.replace_input_with(ffn.x, h_node)


def _node_order(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__


def _check_hrf_users(model: Model, error) -> list[tuple[fx.Node, list[fx.Node]]]:
    """Each HRF node with its consumers, which must all be single-call nn.Linear(r, ·) modules."""
    gm = model.gm
    modules = dict(gm.named_modules())
    calls = _call_counts(gm)
    found = []
    for node in hrf_nodes(model):
        r = modules[node.target].out_features
        users = list(node.users)
        for u in users:
            lin = _module(modules, u, nn.Linear)
            if lin is None or lin.in_features != r or _linear_input(modules, u) is not node or calls[u.target] != 1:
                raise error(f"HRF scaffold '{node.target}' feeds '{u.name}', not only the FFN's first linear(s); "
                            "nothing may sit between H and W1' (the fold would not be exact)")
        if not users:
            raise error(f"HRF scaffold '{node.target}' feeds nothing")
        found.append((node, users))
    return found


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _folded_linear(hrf: HRFExpand, lin: nn.Linear, replay: bool) -> nn.Linear:
    """The nn.Linear(d, f) computing ``lin(hrf(x))`` (structure only on replay)."""
    factory = {"device": lin.weight.device, "dtype": lin.weight.dtype}
    has_bias = lin.bias is not None or hrf.h.bias is not None
    new = skip_init(nn.Linear, hrf.in_features, lin.out_features, bias=has_bias, **factory)
    if not replay:
        with torch.no_grad():
            w, b = dehrf(lin.weight.detach(), _detached(lin.bias), hrf.h.weight.detach(), _detached(hrf.h.bias))
            new.weight.copy_(w)
            if has_bias:
                new.bias.copy_(b)
    new.requires_grad_(lin.weight.requires_grad)
    return new.train(lin.training)


class FoldHRF(Pass):
    """deHRF: fold every HRF scaffold into the linear(s) it feeds (``dehrf``).

    Computed in float64 and cast to the layer's dtype; the folded graph is verified against the scaffolded
    one on sample inputs at two shapes (relative error <= 1e-5). No HRF scaffold: a quiet no-op.
    """

    name = "fold.hrf"
    version = 1
    structural = True

    def call(self, model: Model, *, replay: bool = False) -> PassResult:
        gm = model.gm
        pairs = _check_hrf_users(model, EdgecError)
        if not pairs:
            return PassResult(model, modified=False, summary="no HRF scaffold")
        before = None if replay else model.clone()
        modules = dict(gm.named_modules())
        folded = 0
        for node, users in pairs:
            hrf = modules[node.target]
            x = node.args[0]
            for u in users:
                lin = modules[u.target]
                set_submodule(gm, u.target, _folded_linear(hrf, lin, replay))
                u.replace_input_with(node, x)
                folded += 1
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
        gm.graph.lint()
        gm.recompile()
        checks = {} if replay else {"equivalence": verify_equivalent(before, model, TOLERANCE)}
        return PassResult(model, modified=True, checks=checks,
                          summary=f"folded {len(pairs)} HRF scaffold(s) into {folded} linear(s)")

    def ensures(self, model: Model) -> None:
        left = hrf_nodes(model)
        if left:
            raise PostconditionError(f"fold.hrf left {len(left)} HRF scaffold(s), e.g. '{left[0].target}'")
