"""Feature distillation: block outputs of a traced graph, feature-extraction graphs that share the model's
modules, the OFF loss, and the lookup of the full-precision teacher a scaffold came from. How a block's
output is defined on the graph, and the loss: docs/methods.md#off-distillation.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import torch
import torch.fx as fx

from edgec.core.errors import EdgecError
from edgec.core.fileio import read_data

EPS = 1e-8


# ------------------------------------------------------------------------------------------------ scopes
def _stack_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, value = list(stack.items())[-1]
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return value[0]
    return str(key)


def _common(paths: list[str]) -> str:
    if not paths:
        return ""
    parts = [p.split(".") if p else [] for p in paths]
    out = []
    for items in zip(*parts):
        if all(i == items[0] for i in items):
            out.append(items[0])
        else:
            break
    return ".".join(out)


def node_scopes(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Qualified name of the innermost module whose forward created each node ("" = the top level)."""
    scope: dict[fx.Node, str] = {}
    unknown: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            scope[node] = ""
        elif node.op == "call_module":
            scope[node] = str(node.target)
        elif (path := _stack_path(node)) is not None:
            scope[node] = path
        elif node.op == "get_attr":
            scope[node] = str(node.target).rpartition(".")[0]
        else:
            unknown.append(node)
    # No module stack: top-level code of the traced forward, or a node a pass inserted. It belongs to the
    # innermost scope shared by its known inputs and users (a node inserted inside a block stays inside it,
    # top-level code such as the pooling after the last block lands at the top level).
    for node in unknown:
        near = [scope[n] for n in (*node.all_input_nodes, *node.users) if n in scope]
        scope[node] = _common(near)
    return scope


def _inside(scope: str, path: str) -> bool:
    return scope == path or scope.startswith(path + ".")


def module_paths(gm: fx.GraphModule, scopes: dict | None = None) -> tuple[list[str], set[str]]:
    """All module names the graph runs code of (every prefix of every scope), in first-seen order, and the
    names of the leaf modules (``call_module`` targets)."""
    scopes = node_scopes(gm) if scopes is None else scopes
    seen: dict[str, None] = {}
    for s in scopes.values():
        if not s:
            continue
        parts = s.split(".")
        for i in range(1, len(parts) + 1):
            seen.setdefault(".".join(parts[:i]), None)
    leaves = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    return list(seen), leaves


def output_nodes(gm: fx.GraphModule, names: list[str], scopes: dict | None = None) -> dict[str, fx.Node]:
    """For each module name: the node holding what its forward returned (docs/methods.md#off-distillation)."""
    scopes = node_scopes(gm) if scopes is None else scopes
    out: dict[str, fx.Node] = {}
    for name in names:
        found = None
        for node in gm.graph.nodes:
            if node.op == "output" or not _inside(scopes[node], name):
                continue
            if any(not _inside(scopes[u], name) for u in node.users):
                found = node
        if found is None:
            raise EdgecError(f"feature layer '{name}' produces no value that the rest of the graph uses")
        out[name] = found
    return out


def block_names(gm: fx.GraphModule) -> list[str]:
    """The graph's blocks (docs/methods.md#off-distillation), ordered by where their output is computed."""
    scopes = node_scopes(gm)
    paths, leaves = module_paths(gm, scopes)
    children: dict[str, list[str]] = {}
    for p in paths:
        children.setdefault(p.rpartition(".")[0], []).append(p)

    def indexed(p: str) -> bool:
        return p.rpartition(".")[2].isdigit()

    blocks = []
    for p in paths:
        if not indexed(p) or p in leaves:
            continue
        kids = children.get(p, [])
        if kids and all(indexed(k) and k not in leaves for k in kids):
            continue  # a container of blocks (Sequential/ModuleList of blocks)
        blocks.append(p)
    blocks = [b for b in blocks if not any(_inside(b, a) and a != b for a in blocks)]
    return _by_output_order(gm, blocks, scopes)


def _by_output_order(gm, names, scopes) -> list[str]:
    nodes = output_nodes(gm, names, scopes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(names, key=lambda n: order[nodes[n]])


def resolve_layers(gm: fx.GraphModule, patterns=None, role: str = "model") -> list[str]:
    """Module names for feature distillation: the blocks when ``patterns`` is None/empty, else every module
    (leaf or container) matching a pattern (exact name or fnmatch glob, ``*`` also matches dots); per
    pattern only the outermost matches are kept (``blocks.*`` selects ``blocks.0``, ``blocks.1``, not their
    sub-modules). Ordered by where their output is computed."""
    if not patterns:
        blocks = block_names(gm)
        if not blocks:
            raise EdgecError(f"the {role} has no blocks (indexed sub-modules such as blocks.0 or layer1.0) to "
                             "distil; choose the layers with off_layers (--off-layers GLOB)")
        return blocks
    scopes = node_scopes(gm)
    paths, _ = module_paths(gm, scopes)
    names: list[str] = []
    for pat in patterns:
        hits = [p for p in paths if fnmatch.fnmatchcase(p, pat)]
        hits = [h for h in hits if not any(_inside(h, a) and a != h for a in hits)]
        if not hits:
            blocks = block_names(gm)
            hint = ", ".join(blocks[:6]) + (", ..." if len(blocks) > 6 else "") if blocks else "none"
            raise EdgecError(f"OFF layer '{pat}' matches no module the {role} runs (its blocks: {hint})")
        names += [h for h in hits if h not in names]
    return _by_output_order(gm, names, scopes)


def feature_extractor(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s modules/parameters/buffers that returns
    ``(gm's outputs, (output of names[0], ..., output of names[-1]))``."""
    nodes = output_nodes(gm, names)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output((out, tuple(env[nodes[n]] for n in names)))
    fgm = fx.GraphModule(gm, graph, class_name=type(gm).__name__ + "Features")
    return fgm.train(gm.training)


def check_features(student: dict, teacher: dict) -> None:
    """Refuse features that cannot be compared: missing, not tensors, or different shapes."""
    problems = []
    for name, s in student.items():
        t = teacher.get(name)
        if not isinstance(s, torch.Tensor) or not isinstance(t, torch.Tensor):
            what = type(s if not isinstance(s, torch.Tensor) else t).__name__
            problems.append(f"'{name}' outputs a {what}, not a tensor")
        elif s.ndim < 2:
            problems.append(f"'{name}' outputs shape {list(s.shape)} (no feature dimension)")
        elif s.shape != t.shape:
            problems.append(f"'{name}': student {list(s.shape)} vs teacher {list(t.shape)}")
    if problems:
        raise EdgecError("OFF distillation needs student and teacher features of the same shape, but "
                         + "; ".join(problems) + " — the teacher must be the full-precision model the scaffold "
                         "came from (same blocks and widths)")


# ------------------------------------------------------------------------------------------------ loss
def feature_dim(t: torch.Tensor) -> int:
    """The dimension the OFF cosine runs over: channels (1) for >= 4-D maps, else the last."""
    return 1 if t.ndim >= 4 else t.ndim - 1


def off_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean over positions of 1 − cos(student, teacher), cosine over :func:`feature_dim`."""
    if student.shape != teacher.shape:
        raise EdgecError(f"OFF: student feature {list(student.shape)} vs teacher {list(teacher.shape)}")
    dim = feature_dim(student)
    s, t = student.float(), teacher.detach().float()
    num = (s * t).sum(dim)
    den = ((s * s).sum(dim) * (t * t).sum(dim)).clamp_min(EPS * EPS).sqrt()
    return (1.0 - num / den).mean()


def off_loss(student: dict, teacher: dict, names: list[str] | None = None) -> tuple[torch.Tensor, dict]:
    """``mean over layers of off_distance`` and the per-layer values (detached)."""
    names = list(student) if names is None else names
    if not names:
        raise EdgecError("OFF: no feature layers")
    per = {n: off_distance(student[n], teacher[n]) for n in names}
    total = torch.stack(list(per.values())).mean()
    return total, {n: v.detach() for n, v in per.items()}


# ------------------------------------------------------------------------------------------------ teacher
def scaffold_sources(model) -> list[str]:
    """Input digests to look for, newest first: the newest ``scaffold.*`` record's input, then (for a chain
    of scaffolds applied one after another) the inputs of the scaffold records directly before it."""
    recs = list(getattr(model, "provenance", []) or [])
    idx = [i for i, r in enumerate(recs) if str(r.get("pass", "")).startswith("scaffold.") and r.get("input_digest")]
    if not idx:
        return []
    out = [recs[idx[-1]]["input_digest"]]
    i = idx[-1]
    while i > 0:
        prev = recs[i - 1]
        if str(prev.get("pass", "")).startswith("scaffold.") and prev.get("input_digest") and \
                prev.get("output_digest") == recs[i]["input_digest"]:
            out.append(prev["input_digest"])
            i -= 1
        else:
            break
    return out


def _stored_digest(path: Path) -> str | None:
    """The ``digest`` field of an edgec checkpoint (memory-mapped, so the tensors are not read)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a (zip) torch file: fall back to the checked reader
        try:
            obj = read_data(path)
        except EdgecError:
            return None
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("edgec.checkpoint/"):
        d = obj.get("digest")
        return d if isinstance(d, str) else None
    return None


def find_teacher(model_path, model, mode: str = "off", exclude=()) -> tuple[Path, str]:
    """The full-precision checkpoint the scaffold came from: a ``.pt`` file next to ``model_path`` whose stored
    digest equals a scaffold record's ``input_digest`` (see :func:`scaffold_sources`). Returns
    ``(path, digest)``; raises a clear EdgecError when there is none."""
    model_path = Path(model_path)
    wanted = scaffold_sources(model)
    if not wanted:
        raise EdgecError(f"--distill {mode} needs a teacher: pass --teacher CKPT ({model_path.name} records no "
                         "scaffold pass, so there is no full-precision checkpoint to look for)")
    skip = {os.path.realpath(p) for p in (model_path, *exclude)}
    folder = model_path.resolve().parent
    found: dict[str, Path] = {}
    for p in sorted(folder.glob("*.pt")):
        if os.path.realpath(p) in skip or not p.is_file():
            continue
        d = _stored_digest(p)
        if d in wanted and d not in found:
            found[d] = p
    for d in wanted:
        if d in found:
            return found[d], d
    raise EdgecError(f"--distill {mode} needs a teacher: pass --teacher CKPT (the full-precision checkpoint the "
                     f"scaffold came from, digest {wanted[0][:12]}…, was not found next to {model_path.name})")


# ------------------------------------------------------------------------------------------------ binary
def has_binary_scaffold(gm: torch.nn.Module) -> bool:
    """Whether ``gm`` holds binary scaffolds (scaffold.binary layers not yet folded)."""
    return any(getattr(m, "kind", None) == "binary" and getattr(m, "folded_by", None) == "fold.binary"
               for m in gm.modules())
