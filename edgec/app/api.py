"""The Python API behind the CLI. Every function takes paths and plain values and returns a plain dict
(JSON-serialisable) describing what it did; the CLI only renders these.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from edgec.core.fileio import check_output
from edgec.core.provenance import record as provenance_record
from edgec.core.errors import EdgecError

def fold_passes() -> list[str]:
    """The folds `edgec fold` tries: every registered scaffold's declared fold, in registry order (HRF before
    the low-bit folds, since nothing may sit between H and W1'), then BatchNorm last (it also folds into the
    low-bit layers the other folds produce)."""
    from edgec.core.pass_manager import PASSES, get_pass

    folds = [get_pass(name).scaffold_fold for name in PASSES if name.startswith("scaffold.")]
    return list(dict.fromkeys(f for f in folds if f)) + ["fold.batchnorm"]


def _out_path(input_path: str | Path, output: str | Path | None, suffix: str) -> Path:
    src = Path(input_path)
    return check_output(Path(output) if output else src.with_name(f"{src.stem}{suffix}"), src)


def _model_summary(model) -> dict:
    return {"arch": model.arch, "params": model.param_count(), "bytes": model.nbytes(), "digest": model.digest()}


def load(path: str | Path, arch: str | None = None):
    from edgec.models.checkpoint import load_checkpoint

    return load_checkpoint(path, arch=arch)


def save(model, output: str | Path) -> dict:
    from edgec.models.checkpoint import save_checkpoint

    save_checkpoint(model, output)
    return {"output": str(output), **_model_summary(model), "file_bytes": Path(output).stat().st_size}


# --- zoo -------------------------------------------------------------------------------------------

def zoo_list() -> list[dict]:
    from edgec import models

    rows = []
    for name in models.ZOO:
        cls = models.resolve(name)
        module = cls(**cls.default_config())
        spec = module.input_spec()
        rows.append({"name": name, "summary": cls.summary, "params": sum(p.numel() for p in module.parameters()),
                     "inputs": spec.to_json()["inputs"], "task": spec.task, "config": cls.default_config()})
    return rows


def zoo_create(name: str, output: str | Path, overrides: dict | None = None, seed: int = 0) -> dict:
    from edgec.models.checkpoint import new_model

    output = check_output(output)
    model = new_model(name, overrides, seed)
    return save(model, output) | {"config": model.config, "seed": seed}


def import_hf(folder: str | Path, output: str | Path) -> dict:
    from edgec.models.checkpoint import check_finite, load_state_dict_strict, new_model
    from edgec.models.hf_bert import read_hf_bert

    folder = Path(folder)
    output = check_output(output)
    config, state_dict = read_hf_bert(folder)
    check_finite(state_dict, folder)
    digest = hashlib.sha256()
    # config plus every weight file read (a sharded checkpoint has an index and several shards)
    for path in [folder / "config.json", *sorted(folder.glob("model*.safetensors*"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    origin = provenance_record("import.hf", 1, {"source": folder.name, "source_sha256": digest.hexdigest(),
                                                "config": config})
    model = new_model("bert", config, seed=0, origin=origin)
    load_state_dict_strict(model.gm, state_dict, folder)
    model.provenance[0]["output_digest"] = model.digest()
    return save(model, output) | {"config": model.config}


# --- passes ----------------------------------------------------------------------------------------

def run_passes(model, names: list[str], params: dict | None = None, progress=None):
    from edgec.core.pass_manager import PassManager, get_pass

    passes = [get_pass(n)(**(params or {}).get(n, {})) for n in names]
    return PassManager(passes)(model, progress=progress)


def scaffold(kind: str, input_path: str | Path, output: str | Path, arch: str | None = None,
             progress=None, **params) -> dict:
    """Insert a training scaffold (``kind``: hrf, sttn, dlt, binary) with the pass's parameters."""
    model = load(input_path, arch)
    out = _out_path(input_path, output, f".{kind}.pt")
    before = _model_summary(model)
    params = {k: v for k, v in params.items() if v is not None}
    scaffolded, records = run_passes(model, [f"scaffold.{kind}"], {f"scaffold.{kind}": params}, progress)
    rec = records[0]
    return save(scaffolded, out) | {"input": str(input_path), "before": before, "summary": rec["summary"],
                                    "checks": rec["checks"], "scaffold_params": rec["params"],
                                    "scaffolds": len(scaffolded.scaffolds())}


def scaffold_hrf(input_path, output, **params) -> dict:
    return scaffold("hrf", input_path, output, **params)


def scaffold_ternary(input_path, output, method: str = "sttn", **params) -> dict:
    if method not in ("sttn", "dlt"):
        raise EdgecError(f"--method must be sttn or dlt, got '{method}'")
    if method == "sttn" and params.get("group_size") is not None:
        raise EdgecError("--group-size applies to --method dlt (STTN scales per output channel)")
    return scaffold(method, input_path, output, **params)


def scaffold_binary(input_path, output, **params) -> dict:
    return scaffold("binary", input_path, output, **params)


def fold(input_path: str | Path, output: str | Path | None = None, arch: str | None = None, progress=None) -> dict:
    model = load(input_path, arch)
    out = _out_path(input_path, output, ".folded.pt")
    before = _model_summary(model)
    folded, records = run_passes(model, fold_passes(), progress=progress)
    applied = [r for r in records if r["modified"]]
    result = save(folded, out)
    return result | {
        "input": str(input_path), "before": before, "folded": bool(applied),
        "passes": [{"pass": r["pass"], "modified": r["modified"], "summary": r["summary"], "checks": r["checks"]}
                   for r in records],
        "summary": "; ".join(r["summary"] for r in applied) if applied else
        "nothing to fold: no BatchNorm after a Conv/Linear and no training scaffolds",
        "scaffolds_left": len(folded.scaffolds()),
    }


def export(input_path: str | Path, output: str | Path | None = None, opset: int | None = None,
           arch: str | None = None, weights: str = "auto", forms: str = "measure") -> dict:
    """Verified ONNX; ``weights`` auto|fp32|int2 (auto: INT2 where the graph has ternary/binary layers),
    ``forms`` measure|dq|matmulnbits (how INT2 Linear layers are stored; measure = fastest per layer)."""
    from edgec.core.fileio import atomic_write
    from edgec.onnx.export import export as export_onnx

    model = load(input_path, arch)
    out = _out_path(input_path, output, ".onnx")
    data, record = export_onnx(model, opset=opset, weights=weights, forms=forms)
    atomic_write(out, data)
    parity = record["checks"]["ort_parity"]
    lowbit = record.get("lowbit") or {}
    return {"input": str(input_path), "output": str(out), "file_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "opset": record["params"]["opset"],
            "weights": record["params"]["weights"], "params": model.param_count(), "checks": record["checks"],
            "max_rel_error": parity["rel_error"], "passes": len(model.provenance) + 1,
            "size": record.get("size"), "lowbit_layers": lowbit.get("layers"),
            "fp32_layers": lowbit.get("fp32_layers")}


def finetune(input_path: str | Path, data: str, output: str | Path, **options) -> dict:
    """Real training (AdamW, warm-up + cosine, clipping, keep-best, resumable, DDP under torchrun);
    see edgec.train.job.finetune_file for the options."""
    from edgec.train.job import finetune_file

    options = {k: v for k, v in options.items() if v is not None}
    data_options = dict(options.pop("data_options", None) or {})
    for key in ("n_mels", "frames", "val_fraction"):
        if key in options:
            data_options[key] = options.pop(key)
    return finetune_file(input_path, data, output, data_options=data_options, **options)


def evaluate(input_path: str | Path, data: str, split: str | None = "test", threads: int = 1,
             latency_batch: int = 1, no_latency: bool = False, arch: str | None = None, n_mels: int | None = None,
             frames: int | None = None, progress=None) -> dict:
    """The one evaluation protocol for .pt and .onnx: task metrics, size, ORT latency (see edgec.evaluation).
    Audio features default to those the model was fine-tuned with (recorded in its provenance)."""
    from edgec.evaluation import evaluate as run_eval

    return run_eval(input_path, data, split=split, threads=threads, latency_batch=latency_batch,
                    latency=not no_latency, arch=arch, n_mels=n_mels, frames=frames, progress=progress)


def profile(input_path: str | Path, output: str | Path | None = None, threads: int = 1,
            input_shape: list[str] | None = None, batch: int = 1, table: str | Path | None = None,
            plot: str | Path | None = None, patterns: list[str] | None = None, units: str = "groups",
            refresh: bool = False, arch: str | None = None, progress=None) -> dict:
    """Latency table for pruning: every prunable group timed in onnxruntime at a grid of densities, plus the
    dense model (see edgec.latency). A cached table with the same key is reused; ``table`` loads one
    measured on the target device instead (key checked)."""
    from edgec.core.fileio import atomic_write
    from edgec.core.graph import canonical_json
    from edgec.latency.shapes import parse_input_shapes
    from edgec.latency.cache import cached as cached_table
    from edgec.latency import table as tbl

    input_shape = [input_shape] if isinstance(input_shape, str) else input_shape
    patterns = [patterns] if isinstance(patterns, str) else patterns
    model = load(input_path, arch)
    out = _out_path(input_path, output, ".latency.json")
    shapes = parse_input_shapes(model.spec, input_shape) if input_shape else None
    if table:
        result = tbl.load_table(table, model, threads=threads, shapes=shapes)
        result["_cache"] = {"hit": False, "path": Path(table).name}
    else:
        result = cached_table(model, threads, shapes, batch=batch, units=units, patterns=patterns,
                            refresh=refresh, progress=progress)
    cache = result.pop("_cache", {})
    warnings = result.pop("load_warnings", [])
    atomic_write(out, (canonical_json(result) + "\n").encode())
    if plot:
        tbl.plot_table(result, plot)
    return {"input": str(input_path), "output": str(out), "key": result["key"], "dense_ms": result["dense"]["median_ms"],
            "remainder_ms": result.get("remainder_ms"), "units": tbl.summary_rows(result),
            "patterns": result["request"]["patterns"], "densities": result["densities"],
            "cache_hit": bool(cache.get("hit")), "warnings": warnings, "plot": str(plot) if plot else None}


def prune(input_path: str | Path, output: str | Path | None = None, **options) -> dict:
    """ALCS pruning under a latency budget, measured in onnxruntime (see edgec.prune.run.prune_file).
    Exit codes: 4 infeasible budget (refused before any work), 5 budget missed after the retries."""
    from edgec.prune.run import prune_file

    out = _out_path(input_path, output, ".pruned.pt")
    options = {k: v for k, v in options.items() if v is not None}
    data_options = {k: options.pop(k) for k in ("n_mels", "frames", "val_fraction") if k in options}
    if isinstance(options.get("input_shape"), str):
        options["input_shape"] = [options["input_shape"]]
    if data_options:
        options["data_options"] = data_options
    check_output(out, input_path, options.get("data"), options.get("table"))
    return prune_file(input_path, out, **options)


def inspect(path: str | Path, arch: str | None = None) -> dict:
    from edgec.app.inspection import inspect_file

    return inspect_file(path, arch=arch)
