"""ONNX export for generation: one graph that serves prefill and decode with a key/value cache.

The layout is the one onnxruntime-genai's ``genai_config.json`` names for Llama decoders and Optimum's
``ORTModelForCausalLM`` reads (every batch and length dynamic)::

    inputs   input_ids                 int64   [batch_size, sequence_length]
             attention_mask            int64   [batch_size, total_sequence_length]   (0 = padding)
             position_ids              int64   [batch_size, sequence_length]
             past_key_values.{i}.key   float32 [batch_size, n_kv, past_sequence_length, head_dim]
             past_key_values.{i}.value float32 [batch_size, n_kv, past_sequence_length, head_dim]
    outputs  logits                    float32 [batch_size, sequence_length, vocab]
             present.{i}.key / .value  float32 [batch_size, n_kv, total_sequence_length, head_dim]

``total_sequence_length = past_sequence_length + sequence_length``; a prefill passes a past of length 0, each
decode step feeds ``present`` back as ``past``. Keys are stored after rotary embedding (as HF does).

The graph comes from the architecture's eager module (``forward_cached(input_ids, attention_mask,
position_ids, past) -> (logits, present)`` and ``empty_cache(batch)``), rebuilt from the checkpoint's arch and
config with the traced graph's leaf modules (low-bit deploy layers, pruned Linears) and remaining weights
swapped in by qualified name; the rebuilt ``forward`` must reproduce the graph's before anything is exported.
Low-bit layers are written with the INT2 rewrite and forms of ``edgec.onnx.int2`` (chosen at the decode shape:
batch 1, one new token). Verification: onnxruntime's prefill logits against torch's full forward, and 16
greedy decode steps (present fed back as past) against torch's ``forward_cached`` step by step and against the
full-sequence forward of the final sequence. See docs/methods.md#int2-export for the forms.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from edgec import __version__
from edgec.core.errors import CheckFailed, EdgecError
from edgec.core.graph import Model, canonical_json, max_error, set_submodule, shared_copy
from edgec.core.ops import EXPORT_TOLERANCE
from edgec.core.pass_manager import PRUNED_WIDTHS
from edgec.core.provenance import record as provenance_record
from edgec.models.checkpoint import no_init
from edgec.models.source import build
from edgec.onnx import forms as fm
from edgec.onnx import int2 as lb
from edgec.onnx.export import (
    INT8_TOLERANCE,
    PROVENANCE_KEY,
    append_metadata,
    check_written_opset,
    dynamo_export,
    export_settings,
    finish_int2,
    verification_config,
    versions,
)
from edgec.onnx.session import create_session

INPUTS = ("input_ids", "attention_mask", "position_ids")
PAST = "past_key_values.{i}.{kind}"
PRESENT = "present.{i}.{kind}"
BATCH, SEQ, PAST_SEQ, TOTAL_SEQ = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
DECODE_STEPS = 16
PROMPT = 8  # prompt length of the export check (batch 2)
REBUILD_TOLERANCE = 1e-6  # the rebuilt eager forward runs the same ops as the graph: anything above is a mismatch
KV_TOLERANCE = EXPORT_TOLERANCE  # fp32 activations: ORT vs torch over prefill and every decode step
RECORD = "export.onnx.kv_cache"


def has_kv_cache(module) -> bool:
    return callable(getattr(module, "forward_cached", None)) and callable(getattr(module, "empty_cache", None))


def is_kv_graph(proto_or_names) -> bool:
    """Whether an ONNX model (or its input names) has this module's layout: the three inputs and a past."""
    names = proto_or_names if isinstance(proto_or_names, (list, tuple, set)) else \
        [i.name for i in proto_or_names.graph.input]
    return all(n in names for n in INPUTS) and PAST.format(i=0, kind="key") in names


# --------------------------------------------------------------------------------------------- rebuilding


def _flat_forward(self, input_ids, attention_mask, position_ids, past_key_values):
    """``forward_cached`` with the past as a list of (key, value) and the present flattened after the logits."""
    logits, present = self.forward_cached(input_ids, attention_mask, position_ids, list(past_key_values))
    return logits, [tuple(kv) for kv in present]


def _with_flat_forward(module: nn.Module) -> nn.Module:
    """``module`` (freshly built here, owned) with its class swapped for a subclass whose ``forward`` is the
    cached one, so that module names (and so initializer and report names) stay the architecture's own."""
    cls = type(module)
    module.__class__ = type(f"{cls.__name__}KVCache", (cls,), {"forward": _flat_forward})
    return module


def _owner(module: nn.Module, name: str, arch: str):
    prefix, _, leaf = name.rpartition(".")
    try:
        return (module.get_submodule(prefix) if prefix else module), leaf
    except AttributeError:
        raise EdgecError(f"{arch}: the graph's '{name}' has no place in the architecture's module (the graph was "
                         "changed by a pass the KV-cache export cannot follow)") from None


def decoder_module(model: Model) -> nn.Module:
    """The architecture's eager module carrying the graph's modules and weights (shared, frozen, eval), with
    ``forward`` = the flat cached forward. Refuses (EdgecError) an architecture without ``forward_cached`` and a
    rebuild whose ``forward`` does not reproduce the graph's."""
    dense = {k: v for k, v in model.config.items() if k != PRUNED_WIDTHS}
    with torch.random.fork_rng(devices=[]), no_init():
        module = build(model.arch, dense)
    if not has_kv_cache(module):
        raise EdgecError(f"{model.arch} has no forward_cached(input_ids, attention_mask, position_ids, past) and "
                         "empty_cache(batch): it cannot be exported with --kv-cache or run by `edgec generate`")
    gm = shared_copy(model.gm, frozen=True).eval()
    leaves = sorted({n.target for n in gm.graph.nodes if n.op == "call_module"})
    for target in leaves:
        _owner(module, target, model.arch)
        set_submodule(module, target, gm.get_submodule(target))
    swapped = tuple(t + "." for t in leaves)
    tensors = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        if name.startswith(swapped):
            continue
        owner, leaf = _owner(module, name, model.arch)
        if leaf in owner._parameters:
            owner._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = tensor
        else:
            raise EdgecError(f"{model.arch}: the graph's tensor '{name}' is not a parameter or buffer of the "
                             "architecture's module; the KV-cache export cannot rebuild it")
    module.requires_grad_(False).eval()
    x = model.spec.check_sample(seed=0)
    ref = model.run(x)
    with torch.no_grad():
        got = module(*x)
    err = max_error(ref, (got,))
    if err["rel_error"] > REBUILD_TOLERANCE:
        raise EdgecError(f"{model.arch}: the rebuilt module's forward differs from the graph's (relative error "
                         f"{err['rel_error']:.3g}); the KV-cache export cannot follow this graph")
    return _with_flat_forward(module)


def cache_geometry(module: nn.Module) -> dict:
    """Layers, key/value heads, head dim and vocabulary, read from one 1-token prefill (so that narrowed
    projections count, not the config's numbers)."""
    past = module.empty_cache(1)
    with torch.no_grad():
        logits, present = module(torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1, dtype=torch.int64),
                                 torch.zeros(1, 1, dtype=torch.int64), past)
    k = present[0][0]
    return {"layers": len(present), "kv_heads": int(k.shape[1]), "head_dim": int(k.shape[3]),
            "vocab": int(logits.shape[-1])}


def empty_past(geometry: dict, batch: int) -> list:
    shape = (batch, geometry["kv_heads"], 0, geometry["head_dim"])
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(geometry["layers"])]


def input_names(layers: int) -> list[str]:
    return list(INPUTS) + [PAST.format(i=i, kind=k) for i in range(layers) for k in ("key", "value")]


def output_names(layers: int) -> list[str]:
    return ["logits"] + [PRESENT.format(i=i, kind=k) for i in range(layers) for k in ("key", "value")]


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from an attention mask (left padding): ``cumsum(mask) - 1``, padding at 0 (HF's rule)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def example_inputs(geometry: dict, batch: int, seq: int, past: int, seed: int = 0) -> tuple:
    """(input_ids, attention_mask, position_ids, past) with random ids and a random past of length ``past``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, geometry["vocab"], (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = positions(mask)[:, past:]
    shape = (batch, geometry["kv_heads"], past, geometry["head_dim"])
    kv = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(geometry["layers"])]
    return ids, mask, pos, kv


class _RewriteTarget:
    """What ``edgec.onnx.int2.lowbit_rewrite`` reads of a Model (``gm``, ``spec.sample``, ``run``), for the
    decoder module at the decode shape (batch 1, one new token after a short past): the forms are timed there."""

    def __init__(self, module: nn.Module, geometry: dict):
        self.gm = module
        self.spec = self
        self._inputs = example_inputs(geometry, 1, 1, PROMPT)

    def sample(self, seed: int = 0):
        return self._inputs

    def run(self, inputs):
        with torch.no_grad():
            return self.gm(*inputs)


# --------------------------------------------------------------------------------------------- exporting


def _rename_dims(proto, geometry: dict) -> None:
    """Give the exporter's symbolic dims the layout's names (inputs, outputs, and every value_info using them)."""
    want = {"input_ids": (BATCH, SEQ), "attention_mask": (BATCH, TOTAL_SEQ), "position_ids": (BATCH, SEQ),
            "logits": (BATCH, SEQ, None)}
    for i in range(geometry["layers"]):
        for kind in ("key", "value"):
            want[PAST.format(i=i, kind=kind)] = (BATCH, None, PAST_SEQ, None)
            want[PRESENT.format(i=i, kind=kind)] = (BATCH, None, TOTAL_SEQ, None)
    mapping = {}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        for dim, name in zip(vi.type.tensor_type.shape.dim, want.get(vi.name, ())):
            if name is None:
                continue
            if dim.HasField("dim_value"):
                raise CheckFailed(f"KV-cache export: {vi.name} has a fixed {name} ({dim.dim_value}); expected dynamic")
            old = mapping.setdefault(dim.dim_param, name)
            if old != name:
                raise CheckFailed(f"KV-cache export: the exporter tied {name} to {old} ({vi.name})")
    for vi in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        for dim in vi.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]


def _export_proto(module: nn.Module, geometry: dict, opset: int, rewrite=None):
    """The dynamo export of the flat cached forward with dynamic batch, new-token and past lengths."""
    dim = torch.export.Dim
    batch, seq, past = dim(BATCH, min=1, max=4096), dim(SEQ, min=1, max=1 << 20), dim(PAST_SEQ, min=0, max=1 << 20)
    layers = geometry["layers"]
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: dim.AUTO}, {0: batch, 1: seq},
               [({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(layers)])
    proto = dynamo_export(module, example_inputs(geometry, 2, 3, 5), dynamic, input_names(layers),
                          output_names(layers), opset, rewrite, what="ONNX export (KV cache)")
    _rename_dims(proto, geometry)
    return proto


def _lowbit_proto(module: nn.Module, geometry: dict, opset: int, choice: dict):
    """(proto, lowbit report, measurements) with every low-bit layer as INT2 data in its chosen form."""
    state = {}
    target = _RewriteTarget(module, geometry)

    def rewrite(ir_model):
        state["result"] = lb.lowbit_rewrite(target, ir_model, forms=choice["forms"], threads=choice["threads"],
                                            precision=choice["precision"], config=choice["config"],
                                            progress=choice["say"])

    return finish_int2(_export_proto(module, geometry, opset, rewrite), state["result"])


# --------------------------------------------------------------------------------------------- running


class OrtDecoder:
    """An onnxruntime session over a KV-cache graph: ``step(ids, mask, pos, past) -> (logits, present)`` with
    numpy arrays; ``past`` a list of (key, value)."""

    def __init__(self, data, threads: int = 1, config: dict | None = None):
        self.session = create_session(data, threads, config)
        names = [i.name for i in self.session.get_inputs()]
        if not is_kv_graph(names):
            raise EdgecError("this ONNX file has no KV cache (inputs " + ", ".join(names[:4]) +
                             "); export it with `edgec export MODEL --kv-cache`")
        self.layers = sum(1 for n in names if n.startswith("past_key_values.") and n.endswith(".key"))
        key = self.session.get_inputs()[names.index(PAST.format(i=0, kind="key"))].shape
        logits = self.session.get_outputs()[0].shape
        self.kv_heads, self.head_dim = int(key[1]), int(key[3])
        self.vocab = int(logits[2]) if isinstance(logits[2], int) else None
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = names

    def empty_past(self, batch: int) -> list:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(self.layers)]

    def step(self, ids, mask, pos, past):
        feed = {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64),
                "position_ids": np.asarray(pos, np.int64)}
        for i, (k, v) in enumerate(past):
            feed[PAST.format(i=i, kind="key")] = np.asarray(k, np.float32)
            feed[PAST.format(i=i, kind="value")] = np.asarray(v, np.float32)
        out = self.session.run(self.outputs, feed)
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.layers)]


def torch_step(module: nn.Module, ids, mask, pos, past):
    with torch.no_grad():
        return module(torch.as_tensor(ids), torch.as_tensor(mask), torch.as_tensor(pos), past)


def _worse(a: dict, b: dict) -> dict:
    return {k: max(a[k], b[k]) for k in ("max_abs_error", "output_scale", "rel_error")}


def kv_parity(model: Model, module: nn.Module, geometry: dict, data: bytes, config: dict | None = None,
              steps: int = DECODE_STEPS, prompt: int = PROMPT, seed: int = 0) -> dict:
    """ORT vs torch on a batch-2 prompt: prefill logits vs the graph's full forward; then ``steps`` greedy decode
    steps in ORT (present fed back as past, the next token ORT's argmax) vs torch's ``forward_cached`` on the
    same tokens and cache, and the last step's logits of every position vs the full forward of the whole
    sequence. Returns {name: {max_abs_error, output_scale, rel_error, shape}}."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, geometry["vocab"], (2, prompt), generator=g)
    ort = OrtDecoder(data, 1, config)
    mask = torch.ones_like(ids)
    logits, past = ort.step(ids, mask, positions(mask), ort.empty_past(2))
    full = model.run((ids,))[0]
    result = {"prefill": dict(max_error((full,), (logits,)), shape=[2, prompt])}
    t_logits, t_past = torch_step(module, ids, mask, positions(mask), empty_past(geometry, 2))
    decode = max_error((t_logits,), (logits,))
    seq, steps_logits = ids, [logits[:, -1]]
    for _ in range(steps):
        nxt = torch.as_tensor(logits[:, -1].argmax(-1))[:, None]
        seq = torch.cat([seq, nxt], 1)
        mask = torch.ones_like(seq)
        pos = positions(mask)[:, -1:]
        logits, past = ort.step(nxt, mask, pos, past)
        t_logits, t_past = torch_step(module, nxt, mask, pos, t_past)
        decode = _worse(decode, max_error((t_logits,), (logits,)))
        steps_logits.append(logits[:, -1])
    result["decode_vs_cached"] = dict(decode, shape=[2, 1], steps=steps)
    full = model.run((seq[:, :-1],))[0][:, prompt - 1:]
    got = np.stack(steps_logits[:-1], 1)
    result["decode_vs_full_sequence"] = dict(max_error((full,), (got,)), shape=[2, prompt + steps - 1])
    return result


# --------------------------------------------------------------------------------------------- the export


def export_kv(model: Model, opset: int | None = None, tolerance: float | None = None, weights: str = "auto",
              forms: str = "auto", threads: int = 1, activation_precision: str = "fp32", target_config=None,
              tool_versions: dict | None = None, progress=None):
    """Export ``model`` (an architecture with ``forward_cached``) as one prefill + decode graph with a KV cache;
    verified (``kv_parity``) and annotated like ``edgec.onnx.export.export``. Returns (bytes, record)."""
    say = progress or (lambda _m: None)
    mode, opset, target, config = export_settings(model, opset, weights, forms, activation_precision, target_config)
    say("rebuilding the decoder with its KV-cache forward")
    module = decoder_module(model)
    geometry = cache_geometry(module)
    say("exporting the KV-cache graph (torch.onnx)")
    report = measurements = None
    if mode == "int2":
        choice = {"forms": forms, "threads": threads, "precision": activation_precision, "config": config,
                  "say": say}
        proto, report, measurements = _lowbit_proto(module, geometry, opset, choice)
    else:
        proto = _export_proto(module, geometry, opset)
    check_written_opset(proto, opset)
    proto.producer_name, proto.producer_version = "edgec", __version__
    ir_version = proto.ir_version
    plain = proto.SerializeToString(deterministic=True)
    del proto
    try:
        onnx.checker.check_model(plain)
    except onnx.checker.ValidationError as exc:
        raise CheckFailed(f"exported ONNX does not validate: {str(exc).splitlines()[0]}") from None
    verify_config, note = verification_config(config, report) if mode == "int2" else ({}, None)
    tol = KV_TOLERANCE if tolerance is None else float(tolerance)
    if report is not None:
        report["int8_activation_layers"] = fm.int8_activation_layers(report["layers"], verify_config)
        if report["int8_activation_layers"]:
            tol = max(tol, INT8_TOLERANCE)
    say(f"verifying onnxruntime against torch (prefill + {DECODE_STEPS} decode steps)")
    parity = kv_parity(model, module, geometry, plain, verify_config)
    worst = max(v["rel_error"] for v in parity.values())
    check = {"parity": parity, "rel_error": worst, "tolerance": tol, "passed": worst <= tol}
    if verify_config:
        check["session_config"] = dict(sorted(verify_config.items()))
    if note:
        check["note"] = note
    params = {"opset": opset, "weights": mode, "kv_cache": True, "layout": "onnxruntime-genai",
              "layers": geometry["layers"], "kv_heads": geometry["kv_heads"], "head_dim": geometry["head_dim"]}
    if weights != mode:
        params["weights_requested"] = weights
    if mode == "int2":
        params.update({"forms": forms, "activation_precision": activation_precision, "target_config": target,
                       "session_config": dict(sorted(config.items())), "ir_version": ir_version,
                       "forms_timed_at": "decode: batch 1, 1 new token, past 8"})
    record = provenance_record(RECORD, 1, params, input_digest=model.digest(), checks={"ort_parity": check},
                               tools=tool_versions or versions())
    if report is not None:
        report["whole_model"] = {"checked": False, "reason": "KV-cache export: forms chosen per layer at the "
                                 "decode shape; no whole-file fallback"}
        record["lowbit"] = report
    provenance = {"format": "edgec.provenance/1", "arch": model.arch, "config": model.config,
                  "spec": model.spec.to_json(), "checkpoint_digest": model.digest(),
                  "passes": model.provenance + [record]}
    data = append_metadata(plain, PROVENANCE_KEY, canonical_json(provenance))
    del plain
    if not check["passed"]:
        hint = "; try --activation-precision fp32" if mode == "int2" and activation_precision == "int8" else ""
        raise CheckFailed(f"ONNX KV-cache parity check failed: relative error {worst:.3g} > tolerance {tol:.3g}"
                          + hint)
    if mode == "int2":
        record = dict(record, measurements=measurements, size=_size(data, report))
    return data, record


def _size(data: bytes, report: dict) -> dict:
    w = report["weights"]
    fp32_equiv = len(data) - w["int2_bytes"] - w["aux_bytes"] + w["fp32_bytes"]
    return {"file_bytes": len(data), "fp32_equivalent_file_bytes": fp32_equiv, "file_ratio": len(data) / fp32_equiv,
            "lowbit_weight_ratio": w["ratio"], "int2_payload_ratio": w["int2_ratio"],
            "note": "fp32-equivalent = this file with every low-bit weight stored as float32"}


def genai_config(model: Model, geometry: dict, filename: str, eos_id: int | None = None) -> dict:
    """A minimal onnxruntime-genai ``genai_config.json`` for the exported file (decoder inputs/outputs, sizes)."""
    cfg = model.config
    return {"model": {
        "type": "llama", "context_length": int(cfg.get("max_position_embeddings") or 2048),
        "vocab_size": geometry["vocab"], "eos_token_id": eos_id if eos_id is not None else -1,
        "pad_token_id": 0, "bos_token_id": 0,
        "decoder": {
            "filename": filename, "head_size": geometry["head_dim"],
            "hidden_size": int(cfg.get("hidden_size") or 0),
            "num_attention_heads": int(cfg.get("num_attention_heads") or 0),
            "num_hidden_layers": geometry["layers"], "num_key_value_heads": geometry["kv_heads"],
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"}}},
        "search": {"do_sample": False, "max_length": int(cfg.get("max_position_embeddings") or 2048),
                   "num_beams": 1, "past_present_share_buffer": False}}
