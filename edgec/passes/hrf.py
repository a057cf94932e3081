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
from edgec.core.pass_manager import Pass, PassResult, PostconditionError, PreconditionError, describe_skips, skip
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
    return scan_ffns(model)[0]


def scan_ffns(model: Model) -> tuple[list[FFN], list[dict]]:
    """The FFNs, and the candidates rejected with the reason: each nn.Linear whose only user is an activation
    but that is no FFN's first linear, and each opaque module with Linear layers inside (graph order)."""
    gm = model.gm
    modules = dict(gm.named_modules())
    calls = _call_counts(gm)
    ffns: list[FFN] = []
    rejected: list[dict] = []
    for node in gm.graph.nodes:
        hidden = _opaque_ffn_holder(modules, node)
        if hidden:
            rejected.append(skip(node.target, hidden))
        x = _linear_input(modules, node)
        act = _only_user(node) if x is not None else None
        if act is None or not _is_act(modules, act) or not act.args or act.args[0] is not node:
            continue
        found = _match_ffn(modules, calls, node, x, act)
        if isinstance(found, FFN):
            ffns.append(found)
        elif node.target not in {r["layer"] for r in rejected}:
            # a single-use Linear that is no FFN's first linear is reported, but not a failure under --strict;
            # a shared one is an FFN HRF cannot rewrite
            rejected.append(skip(node.target, found, deliberate=calls[node.target] == 1))
    return ffns, rejected


def _opaque_ffn_holder(modules: dict, node: fx.Node) -> str | None:
    """Why HRF cannot look inside a module fx left opaque that holds two or more Linear layers (else None)."""
    m = modules.get(node.target) if node.op == "call_module" else None
    if m is None or isinstance(m, (nn.Linear, HRFExpand)):
        return None
    if sum(isinstance(c, nn.Linear) for c in m.modules()) < 2:
        return None
    return f"{type(m).__name__} is one opaque module; HRF cannot see the FFN(s) inside it"


def _match_ffn(modules: dict, calls: dict, node: fx.Node, x: fx.Node, act: fx.Node) -> FFN | str:
    """The FFN whose first linear is ``node`` (followed by ``act``), or why it is not one."""
    if calls[node.target] != 1:
        return f"Linear module called {calls[node.target]} times (shared); HRF cannot rewrite one call alone"
    nxt = _skip_drops_forward(modules, act)
    if nxt is None:
        return "its activation feeds several ops, not one second Linear"
    if _linear_input(modules, nxt) is not None:
        if _returns_to_width(modules, node, nxt):
            return FFN(x, [node], nxt, names=[node.target])
        d, f, o = modules[node.target].in_features, modules[node.target].out_features, modules[nxt.target].out_features
        return (f"Linear → activation → {nxt.target} maps {d} → {f} → {o}, not back to the input width {d} "
                "(a head, not an FFN)")
    if not _is_mul(nxt):
        return f"its activation feeds {_what(modules, nxt)}, not a second Linear"
    # Gated: the other factor of the product is W_v x (through dropouts), W_v reading the same x.
    mine = 0 if _skip_drops_backward(modules, nxt.args[0]) is act else 1
    other = _skip_drops_backward(modules, nxt.args[1 - mine])
    if (other is None or other is node or _linear_input(modules, other) is not x or calls[other.target] != 1
            or _only_user(other) is None):
        return "gated product whose other factor is not a single-use Linear of the same input"
    w2 = _skip_drops_forward(modules, nxt)
    if w2 is None or _linear_input(modules, w2) is None or not _returns_to_width(modules, node, w2):
        return "gated product that does not feed one Linear back to the input width"
    return FFN(x, [node, other], w2, gated=True, names=[node.target, other.target])


def _what(modules: dict, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}' ({type(modules[node.target]).__name__})"
    name = getattr(node.target, "__name__", node.target)
    return f"'{node.name}' ({name})"


def _no_candidates(model: Model) -> str:
    n = sum(isinstance(m, nn.Linear) for m in model.gm.modules())
    return (f"none of its {n} nn.Linear layer(s) is followed by an activation" if n
            else "it has no nn.Linear layer")


def _ffn_glob_reason(ffn: FFN, include: list[str], exclude: list[str]) -> str | None:
    """Why the include/exclude globs (over the FFN's first-linear names) leave ``ffn`` out (None: selected)."""
    hit = next((g for g in exclude for name in ffn.names if fnmatchcase(name, g)), None)
    if hit is not None:
        return f"excluded by --exclude '{hit}'"
    if not any(fnmatchcase(name, g) for name in ffn.names for g in include):
        return f"not matched by --include {include}"
    return None


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

    def select(self, model: Model) -> tuple[list[FFN], list[dict]]:
        """The FFNs to scaffold and the skipped candidates with reasons; raises PreconditionError when
        there is nothing to scaffold (saying why each candidate was rejected)."""
        ffns, rejected = scan_ffns(model)
        if not ffns:
            raise PreconditionError(f"no FFN found (Linear → activation → Linear) in {model.arch}: "
                                    + (f"rejected {describe_skips(rejected)}" if rejected else _no_candidates(model)))
        include, exclude = self.params["include"], self.params["exclude"]
        skipped = {r["layer"]: r for r in rejected}
        chosen = []
        for f in ffns:
            reason = _ffn_glob_reason(f, include, exclude)
            if reason is None:
                chosen.append(f)
            else:
                skipped[f.w1.target] = skip(f.w1.target, reason, deliberate=True)
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
        # FFNs scaffolded by an earlier run are done, not skipped (as layers already low-bit for ternary).
        order = {n.target: i for i, n in enumerate(model.gm.graph.nodes) if n.op == "call_module"}
        return fresh, sorted(skipped.values(), key=lambda r: order.get(r["layer"], len(order)))

    def call(self, model: Model, *, replay: bool = False) -> PassResult:
        k, init = self.params["expand"], self.params["init"]
        preserve = init == "preserve" and not replay
        before = model.clone(share_weights=True) if preserve else None  # read-only: new modules are inserted
        gm = model.gm
        ffns, skipped = self.select(model)
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
        return PassResult(model, modified=True, checks=checks, skipped=[] if replay else skipped,
                          summary=f"inserted HRF (K={k}, init={init}) in front of {len(ffns)} FFN(s){kinds}; "
                                  f"{len(ffns)} changed, {len(skipped)} skipped")

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
        before = None if replay else model.clone(share_weights=True)  # read-only: the pass replaces modules
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
