"""What ``finetune_file`` returns: a typed result whose ``to_dict()`` is the JSON the CLI prints."""
from __future__ import annotations

from dataclasses import dataclass

from edgec.core.result import Result


@dataclass(frozen=True)
class FinetuneResult(Result):
    """One fine-tuning run; every rank returns one, ``written`` is true on rank 0 only."""

    SCHEMA = "edgec.finetune/1"

    output: str
    written: bool
    rank: int
    world_size: int
    input: str
    arch: str
    data: str
    data_digest: str
    task: str
    classes: list | None
    best_epoch: int
    monitor: str
    best: dict
    history: list
    steps: int
    final_lr: float
    device: str
    batch_size_per_process: int
    resumed_from: int | None
    resume_file: str | None
    digest: str
    params: int
    bytes: int
    notes: list
    distill: dict
    seconds: float
    train_seconds: float
    fsdp: dict | None = None  # {world, units, params_total_bytes, params_per_rank_bytes} under --fsdp
