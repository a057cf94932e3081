"""``prune.channels``: physically remove the channels, hidden units or attention heads of coupled groups.

``keep = {group: [kept unit indices]}`` (indices, so replaying the record on load rebuilds the same structure).
Producers lose output rows, consumers input columns, per-channel layers their channels, and the view/reshape
and split literals that count units (and slice bounds on a channel dim) are rewritten. Check: the pruned model equals its input with the removed units
zeroed (see docs/methods.md#coupled-channel-groups).

The output's ``config`` records the real widths: ``config["pruned_widths"] = {group: units}`` for every group
(``width_run`` in edgec.core.pass_manager says which records of the log the entry stands for), so the pruned
architecture rebuilds from its config (edgec.models.checkpoint.build_from_config); the record stays in the log.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from edgec.analysis.groups import analyse, keep_from_counts, resolve_keep, zero_channels
from edgec.core.errors import EdgecError
from edgec.core.graph import Model, set_submodule, verify_equivalent
from edgec.core.ops import BATCHNORM as _BN
from edgec.core.ops import CONV as _CONV
from edgec.core.ops import EQUIVALENCE_TOLERANCE as TOLERANCE
from edgec.core.pass_manager import PRUNED_WIDTHS, Pass, PassResult, width_run


def _slice_weight(m, new, w, b, out, inp, out_attr: str, in_attr: str) -> None:
    """Keep output rows ``out`` and input columns ``inp`` of ``w`` (and ``b``); set the new sizes on ``new``."""
    if out is not None:
        idx = torch.tensor(out, dtype=torch.long)
        w, b = w[idx], (b[idx] if b is not None else None)
        setattr(new, out_attr, len(out))
    if inp is not None:
        w = w[:, torch.tensor(inp, dtype=torch.long)]
        setattr(new, in_attr, len(inp))
    new.weight = _param(w, m.weight)
    if b is not None:
        new.bias = _param(b, m.bias)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=like.requires_grad)


def _slice_module(m: nn.Module, target: str, cuts: dict[str, list[int]]) -> nn.Module:
    """A copy of ``m`` keeping output rows ``cuts['out']``, input columns ``cuts['in']``, per-channel entries
    ``cuts['channel']`` or embedding columns ``cuts['embedding']`` (each optional)."""
    new = copy.deepcopy(m)
    out, inp, chan, emb = (cuts.get(k) for k in ("out", "in", "channel", "embedding"))
    with torch.no_grad():
        if isinstance(m, nn.Embedding):
            idx = torch.tensor(emb, dtype=torch.long)
            new.weight = _param(m.weight[:, idx], m.weight)
            new.embedding_dim = len(emb)
        elif isinstance(m, nn.Linear):
            _slice_weight(m, new, m.weight, m.bias, out, inp, "out_features", "in_features")
        elif isinstance(m, _CONV):
            w, b = m.weight, m.bias
            if chan is not None:  # depthwise: in = out = groups
                idx = torch.tensor(chan, dtype=torch.long)
                w, b = w[idx], (b[idx] if b is not None else None)
                new.in_channels = new.out_channels = new.groups = len(chan)
            _slice_weight(m, new, w, b, out, inp, "out_channels", "in_channels")
        elif isinstance(m, _BN):
            idx = torch.tensor(chan, dtype=torch.long)
            new.num_features = len(chan)
            if m.affine:
                new.weight = _param(m.weight[idx], m.weight)
                new.bias = _param(m.bias[idx], m.bias)
            if m.running_mean is not None:
                new.running_mean = m.running_mean[idx].clone()
                new.running_var = m.running_var[idx].clone()
        else:
            raise EdgecError(f"prune.channels: do not know how to slice '{target}' ({type(m).__name__})")
    return new


def _set_literal(node, arg: tuple, value: int) -> None:
    args = list(node.args)
    if len(arg) == 1:
        args[arg[0]] = value
    else:
        seq = list(args[arg[0]])
        seq[arg[1]] = value
        args[arg[0]] = type(node.args[arg[0]])(seq)
    node.args = tuple(args)


def _set_slice_bound(node, arg: tuple, value: int) -> None:
    """Set the ``start``/``stop`` (``arg[2]``) of the slice at ``node.args[arg[0]]`` (item ``arg[1]`` of an
    index tuple, or the slice itself when None) to ``value``."""
    args = list(node.args)
    index = args[arg[0]]
    items = list(index) if arg[1] is not None else [index]
    where = arg[1] if arg[1] is not None else 0
    sl = items[where]
    items[where] = slice(value, sl.stop, sl.step) if arg[2] == "start" else slice(sl.start, value, sl.step)
    args[arg[0]] = tuple(items) if arg[1] is not None else items[0]
    node.args = tuple(args)


def apply_keep(model: Model, keep: dict, analysis=None) -> dict:
    """Slice ``model`` in place to ``keep`` (validated); return ``{group: [size before, size after]}`` for the
    groups that lose units. ``analysis``: ``analyse(model)`` when the caller has it."""
    analysis = analysis or analyse(model)
    keep_idx = resolve_keep(analysis, keep)
    gm = model.gm
    modules = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    cuts: dict[str, dict[str, list[int]]] = {}
    for s in analysis.slots:
        kept = s.kept_positions(keep_idx)
        if len(kept) == len(s.ids):
            continue  # untouched: modules that lose nothing are left as they are
        if s.kind == "reshape":
            _set_literal(nodes[s.target], s.arg, len(kept))
        elif s.kind == "slice":
            _set_slice_bound(nodes[s.target], s.arg, len(kept))
        else:
            cuts.setdefault(s.target, {})[s.kind] = kept
    for target, c in cuts.items():
        m = modules[target]
        set_submodule(gm, target, _slice_module(m, target, c).train(m.training))
    gm.graph.lint()
    gm.recompile()
    return {g.name: [g.size, len(keep_idx[g.index])] for g in analysis.groups if g.index in keep_idx}


class PruneChannels(Pass):
    """Remove the units not listed in ``keep`` ({group name: sorted kept indices}) from every coupled layer."""

    name = "prune.channels"
    version = 1
    structural = True

    def __init__(self, keep: dict | None = None, **params):
        if params:
            raise EdgecError(f"prune.channels: unknown parameter(s) {', '.join(sorted(params))}; expected 'keep'")
        keep = {str(k): [int(i) for i in v] for k, v in (keep or {}).items()}
        super().__init__(keep=keep)

    @classmethod
    def from_counts(cls, model: Model, counts: dict[str, int]) -> PruneChannels:
        """Keep the ``counts[group]`` most important units of each named group (importance: L2 norm of the
        producer rows, summed over coupled producers)."""
        return cls(keep=keep_from_counts(model, counts))

    @classmethod
    def from_fraction(cls, model: Model, fraction: float, groups: list[str] | None = None) -> PruneChannels:
        """Keep ``round(fraction · size)`` (at least 1) of every prunable group (or of the named ``groups``)."""
        if not 0 < fraction <= 1:
            raise EdgecError(f"fraction must be in (0, 1], got {fraction}")
        analysis = analyse(model)
        chosen = [analysis.group(n) for n in groups] if groups is not None else analysis.prunable
        counts = {g.name: max(1, round(fraction * g.size)) for g in chosen}
        return cls(keep=keep_from_counts(model, counts, analysis))

    @classmethod
    def shrink(cls, model: Model, widths, *, complete: bool = False) -> dict | None:
        """Cut ``model`` in place to ``widths`` ({group: units}, a config's ``pruned_widths``), keeping the first
        units of each group: for rebuilding an architecture whose weights are loaded afterwards. Unknown groups
        and counts a group cannot have are one-line errors naming the entry. ``complete``: return the widths of
        every group afterwards (what pruning records), or None when cutting changed the groups' names."""
        if not isinstance(widths, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in widths.items()):
            raise EdgecError(f"'{PRUNED_WIDTHS}' must map channel group names to unit counts, "
                             "e.g. {'conv1': 12}")
        analysis = analyse(model)
        sizes = {g.name: g.size for g in analysis.groups}
        for name, n in widths.items():
            if name not in sizes:
                shown = ", ".join(list(sizes)[:6]) + (f" (+{len(sizes) - 6} more)" if len(sizes) > 6 else "")
                raise EdgecError(f"'{PRUNED_WIDTHS}' names channel group '{name[:100]}', which {model.arch} does "
                                 f"not have (groups: {shown})")
            if not 1 <= n <= sizes[name]:
                raise EdgecError(f"'{PRUNED_WIDTHS}' gives group '{name}' {n} unit(s); it has {sizes[name]} "
                                 "(keep 1 to all of them)")
            group = analysis.group(name)
            if n < group.size and not group.prunable:
                raise EdgecError(f"'{PRUNED_WIDTHS}' cuts group '{name}' to {n} of {group.size} units, but it "
                                 f"cannot be pruned: {group.reasons[0]}")
        apply_keep(model, {name: list(range(n)) for name, n in widths.items()}, analysis)
        if not complete:
            return None
        after = {g.name: g.size for g in analyse(model).groups}
        return after if list(after) == list(sizes) else None

    def call(self, model: Model, *, replay: bool = False) -> PassResult:
        keep = self.params["keep"]
        if replay:
            changed = apply_keep(model, keep)
            return PassResult(model, modified=any(b != a for b, a in changed.values()))
        analysis = analyse(model)
        before = model.clone()
        changed = apply_keep(model, keep, analysis)
        removed = sum(b - a for b, a in changed.values())
        if removed:
            model.config = _config_after(model, analysis, changed)
        checks = {"groups": {name: {"size": b, "kept": a} for name, (b, a) in changed.items()}}
        not_exact = [name for name in changed if not analysis.group(name).zero_exact]
        if not_exact:
            checks["mask_equivalence"] = {"skipped": True, "groups": not_exact,
                                          "note": "zeroed units are not zero at every consumer in these groups"}
        else:
            masked = zero_channels(before, keep, analysis)
            checks["mask_equivalence"] = verify_equivalent(masked, model, TOLERANCE)
        summary = (f"removed {removed} unit(s) from {len(changed)} channel group(s)" if removed
                   else "nothing to remove: every group keeps all its units")
        return PassResult(model, modified=bool(removed), checks=checks, summary=summary)


def _config_after(model: Model, analysis, changed: dict) -> dict:
    """The pruned model's config: ``pruned_widths`` = every group's units after this pass, when the entry can
    stand for this pass (it is, or continues, the first run of ``prune.channels`` in the log: ``width_run``);
    otherwise the config as it was, the pass log alone rebuilding the structure as before."""
    config, log = model.config, model.passes  # the input's (this pass's record is appended after it)
    current = {g.name: g.size for g in analysis.groups}
    unique = len(current) == len(analysis.groups)  # two groups with one name: widths cannot tell them apart
    widths = {name: changed[name][1] if name in changed else size for name, size in current.items()}
    start, end = width_run(log)
    prior = config.get(PRUNED_WIDTHS)
    if prior is None:
        # a model pruned before configs recorded widths (or with ambiguous group names): its log rebuilds it
        return config if start < end or not unique else {**config, PRUNED_WIDTHS: widths}
    if start == end and log:
        raise EdgecError(f"prune.channels: this model was built from a pruned config ('{PRUNED_WIDTHS}') and then "
                         f"changed by {log[0]['pass']}; prune it before that pass")
    if end < len(log):  # pruned again after other structural passes: the log holds this one
        return config
    if not unique or current != prior:
        # the earlier pruning changed how channels couple (e.g. a group cut to one unit): the entry no longer
        # names this model's groups, so the full log rebuilds it instead
        if start == end:
            raise EdgecError(f"prune.channels: this model's config ('{PRUNED_WIDTHS}') does not describe its "
                             "channel groups; prune the dense model instead")
        return {k: v for k, v in config.items() if k != PRUNED_WIDTHS}
    return {**config, PRUNED_WIDTHS: widths}
