"""What ``prune_file`` returns: a typed result whose ``to_dict()`` is the JSON the CLI prints."""
from __future__ import annotations

from dataclasses import dataclass

from edgec.core.result import Result


@dataclass(frozen=True)
class PruneResult(Result):
    """One pruning run (see docs/methods.md#alcs). Times are milliseconds of one ``session.run``; ``*_ms``
    without qualifier are local measurements, ``*_table_ms`` are in the latency table's units."""

    SCHEMA = "edgec.prune/1"

    output: str
    input: str
    arch: str
    budget_ms: float
    local_budget_ms: float
    budget_from: str  # "ms" | "ratio"
    latency_ratio: float | None
    dense_ms: float
    estimated_ms: float
    measured_ms: float
    measured_runs_ms: list
    estimated_table_ms: float
    calibration: dict
    speedup: float | None
    min_reachable_ms: float
    table_foreign: bool
    params: int  # of the pruned model
    macs: int
    before: dict  # the input model's {params, macs}
    flop_reduction: float | None
    densities: dict
    kept: dict
    retries: int
    attempts: list
    pattern: str
    pattern_chosen: str
    simd: dict | None
    model_error: float | None
    mode: str  # "one-shot" | "admm" | "finetune"
    admm: dict | None
    finetune: dict | None
    table: dict
    digest: str
    notes: list
    skipped: list  # [{"layer": group, "reason"}]: channel groups left at full density, and why
    seconds: float
    threads: int
    batch: int
    input_shapes: dict
    importance: str  # "taylor" | "l2": what the allocation traded against latency
    floor_check: dict | None  # the table's fastest configuration, measured, when the budget was below its estimate
    search: list | None  # the measured search of the allocation target: one row per probed structure
    # filled by the file API (edgec.app.gates.release_pruned); None from prune_file / prune_model alone
    gates: dict | None = None  # the quality gates' report; None when none were set
    damage: dict | None = None  # accuracy damage: measured on --data, else estimated on random inputs
