"""Reading ONNX files edgec is given (``inspect``, ``eval``): bounded, parsed without external data, and checked
before anything else touches them, so a malformed file is one EdgecError line (exit 2), never a crash or a huge
allocation. Checks: graph outputs exist; every element type is one ONNX defines; dims are sane; each
initializer's data matches its dims; the ``edgec.provenance`` metadata parses within limits and fits its schema
(edgec.core.schema). onnxruntime still validates the graph itself when a session is created."""
from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import TensorProto

from edgec.core.errors import EdgecError
from edgec.onnx.export import read_provenance

MAX_ONNX_BYTES = 2 * 1024**3  # protobuf's own limit for one message
MAX_RANK = 64
MAX_DIM_VALUE = (1 << 31) - 1
KNOWN_TYPES = frozenset(v for v in TensorProto.DataType.values() if v != TensorProto.UNDEFINED)
# bits per element of the packed sub-byte types (the others are whole bytes). In raw_data they are packed; in
# int32_data 4- and 2-bit values are packed one byte per entry, 6-bit ones stored one per entry.
_SUB_BYTE_BITS = {getattr(TensorProto, name, -i): bits for i, (name, bits) in enumerate(
    (("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)),
    start=1)}


def read_onnx(path: str | Path) -> tuple[bytes, onnx.ModelProto]:
    """``(bytes, proto)`` of a single-file ONNX model, checked (module docstring)."""
    path = Path(path)
    if not path.exists():
        raise EdgecError(f"no such file: {path}")
    if not path.is_file():
        raise EdgecError(f"{path} is not a regular file (an ONNX model is one file)")
    size = path.stat().st_size
    if size == 0:
        raise EdgecError(f"{path} is empty")
    if size > MAX_ONNX_BYTES:
        raise EdgecError(f"{path}: {size} bytes, more than an ONNX file can hold ({MAX_ONNX_BYTES})")
    data = path.read_bytes()
    return data, parse_onnx(data, str(path))


def parse_onnx(data: bytes, what: str = "ONNX model") -> onnx.ModelProto:
    """Parse (no external data is ever loaded) and :func:`check_onnx`."""
    try:
        proto = onnx.load_model_from_string(bytes(data))
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError, RecursionError, invalid UTF-8 ...
        raise EdgecError(f"{what} is not a readable ONNX file ({type(exc).__name__})") from None
    check_onnx(proto, what)
    return proto


def check_onnx(proto, what: str = "ONNX model") -> None:
    """Refuse what would crash or mislead the code reading ``proto`` (module docstring)."""
    graph = proto.graph
    if not graph.output:
        raise EdgecError(f"{what}: the graph has no outputs; nothing to inspect or run")
    for kind, values in (("input", graph.input), ("output", graph.output), ("value_info", graph.value_info)):
        for vi in values:
            _check_value(vi, kind, what)
    for init in graph.initializer:
        check_tensor(init, what)
    read_provenance(proto, what)  # raises on malformed metadata


def _check_value(vi, kind: str, what: str) -> None:
    if not vi.type.HasField("tensor_type"):
        return
    tt = vi.type.tensor_type
    name = f"{what}: {kind} '{vi.name[:100]}'"
    if tt.elem_type not in KNOWN_TYPES:
        raise EdgecError(f"{name}: unknown element type {tt.elem_type}")
    if len(tt.shape.dim) > MAX_RANK:
        raise EdgecError(f"{name}: {len(tt.shape.dim)} dimensions, more than {MAX_RANK}")
    for d in tt.shape.dim:
        if d.HasField("dim_value") and not 0 <= d.dim_value <= MAX_DIM_VALUE:
            raise EdgecError(f"{name}: dimension {d.dim_value} is outside 0..{MAX_DIM_VALUE}")


def check_tensor(t, what: str = "ONNX model") -> None:
    """An initializer: known type, non-negative dims, data inside the file and exactly as long as its dims say."""
    name = f"{what}: initializer '{t.name[:100]}'"
    if t.data_type not in KNOWN_TYPES:
        raise EdgecError(f"{name}: unknown element type {t.data_type}")
    if t.data_location == TensorProto.EXTERNAL:
        raise EdgecError(f"{name}: weights in external data files; edgec reads single-file ONNX only")
    if len(t.dims) > MAX_RANK or any(d < 0 for d in t.dims):
        raise EdgecError(f"{name}: invalid dims {list(t.dims)[:8]}")
    n = math.prod(t.dims)
    bits = _SUB_BYTE_BITS.get(t.data_type)
    if t.HasField("raw_data"):
        width = bits or 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        need, have, unit = math.ceil(n * width / 8), len(t.raw_data), "bytes"
    else:
        field = onnx.helper.tensor_dtype_to_field(t.data_type)
        per = 2 if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
        need = (n if bits == 6 else math.ceil(n * bits / 8)) if bits else n * per
        have, unit = len(getattr(t, field)), f"values in {field}"
    if have != need:
        raise EdgecError(f"{name}: dims {list(t.dims)[:8]} need {need} {unit}, the file holds {have}")


__all__ = ["MAX_ONNX_BYTES", "check_onnx", "check_tensor", "parse_onnx", "read_onnx"]
