"""Typed results of the API calls; ``to_dict()`` gives the JSON that ``--json`` prints and report.json holds."""
from __future__ import annotations

from dataclasses import dataclass, fields


class Result:
    """Base of the result dataclasses: ``to_dict()`` is the fields in declaration order."""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class SavedCheckpoint(Result):
    output: str
    arch: str
    params: int
    bytes: int
    digest: str
    file_bytes: int


@dataclass(frozen=True)
class ZooCreateResult(SavedCheckpoint):
    config: dict
    seed: int


@dataclass(frozen=True)
class ImportResult(SavedCheckpoint):
    config: dict


@dataclass(frozen=True)
class ScaffoldResult(SavedCheckpoint):
    input: str
    before: dict
    summary: str
    checks: dict
    scaffold_params: dict
    scaffolds: int


@dataclass(frozen=True)
class FoldResult(SavedCheckpoint):
    input: str
    before: dict
    folded: bool
    passes: list
    summary: str
    scaffolds_left: int


@dataclass(frozen=True)
class ExportResult(Result):
    input: str
    output: str
    file_bytes: int
    sha256: str
    opset: int
    weights: str
    params: int
    checks: dict
    max_rel_error: float
    passes: int
    size: dict | None
    lowbit_layers: list | None
    fp32_layers: list | None


@dataclass(frozen=True)
class ProfileResult(Result):
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

    report: dict

    def to_dict(self) -> dict:
        return self.report


@dataclass(frozen=True)
class CheckpointInfo(Result):
    """``edgec inspect`` of a .pt checkpoint."""

    kind: str
    file: str
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

    kind: str
    file: str
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
