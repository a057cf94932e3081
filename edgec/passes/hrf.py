"""HRF scaffold and deHRF fold: Transformer re-parameterization of the FFN's first linear.

Source: "Transformer re-parameterization for on-device speech emotion recognition" (arXiv 2411.09339).

An FFN computes ``y = W2 · act(W1 x + b1) + b2`` with W1 ∈ R^{f×d}. For training, HRF replaces the first
linear by a wider two-step linear map (nothing between the two steps, so it stays linear)::

    W1 x + b1   ->   W1' (H x + c) + b1,      H ∈ R^{r×d}, c ∈ R^r, W1' ∈ R^{f×r}, r = K·d

and deHRF folds it back before deployment::

    W1* = W1' · H            b1* = W1' · c + b1

which is exact (up to float rounding; computed in float64, then cast), so the folded model has exactly
the base architecture: same module names, types, shapes and parameter count, same graph.

**Finding FFNs (dataflow, not names).** In the traced fx graph an FFN is

* plain: ``call_module`` nn.Linear W1 -> activation -> zero or more dropouts -> ``call_module`` nn.Linear W2,
  with W2 returning to W1's input width (d → f → d, which excludes classifier heads such as BERT's
  pooler → tanh → classifier);
* gated (GEGLU / SwiGLU): two nn.Linear W_g, W_v reading the *same* input node, ``act(W_g x)`` and
  ``W_v x`` multiplied (either operand order, dropouts allowed on either side), then zero or more dropouts
  -> nn.Linear W2. Both input projections share one H: W_g' and W_v' both read ``H x + c``.

An activation is a ``call_module`` of GELU/ReLU/ReLU6/SiLU/Mish/Tanh/Sigmoid/LeakyReLU/ELU/SELU/CELU/
Hardswish/Softplus, or the matching ``call_function`` (``F.gelu``, ``torch.relu`` ...) or ``call_method``
(``x.relu()`` ...). A dropout is nn.Dropout/AlphaDropout/Identity or ``F.dropout``. Every intermediate value
must feed only the next step (as in BatchNorm folding), W1/W_v must be called once in the graph, and
an FFN whose input already comes from an HRF scaffold is skipped (so scaffolding a subset, then
another subset, works; a second HRF on the same FFN does not stack).

**Where things go.** For each FFN an :class:`HRFExpand` scaffold (kind ``hrf``, folded by ``fold.hrf``) is
registered next to W1 as ``<W1 name>_hrf`` (e.g. ``blocks.0.ffn.linear1_hrf``,
``encoder.layer.0.intermediate.dense_hrf``, ``levels.0.0.geglu.w_g_hrf`` for a gated FFN, where W1 is the
activated projection W_g). Its ``h`` is an nn.Linear(d, r): ``h.weight`` is H and ``h.bias`` is c. W1 (and
W_v) are replaced in place by nn.Linear(r, f) at the same qualified names. c exists only when the FFN's
input projection(s) have a bias (choice: a bias-free FFN, e.g. LLaMA's, stays bias-free after the fold).

**Selection** (``include``/``exclude``, fnmatch globs, case-sensitive, ``*`` also matches dots): an FFN is
scaffolded when one of its input projection names (W1, or W_g/W_v) matches an include glob and none
matches an exclude glob. Example: ``--include 'blocks.0.*'``, ``--exclude '*.ffn2.*'``.

**Initialisation** (``init``):

* ``default`` — H (with c) and W1' (and W_v') freshly initialised with nn.Linear's default init, drawn in
  graph order (per FFN: H, then W1', then W_v') from torch's RNG seeded with ``seed`` inside
  ``torch.random.fork_rng`` — so the output is a function of the recorded parameters alone and the
  caller's global RNG is left untouched. The function changes by design (training from scratch), so no
  equivalence check is run.
* ``preserve`` (choice, METHODS.md) — function-preserving on a trained model: H = Q, a random matrix with
  orthonormal columns (QᵀQ = I_d, from QR of a Gaussian drawn from a generator seeded by ``seed``, one
  Q per FFN in graph order), c = 0, W1' = W1 Qᵀ (= W1 H⁺), b1 unchanged, so W1' H = W1. A random
  orthogonal embedding (rather than [I_d; 0]) lets gradients reach all r dimensions of W1'. The output is
  verified unchanged (relative error <= 1e-5). The global RNG is not touched.

``expand`` is K (default 4, choice; the paper uses K in {1, 2, 4, 8}). On replay (rebuilding a
checkpoint's structure) both passes only build the structure, with uninitialised weights that the
checkpoint's state dict then overwrites.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from edgec.core.errors import EdgecError
from edgec.core.graph import Model, Scaffold, set_submodule, verify_equivalent
from edgec.core.pass_manager import Pass, PassResult, PostconditionError, PreconditionError

TOLERANCE = 1e-5
SUFFIX = "_hrf"

_ACT_MODULES = (nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU,
                nn.SELU, nn.CELU, nn.Hardswish, nn.Softplus)
_ACT_FUNCTIONS = {F.gelu, F.relu, F.relu6, F.silu, F.mish, F.leaky_relu, F.elu, F.selu, F.celu, F.hardswish,
                  F.softplus, F.tanh, F.sigmoid, torch.relu, torch.tanh, torch.sigmoid, torch.selu, torch.celu}
_ACT_METHODS = {"relu", "gelu", "silu", "mish", "tanh", "sigmoid"}
_DROP_MODULES = (nn.Dropout, nn.AlphaDropout, nn.Identity)
_DROP_FUNCTIONS = {F.dropout}
_MUL_FUNCTIONS = {operator.mul, torch.mul}


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


def _orthonormal_columns(r: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """Q ∈ R^{r×d} (float64) with QᵀQ = I_d: reduced QR of a Gaussian, signs fixed so Q is unique."""
    q, rr = torch.linalg.qr(torch.randn(r, d, generator=generator, dtype=torch.float64), mode="reduced")
    signs = torch.sign(torch.diagonal(rr))
    signs[signs == 0] = 1.0
    return q * signs


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
        hrf = HRFExpand(d, r, bias, init=fresh_init, **factory)
        news = []
        for old in olds:
            if fresh_init:
                new = nn.Linear(r, old.out_features, bias=old.bias is not None, **factory)
            else:
                new = skip_init(nn.Linear, r, old.out_features, bias=old.bias is not None, **factory)
            news.append(new)
        if preserve:
            q = _orthonormal_columns(r, d, gen)  # H = Q, c = 0, W1' = W1 Qᵀ
            with torch.no_grad():
                hrf.h.weight.copy_(q)
                if hrf.h.bias is not None:
                    hrf.h.bias.zero_()
                for old, new in zip(olds, news):
                    new.weight.copy_(old.weight.detach().double() @ q.T)
                    if new.bias is not None:
                        new.bias.copy_(old.bias.detach())
        for old, new in zip(olds, news):
            new.requires_grad_(old.weight.requires_grad)
        gm.add_submodule(hrf_name, hrf.train(gm.training))
        for node, new in zip(ffn.inputs, news):
            set_submodule(gm, node.target, new.train(gm.training))
        first = min(ffn.inputs, key=_node_order(gm))
        with gm.graph.inserting_before(first):
            h_node = gm.graph.call_module(hrf_name, (ffn.x,))
        for node in ffn.inputs:
            node.replace_input_with(ffn.x, h_node)

    def ensures(self, model: Model) -> None:
        _check_hrf_users(model, PostconditionError)


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


class FoldHRF(Pass):
    """deHRF: fold every HRF scaffold into the linear(s) it feeds: W1* = W1'·H, b1* = W1'·c + b1.

    Source: Transformer re-parameterization for on-device speech emotion recognition (arXiv 2411.09339).
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
            d = hrf.in_features
            for u in users:
                lin = modules[u.target]
                factory = {"device": lin.weight.device, "dtype": lin.weight.dtype}
                has_bias = lin.bias is not None or hrf.h.bias is not None
                new = skip_init(nn.Linear, d, lin.out_features, bias=has_bias, **factory)
                if not replay:
                    with torch.no_grad():
                        w = lin.weight.detach().double()
                        new.weight.copy_(w @ hrf.h.weight.detach().double())
                        if has_bias:
                            b = torch.zeros(lin.out_features, dtype=torch.float64, device=w.device)
                            if hrf.h.bias is not None:
                                b += w @ hrf.h.bias.detach().double()
                            if lin.bias is not None:
                                b += lin.bias.detach().double()
                            new.bias.copy_(b)
                new.requires_grad_(lin.weight.requires_grad)
                set_submodule(gm, u.target, new.train(lin.training))
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
