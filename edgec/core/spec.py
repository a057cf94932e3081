"""Input specifications: what a model consumes, used by tracing, export, eval and profiling.

A spec is plain data (no torch import at module level) so the CLI can describe models cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Dim:
    """A dynamic axis: `example` is the traced size, `alt` a second size used to prove the export is dynamic."""

    name: str
    example: int
    alt: int
    min: int = 1
    max: int = 4096


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple  # each an int (static) or a Dim (dynamic)
    dtype: str = "float32"  # "float32" | "int64"
    high: int | None = None  # int inputs: values drawn from [0, high)
    ones: bool = False  # int inputs that are masks: all ones in samples

    def shape(self, alt: bool = False) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else (d.alt if alt else d.example) for d in self.dims)


@dataclass(frozen=True)
class InputSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...] = ("logits",)
    # "classification" | "regression" | "features": decides metrics and default losses
    task: str = "classification"
    extra: dict = field(default_factory=dict)

    def sample(self, seed: int = 0, alt: bool = False, batch: int | None = None):
        """Deterministic sample inputs (a tuple of tensors, in input order)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        out = []
        for t in self.inputs:
            shape = list(t.shape(alt))
            if batch is not None and t.dims and not isinstance(t.dims[0], int):
                shape[0] = batch
            if t.dtype == "int64":
                if t.ones:
                    out.append(torch.ones(shape, dtype=torch.int64))
                else:
                    out.append(torch.randint(0, t.high or 2, shape, generator=g, dtype=torch.int64))
            else:
                out.append(torch.randn(shape, generator=g))
        return tuple(out)

    def dynamic_dims(self) -> list[dict[int, Dim]]:
        return [{i: d for i, d in enumerate(t.dims) if isinstance(d, Dim)} for t in self.inputs]

    def to_json(self) -> dict:
        def dim(d):
            return d if isinstance(d, int) else d.name

        return {
            "inputs": [{"name": t.name, "shape": [dim(d) for d in t.dims], "dtype": t.dtype} for t in self.inputs],
            "outputs": list(self.outputs),
            "task": self.task,
        }
