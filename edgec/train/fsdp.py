"""Fully sharded data parallel (torch's ``fully_shard``, "FSDP2") for fine-tuning under ``torchrun``: every
process holds 1/world of each sharded parameter, its gradient and its AdamW states; a unit's full parameters
exist only while its forward or backward runs (all-gather before, reduce-scatter of the gradients after).

Shard units. An edgec model is a ``torch.fx.GraphModule`` whose graph calls leaf modules (Linear, Embedding,
scaffold layers) directly; container modules' forwards never run, so FSDP hooks on a container would never
fire. The units are therefore the modules the graph calls (``call_module`` nodes) that own parameters, plus
the root, which takes every remaining parameter: those read through ``get_attr`` (e.g.
RMSNorm weights), those of a module called more than once, tied parameters (one tensor under two names,
e.g. the llama's tied embedding/head: FSDP requires a shared parameter to sit in the unit of the lowest
common ancestor, so it stays tied) and binary scaffolds (their ``aux`` outputs, which the latent-weight
supervision's cosine term reads, bypass the hooks FSDP puts on a module's output, so their backward would
find the parameters resharded). The root's parameters are gathered once per step and stay gathered until
its backward ends; those of the other units only while the unit's forward or backward runs. Called
modules of one block (``model.layers.3.*``) share one unit (``fully_shard`` of a list: one collective).

Numerics. The gradient reduce-scatter averages over processes like DDP's all-reduce, clipping uses the
global norm, AdamW is element-wise: a run equals the DDP run of the same seeds and data order up to float
summation order. Buffers are not sharded (BatchNorm statistics: as with DDP, rank 0's are broadcast at
each epoch end). Checkpoints and resume files hold the full (gathered) state dict, so the output checkpoint
is the same format as a single-process or DDP run's.
"""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from edgec.core.errors import EdgecError
from edgec.layers.binary import binary_layers
from edgec.train import distributed as D


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def shard_units(gm: torch.nn.Module) -> list[list[str]]:
    """The FSDP units below the root: groups of module names, each group one all-gather / reduce-scatter
    (see the module docstring). A module qualifies when the graph calls it once, it owns parameters, none of
    them tied or read through ``get_attr``, no other called module lies beneath it, and it is not a binary
    scaffold (whose ``aux`` outputs feed a loss term outside the module's output). Qualifying modules
    in the same block (the name up to its first numeric part, ``model.layers.3``) form one group; the
    others (``model.embed_tokens``, ``lm_head``) are a group each."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return []
    calls: dict[str, int] = {}
    attrs: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        elif node.op == "get_attr":
            attrs.append(str(node.target))
    owners: dict[int, int] = {}
    for _, p in gm.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    aux = {id(m) for m in binary_layers(gm)}
    groups: dict[str, list[str]] = {}
    for name, count in calls.items():
        params = list(gm.get_submodule(name).parameters())
        if not params or count > 1 or any(owners[id(p)] > 1 for p in params):  # tied: the root's
            continue
        if any(a.startswith(name + ".") for a in attrs):  # read outside its forward
            continue
        if any(c.startswith(name + ".") for c in calls):  # a called module beneath it
            continue
        if id(gm.get_submodule(name)) in aux:  # its aux outputs carry gradients past FSDP's output hooks
            continue
        groups.setdefault(_block(name), []).append(name)
    return list(groups.values())


def _block(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def check_world(info: D.DistInfo) -> None:
    """FSDP needs a process group of 2 or more (a single process would hold every shard)."""
    if not info.distributed:
        raise EdgecError("fsdp shards the model across processes: launch with torchrun --nproc-per-node N "
                         "(N >= 2), or drop --fsdp")


def shard(gm: torch.nn.Module, info: D.DistInfo, device: torch.device) -> dict:
    """Apply ``fully_shard`` to ``gm`` in place (units, then the root); return the report's ``fsdp`` entry:
    ``{world, units, params_total_bytes, params_per_rank_bytes}`` (bytes of unique parameters; per rank: the
    local shards each process holds, gathered over ranks)."""
    check_world(info)
    total = sum(p.numel() * p.element_size() for p in gm.parameters())
    mesh = init_device_mesh(device.type, (info.world_size,))
    units = shard_units(gm)
    for names in units:
        modules = [gm.get_submodule(n) for n in names]
        fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh)
    fully_shard(gm, mesh=mesh)
    local = sum(_local(p).numel() * p.element_size() for p in gm.parameters())
    per_rank = [int(b) for b in D.gather_objects(int(local), info)]
    return {"world": info.world_size, "units": len(units) + 1, "params_total_bytes": int(total),
            "params_per_rank_bytes": per_rank}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(gm: torch.nn.Module) -> dict:
    """A CPU copy of ``gm``'s state dict with every sharded tensor gathered (collective under FSDP: every
    rank calls it; every rank gets the full dict)."""
    return {k: _full(v).detach().to("cpu", copy=True) for k, v in gm.state_dict().items()}


def load_full_state_dict(gm: torch.nn.Module, state_dict: dict, path) -> None:
    """Load a full (unsharded) state dict into a sharded ``gm``; every rank holds the same ``state_dict``."""
    have, got = set(gm.state_dict()), set(state_dict)
    if have != got:
        diff = sorted(have ^ got)
        raise EdgecError(f"{path}: its weights do not fit the model ({len(diff)} key(s) differ, e.g. {diff[0]})")
    set_model_state_dict(gm, state_dict, options=StateDictOptions(full_state_dict=True, strict=True))


def optimizer_state_dict(gm: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state (keyed by parameter name), on rank 0; empty on the others (collective)."""
    return get_optimizer_state_dict(gm, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                            cpu_offload=True))


def load_optimizer_state_dict(gm: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(gm, optimizer, state, options=StateDictOptions(full_state_dict=True))


def clip_grad_norm(params, max_norm: float) -> float:
    """``clip_grad_norm_`` over (possibly sharded) parameters; the global norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    return float(_full(norm))

