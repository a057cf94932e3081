"""The per-op rule registry of the channel analysis (one small rule per op, as Torch-Pruning registers one
pruner per op type).

A rule ``rule(cx, node) -> {dim: Label}`` gets the :class:`~edgec.analysis.context.Context` and an fx node and
returns the labels of the node's output, uniting, marking or recording slots on the way. Rules are keyed by
module type (``call_module``; subclasses match unless registered ``exact``), by function (``call_function``)
or by method name (``call_method``). An op without a rule makes every channel it touches unprunable.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch.fx as fx
from torch import nn

from edgec.analysis.context import Context, Labels, describe, flat_nodes

Rule = Callable[[Context, fx.Node], Labels]


class _ModuleRule(NamedTuple):
    rule: Rule
    exact: bool  # only this exact type, not subclasses
    always: bool  # run even when no input carries channels (producers)


_MODULES: dict[type, _ModuleRule] = {}
_FUNCTIONS: dict[object, Rule] = {}
_METHODS: dict[str, Rule] = {}


def _add(table: dict, key, entry) -> None:
    old = table.get(key)
    if old is not None and old != entry:
        raise ValueError(f"channel analysis: two rules registered for {key!r}")
    table[key] = entry


def register(*ops, exact: bool = False, always: bool = False) -> Callable[[Rule], Rule]:
    """Decorator registering a rule for ``ops``: nn.Module types, functions (fx ``call_function`` targets) and
    method names (str). ``exact``/``always`` apply to module types (see :class:`_ModuleRule`)."""

    def deco(rule: Rule) -> Rule:
        for op in ops:
            if isinstance(op, str):
                _add(_METHODS, op, rule)
            elif isinstance(op, type) and issubclass(op, nn.Module):
                _add(_MODULES, op, _ModuleRule(rule, exact, always))
            else:
                _add(_FUNCTIONS, op, rule)
        return rule

    return deco


def module_rule(module) -> _ModuleRule | None:
    """The rule of the nearest registered class in ``module``'s MRO (exact rules match their own type only)."""
    for cls in type(module).__mro__:
        entry = _MODULES.get(cls)
        if entry is not None and (not entry.exact or cls is type(module)):
            return entry
    return None


def _rule_for(cx: Context, node: fx.Node) -> Rule | None:
    if node.op == "call_module":
        entry = module_rule(cx.module(node))
        return entry.rule if entry is not None else None
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def labelled_inputs(cx: Context, node: fx.Node) -> list[fx.Node]:
    """The inputs of ``node`` that carry channels (or sizes of channel dims)."""
    inputs = flat_nodes((node.args, node.kwargs))
    return [n for n in inputs if cx.carries(n)]


def unsupported(cx: Context, node: fx.Node) -> Labels:
    """What an op without a rule does: every channel it touches becomes unprunable."""
    cx.mark_all(labelled_inputs(cx, node), f"{describe(node)} is an op the channel analysis does not understand")
    return {}


def visit(cx: Context, node: fx.Node) -> Labels:
    """Apply the rule of ``node`` (``call_*`` nodes only)."""
    if node.op == "call_module":
        entry = module_rule(cx.module(node))
        if entry is not None and entry.always:
            _check_sizes(cx, node, entry.rule)
            return entry.rule(cx, node)
    if not labelled_inputs(cx, node):
        return {}
    rule = _rule_for(cx, node)
    if rule is None:
        return unsupported(cx, node)
    _check_sizes(cx, node, rule)
    return rule(cx, node)


def _check_sizes(cx: Context, node: fx.Node, rule: Rule) -> None:
    """A channel dim's size (``x.shape[-1]``) used in a computation: its value would change after pruning, so
    those channels are unprunable; only rules that check sizes themselves (``reads_sizes``: reshape) may take
    one."""
    if getattr(rule, "reads_sizes", False):
        return
    for n in flat_nodes((node.args, node.kwargs)):
        if n in cx.sizes:
            cx.mark(cx.sizes[n], f"{describe(node)} computes with the size of a channel dim ({describe(n)}); "
                                 "its value would change")
