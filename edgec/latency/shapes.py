"""Input shapes for profiling and measurement: resolving a model's input spec to concrete shapes and feeds."""
from __future__ import annotations

import re

import numpy as np

from edgec.core.errors import EdgecError
from edgec.core.spec import parse_input_shape


def resolve_shapes(spec, shapes=None, batch: int | None = None) -> dict[str, tuple[int, ...]]:
    """``{input name: shape}``: the spec's traced shapes with the batch axis set to ``batch`` (default 1),
    overridden by ``shapes`` (a dict by name, or a sequence of shapes in input order). Checked against the
    spec: rank, static axes, and the bounds of dynamic axes."""
    batch = 1 if batch is None else int(batch)
    if batch < 1:
        raise EdgecError(f"batch must be >= 1, got {batch}")
    out = {}
    for t in spec.inputs:
        shape = list(t.shape())
        if t.dims and not isinstance(t.dims[0], int):
            shape[0] = batch
        out[t.name] = tuple(shape)
    if shapes is None:
        return out
    if not isinstance(shapes, dict):
        shapes = list(shapes)
        if len(shapes) != len(spec.inputs):
            raise EdgecError(f"the model takes {len(spec.inputs)} input(s) "
                             f"({', '.join(t.name for t in spec.inputs)}), got {len(shapes)} shape(s)")
        shapes = {t.name: s for t, s in zip(spec.inputs, shapes)}
    unknown = [n for n in shapes if n not in out]
    if unknown:
        raise EdgecError(f"no model input named {', '.join(map(str, unknown))}; "
                         f"inputs: {', '.join(t.name for t in spec.inputs)}")
    for t in spec.inputs:
        if t.name not in shapes:
            continue
        shape = tuple(int(d) for d in shapes[t.name])
        if len(shape) != len(t.dims):
            raise EdgecError(f"input '{t.name}' has {len(t.dims)} axes, the shape {list(shape)} has {len(shape)}")
        for axis, (d, v) in enumerate(zip(t.dims, shape)):
            if isinstance(d, int):
                if v != d:
                    raise EdgecError(f"input '{t.name}' axis {axis} is fixed at {d}, got {v}")
            elif not d.min <= v <= d.max:
                raise EdgecError(f"input '{t.name}' axis {axis} ({d.name}) must be in [{d.min}, {d.max}], got {v}")
        out[t.name] = shape
    return out


def parse_input_shapes(spec, texts) -> dict[str, tuple[int, ...]] | None:
    """CLI ``--input-shape`` values: ``NAME=1x200x40`` (or ``1,200,40``); the name may be left out for a
    single-input model. Returns ``{name: shape}`` (checked by :func:`resolve_shapes`), or None for none."""
    if not texts:
        return None
    names = [t.name for t in spec.inputs]
    shapes = {}
    for text in texts:
        name, sep, dims = str(text).partition("=")
        if not sep:
            if len(names) != 1:
                raise EdgecError(f"--input-shape '{text}': name the input (NAME=1x2x3); inputs: {', '.join(names)}")
            name, dims = names[0], text
        parts = [p for p in re.split(r"[x,×\s]+", dims.strip()) if p]
        if parts and not all(p.isdigit() for p in parts):
            parts = _example_sizes(spec, name.strip(), text)  # the example-input grammar: B, T=64, :dtype
        if not parts or not all(str(p).isdigit() for p in parts):
            raise EdgecError(f"--input-shape '{text}': expected positive integers like 1x200x40")
        shapes[name.strip()] = tuple(int(p) for p in parts)
    resolve_shapes(spec, shapes)
    return shapes


def _example_sizes(spec, name: str, text: str) -> list:
    """Sizes from ``NAME=1xT=64[:dtype]`` (edgec.core.spec.parse_input_shape): a named dim without a size
    takes the spec's traced size at that axis."""
    _, dims, _ = parse_input_shape(text if "=" in str(text) else f"{name}={text}")
    traced = next((t.shape() for t in spec.inputs if t.name == name), ())
    return [str(d if isinstance(d, int) else d[1] if isinstance(d, tuple) else traced[i] if i < len(traced) else 1)
            for i, d in enumerate(dims)]


def make_inputs(spec, shapes: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs at ``shapes`` following the spec (float: normal; int: in ``[0, high)``, or ones for masks)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for t in spec.inputs:
        shape = tuple(shapes[t.name])
        if t.dtype == "int64":
            feed[t.name] = (np.ones(shape, np.int64) if t.ones
                            else rng.integers(0, t.high or 2, size=shape, dtype=np.int64))
        else:
            feed[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feed
