"""DistributedDataParallel glue for ``torchrun`` (one process per device; a plain single process without
``WORLD_SIZE``). The conventions that decide results (global batch, shuffling, validation on every rank,
rank-0 writes, per-rank seeds) are in docs/methods.md#logits-distillation with the fine-tuning recipe.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from edgec.core.errors import EdgecError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise EdgecError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None


def current() -> DistInfo:
    """Rank and world size of the running process group (single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                        dist.get_backend())
    return DistInfo()


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed), also before the process group exists (reads RANK)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def session():
    """Initialise the process group from the torchrun environment if needed; yield a :class:`DistInfo`."""
    created = False
    if env_world_size() > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise EdgecError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise EdgecError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set; "
                             "launch with: torchrun --standalone --nproc_per_node N ...")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        created = True
    try:
        yield current()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def device_for(info: DistInfo, device: str | None) -> torch.device:
    """``None``/"auto": this rank's CUDA device when CUDA is available, else the CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank if info.distributed else torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EdgecError(f"device {device} requested but CUDA is not available")
    if dev.type == "cuda" and info.distributed and dev.index is None:
        dev = torch.device("cuda", info.local_rank)
    return dev


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few float64 numbers over ranks (identity when single process)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if not info.distributed:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` when single process)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device, find_unused: bool):
    """DistributedDataParallel around ``module`` (returned unchanged when single process)."""
    if not info.distributed:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused)
