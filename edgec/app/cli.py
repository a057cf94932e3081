"""The edgec command line: typer parses, edgec.app.api works, edgec.app.render shows. No torch at import time."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgec import __version__
from edgec.core.errors import EXIT_INTERNAL, EdgecError
from edgec.app import render as r

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="edgec: PyTorch checkpoints → small, fast, verified ONNX artifacts.")
zoo_app = typer.Typer(no_args_is_help=True, help="The model zoo: list and create models.")
import_app = typer.Typer(no_args_is_help=True, help="Import checkpoints from other formats.")
app.add_typer(zoo_app, name="zoo")
app.add_typer(import_app, name="import")
scaffold_app = typer.Typer(no_args_is_help=True, help="Insert training-time scaffolds (folded back by `edgec fold`).")
app.add_typer(scaffold_app, name="scaffold")

STATE = {"debug": bool(os.environ.get("EDGEC_DEBUG"))}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="Architecture for a bare state_dict or a user "
                                                "class: zoo name or package.module:Class.")]
OutOpt = Annotated[Optional[Path], typer.Option("-o", "--output", help="Output file.")]


def _version(value: bool):
    if value:
        typer.echo(f"edgec {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
):
    if debug:
        STATE["debug"] = True


def parse_sets(items: list[str] | None) -> dict:
    """`--set key=value`: values parsed as JSON when they parse (numbers, lists, true/false), else strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EdgecError(f"--set expects key=value, got '{item}'")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


# --- zoo -------------------------------------------------------------------------------------------

@zoo_app.command("list")
def zoo_list(as_json: JsonOpt = False):
    """List the zoo's architectures with their default sizes and inputs."""
    from edgec.app import api

    rows = api.zoo_list()
    if as_json:
        return r.print_json(rows)
    r.console.print(r.rows_table("edgec model zoo", ["name", "params", "inputs", "task", "description"], [
        [x["name"], r.human_count(x["params"]),
         "; ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in x["inputs"]), x["task"], x["summary"]]
        for x in rows]))


@zoo_app.command("create")
def zoo_create(
    name: Annotated[str, typer.Argument(help="Zoo architecture (see `edgec zoo list`) or package.module:Class.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint to write.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Config override key=value (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
    as_json: JsonOpt = False,
):
    """Create a freshly initialised model checkpoint."""
    from edgec.app import api

    res = api.zoo_create(name, output, parse_sets(set_), seed)
    if as_json:
        return r.print_json(res)
    r.console.print(r.kv_table(f"created {name}", [
        ("output", res["output"]), ("params", r.human_count(res["params"])),
        ("file size", r.human_bytes(res["file_bytes"])), ("digest", res["digest"][:16]),
        ("config", ", ".join(f"{k}={v}" for k, v in sorted(res["config"].items())))]))


@import_app.command("hf")
def import_hf(
    folder: Annotated[Path, typer.Argument(help="Folder with config.json and model.safetensors (BertModel layout).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint to write.")],
    as_json: JsonOpt = False,
):
    """Import a Hugging Face BERT checkpoint (no transformers needed)."""
    from edgec.app import api

    with r.spinner(f"importing {folder}", not as_json):
        res = api.import_hf(folder, output)
    if as_json:
        return r.print_json(res)
    r.console.print(r.kv_table("imported BERT", [
        ("output", res["output"]), ("params", r.human_count(res["params"])),
        ("layers", res["config"].get("num_hidden_layers")), ("hidden", res["config"].get("hidden_size")),
        ("digest", res["digest"][:16])]))


# --- passes ----------------------------------------------------------------------------------------

def _show_scaffold(res: dict, as_json: bool) -> None:
    if as_json:
        return r.print_json(res)
    rows = [("scaffold", res["summary"]), ("parameters", ", ".join(f"{k}={v}" for k, v in res["scaffold_params"].items())),
            ("params (training)", f"{r.human_count(res['before']['params'])} → {r.human_count(res['params'])}")]
    rows += [(f"check {k}", r.check_text(v)) for k, v in res["checks"].items()]
    r.console.print(r.kv_table("scaffold", rows + [("output", res["output"])]))


@scaffold_app.command("hrf")
def scaffold_hrf(
    model: Annotated[Path, typer.Argument(help="Checkpoint with transformer FFNs.")],
    output: OutOpt = None,
    expand: Annotated[int, typer.Option("--expand", help="K: H maps d → K·d.")] = 4,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Glob over FFN first-linear names (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Glob to skip (repeatable).")] = None,
    init: Annotated[str, typer.Option("--init", help="default (train from scratch) | preserve (function-preserving).")] = "default",
    seed: Annotated[int, typer.Option(help="Seed for the inserted weights.")] = 0,
    arch: ArchOpt = None,
    as_json: JsonOpt = False,
):
    """HRF: insert H (d → K·d) in front of every FFN's first linear; `edgec fold` folds it back exactly."""
    from edgec.app import api

    with r.spinner("scaffolding", not as_json) as update:
        res = api.scaffold("hrf", model, output, arch, progress=update, expand=expand, include=include or None,
                           exclude=exclude or None, init=init, seed=seed)
    _show_scaffold(res, as_json)


Include = Annotated[Optional[list[str]], typer.Option("--include", help="Glob over layer names (repeatable).")]
Exclude = Annotated[Optional[list[str]], typer.Option("--exclude", help="Glob over layer names to skip (repeatable).")]
KeepFirstLast = Annotated[bool, typer.Option("--keep-first-last/--no-keep-first-last",
                                             help="Keep the first layer and the classifier in full precision.")]


@scaffold_app.command("ternary")
def scaffold_ternary(
    model: Annotated[Path, typer.Argument(help="Checkpoint to ternarise.")],
    output: OutOpt = None,
    method: Annotated[str, typer.Option("--method", help="sttn (two binary kernels, soft threshold) | dlt "
                                        "(learnable per-group scale and shift).")] = "sttn",
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="DLT group size along the fan-in "
                                                       "(0: one group per output channel; default 128).")] = None,
    activations: Annotated[str, typer.Option("--activations", help="none | ternary (quantize layer inputs).")] = "none",
    include: Include = None,
    exclude: Exclude = None,
    keep_first_last: KeepFirstLast = True,
    seed: Annotated[Optional[int], typer.Option(help="Seed for STTN's latent split.")] = None,
    arch: ArchOpt = None,
    as_json: JsonOpt = False,
):
    """Ternary training scaffold on Conv/Linear weights (STTN or DLT); `edgec fold` turns it into 2-bit layers."""
    from edgec.app import api

    with r.spinner("scaffolding", not as_json) as update:
        res = api.scaffold_ternary(model, output, method=method, arch=arch, progress=update, group_size=group_size,
                                   activations=activations, include=include or None, exclude=exclude or None,
                                   keep_first_last=keep_first_last, seed=seed)
    _show_scaffold(res, as_json)


@scaffold_app.command("binary")
def scaffold_binary(
    model: Annotated[Path, typer.Argument(help="Checkpoint to binarise.")],
    output: OutOpt = None,
    activations: Annotated[str, typer.Option("--activations", help="none | binary (quantize layer inputs).")] = "none",
    latent_weight: Annotated[str, typer.Option("--latent-weight", help="λ1,λ2: weights of the real-valued latent "
                                               "path's CE and cosine terms during fine-tuning.")] = "0.5,0.5",
    include: Include = None,
    exclude: Exclude = None,
    keep_first_last: KeepFirstLast = True,
    arch: ArchOpt = None,
    as_json: JsonOpt = False,
):
    """Binary weights sign(W)·α, with the real latent weights as a supervised parallel path while training."""
    from edgec.app import api

    with r.spinner("scaffolding", not as_json) as update:
        res = api.scaffold_binary(model, output, arch=arch, progress=update, activations=activations,
                                  latent_weight=latent_weight, include=include or None, exclude=exclude or None,
                                  keep_first_last=keep_first_last)
    _show_scaffold(res, as_json)


@app.command("fold")
def fold(
    model: Annotated[Path, typer.Argument(help="Checkpoint to fold.")],
    output: OutOpt = None,
    arch: ArchOpt = None,
    as_json: JsonOpt = False,
):
    """Fold everything foldable (training scaffolds, BatchNorm) and verify the result. Default output: <stem>.folded.pt."""
    from edgec.app import api

    with r.spinner("folding", not as_json) as update:
        res = api.fold(model, output, arch, progress=update)
    if as_json:
        return r.print_json(res)
    rows = [(p["pass"], (p["summary"] or "-") + ("" if not p["checks"] else
             "  [" + "; ".join(r.check_text(c) for c in p["checks"].values()) + "]")) for p in res["passes"]]
    r.console.print(r.kv_table("fold", rows + [
        ("params", f"{r.human_count(res['before']['params'])} → {r.human_count(res['params'])}"),
        ("output", res["output"])]))
    if not res["folded"]:
        r.console.print(f"[yellow]{res['summary']}[/] (copied unchanged to {res['output']})")


@app.command("export")
def export(
    model: Annotated[Path, typer.Argument(help="Checkpoint to export.")],
    output: OutOpt = None,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default 20; 25 with INT2 weights).")] = None,
    weights: Annotated[str, typer.Option("--weights", help="auto (INT2 where the graph is ternary/binary) | fp32 | int2.")] = "auto",
    forms: Annotated[str, typer.Option("--forms", help="INT2 Linear storage: measure (fastest per layer) | dq "
                                       "(DequantizeLinear) | matmulnbits.")] = "measure",
    arch: ArchOpt = None,
    as_json: JsonOpt = False,
):
    """Export to ONNX, verify against torch in onnxruntime, embed provenance. Default output: <stem>.onnx."""
    from edgec.app import api

    with r.spinner("exporting and verifying", not as_json):
        res = api.export(model, output, opset, arch, weights=weights, forms=forms)
    if as_json:
        return r.print_json(res)
    parity = res["checks"]["ort_parity"]
    rows = [("output", res["output"]), ("size", r.human_bytes(res["file_bytes"])), ("opset", res["opset"]),
            ("weights", res["weights"])]
    if res.get("size"):
        sz = res["size"]
        forms_used = {}
        for layer in res["lowbit_layers"] or []:
            forms_used[layer.get("form", "?")] = forms_used.get(layer.get("form", "?"), 0) + 1
        rows += [("low-bit layers", f"{len(res['lowbit_layers'] or [])} ({', '.join(f'{k}×{v}' for k, v in forms_used.items())})"),
                 ("low-bit weights vs fp32", f"{sz['lowbit_weight_ratio']:.3f}"),
                 ("file vs fp32 file", f"{sz['file_ratio']:.3f} (fp32 layers: {len(res['fp32_layers'] or [])})")]
    rows += [("params", r.human_count(res["params"])), ("sha256", res["sha256"][:16]),
             ("provenance", f"{res['passes']} record(s) in metadata 'edgec.provenance'")]
    for name, p in parity["parity"].items():
        rows.append((f"ORT parity {name.replace('_', ' ')} {p['shape']}", r.check_text(p | {
            "tolerance": parity["tolerance"], "passed": p["rel_error"] <= parity["tolerance"]})))
    r.console.print(r.kv_table("export", rows))


@app.command("finetune")
def finetune(
    model: Annotated[Path, typer.Argument(help="Checkpoint to train (scaffolded or not).")],
    data: Annotated[str, typer.Option("--data", help="Audio folder with labels.csv, tensor file or package.module:function.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Best checkpoint to write.")],
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch size (split across processes).")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.01,
    warmup: Annotated[float, typer.Option(help="Warm-up as a fraction of all steps, then cosine decay.")] = 0.1,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Max gradient norm (0: off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for data order, dropout and initialisation.")] = 0,
    distill: Annotated[Optional[str], typer.Option("--distill", help="none | logits (KL on soft targets) | off "
                       "(task loss + λ·(1 − cos) on hidden features). Default: logits with --teacher, else none.")] = None,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="Teacher checkpoint (default with --distill: the "
                       "full-precision checkpoint the scaffold came from, found by digest next to MODEL).")] = None,
    kd_weight: Annotated[Optional[float], typer.Option("--kd-weight", help="w in (1−w)·task + w·KD; default 0.5 with "
                         "logits, 0 with off; 1 = pure distillation.")] = None,
    off_weight: Annotated[float, typer.Option("--off-weight", help="λ: weight of the OFF term.")] = 1.0,
    off_layers: Annotated[Optional[str], typer.Option("--off-layers", help="Comma-separated module names/globs whose "
                          "outputs OFF compares (default: every block output).")] = None,
    binary_weights: Annotated[Optional[str], typer.Option("--binary-weights", help="λ1,λ2 for binary scaffolds' "
                              "latent path (default: as recorded by scaffold binary; 0,0 = off).")] = None,
    kd_temperature: Annotated[float, typer.Option("--kd-temperature")] = 2.0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the resume file of an interrupted run.")] = False,
    resume_file: Annotated[Optional[Path], typer.Option("--resume-file", help="Default: <output>.resume.")] = None,
    keep_resume: Annotated[bool, typer.Option("--keep-resume", help="Keep the resume file after success.")] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="auto (default), cpu, cuda, cuda:N.")] = None,
    n_mels: Annotated[Optional[int], typer.Option("--n-mels", help="Log-mel bins for audio data (default: the model's).")] = None,
    frames: Annotated[Optional[int], typer.Option("--frames", help="Frames per clip for audio data (default 200).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Held-out fraction when the data has no val split.")] = None,
    arch: ArchOpt = None,
    as_json: JsonOpt = False,
):
    """Fine-tune on real data: AdamW, warm-up + cosine, clipping, keep-best, resumable; DDP under torchrun.

    Progress goes to stderr (also with --json); under torchrun only rank 0 prints and writes."""
    from edgec.app import api

    data_options = {k: v for k, v in {"n_mels": n_mels, "frames": frames, "val_fraction": val_fraction}.items()
                    if v is not None}
    with r.TrainProgress() as progress:
        res = api.finetune(model, data, output, epochs=epochs, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip, seed=seed,
                           teacher=teacher, kd_weight=kd_weight, kd_temperature=kd_temperature, resume=resume,
                           distill=distill, off_weight=off_weight, binary_weights=binary_weights,
                           off_layers=[x.strip() for x in off_layers.split(",")] if off_layers else None,
                           resume_file=resume_file, keep_resume=keep_resume, arch=arch, progress=progress,
                           device=device, data_options=data_options)
    if res.get("rank", 0) != 0:
        return
    if as_json:
        return r.print_json(res)
    r.console.print(r.finetune_table(res))


@app.command("eval")
def eval_(
    model: Annotated[Path, typer.Argument(help="A .pt checkpoint or an .onnx file.")],
    data: Annotated[str, typer.Option("--data", help="Audio folder with labels.csv, tensor file (.pt/.npz/"
                                      ".safetensors) or package.module:function.")],
    split: Annotated[str, typer.Option(help="Split to score (test falls back to val when absent).")] = "test",
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads for latency.")] = 1,
    latency_batch: Annotated[int, typer.Option("--latency-batch", help="Batch size for the latency run.")] = 1,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip the latency measurement.")] = False,
    n_mels: Annotated[Optional[int], typer.Option("--n-mels", help="Log-mel bins (default: the model's).")] = None,
    frames: Annotated[Optional[int], typer.Option("--frames", help="Frames per clip (default: as fine-tuned, else 200).")] = None,
    arch: ArchOpt = None,
    as_json: JsonOpt = False,
):
    """Score a checkpoint or ONNX file with one protocol: accuracy/WA, UAR, macro-F1 (or CCC, MAE), size, latency."""
    from edgec.app import api

    with r.spinner("evaluating", not as_json) as update:
        res = api.evaluate(model, data, split=split, threads=threads, latency_batch=latency_batch,
                           no_latency=no_latency, arch=arch, n_mels=n_mels, frames=frames, progress=update)
    if as_json:
        return r.print_json(res)
    r.console.print(r.eval_table(res))


@app.command("profile")
def profile(
    model: Annotated[Path, typer.Argument(help="Checkpoint to profile.")],
    output: OutOpt = None,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads (part of the table key).")] = 1,
    input_shape: Annotated[Optional[list[str]], typer.Option("--input-shape", help="NAME=1x200x40 (repeatable) or "
                           "1,200,40 for a single-input model; default: the spec's traced shape at --batch.")] = None,
    batch: Annotated[int, typer.Option(help="Batch size when --input-shape is not given.")] = 1,
    pattern: Annotated[Optional[list[str]], typer.Option("--pattern", help="channel and/or simd:N (repeatable).")] = None,
    table: Annotated[Optional[Path], typer.Option("--table", help="Use a table measured on the target device.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write per-unit latency bars to this PNG.")] = None,
    refresh: Annotated[bool, typer.Option("--refresh", help="Measure again even if a cached table matches.")] = False,
    arch: ArchOpt = None,
    as_json: JsonOpt = False,
):
    """Measure per-group latency over a density grid in onnxruntime (cached by runtime, threads, CPU, shape)."""
    from edgec.app import api

    with r.spinner("profiling", not as_json) as update:
        res = api.profile(model, output, threads=threads, input_shape=input_shape, batch=batch, table=table,
                          plot=plot, patterns=pattern or None, refresh=refresh, arch=arch,
                          progress=update)
    if as_json:
        return r.print_json(res)
    r.console.print(r.profile_table(res))


@app.command("prune")
def prune(
    model: Annotated[Path, typer.Argument(help="Checkpoint to prune.")],
    output: OutOpt = None,
    latency_ms: Annotated[Optional[float], typer.Option("--latency-ms", help="Budget: median ORT latency in ms.")] = None,
    latency_ratio: Annotated[Optional[float], typer.Option("--latency-ratio", help="Budget as a fraction of the dense "
                             "model's measured latency (e.g. 0.6).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Training data: ADMM + fine-tune (without: one-shot "
                    "importance pruning, lower quality).")] = None,
    table: Annotated[Optional[Path], typer.Option("--table", help="Latency table measured on the target device.")] = None,
    pattern: Annotated[str, typer.Option("--pattern", help="channel | simd:N (ALCS 1×N vectors; used only where the "
                       "table measures it faster).")] = "channel",
    threads: Annotated[int, typer.Option(help="onnxruntime threads for the budget.")] = 1,
    batch: Annotated[int, typer.Option(help="Batch size the budget applies to.")] = 1,
    input_shape: Annotated[Optional[list[str]], typer.Option("--input-shape", help="NAME=1x200x40 (as edgec profile).")] = None,
    admm_epochs: Annotated[int, typer.Option("--admm-epochs", help="ADMM rounds (with --data).")] = 3,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", help="Fine-tune epochs after the hard mask.")] = 3,
    rho: Annotated[float, typer.Option(help="ADMM penalty ρ.")] = 1e-3,
    lr: Annotated[float, typer.Option(help="Learning rate for ADMM and fine-tuning.")] = 1e-3,
    min_density: Annotated[Optional[float], typer.Option("--min-density", help="Keep at least this fraction of every group.")] = None,
    max_retries: Annotated[int, typer.Option("--max-retries", help="Tighten and retry when the measured latency misses.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    n_mels: Annotated[Optional[int], typer.Option("--n-mels")] = None,
    frames: Annotated[Optional[int], typer.Option("--frames")] = None,
    arch: ArchOpt = None,
    as_json: JsonOpt = False,
):
    """Prune to a latency budget: per-group densities from measured latency tables, ADMM, physical shrink,
    fine-tune, then export and measure for real. Exit 4: budget below the reachable minimum; 5: missed."""
    from edgec.app import api

    if (latency_ms is None) == (latency_ratio is None):
        raise EdgecError("give exactly one of --latency-ms and --latency-ratio")
    with r.spinner("pruning", not as_json) as update:
        res = api.prune(model, output, latency_ms=latency_ms, latency_ratio=latency_ratio, data=data, table=table,
                        pattern=pattern, threads=threads, batch=batch, input_shape=input_shape or None,
                        admm_epochs=admm_epochs, finetune_epochs=finetune_epochs, rho=rho, lr=lr,
                        min_density=min_density, max_retries=max_retries, seed=seed, n_mels=n_mels, frames=frames,
                        arch=arch, progress=update)
    if as_json:
        return r.print_json(res)
    r.console.print(r.prune_table(res))


@app.command("inspect")
def inspect(
    file: Annotated[Path, typer.Argument(help="A .pt checkpoint or an .onnx file.")],
    layers: Annotated[bool, typer.Option("--layers", help="List every weight layer with its bit width.")] = False,
    arch: ArchOpt = None,
    as_json: JsonOpt = False,
):
    """Show architecture, size, bit widths, ops and the provenance chain of a checkpoint or ONNX file."""
    from edgec.app import api

    res = api.inspect(file, arch)
    if as_json:
        return r.print_json(res)
    if res["kind"] == "onnx":
        rows = [("file", f"{res['file']} ({r.human_bytes(res['file_bytes'])})"), ("producer", res["producer"]),
                ("arch", res["arch"] or "-"), ("IR / opsets", f"{res['ir_version']} / {res['opsets']}"),
                ("params", f"{r.human_count(res['params'])} ({res['initializer_dtypes']})"),
                ("inputs", "; ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in res["inputs"])),
                ("outputs", "; ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in res["outputs"])),
                ("nodes", res["nodes"]), ("ops", ", ".join(f"{k}×{v}" for k, v in res["ops"].items()))]
    else:
        rows = [("file", f"{res['file']} ({r.human_bytes(res['file_bytes'])})"), ("arch", res["arch"]),
                ("params", r.human_count(res["params"])), ("tensor bytes", r.human_bytes(res["bytes"])),
                ("digest", res["digest"][:16]),
                ("inputs", "; ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in res["spec"]["inputs"])),
                ("modules", ", ".join(f"{k}×{v}" for k, v in res["modules"].items())),
                ("weight bits", ", ".join(f"{b}: {v['layers']} layer(s), {r.human_count(v['weights'])} weights"
                                          for b, v in res["bits"].items())),
                ("scaffolds", ", ".join(f"{s['kind']}@{s['module']}" for s in res["scaffolds"]) or "none")]
    r.console.print(r.kv_table(f"inspect {res['file']}", rows))
    if layers and res["kind"] == "checkpoint":
        r.console.print(r.rows_table("layers", ["layer", "type", "bits", "weights", "group", "act"], [
            [x["layer"], x["type"], x["bits"], f"{x['weights']:,}", x.get("group_size", "-"), x.get("act", "-")]
            for x in res["layers"]]))
    r.console.print(r.provenance_tree("provenance", res["provenance"]))


@app.command("run")
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: out/<recipe stem>).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, run nothing.")] = False,
    as_json: JsonOpt = False,
):
    """Run a recipe: a list of steps named like the CLI commands. Exit 0 ok, 1 a check failed, 2 bad input."""
    from edgec.app import recipe as rec

    plan = rec.plan(recipe, out)
    if dry_run:
        if as_json:
            return r.print_json(plan.describe())
        r.console.print(r.rows_table(f"plan: {recipe} → {plan.out_dir}", ["#", "step", "parameters"], [
            [i + 1, s.run, ", ".join(f"{k}={v}" for k, v in s.raw.items())] for i, s in enumerate(plan.steps)]))
        return
    with r.progress_bar(f"recipe {recipe.name}", len(plan.steps), not as_json) as progress:
        report = rec.execute(plan, progress)
    if as_json:
        r.print_json(report)
    else:
        r.console.print(rec.render_report(report))
    if report["status"] != "ok":
        raise typer.Exit(report["exit_code"])


def main() -> None:
    """Console entry point: one-line errors and documented exit codes instead of tracebacks."""
    import click

    debug = STATE["debug"] or "--debug" in sys.argv[1:]
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        r.err_console.print("interrupted")
        sys.exit(130)
    except EdgecError as exc:
        if debug:
            raise
        r.error_line("error", str(exc))
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: still one line, with a way to get the traceback
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        r.error_line("internal error", f"{type(exc).__name__}: {first} (rerun with --debug for the traceback)")
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
