"""Input specifications: what a model consumes, used by tracing, export, eval and profiling.

A spec is plain data (no torch import at module level) so the CLI can describe models cheaply.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from edgec.core.errors import EdgecError


@dataclass(frozen=True)
class Dim:
    """A dynamic axis: `example` is the traced size, `alt` a second size used to prove the export is dynamic."""

    name: str
    example: int
    alt: int
    min: int = 1
    max: int = 4096

    def check_size(self, alt: bool = False) -> int:
        """The size equivalence and parity checks use: ``example``/``alt`` unless both exceed CHECK_SIZE, else
        CHECK_SIZE and about half of it (odd where ``alt - example`` is odd; within min..max; two different
        sizes). A short sequence runs the same code as a long one, at a fraction of the cost."""
        if min(self.example, self.alt) <= CHECK_SIZE:
            return self.alt if alt else self.example
        example = min(max(self.min, CHECK_SIZE), self.max)
        if not alt:
            return example
        other = min(max(self.min, CHECK_SIZE // 2 + (self.alt - self.example) % 2), self.max)
        if other == example:
            other = example + 1 if example < self.max else example - 1
        return other


# Dynamic axes whose traced and alternative sizes both exceed this are checked at this size and about half
# of it (Dim.check_size).
CHECK_SIZE = 32


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple  # each an int (static) or a Dim (dynamic)
    dtype: str = "float32"  # "float32" | "int64" | "bool"
    high: int | None = None  # int inputs: values drawn from [0, high)
    ones: bool = False  # int inputs that are masks: all ones in samples

    def shape(self, alt: bool = False, check: bool = False) -> tuple[int, ...]:
        """The traced (``alt``: the alternative) shape; ``check``: the small shapes checks run at."""
        if check:
            return tuple(d if isinstance(d, int) else d.check_size(alt) for d in self.dims)
        return tuple(d if isinstance(d, int) else (d.alt if alt else d.example) for d in self.dims)


@dataclass(frozen=True)
class InputSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...] = ("logits",)
    # "classification" | "regression" | "features": decides metrics and default losses
    task: str = "classification"
    extra: dict = field(default_factory=dict)

    def sample(self, seed: int = 0, alt: bool = False, batch: int | None = None, check: bool = False):
        """Deterministic sample inputs (a tuple of tensors, in input order). ``check``: at the small check shapes
        (``Dim.check_size``) that equivalence and parity checks use."""
        import torch

        g = torch.Generator().manual_seed(seed)
        out = []
        for t in self.inputs:
            shape = list(t.shape(alt, check=check))
            if batch is not None and t.dims and not isinstance(t.dims[0], int):
                shape[0] = batch
            if t.dtype in ("int64", "bool"):
                dtype = torch.int64 if t.dtype == "int64" else torch.bool
                if t.ones:
                    out.append(torch.ones(shape, dtype=dtype))
                else:
                    high = (t.high or 2) if t.dtype == "int64" else 2
                    out.append(torch.randint(0, high, shape, generator=g, dtype=torch.int64).to(dtype))
            else:
                out.append(torch.randn(shape, generator=g))
        return tuple(out)

    def check_sample(self, seed: int = 0, alt: bool = False):
        """``sample(seed, alt, check=True)``, or, for a subclass whose ``sample`` override takes no ``check``, its
        own sample at the traced shapes (it may shape its inputs in ways the small shapes would not keep)."""
        import inspect

        if "check" in inspect.signature(self.sample).parameters:
            return self.sample(seed=seed, alt=alt, check=True)
        return self.sample(seed=seed, alt=alt)

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


# --- example inputs from text (--input-shape) and plain data (checkpoints) ---------------------------

DTYPES = {"float32": "float32", "float": "float32", "int64": "int64", "long": "int64", "bool": "bool"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*$")


def token_dims(max_seq: int) -> tuple[Dim, Dim]:
    """``(batch, seq)`` dims of a token model whose positions stop at ``max_seq``: examples stay >= 2 (torch.export
    specialises sizes 0/1) and within the position table, the alternative shape differs from the example."""
    example = max(2, min(32, max_seq))
    alt = max(2, min(19, max_seq - 1)) if example != 19 else 17
    return Dim("batch", example=2, alt=3, min=1), Dim("seq", example=example, alt=alt, min=1, max=max_seq)


def parse_input_shape(text: str) -> tuple[str | None, tuple, str]:
    """``NAME=d1xd2x...[:dtype]`` → ``(name, dims, dtype)``; ``name`` is None when left out. Each dim is an
    int (static), a name (dynamic: ``B``) or ``(name, example)`` (``T=64``). Dims are separated by ``x``, or by
    commas when the text has any (so a dim name may contain an x: ``1,max_len=64``)."""
    raw = str(text).strip()
    hint = "expected NAME=1x3x32x32[:float32|int64|bool], dims ints or names (B, T=64)"
    body, colon, dtype = raw.rpartition(":")
    if not colon:
        body, dtype = raw, "float32"
    if dtype.strip().lower() not in DTYPES:
        raise EdgecError(f"--input-shape '{raw}': unknown dtype '{dtype}'; {hint}")
    name, eq, dims_text = body.partition("=")
    if not eq or not _NAME.match(name.strip()):  # "1x3x32" or "1xT=64": no input name
        name, dims_text = None, body
    parts = [p.strip() for p in re.split(r"," if "," in dims_text else r"[x×]", dims_text)]
    if not parts or any(not p for p in parts):
        raise EdgecError(f"--input-shape '{raw}': empty dimension; {hint}")
    return (name.strip() if name else None), tuple(_parse_dim(p, raw, hint) for p in parts), DTYPES[dtype.strip().lower()]


def _parse_dim(part: str, raw: str, hint: str):
    if part.isdigit():
        if int(part) < 1:
            raise EdgecError(f"--input-shape '{raw}': sizes must be >= 1; {hint}")
        return int(part)
    dim_name, eq, size = part.partition("=")
    if not _NAME.match(dim_name) or (eq and not size.isdigit()) or (eq and int(size) < 1):
        raise EdgecError(f"--input-shape '{raw}': bad dimension '{part}'; {hint}")
    return (dim_name, int(size)) if eq else dim_name


def _dynamic(name: str, example: int, batch: bool) -> Dim:
    """A dynamic axis. The traced example is at least 2: torch.export specialises axes of size 1 to constants,
    so a batch given as 1 is traced at 2 (alt 3); other axes take a smaller alt, so position tables with a
    maximum fit."""
    example = max(2, example)
    alt = example + 1 if batch else max(1, example // 2)
    if alt == example:
        alt = example + 1
    return Dim(name, example=example, alt=alt)


def build_spec(entries, *, vocab: int | None = None, outputs=None) -> InputSpec:
    """An InputSpec from ``[(name, dims, dtype)]`` (dims: int | name | (name, example)). Inference: axis 0 is a
    dynamic batch (traced at 2, alt 3) unless named; for int64 inputs of rank 2 axis 1 is a dynamic sequence;
    int64 inputs sample in ``[0, vocab)``; an int/bool input whose name contains "mask" samples as ones. Dims
    with the same name are one Dim (their examples must agree)."""
    named: dict[str, Dim] = {}
    tensors = []
    for name, dims, dtype in entries:
        dtype = DTYPES.get(str(dtype).lower(), dtype)
        if dtype not in ("float32", "int64", "bool"):
            raise EdgecError(f"input '{name}': unknown dtype '{dtype}' (float32, int64 or bool)")
        out = []
        for axis, d in enumerate(dims):
            if isinstance(d, bool) or not isinstance(d, (int, str, tuple, list)):
                raise EdgecError(f"input '{name}' axis {axis}: expected an int, a name or (name, size), got {d!r}")
            if isinstance(d, int):
                if d < 1:
                    raise EdgecError(f"input '{name}' axis {axis}: sizes must be >= 1, got {d}")
                if axis == 0:
                    d = ("batch", d)
                elif axis == 1 and dtype == "int64" and len(dims) == 2:
                    d = ("seq", d)
                else:
                    out.append(d)
                    continue
            dim_name, example = (d, None) if isinstance(d, str) else (str(d[0]), int(d[1]))
            out.append(_named_dim(named, name, axis, dim_name, example))
        high = vocab if dtype == "int64" else None
        ones = dtype != "float32" and "mask" in str(name).lower()
        tensors.append(TensorSpec(str(name), tuple(out), dtype=dtype, high=high, ones=ones))
    return InputSpec(tuple(tensors), outputs=tuple(outputs) if outputs else ("logits",))


def _named_dim(named: dict, tensor: str, axis: int, dim_name: str, example: int | None) -> Dim:
    have = named.get(dim_name)
    if have is not None:
        if example is not None and max(2, example) != have.example:
            raise EdgecError(f"dimension '{dim_name}' is {have.example} in one input and {example} in '{tensor}'; "
                             "one name, one size")
        return have
    if example is None:
        if axis != 0:
            raise EdgecError(f"input '{tensor}' axis {axis}: give the example size of '{dim_name}', "
                             f"e.g. {dim_name}=64")
        example = 1
    named[dim_name] = dim = _dynamic(dim_name, example, batch=axis == 0)
    return dim


def spec_to_dict(spec: InputSpec) -> dict:
    """Plain data (JSON-able) with everything: checkpoints store it."""
    def dim(d):
        return d if isinstance(d, int) else {"name": d.name, "example": d.example, "alt": d.alt, "min": d.min,
                                             "max": d.max}

    return {"inputs": [{"name": t.name, "dims": [dim(d) for d in t.dims], "dtype": t.dtype, "high": t.high,
                        "ones": t.ones} for t in spec.inputs],
            "outputs": list(spec.outputs), "task": spec.task, "extra": dict(spec.extra)}


def spec_from_dict(data: dict) -> InputSpec:
    """The inverse of :func:`spec_to_dict` (dims shared by name stay one Dim)."""
    dims: dict = {}

    def dim(d):
        if isinstance(d, int):
            return d
        key = (d["name"], d["example"], d["alt"], d["min"], d["max"])
        return dims.setdefault(key, Dim(*key))

    inputs = tuple(TensorSpec(t["name"], tuple(dim(d) for d in t["dims"]), dtype=t["dtype"], high=t.get("high"),
                              ones=bool(t.get("ones"))) for t in data["inputs"])
    return InputSpec(inputs, outputs=tuple(data.get("outputs") or ("logits",)), task=data.get("task", "classification"),
                     extra=dict(data.get("extra") or {}))
