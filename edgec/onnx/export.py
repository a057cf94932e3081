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
from edgec.core.graph import Model, canonical_json, derived_weights_cached, max_error, shared_copy
from edgec.core.limits import load_json
from edgec.core.ops import EXPORT_TOLERANCE as TOLERANCE
from edgec.core.options import MIN_OPSET
from edgec.core.provenance import record as provenance_record
from edgec.core.schema import check_onnx_provenance
from edgec.onnx import forms as fm
from edgec.onnx import int2 as lb
from edgec.onnx.emit import dq_to_cast
from edgec.onnx.session import create_session, measure_interleaved, sample_inputs

DEFAULT_OPSET = 20
PROVENANCE_KEY = "edgec.provenance"
INT8_TOLERANCE = 0.05  # parity with int8 activations: quantization error, not a bug; the task metric judges it
NOISE = 0.05  # forms="auto": a file up to this much slower than fp32, side by side, is within measurement noise
WHOLE_MODEL_TIMING = {"warmup": 5, "repeats": 30, "min_seconds": 0.3}


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
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "onnx_ir", "torch")]
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
    # A structural copy sharing the weights' storage (no bytes copied), with its own Parameter objects so that
    # eval mode and requires_grad=False (no straight-through branches in the traced graph) leave model as it is.
    gm = shared_copy(model.gm, frozen=True).eval()
    dynamic = [{axis: torch.export.Dim(d.name, min=d.min, max=d.max) for axis, d in dims.items()} or None
               for dims in spec.dynamic_dims()]
    return dynamo_export(gm, spec.sample(seed=0), tuple(dynamic), [t.name for t in spec.inputs], list(spec.outputs),
                         opset, rewrite)


def dynamo_export(module, args, dynamic_shapes, input_names, output_names, opset: int, rewrite=None,
                  what: str = "ONNX export"):
    """torch.onnx's dynamo export of ``module`` on ``args`` -> ``onnx.ModelProto`` with metadata stripped;
    ``rewrite`` is applied to the ``onnx_ir.Model`` before the optimizer runs. Failures are one line."""
    try:
        with quiet():
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                input_names=input_names, output_names=output_names,
                optimize=rewrite is None, verbose=False, external_data=False)
    except Exception as exc:  # the exporter raises many types; the user needs the first line
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise EdgecError(f"{what} failed: {msg}") from exc
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
    """Max error of ORT vs torch at two input shapes and two seeds (``config``: session entries). The shapes are
    the spec's small check shapes (``InputSpec.check_sample``; recorded as ``shape``): the exported graph
    is dynamic, so a short sequence runs the same ONNX code as the traced length, at a fraction of the cost.
    The keys stay ``traced_shape`` (first shape) and ``alt_shape`` (second). The torch references run first,
    with derived weights computed once, and are released before the session is built."""
    cases = [(alt, model.spec.check_sample(seed=seed, alt=alt)) for alt in (False, True) for seed in seeds]
    with derived_weights_cached(model.gm):
        refs = [model.run(inputs) for _, inputs in cases]
    session = ort_session(data, **(config or {}))
    names = [i.name for i in session.get_inputs()]
    result = {}
    for alt in (False, True):
        worst = {"max_abs_error": 0.0, "output_scale": 0.0, "rel_error": 0.0}
        for (case_alt, inputs), ref in zip(cases, refs):
            if case_alt != alt:
                continue
            got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
            if [tuple(g.shape) for g in got] != [tuple(r.shape) for r in ref]:
                raise CheckFailed(f"ONNX output shapes {[g.shape for g in got]} differ from torch "
                                  f"{[tuple(r.shape) for r in ref]}")
            err = max_error(ref, got)
            worst = {k: max(worst[k], err[k]) for k in worst}
        worst["shape"] = [list(t.shape) for t in next(x for a, x in cases if a == alt)]
        result["alt_shape" if alt else "traced_shape"] = worst
    return result


def export(model: Model, opset: int | None = None, tolerance: float = TOLERANCE, tool_versions: dict | None = None,
           weights: str = "auto", forms: str = "auto", threads: int = 1, activation_precision: str = "fp32",
           target_config=None, progress=None):
    """Export, verify and annotate. Returns (onnx bytes, export provenance record).

    ``opset``: None → 20 for fp32 weights, 25 for int2; an explicit opset below 25 is an error with "int2"
    and turns "auto" into fp32 (recorded as ``params.weights_requested``).
    ``weights``: "auto" | "fp32" | "int2" (module docstring). ``forms``: how each int2 layer is written —
    "auto" (per layer by measured latency in the target session, and the whole file never slower than the fp32
    export beyond noise), "cast", "dq" or "matmulnbits" (``edgec.onnx.emit``). ``activation_precision``: "fp32"
    (exact) or "int8" (MatMulNBits accuracy_level 4; parity gated at ``INT8_TOLERANCE``). ``target_config``:
    the onnxruntime session the file is optimised and verified for (None: a default session; a name in
    ``forms.TARGET_CONFIGS``; "key=value,..."). ``threads``: for timing the forms. ``progress``: called with
    a short text at each step.
    The returned record is the one embedded in the file, plus (int2 only) ``measurements`` (per-layer and
    whole-file timings, not embedded because they vary run to run) and ``size`` (file bytes and the
    fp32-equivalent file size).
    """
    mode, opset, target, config = export_settings(model, opset, weights, forms, activation_precision, target_config)
    say = progress or (lambda _m: None)
    choice = {"forms": forms, "threads": threads, "precision": activation_precision, "config": config, "say": say}
    say("exporting the graph (torch.onnx)")
    proto, report, measurements = _exported_proto(model, mode, opset, choice)
    if mode == "int2" and forms == "auto":
        proto, report, measurements = never_slower(model, proto, report, measurements, opset, choice)
    check_written_opset(proto, opset)
    proto.producer_name, proto.producer_version = "edgec", __version__
    ir_version = proto.ir_version
    plain = proto.SerializeToString(deterministic=True)
    del proto  # one copy of a large model in memory: the bytes, from here on
    _validate(plain)
    verify_config, note = verification_config(config, report) if mode == "int2" else ({}, None)
    if report is not None:
        report["int8_activation_layers"] = fm.int8_activation_layers(report["layers"], verify_config)
        if report["int8_activation_layers"]:
            tolerance = max(tolerance, INT8_TOLERANCE)
    say("verifying onnxruntime against torch (2 shapes x 2 seeds)")
    checks = _parity_checks(model, plain, mode, tolerance, verify_config, note)
    params = {"opset": opset, "weights": mode}
    if weights != mode:
        params["weights_requested"] = weights
    if mode == "int2":
        params.update({"forms": forms, "activation_precision": activation_precision, "target_config": target,
                       "session_config": dict(sorted(config.items())), "ir_version": ir_version})
    record = provenance_record("export.onnx", 1, params, input_digest=model.digest(), checks=checks,
                               tools=tool_versions or versions())
    if report is not None:
        record["lowbit"] = report
    data = _embed_provenance(plain, model, record)
    del plain
    check = checks["ort_parity"]
    if not check["passed"]:
        hint = "; try --activation-precision fp32" if mode == "int2" and activation_precision == "int8" else ""
        raise CheckFailed(f"ONNX parity check failed: relative error {check['rel_error']:.3g} > tolerance "
                          f"{tolerance:.3g}" + (f" (session config {verify_config})" if verify_config else "") + hint)
    if mode == "int2":
        record = dict(record, measurements=measurements, size=_size_report(data, report))
    return data, record


def export_settings(model: Model, opset, weights: str, forms: str, activation_precision: str, target_config):
    """The checks every export starts with (no unfolded scaffold, valid forms, precision, target and opset) ->
    ``(weights mode, opset, target label, session config)``."""
    refuse_scaffolds(model)
    mode = lb.resolve_weights(model, weights)
    lb.check_forms(forms)
    fm.check_precision(activation_precision)
    target, config = fm.parse_target_config(target_config)
    mode, opset = lb.resolve_opset(mode, opset, DEFAULT_OPSET, weights)
    check_opset(opset)
    return mode, opset, target, config


def _exported_proto(model: Model, mode: str, opset: int, choice: dict, overrides: dict | None = None):
    """(proto, lowbit report, measurements); int2: the graph is rewritten before optimization, codes checked
    after, then the ``cast`` layers' DequantizeLinear turned into Cast -> Mul."""
    if mode != "int2":
        return to_onnx(model, opset), None, None
    state = {}

    def rewrite(ir_model):
        state["result"] = lb.lowbit_rewrite(model, ir_model, forms=choice["forms"], threads=choice["threads"],
                                            precision=choice["precision"], config=choice["config"],
                                            overrides=overrides, progress=choice.get("say"))

    return finish_int2(to_onnx(model, opset, rewrite=rewrite), state["result"])


def finish_int2(proto, result: tuple):
    """After an export whose rewrite was ``lowbit_rewrite`` (its ``result``): check the INT2 storage, turn the
    cast-form layers' DequantizeLinear into Cast, raise the IR version. -> (proto, report, measurements)."""
    report, measurements, storage = result
    lb.check_storage(proto, storage)
    want = lb.cast_outputs(storage)
    if dq_to_cast(proto, want) != len(want):
        raise CheckFailed("int2 export: a cast-form layer's DequantizeLinear did not survive optimization")
    proto.ir_version = max(proto.ir_version, lb.LOWBIT_IR_VERSION)
    return proto, report, measurements


def never_slower(model: Model, proto, report: dict, measurements: dict, opset: int, choice: dict):
    """``forms="auto"``'s whole-file guarantee: time the file side by side with the fp32 export of the same model
    (batch 1, the target session); while it is slower by more than ``NOISE``, write back to ``cast`` the half
    of the remaining non-cast layers that gained least alone, then all of them (a cast-only file is the fp32
    graph once onnxruntime has folded it). Returns the (possibly re-exported) proto, report and measurements."""
    rows = {r["layer"]: r for r in report["layers"]}
    fast = [k for k, r in rows.items() if r["form"] != "cast"]
    if not fast:
        report["whole_model"] = {"checked": False, "reason": "every low-bit layer is in the cast form: once "
                                 "onnxruntime has folded it, the session runs the float32 graph"}
        return proto, report, measurements
    say = choice.get("say") or (lambda _m: None)
    say(f"{len(fast)} layer(s) in a faster form: exporting fp32 to check the whole file side by side")
    fp32 = to_onnx(model, opset).SerializeToString()
    feed = sample_inputs(model.spec, batch=1)
    gain = {k: measurements[k]["fp32 (reference)"] / max(measurements[k][rows[k]["form"]], 1e-9) for k in fast}
    overrides, rounds, history = {}, 0, []
    while True:
        say(f"timing the whole file against fp32, side by side (round {rounds})")
        art, ref = measure_interleaved([proto.SerializeToString(), fp32], feed, threads=choice["threads"],
                                       config=choice["config"], **WHOLE_MODEL_TIMING)
        ratio = art["median_ms"] / ref["median_ms"]
        history.append({"fallback_round": rounds, "ms": round(art["median_ms"], 4),
                        "fp32_ms": round(ref["median_ms"], 4), "ratio": round(ratio, 3), "cast_layers": sorted(overrides)})
        left = [k for k in fast if k not in overrides]
        if ratio <= 1.0 + NOISE or not left:
            break
        rounds += 1
        left.sort(key=lambda k: (gain[k], k))
        back = left[:max(1, len(left) // 2)] if rounds == 1 else left
        overrides.update({k: ("cast", f"fallback round {rounds}: the whole file measured {ratio:.2f}x the fp32 "
                                      f"export side by side (> {1 + NOISE:.2f}); alone, {rows[k]['form']} ran "
                                      f"{gain[k]:.2f}x faster than fp32 on this layer alone") for k in back})
        say(f"fallback round {rounds}: {len(back)} layer(s) back to cast, re-exporting")
        proto, report, fresh = _exported_proto(model, "int2", opset, choice, overrides)
        measurements = dict(fresh)
        rows = {r["layer"]: r for r in report["layers"]}
    measurements["whole_model"] = history
    report["whole_model"] = {"checked": True, "fallback_rounds": rounds, "cast_fallbacks": sorted(overrides),
                             "passed": history[-1]["ratio"] <= 1.0 + NOISE, "noise": NOISE,
                             "batch": 1, "compared_with": "the fp32 export of the same model, timed side by side"}
    return proto, report, measurements


def _validate(data: bytes) -> None:
    try:
        onnx.checker.check_model(data)
    except onnx.checker.ValidationError as exc:
        raise CheckFailed(f"exported ONNX does not validate: {str(exc).splitlines()[0]}") from None


def verification_config(config: dict, report: dict | None) -> tuple[dict, str | None]:
    """(session config the file is verified in, note): the target session, except that a ``dq`` Linear layer
    under fp32 activations is verified with onnxruntime's DQ -> MatMulNBits fusion at accuracy level 0 (a
    default session would run it with int8 activations); the note says so."""
    config = dict(config)
    if not report or report.get("activation_precision") != "fp32" or not fm.dq_fused_int8(config):
        return config, None
    if any(r["form"] == "dq" and r["consumer"] != "Conv" for r in report["layers"]):
        config[fm.QDQ_ACCURACY_KEY] = "0"
        return config, (f"dq Linear layers: in a session without {fm.QDQ_ACCURACY_KEY}=0 onnxruntime runs them "
                        "with int8 activations (see ort_parity_default_session)")
    return config, None


def _parity_checks(model: Model, plain: bytes, mode: str, tolerance: float, config: dict,
                   note: str | None) -> dict:
    """ORT vs torch in the session the file is verified in (``config``, from ``verification_config``); when that
    is not a default session, the default session's parity is recorded too, informationally."""
    parity = ort_parity(model, plain, config=config)
    worst = max(v["rel_error"] for v in parity.values())
    check = {"parity": parity, "rel_error": worst, "tolerance": tolerance, "passed": worst <= tolerance}
    checks = {"ort_parity": check}
    if mode == "int2":
        check["session_config"] = dict(sorted(config.items()))
        if note:
            check["note"] = note
    if config:
        default = ort_parity(model, plain)
        checks["ort_parity_default_session"] = {
            "parity": default, "rel_error": max(v["rel_error"] for v in default.values()), "informational": True}
    return checks


def _embed_provenance(data: bytes, model: Model, record: dict) -> bytes:
    """The file's bytes with the whole pass chain (plus this export's record) under ``PROVENANCE_KEY``."""
    provenance = {
        "format": "edgec.provenance/1",
        "arch": model.arch, "config": model.config, "spec": model.spec.to_json(),
        "checkpoint_digest": model.digest(),
        "passes": model.provenance + [record],
    }
    return append_metadata(data, PROVENANCE_KEY, canonical_json(provenance))


def metadata_entry(key: str, value: str) -> bytes:
    """A serialized ModelProto that holds only one ``metadata_props`` entry."""
    fragment = onnx.ModelProto()
    entry = fragment.metadata_props.add()
    entry.key, entry.value = key, value
    return fragment.SerializeToString(deterministic=True)


def append_metadata(data: bytes, key: str, value: str) -> bytes:
    """``data`` (a serialized model) with one more metadata entry, without parsing or re-serializing the model:
    protobuf reads concatenated messages as one, appending repeated fields, so a 400 MB model costs one copy.
    Deterministic; when the model has no field numbered above ``metadata_props`` (14) the bytes are the same
    as a deterministic re-serialization."""
    return data + metadata_entry(key, value)


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
