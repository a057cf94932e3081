"""Verified ONNX export: torch graph -> ONNX bytes that carry their own provenance.

Refuses unfolded scaffolds; exports with torch's dynamo exporter at a pinned opset; strips exporter metadata so the
same checkpoint always gives the same bytes; checks onnxruntime against torch at two input shapes; embeds the pass
chain under ``edgec.provenance``. ``weights="int2"`` stores ternary/binary layers as 2-bit data
(``edgec.onnx.int2``). See docs/methods.md#int2-export.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import onnxruntime
import torch

from edgec import __version__
from edgec.core.errors import CheckFailed, EdgecError
from edgec.core.graph import Model, canonical_json, max_error
from edgec.core.limits import load_json
from edgec.core.ops import EXPORT_TOLERANCE as TOLERANCE
from edgec.core.options import MIN_OPSET
from edgec.core.provenance import record as provenance_record
from edgec.core.schema import check_onnx_provenance
from edgec.onnx import int2 as lb
from edgec.onnx.session import create_session

DEFAULT_OPSET = 20
PROVENANCE_KEY = "edgec.provenance"


def check_opset(opset: int) -> None:
    """An opset edgec can write: from the exporter's lowest to the newest this onnx package knows."""
    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= int(opset) <= top:
        raise EdgecError(f"opset {opset} is not one edgec writes: choose {MIN_OPSET}..{top} (default {DEFAULT_OPSET})")


def check_written_opset(proto, opset: int) -> None:
    """The exporter falls back to another opset without a word; the record must name the one in the file."""
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != int(opset):
        raise EdgecError(f"opset {opset} was requested but the exporter wrote opset {written}; choose "
                         f"{MIN_OPSET}..{onnx.defs.onnx_opset_version()} or leave --opset unset")


def refuse_scaffolds(model: Model) -> None:
    found = model.scaffolds()
    if found:
        names = ", ".join(f"{m.kind} at {n}" for n, m in found[:3]) + (" ..." if len(found) > 3 else "")
        folds = sorted({m.folded_by for _, m in found})
        raise EdgecError(f"model still carries {len(found)} unfolded training scaffold(s) ({names}); "
                         f"run `edgec fold` first (fold pass: {', '.join(folds)})")


@contextlib.contextmanager
def quiet():
    """The dynamo exporter prints progress and warnings to stdout/logging; keep the CLI output ours."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_onnx(model: Model, opset: int = DEFAULT_OPSET, rewrite=None):
    """Export to an ``onnx.ModelProto`` with metadata stripped (not yet verified).

    ``rewrite``: a function applied in place to the exporter's ``onnx_ir.Model`` before it is optimized (the
    optimizer then runs on the result, as it would have on the plain export).
    """
    spec = model.spec
    gm = model.clone().gm.eval()
    for p in gm.parameters():  # eval-mode forward: no straight-through branches in the traced graph
        p.requires_grad_(False)
    dynamic = [{axis: torch.export.Dim(d.name, min=d.min, max=d.max) for axis, d in dims.items()} or None
               for dims in spec.dynamic_dims()]
    args = spec.sample(seed=0)
    try:
        with quiet():
            program = torch.onnx.export(
                gm, args, dynamo=True, opset_version=opset, dynamic_shapes=tuple(dynamic),
                input_names=[t.name for t in spec.inputs], output_names=list(spec.outputs),
                optimize=rewrite is None, verbose=False, external_data=False)
    except Exception as exc:  # the exporter raises many types; the user needs the first line
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise EdgecError(f"ONNX export failed: {msg}") from exc
    if rewrite is not None:
        rewrite(program.model)
        with quiet():
            program.optimize()
    proto = program.model_proto
    strip_metadata(proto)
    return proto


def strip_metadata(proto) -> None:
    """Remove exporter node metadata and doc strings (they hold file paths and qualnames)."""
    graphs = [proto.graph] + list(proto.functions)
    while graphs:
        g = graphs.pop()
        if hasattr(g, "metadata_props"):
            del g.metadata_props[:]
        if hasattr(g, "doc_string"):
            g.doc_string = ""
        for vi in list(getattr(g, "input", [])) + list(getattr(g, "output", [])) + list(getattr(g, "value_info", [])):
            del vi.metadata_props[:]
            vi.doc_string = ""
        for init in getattr(g, "initializer", []):
            del init.metadata_props[:]
            init.doc_string = ""
        for node in g.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    del proto.metadata_props[:]
    proto.doc_string = ""


def ort_session(data: bytes, threads: int = 1, **config):
    """A session with the same options eval and latency measurement use (edgec.onnx.session)."""
    return create_session(data, threads, config)


def ort_parity(model: Model, data: bytes, seeds=(0, 1), config: dict | None = None) -> dict:
    """Max error of ORT vs torch at the traced shape and at the alternative shape (``config``: session entries)."""
    session = ort_session(data, **(config or {}))
    names = [i.name for i in session.get_inputs()]
    result = {}
    for alt in (False, True):
        worst = {"max_abs_error": 0.0, "output_scale": 0.0, "rel_error": 0.0}
        for seed in seeds:
            inputs = model.spec.sample(seed=seed, alt=alt)
            ref = model.run(inputs)
            got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
            if [tuple(g.shape) for g in got] != [tuple(r.shape) for r in ref]:
                raise CheckFailed(f"ONNX output shapes {[g.shape for g in got]} differ from torch "
                                  f"{[tuple(r.shape) for r in ref]}")
            err = max_error(ref, got)
            worst = {k: max(worst[k], err[k]) for k in worst}
        worst["shape"] = [list(t.shape) for t in model.spec.sample(seed=0, alt=alt)]
        result["alt_shape" if alt else "traced_shape"] = worst
    return result


def export(model: Model, opset: int | None = None, tolerance: float = TOLERANCE, tool_versions: dict | None = None,
           weights: str = "auto", forms: str = "measure", threads: int = 1):
    """Export, verify and annotate. Returns (onnx bytes, export provenance record).

    ``opset``: None → 20 for fp32 weights, 25 for int2; an explicit opset below 25 is an error with "int2"
    and turns "auto" into fp32 (recorded as ``params.weights_requested``).
    ``weights``: "auto" | "fp32" | "int2" (module docstring). ``forms`` / ``threads``: how int2 layers choose
    between DequantizeLinear and MatMulNBits ("measure" | "dq" | "matmulnbits"; ``edgec.onnx.int2``).
    The returned record is the one embedded in the file, plus (int2 only) ``measurements`` (per-layer timings,
    not embedded because they vary run to run) and ``size`` (file bytes and the fp32-equivalent file size).
    """
    refuse_scaffolds(model)
    mode = lb.resolve_weights(model, weights)
    lb.check_forms(forms)
    mode, opset = lb.resolve_opset(mode, opset, DEFAULT_OPSET, weights)
    check_opset(opset)
    proto, report, measurements = _exported_proto(model, mode, opset, forms, threads)
    check_written_opset(proto, opset)
    plain = proto.SerializeToString(deterministic=True)
    _validate(proto)
    checks, config = _parity_checks(model, plain, mode, tolerance)
    params = {"opset": opset, "weights": mode}
    if weights != mode:
        params["weights_requested"] = weights
    if mode == "int2":
        params.update({"forms": forms, "ir_version": proto.ir_version})
    record = provenance_record("export.onnx", 1, params, input_digest=model.digest(), checks=checks,
                               tools=tool_versions or versions())
    if report is not None:
        record["lowbit"] = report
    data = _embed_provenance(proto, model, record)
    check = checks["ort_parity"]
    if not check["passed"]:
        raise CheckFailed(f"ONNX parity check failed: relative error {check['rel_error']:.3g} > tolerance "
                          f"{tolerance:.3g}" + (f" (session config {config})" if config else ""))
    if mode == "int2":
        record = dict(record, measurements=measurements, size=_size_report(data, report))
    return data, record


def _exported_proto(model: Model, mode: str, opset: int, forms: str, threads: int):
    """(proto, lowbit report, measurements); int2: the graph is rewritten before optimization, codes checked after."""
    if mode != "int2":
        return to_onnx(model, opset), None, None
    state = {}

    def rewrite(ir_model):
        state["result"] = lb.lowbit_rewrite(model, ir_model, forms=forms, threads=threads)

    proto = to_onnx(model, opset, rewrite=rewrite)
    report, measurements, storage = state["result"]
    lb.check_storage(proto, storage)
    proto.ir_version = max(proto.ir_version, lb.LOWBIT_IR_VERSION)
    return proto, report, measurements


def _validate(proto) -> None:
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise CheckFailed(f"exported ONNX does not validate: {str(exc).splitlines()[0]}") from None


def _parity_checks(model: Model, plain: bytes, mode: str, tolerance: float) -> tuple[dict, dict]:
    """(checks, session config): ORT vs torch; int2 gates on the strict config and records the default one."""
    config = dict(lb.STRICT_SESSION_CONFIG) if mode == "int2" else {}
    parity = ort_parity(model, plain, config=config)
    worst = max(v["rel_error"] for v in parity.values())
    check = {"parity": parity, "rel_error": worst, "tolerance": tolerance, "passed": worst <= tolerance}
    checks = {"ort_parity": check}
    if mode == "int2":
        check["session_config"] = config
        default = ort_parity(model, plain)
        checks["ort_parity_default_session"] = {
            "parity": default, "rel_error": max(v["rel_error"] for v in default.values()), "informational": True,
            "note": "default ORT session: DQ+MatMul fused into MatMulNBits with int8-quantized activations"}
    return checks, config


def _embed_provenance(proto, model: Model, record: dict) -> bytes:
    """The file's bytes with the whole pass chain (plus this export's record) under ``PROVENANCE_KEY``."""
    provenance = {
        "format": "edgec.provenance/1",
        "arch": model.arch, "config": model.config, "spec": model.spec.to_json(),
        "checkpoint_digest": model.digest(),
        "passes": model.provenance + [record],
    }
    proto.producer_name = "edgec"
    proto.producer_version = __version__
    entry = proto.metadata_props.add()
    entry.key, entry.value = PROVENANCE_KEY, canonical_json(provenance)
    return proto.SerializeToString(deterministic=True)


def _size_report(data: bytes, report: dict) -> dict:
    """File size against the same file with every low-bit weight stored as float32."""
    w = report["weights"]
    fp32_equiv = len(data) - w["int2_bytes"] - w["aux_bytes"] + w["fp32_bytes"]
    return {
        "file_bytes": len(data), "fp32_equivalent_file_bytes": fp32_equiv, "file_ratio": len(data) / fp32_equiv,
        "lowbit_weight_ratio": w["ratio"], "int2_payload_ratio": w["int2_ratio"],
        "note": "fp32-equivalent = this file with every low-bit weight stored as float32 instead of its INT2 "
                "codes, scales, shifts and zero points; layers listed in lowbit.fp32_layers stay float32"}


def versions() -> dict:
    return {"edgec": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def read_provenance(proto, what: str = "ONNX model") -> dict | None:
    """The ``edgec.provenance`` metadata, parsed with limits and checked against its schema
    (edgec.core.schema.OnnxProvenance); None when the file has none. Malformed metadata is an EdgecError naming
    the field: a file that claims edgec provenance must carry a readable one."""
    entries = [e for e in proto.metadata_props if e.key == PROVENANCE_KEY]
    if not entries:
        return None
    where = f"{what}: metadata '{PROVENANCE_KEY}'"
    if len(entries) > 1:
        raise EdgecError(f"{where} appears {len(entries)} times; expected once")
    return check_onnx_provenance(load_json(entries[0].value, where), where)
