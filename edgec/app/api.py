"""The Python API behind the CLI and the recipe runner: paths plus one options dataclass per command
(edgec.core.options) in, a typed result (``to_dict()``: the JSON the CLI prints) out.

Each command imports the layers it needs inside its function: every CLI call imports this module, and
``edgec zoo list`` should not pay for onnx, onnxruntime and the training stack."""
from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from edgec import models
from edgec.app.results import (
    CheckpointInfo,
    EvalResult,
    ExportResult,
    FoldResult,
    ImportResult,
    OnnxInfo,
    ProfileResult,
    SavedCheckpoint,
    ScaffoldResult,
    ZooCreateResult,
    ZooListResult,
)
from edgec.core.errors import EdgecError
from edgec.core.fileio import atomic_write, check_output
from edgec.core.graph import canonical_json, digest_cache
from edgec.core.options import (
    EvalOptions,
    ExportOptions,
    FinetuneOptions,
    FoldOptions,
    InspectOptions,
    ProfileOptions,
    PruneOptions,
    ScaffoldBinaryOptions,
    ScaffoldHrfOptions,
    ScaffoldTernaryOptions,
    SourceOptions,
    ZooCreateOptions,
)
from edgec.core.pass_manager import PASSES, PassManager, get_pass, refuse_skips, skip
from edgec.core.provenance import record as provenance_record

if TYPE_CHECKING:
    from edgec.prune.result import PruneResult
    from edgec.train.result import FinetuneResult
from edgec.models.checkpoint import check_finite, load_checkpoint, load_state_dict_strict, new_model, save_checkpoint


def fold_passes() -> list[str]:
    """The folds `edgec fold` tries: every registered scaffold's declared fold, in registry order (HRF before
    the low-bit folds, since nothing may sit between H and W1'), then BatchNorm last (it also folds into the
    low-bit layers the other folds produce)."""
    folds = [get_pass(name).scaffold_fold for name in PASSES if name.startswith("scaffold.")]
    return list(dict.fromkeys(f for f in folds if f)) + ["fold.batchnorm"]


def _out_path(input_path: str | Path, output: str | Path | None, suffix: str) -> Path:
    src = Path(input_path)
    return check_output(Path(output) if output else src.with_name(f"{src.stem}{suffix}"), src)


def _model_summary(model) -> dict:
    return {"arch": model.arch, "params": model.param_count(), "bytes": model.nbytes(), "digest": model.digest()}


def _as_list(value):
    """Recipe list parameters may be one string."""
    return [value] if isinstance(value, str) else value


def load(path: str | Path, source: SourceOptions | str | None = None):
    """Any checkpoint form as a Model; ``source`` (options or an arch string) is merged with the project
    file (see edgec.models.checkpoint.load_checkpoint)."""
    return load_checkpoint(path, source)


def save(model, output: str | Path) -> SavedCheckpoint:
    save_checkpoint(model, output)
    return SavedCheckpoint(output=str(output), **_model_summary(model), file_bytes=Path(output).stat().st_size)


def _saved(model, output, cls, **extra):
    """``save`` the model and return ``cls`` (a SavedCheckpoint subclass) with the extra fields."""
    return cls(**save(model, output).field_values(), **extra)


# --- zoo -------------------------------------------------------------------------------------------

def zoo_list() -> ZooListResult:
    rows = []
    for name in models.ZOO:
        cls = models.resolve(name)
        module = cls(**cls.default_config())
        spec = module.input_spec()
        rows.append({"name": name, "summary": cls.summary, "params": sum(p.numel() for p in module.parameters()),
                     "inputs": spec.to_json()["inputs"], "task": spec.task, "config": cls.default_config()})
    return ZooListResult(models=rows)


def zoo_create(name: str, output: str | Path, options: ZooCreateOptions = ZooCreateOptions()) -> ZooCreateResult:
    output = check_output(output)
    model = new_model(name, options.set, options.seed)
    return _saved(model, output, ZooCreateResult, config=model.config, seed=options.seed)


def import_hf(folder: str | Path, output: str | Path) -> ImportResult:
    """A Hugging Face folder (BERT, or a Llama / Qwen2 / Mistral causal LM) as a zoo ``bert`` / ``llama``
    checkpoint (record ``import.hf``)."""
    from edgec.models.hf_bert import read_hf_bert
    from edgec.models.hf_common import hf_family
    from edgec.models.hf_llama import read_hf_llama

    folder = Path(folder)
    output = check_output(output)
    arch = hf_family(folder)
    config, state_dict = (read_hf_llama if arch == "llama" else read_hf_bert)(folder)
    check_finite(state_dict, folder)
    digest = hashlib.sha256()
    # config plus every weight file read (a sharded checkpoint has an index and several shards)
    for path in [folder / "config.json", *sorted(folder.glob("model*.safetensors*"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    params = {"source": folder.name, "source_sha256": digest.hexdigest(), "config": config}
    if arch != "bert":  # BERT records stay as they were (same inputs, byte-identical output)
        params = {"arch": arch, **params}
    origin = provenance_record("import.hf", 1, params)
    model = new_model(arch, config, seed=0, origin=origin)
    if arch == "llama":
        # The traced graph holds the rotary inv_freq (a function of the config, not in HF files) as a buffer;
        # read_hf_llama already matched every module tensor by name and shape, so only such buffers are added.
        state_dict = {**{k: v for k, v in model.gm.state_dict().items() if k not in state_dict}, **state_dict}
    load_state_dict_strict(model.gm, state_dict, folder)
    model.provenance[0]["output_digest"] = model.digest()
    return _saved(model, output, ImportResult, config=model.config)


def import_torch(file: str | Path, output: str | Path, options: SourceOptions = SourceOptions()) -> ImportResult:
    """A PyTorch checkpoint (state_dict, safetensors, Lightning, or a pickled module with ``trust_pickle``)
    loaded into ``options.arch`` and written once as an edgec checkpoint (record ``import.torch``)."""
    output = check_output(output, file)
    model = load_checkpoint(file, options)
    if model.provenance and model.provenance[0].get("pass") != "import.torch":
        raise EdgecError(f"{file} is already an edgec checkpoint; use it as it is")
    return _saved(model, output, ImportResult, config=model.config)


# --- passes ----------------------------------------------------------------------------------------

def run_passes(model, names: list[str], params: dict | None = None, progress=None, owned: bool = False):
    """``owned``: the caller gives ``model`` up, so the passes need not copy it (PassManager)."""
    passes = [get_pass(n)(**(params or {}).get(n, {})) for n in names]
    return PassManager(passes)(model, progress=progress, owned=owned)


ScaffoldOptions = ScaffoldHrfOptions | ScaffoldTernaryOptions | ScaffoldBinaryOptions


def pass_params(options: ScaffoldOptions) -> dict:
    """A scaffold pass's parameters: the options' fields other than the model source, ``method`` and
    ``strict``, those given."""
    skip = {f.name for f in fields(SourceOptions)} | {"method", "strict"}
    return {k: v for k, v in options.__dict__.items() if k not in skip and v is not None}


def scaffold(kind: str, input_path: str | Path, output: str | Path | None, options: ScaffoldOptions,
             progress=None) -> ScaffoldResult:
    """Insert a training scaffold (``kind``: hrf, sttn, dlt, binary) with the pass's parameters
    (:func:`pass_params`)."""
    out = _out_path(input_path, output, f".{kind}.pt")  # refused before any work
    model = load(input_path, options)
    before = _model_summary(model)
    scaffolded, records = run_passes(model, [f"scaffold.{kind}"], {f"scaffold.{kind}": pass_params(options)},
                                     progress)
    rec = records[0]
    skipped = rec.get("skipped", [])
    if options.strict:
        refuse_skips(f"scaffold.{kind}", skipped)
    return _saved(scaffolded, out, ScaffoldResult, input=str(input_path), before=before, summary=rec["summary"],
                  skipped=skipped, checks=rec["checks"], scaffold_params=rec["params"],
                  scaffolds=len(scaffolded.scaffolds()))


def scaffold_hrf(input_path, output, options: ScaffoldHrfOptions = ScaffoldHrfOptions(),
                 progress=None) -> ScaffoldResult:
    return scaffold("hrf", input_path, output, options, progress)


def scaffold_ternary(input_path, output, options: ScaffoldTernaryOptions = ScaffoldTernaryOptions(),
                     progress=None) -> ScaffoldResult:
    options.validate()
    return scaffold(options.method, input_path, output, options, progress)


def scaffold_binary(input_path, output, options: ScaffoldBinaryOptions = ScaffoldBinaryOptions(),
                    progress=None) -> ScaffoldResult:
    return scaffold("binary", input_path, output, options, progress)


def fold_model(model, progress=None, owned: bool = False) -> tuple:
    """Every fold (:func:`fold_passes`) on an in-memory model: ``(folded, records, summary, skipped)``; a
    scaffold no fold removed is a skip (export would refuse the model). ``owned``: see :func:`run_passes`."""
    folded, records = run_passes(model, fold_passes(), progress=progress, owned=owned)
    applied = [r for r in records if r["modified"]]
    skipped = [s for r in records for s in r.get("skipped", [])] + [
        skip(n, f"{m.kind} scaffold ({type(m).__name__}) has no fold that applies; export will refuse the model")
        for n, m in folded.scaffolds()]
    summary = ("; ".join(r["summary"] for r in applied) if applied else
               "nothing to fold: no BatchNorm after a Conv/Linear and no training scaffolds")
    if skipped and not any(r.get("skipped") for r in applied):  # else the applied pass's summary counts them
        summary += f"; {len(skipped)} skipped"
    return folded, records, summary, skipped


def fold(input_path: str | Path, output: str | Path | None = None, options: FoldOptions = FoldOptions(),
         progress=None) -> FoldResult:
    out = _out_path(input_path, output, ".folded.pt")
    step = progress or (lambda _desc: None)
    with digest_cache():  # file to file: each model state is hashed once (edgec.core.graph.digest_cache)
        step("loading")
        model = load(input_path, options)
        before = _model_summary(model)
        folded, records, summary, skipped = fold_model(model, progress, owned=True)  # no copy of the weights
        del model
        passes = [{"pass": r["pass"], "modified": r["modified"], "summary": r["summary"], "checks": r["checks"]}
                  for r in records]
        if options.strict:
            refuse_skips("fold", skipped)
        step("writing")
        return _saved(folded, out, FoldResult, input=str(input_path), before=before,
                      folded=any(r["modified"] for r in records), passes=passes, summary=summary, skipped=skipped,
                      scaffolds_left=len(folded.scaffolds()))


def export(input_path: str | Path, output: str | Path | None = None,
           options: ExportOptions = ExportOptions(), progress=None) -> ExportResult:
    """Verified ONNX; ``weights`` auto|fp32|int2 (auto: INT2 where the graph has ternary/binary layers),
    ``forms`` auto|cast|dq|matmulnbits (how each INT2 layer is written; auto = fastest per layer in the target
    session, never slower than fp32), ``activation_precision`` fp32|int8, ``target_config``."""
    out = _out_path(input_path, output, ".onnx")
    step = progress or (lambda _desc: None)
    with digest_cache():  # file to file: the checkpoint's digest is computed once (when verified on load)
        step("loading")
        model = load(input_path, options)
        step("exporting and verifying")
        return export_model(model, out, options, input_label=str(input_path), progress=progress)


def export_kv_model(model, out: Path, options: ExportOptions, input_label: str | None = None,
                    progress=None) -> ExportResult:
    """``--kv-cache``: one prefill + decode graph (edgec.onnx.generation), verified over prefill and 16 decode
    steps, written atomically. No model card or quality gates (they score one-shot forwards)."""
    from edgec.onnx.generation import export_kv

    gated = [f"--{k.replace('_', '-')}" for k in ("data", "min_metric", "max_metric_drop", "max_latency_ms",
                                                  "max_size_kb") if getattr(options, k) is not None]
    if gated:
        raise EdgecError(f"--kv-cache exports are not scored by the quality gates; drop {', '.join(gated)}")
    data, record = export_kv(model, **_export_kwargs(options), progress=progress)
    atomic_write(out, data)
    return _export_result(model, out, data, record, input_label)


def _export_result(model, out: Path, data: bytes, record: dict, input_label: str | None, **fields) -> ExportResult:
    parity = record["checks"]["ort_parity"]
    lowbit = record.get("lowbit") or {}
    return ExportResult(input=input_label, output=str(out), file_bytes=len(data),
                        sha256=hashlib.sha256(data).hexdigest(), opset=record["params"]["opset"],
                        weights=record["params"]["weights"], params=model.param_count(), checks=record["checks"],
                        max_rel_error=parity["rel_error"], provenance_records=len(model.provenance) + 1,
                        size=record.get("size"), lowbit_layers=lowbit.get("layers"),
                        fp32_layers=lowbit.get("fp32_layers"), forms=_forms_summary(record), **fields)


def export_model(model, out: Path, options: ExportOptions, input_label: str | None = None,
                 progress=None) -> ExportResult:
    """Export an in-memory ``Model`` to ``out`` (already checked as an output path), verified, with its model
    card (edgec.app.card) embedded and written beside it, after the quality gates (edgec.app.gates): a failed
    gate writes ``<out>.rejected`` instead and raises GateFailed (exit 1)."""
    from edgec.app import card as model_card
    from edgec.app import gates
    from edgec.onnx.export import export as export_onnx

    if options.kv_cache:
        return export_kv_model(model, out, options, input_label, progress)
    checks = gates.from_options(options)
    gates.require_data(checks, options.data, "export")
    gates.check_task(checks, model.spec.task, "export")
    card_out = check_output(model_card.card_path(out), input_label, options.data)
    check_output(gates.rejected_path(out), input_label, options.data)
    bundle = gates.load_model_data(options.data, model) if options.data is not None else None
    say = progress or (lambda _m: None)
    data, record = export_onnx(model, **_export_kwargs(options), progress=progress)
    session = record["checks"]["ort_parity"].get("session_config") or None
    if bundle is not None or checks.max_latency_ms is not None:
        say("measuring the file for the card and the gates")
    measured = gates.measure_export(model, data, bundle, checks, int(options.threads), ort_config=session)
    precisions = score_precisions(model, options, record, measured, bundle, say)
    data, card, report = model_card.attach(data, model_card.base_card(model, record, measured),
                                           gates.decide_size(checks, measured))
    gates.write_or_reject(out, data, report)
    atomic_write(card_out, model_card.markdown(card).encode())
    return _export_result(model, out, data, record, input_label, card=str(card_out), gates=report,
                          activation_precisions=precisions)


def _forms_summary(record: dict) -> dict | None:
    from edgec.app.card import form_counts

    lowbit = record.get("lowbit")
    if not lowbit:
        return None
    params = record["params"]
    whole = dict(lowbit.get("whole_model") or {})
    runs = (record.get("measurements") or {}).get("whole_model")
    if runs:
        whole["runs"] = runs
    return {"requested": params["forms"], "activation_precision": params["activation_precision"],
            "target_config": params["target_config"], "session_config": params["session_config"],
            "layers": form_counts(lowbit["layers"]), "int8_activation_layers": lowbit.get("int8_activation_layers", 0),
            "whole_model": whole or None}


def _export_kwargs(options: ExportOptions, **override) -> dict:
    kwargs = {"opset": options.opset, "weights": options.weights, "forms": options.forms,
              "threads": int(options.threads), "activation_precision": options.activation_precision,
              "target_config": options.target_config}
    return kwargs | override


def int8_layers(record: dict) -> int:
    """Low-bit layers of an export that compute with int8 activations in the session it was verified in."""
    return (record.get("lowbit") or {}).get("int8_activation_layers", 0)


def score_precisions(model, options: ExportOptions, record: dict, measured, bundle, say=None) -> dict | None:
    """With data and INT2 weights: the task metric and ORT parity at both activation precisions (the other one
    exported the same way), so an int8-activation file is judged on the task, not only on parity."""
    from edgec.app import gates
    from edgec.onnx.export import export as export_onnx

    if bundle is None or record["params"]["weights"] != "int2":
        return None
    chosen = options.activation_precision
    other = "fp32" if chosen == "int8" else "int8"
    out = {chosen: _precision_row(record, measured.evaluation)}
    if say is not None:
        say(f"exporting and scoring {other} activations for comparison")
    data, rec = export_onnx(model, **_export_kwargs(options, activation_precision=other))
    if int8_layers(rec) == int8_layers(record) == 0:  # both compute in float32: nothing to score twice
        out[other] = dict(out[chosen], same_as=chosen)
    else:
        ev = gates.score(data, bundle, split=measured.evaluation["split"],
                         ort_config=rec["checks"]["ort_parity"].get("session_config") or None)
        out[other] = _precision_row(rec, ev)
    return {"chosen": chosen, "split": measured.evaluation["split"], "precisions": out}


def _precision_row(record: dict, evaluation: dict) -> dict:
    return {"metrics": evaluation["metrics"], "parity_rel_error": record["checks"]["ort_parity"]["rel_error"],
            "int8_activation_layers": int8_layers(record),
            "forms": sorted({r["form"] for r in record["lowbit"]["layers"]})}


# --- training, evaluation, latency, pruning ---------------------------------------------------------

def finetune(input_path: str | Path, output: str | Path, options: FinetuneOptions, progress=None) -> FinetuneResult:
    """Real training (AdamW, warm-up + cosine, clipping, keep-best, resumable, DDP under torchrun);
    see edgec.train.job.finetune_file."""
    from edgec.train.job import finetune_file

    return finetune_file(input_path, output, options, progress=progress)


def evaluate(input_path: str | Path, options: EvalOptions, progress=None) -> EvalResult:
    """The one evaluation protocol for .pt and .onnx: task metrics, size, ORT latency (see edgec.evaluation).
    Audio features default to those the model was fine-tuned with (recorded in its provenance)."""
    from edgec.evaluation import evaluate as run_eval

    o = options
    return EvalResult(run_eval(input_path, o.data, split=o.split, threads=o.threads, latency_batch=o.latency_batch,
                               latency=not o.no_latency, arch=o, n_mels=o.n_mels, frames=o.frames,
                               block_size=o.block_size, progress=progress))


def _latency_table(model, options: ProfileOptions, progress) -> dict:
    """A table from ``options.table`` (key checked), else the cached or freshly measured one."""
    from edgec.latency import table as tbl
    from edgec.latency.cache import cached as cached_table
    from edgec.latency.shapes import parse_input_shapes

    shapes = parse_input_shapes(model.spec, _as_list(options.input_shape)) if options.input_shape else None
    if options.table:
        result = tbl.load_table(options.table, model, threads=options.threads, shapes=shapes)
        result["_cache"] = {"hit": False, "path": Path(options.table).name}
        return result
    return cached_table(model, options.threads, shapes, batch=options.batch, units=options.units,
                        patterns=_as_list(options.patterns), refresh=options.refresh, progress=progress)


def profile(input_path: str | Path, output: str | Path | None = None, options: ProfileOptions = ProfileOptions(),
            progress=None) -> ProfileResult:
    """Latency table for pruning: every prunable group timed in onnxruntime at a grid of densities, plus the
    dense model (see edgec.latency). A cached table with the same key is reused; ``options.table`` loads one
    measured on the target device instead (key checked)."""
    from edgec.latency import table as tbl

    out = _out_path(input_path, output, ".latency.json")
    if options.plot:
        check_output(options.plot, input_path, options.table, others={"the table output": out})
    model = load(input_path, options)
    result = _latency_table(model, options, progress)
    cache = result.pop("_cache", {})
    warnings = result.pop("load_warnings", [])
    atomic_write(out, (canonical_json(result) + "\n").encode())
    if options.plot:
        tbl.plot_table(result, options.plot)
    return ProfileResult(input=str(input_path), output=str(out), key=result["key"],
                         dense_ms=result["dense"]["median_ms"], remainder_ms=result.get("remainder_ms"),
                         units=tbl.summary_rows(result), patterns=result["request"]["patterns"],
                         densities=result["densities"], cache_hit=bool(cache.get("hit")), warnings=warnings,
                         plot=str(options.plot) if options.plot else None)


def prune(input_path: str | Path, output: str | Path | None, options: PruneOptions, progress=None) -> PruneResult:
    """ALCS pruning under a latency budget, measured in onnxruntime (see edgec.prune.run.prune_model), then
    the accuracy damage (measured with data, else estimated) and the quality gates (edgec.app.gates).
    Exit codes: 4 infeasible budget (refused before any work), 5 budget missed after the retries, 1 a failed
    gate (the checkpoint goes to ``<output>.rejected``)."""
    from edgec.app import gates
    from edgec.prune.run import prune_model

    options.validate()
    gates.require_data(gates.from_options(options), options.data, "prune")
    out = _out_path(input_path, output, ".pruned.pt")
    check_output(out, input_path, options.data, options.table)
    check_output(gates.rejected_path(out), input_path, options.data, options.table)
    model = load(input_path, options)
    gates.check_task(gates.from_options(options), model.spec.task, "prune")
    pruned, result = prune_model(model, options, progress=progress, input_label=str(Path(input_path)))
    return gates.release_pruned(model, pruned, result, out, options, progress)


def inspect(path: str | Path, options: InspectOptions = InspectOptions()) -> CheckpointInfo | OnnxInfo:
    from edgec.app.inspection import inspect_file

    return inspect_file(path, arch=options)
