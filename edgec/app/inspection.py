"""Describe a checkpoint or an ONNX file: architecture, size, ops, and the provenance chain."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from edgec.app.results import CheckpointInfo, OnnxInfo
from edgec.core.errors import EdgecError
from edgec.core.graph import Scaffold
from edgec.layers.lowbit import lowbit_layers
from edgec.models.checkpoint import load_checkpoint
from edgec.onnx.export import read_provenance
from edgec.onnx.reader import read_onnx


def inspect_file(path: str | Path, arch: str | None = None) -> CheckpointInfo | OnnxInfo:
    """The checkpoint's or ONNX file's description (by suffix)."""
    path = Path(path)
    if not path.exists():
        raise EdgecError(f"no such file: {path}")
    if path.suffix == ".onnx":
        return inspect_onnx(path)
    return inspect_checkpoint(path, arch)


def layer_bits(gm) -> list[dict]:
    """Weight-bearing layers with their weight bit width (32 for float, 2 ternary, 1 binary)."""
    lowbit = dict(lowbit_layers(gm))
    rows, inside = [], []  # layers inside a scaffold are counted with the scaffold
    for name, m in gm.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if name in lowbit:
            rows.append({"layer": name, "type": type(m).__name__, "bits": m.bits, "group_size": m.group_size,
                         "shift": m.shift is not None, "act": m.act, "weights": m.codes.numel()})
        elif isinstance(m, Scaffold):
            inside.append(name)
            rows.append({"layer": name, "type": type(m).__name__, "bits": f"scaffold:{m.kind}",
                         "weights": sum(p.numel() for p in m.parameters())})
        elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
            w = m.weight
            bits = {1: 8, 2: 16, 4: 32, 8: 64}.get(w.element_size(), 32) if w.is_floating_point() else 8
            rows.append({"layer": name, "type": type(m).__name__, "bits": bits, "weights": w.numel()})
    return rows


def bits_summary(rows: list[dict]) -> dict:
    """{bit width: {"layers": n, "weights": n}} over ``layer_bits`` rows."""
    out: dict = {}
    for r in rows:
        entry = out.setdefault(str(r["bits"]), {"layers": 0, "weights": 0})
        entry["layers"] += 1
        entry["weights"] += r["weights"]
    return out


def inspect_checkpoint(path: Path, arch: str | None = None) -> CheckpointInfo:
    model = load_checkpoint(path, arch)  # arch: a str or SourceOptions
    modules = Counter(type(m).__name__ for n, m in model.gm.named_modules() if n and not list(m.children()))
    layers = layer_bits(model.gm)
    return CheckpointInfo(
        kind="checkpoint", input=path.name, file_bytes=path.stat().st_size,
        arch=model.arch, config=model.config, params=model.param_count(), bytes=model.nbytes(),
        digest=model.digest(), spec=model.spec.to_json(), modules=dict(sorted(modules.items())),
        scaffolds=[{"module": n, "kind": m.kind, "folded_by": m.folded_by} for n, m in model.scaffolds()],
        layers=layers, bits=bits_summary(layers), structural_passes=model.passes, provenance=model.provenance)


def inspect_onnx(path: Path) -> OnnxInfo:
    """Counted from the checked proto (edgec.onnx.reader): element counts from dims, never by copying weights."""
    _, proto = read_onnx(path)
    provenance = read_provenance(proto, str(path)) or {}
    ops = Counter((n.domain + "::" if n.domain else "") + n.op_type for n in proto.graph.node)
    params = init_bytes = 0
    dtypes = Counter()
    for init in proto.graph.initializer:
        n = math.prod(init.dims)
        params += n
        init_bytes += len(init.raw_data) if init.raw_data else n * _dtype(init.data_type).itemsize
        dtypes[_dtype(init.data_type).name] += n

    def io(values):
        return [{"name": v.name, "dtype": _dtype(v.type.tensor_type.elem_type).name if v.type.HasField("tensor_type")
                 else v.type.WhichOneof("value") or "?",
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return OnnxInfo(
        kind="onnx", input=path.name, file_bytes=path.stat().st_size,
        ir_version=proto.ir_version, opsets={o.domain or "ai.onnx": o.version for o in proto.opset_import},
        producer=f"{proto.producer_name} {proto.producer_version}".strip(),
        inputs=io(proto.graph.input), outputs=io(proto.graph.output),
        params=int(params), initializer_bytes=int(init_bytes), initializer_dtypes=dict(dtypes),
        nodes=len(proto.graph.node), ops=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        arch=provenance.get("arch"), checkpoint_digest=provenance.get("checkpoint_digest"),
        provenance=provenance.get("passes", []))


def _dtype(elem_type: int):
    """numpy dtype of an ONNX element type (``object`` for the undefined type 0 of an untyped value)."""
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type) if elem_type else np.dtype(object)
