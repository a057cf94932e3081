"""Typed results of the API calls; ``to_dict()`` gives the JSON that ``--json`` prints and report.json holds.
Each class names its schema (``SCHEMA``); docs/json.md documents every key (tests/unit/test_json_schemas.py
keeps the two in step)."""
from __future__ import annotations

from dataclasses import dataclass

from edgec.core.result import Result


@dataclass(frozen=True)
class ZooListResult(Result):
    """``edgec zoo list``: one row per architecture."""

    SCHEMA = "edgec.zoo.list/1"

    models: list


@dataclass(frozen=True)
class SavedCheckpoint(Result):
    SCHEMA = "edgec.checkpoint/1"

    output: str
    arch: str
    params: int
    bytes: int
    digest: str
    file_bytes: int


@dataclass(frozen=True)
class ZooCreateResult(SavedCheckpoint):
    SCHEMA = "edgec.zoo.create/1"

    config: dict
    seed: int


@dataclass(frozen=True)
class ImportResult(SavedCheckpoint):
    SCHEMA = "edgec.import/1"

    config: dict


@dataclass(frozen=True)
class ScaffoldResult(SavedCheckpoint):
    SCHEMA = "edgec.scaffold/1"

    input: str
    before: dict
    summary: str
    skipped: list  # [{"layer", "reason"}]: weight layers the scaffold left full precision, and why
    checks: dict
    scaffold_params: dict
    scaffolds: int


@dataclass(frozen=True)
class FoldResult(SavedCheckpoint):
    SCHEMA = "edgec.fold/1"

    input: str
    before: dict
    folded: bool
    passes: list
    summary: str
    skipped: list  # [{"layer", "reason"}]: BatchNorms and scaffolds no fold could handle, and why
    scaffolds_left: int


@dataclass(frozen=True)
class ExportResult(Result):
    SCHEMA = "edgec.export/1"

    input: str
    output: str
    file_bytes: int
    sha256: str
    opset: int
    weights: str
    params: int
    checks: dict
    max_rel_error: float
    provenance_records: int
    size: dict | None
    lowbit_layers: list | None
    fp32_layers: list | None
    card: str | None = None  # the model card written beside the ONNX file (edgec.app.card)
    gates: dict | None = None  # the quality gates' report (edgec.app.gates.judge); None when none were set
    # with --data and INT2 weights: metrics and parity at both activation precisions (edgec.app.api)
    activation_precisions: dict | None = None
    # INT2 only: forms asked, activation precision, target session, and forms=auto's whole-file check (with ms)
    forms: dict | None = None


@dataclass(frozen=True)
class ProfileResult(Result):
    SCHEMA = "edgec.profile/1"

    input: str
    output: str
    key: dict
    dense_ms: float
    remainder_ms: float | None
    units: list
    patterns: list
    densities: list
    cache_hit: bool
    warnings: list
    plot: str | None


@dataclass(frozen=True)
class EvalResult(Result):
    """The evaluation protocol's report (edgec.evaluation.evaluate), kept as the dict it returns."""

    SCHEMA = "edgec.eval/1"

    report: dict

    def to_dict(self) -> dict:
        return {"schema": self.SCHEMA, **self.report}


@dataclass(frozen=True)
class CheckpointInfo(Result):
    """``edgec inspect`` of a .pt checkpoint."""

    SCHEMA = "edgec.inspect.checkpoint/1"

    kind: str
    input: str
    file_bytes: int
    arch: str
    config: dict
    params: int
    bytes: int
    digest: str
    spec: dict
    modules: dict
    scaffolds: list
    layers: list
    bits: dict
    structural_passes: list
    provenance: list


@dataclass(frozen=True)
class OnnxInfo(Result):
    """``edgec inspect`` of an ONNX file."""

    SCHEMA = "edgec.inspect.onnx/1"

    kind: str
    input: str
    file_bytes: int
    ir_version: int
    opsets: dict
    producer: str
    inputs: list
    outputs: list
    params: int
    initializer_bytes: int
    initializer_dtypes: dict
    nodes: int
    ops: dict
    arch: str | None
    checkpoint_digest: str | None
    provenance: list
