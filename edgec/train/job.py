"""``finetune_file``: what ``edgec finetune`` runs: load a checkpoint and a dataset, fine-tune, save the best
model (rank 0) with a ``finetune`` provenance record, report. Works unchanged under ``torchrun``: every rank
trains and returns a result, only rank 0 writes (see docs/architecture.md#options-and-results)."""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from edgec.core.errors import EdgecError
from edgec.core.fileio import check_output
from edgec.core.options import DEVICE, FinetuneOptions
from edgec.data import check_fits, load_data, max_sequence
from edgec.models.checkpoint import load_checkpoint, save_checkpoint
from edgec.train import distributed as D
from edgec.train import fsdp as F
from edgec.train.distill import find_teacher, scaffold_sources
from edgec.train.loop import finetune
from edgec.train.record import finetune_record
from edgec.train.result import FinetuneResult


def data_name(source) -> str:
    """What provenance records about the data: the file or folder NAME (never an absolute path), or an
    entry point ``package.module:function`` as given."""
    s = os.fspath(source)
    if os.path.exists(s):
        p = Path(s).resolve()
        return p.parent.name if p.name == "labels.csv" else p.name
    return s


def _load_teacher(path, arch):
    """The teacher checkpoint; a user architecture is allowed when it is the student's (``arch``)."""
    try:
        return load_checkpoint(path)
    except EdgecError as exc:
        if arch and f"user architecture '{arch}'" in str(exc):
            return load_checkpoint(path, arch)
        raise


def default_resume_file(output) -> Path:
    out = Path(output)
    return out.with_name(out.name + ".resume")


def _check_outputs(model_path: Path, output, options: FinetuneOptions) -> tuple[Path, Path]:
    """The output and resume file, refused when they would overwrite an input or each other (the last step
    deletes the resume file: were it the output, nothing would be left)."""
    data = options.data
    inputs = (model_path, data if os.path.exists(os.fspath(data)) else None, options.teacher)
    output = check_output(output, *inputs)
    rfile = options.resume_file
    rfile = check_output(Path(rfile) if rfile else default_resume_file(output), *inputs,
                         others={"the output": output})
    return output, rfile


def check_device(device: str | None) -> None:
    """A device edgec trains on: auto, cpu, mps, cuda or cuda:N (an index this machine has)."""
    if device is None:
        return
    if not re.fullmatch(DEVICE["pattern"], str(device)):
        raise EdgecError(f"device must be {DEVICE['text']} (got {device!r})")
    kind, _, index = str(device).partition(":")
    if kind == "cuda" and index and torch.cuda.is_available() and int(index) >= torch.cuda.device_count():
        raise EdgecError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _resolve_teacher(model_path: Path, model, mode: str, options: FinetuneOptions, output):
    """(teacher model or None, its path, how it was found): given, or looked up by digest for distillation."""
    teacher, teacher_source = options.teacher, "given" if options.teacher is not None else None
    if teacher is None and mode in ("logits", "off"):
        teacher, want = find_teacher(model_path, model, mode, exclude=[output])
        teacher_source = "scaffold provenance"
    tmodel = _load_teacher(teacher, options.arch) if teacher is not None else None
    if teacher_source == "scaffold provenance" and tmodel.digest() != want:
        raise EdgecError(f"{Path(teacher).name} claims digest {want[:12]}… but its weights hash to "
                         f"{tmodel.digest()[:12]}…; pass --teacher CKPT explicitly")
    return tmodel, teacher, teacher_source


def _load_training_data(info, model, options: FinetuneOptions):
    """The data bundle and the loader options used. Rank 0 loads first so that it alone computes and caches
    audio features; the others then read the cache."""
    opts = options.data_options.to_kwargs()
    if not info.is_main:
        D.barrier(info)
    if isinstance(model.config.get("n_mels"), int):
        opts.setdefault("n_mels", model.config["n_mels"])  # featurise audio for the model's front-end
    # text: blocks of --block-size tokens, by default 128 capped at the model's longest sequence; detection
    # folders: images resized to the model's input size
    size = image_size(model.spec)
    data = load_data(os.fspath(options.data), **opts, max_block_size=max_sequence(model.spec),
                     **({"image_size": size} if size is not None else {}))
    if info.is_main:
        D.barrier(info)
    check_fits(data, model.spec, f"the model ({model.arch})")
    if data.task == "causal_lm":
        opts["block_size"] = int(data.meta["block_size"])  # recorded as resolved: eval packs the same blocks
    return data, opts


def image_size(spec) -> int | None:
    """A detection model's square input size S (its first input is [batch, 3, S, S]), else None."""
    if getattr(spec, "task", None) != "detection" or not spec.inputs:
        return None
    dims = spec.inputs[0].dims
    return int(dims[-1]) if len(dims) == 4 and isinstance(dims[-1], int) and dims[-1] == dims[-2] else None


def _train(model, data, tmodel, mode: str, options: FinetuneOptions, rfile: Path, progress):
    o = options
    return finetune(
        model, data, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr, weight_decay=o.weight_decay,
        warmup=o.warmup, grad_clip=o.grad_clip, seed=o.seed, teacher=tmodel, kd_weight=o.kd_weight,
        kd_temperature=o.kd_temperature, resume_file=rfile, resume=o.resume, progress=progress, device=o.device,
        distill=mode, off_weight=o.off_weight, off_layers=o.off_layers, binary_weights=o.binary_weights,
        fsdp=o.fsdp,
    )


def _record_params(options: FinetuneOptions, model, data, opts: dict, report: dict, tmodel, teacher,
                   teacher_source) -> dict:
    """The ``finetune`` record's parameters (key order is part of the checkpoint bytes)."""
    o, dinfo = options, report["distill"]
    params = {
        "epochs": int(o.epochs), "batch_size": int(o.batch_size), "lr": float(o.lr),
        "weight_decay": float(o.weight_decay), "warmup": float(o.warmup), "grad_clip": float(o.grad_clip or 0.0),
        "seed": int(o.seed), "data": data_name(o.data), "data_digest": data.digest,
        "world_size": report["world_size"],
        "data_options": {k: v for k, v in sorted(opts.items()) if k != "cache_dir"},
    }
    if tmodel is not None:
        params |= {"distill": dinfo["mode"], "teacher": Path(teacher).name, "teacher_digest": tmodel.digest(),
                   "teacher_source": teacher_source, "kd_weight": dinfo["kd_weight"],
                   "kd_temperature": float(o.kd_temperature)}
        if dinfo["mode"] == "off":
            params |= {"off_weight": dinfo["off_weight"], "off_layers": dinfo["off_layers"]}
        sources = scaffold_sources(model)
        if sources and tmodel.digest() not in sources:
            report["notes"].append(f"the teacher {Path(teacher).name} is not the checkpoint the scaffold came "
                                   f"from (digest {sources[0][:12]}…)")
    if dinfo["binary_weights"] is not None:
        params["binary_weights"] = dinfo["binary_weights"]
    if report.get("fsdp") is not None:
        params["fsdp"] = True
    return params


def _save(info, best, output: Path, rfile: Path, keep_resume: bool) -> bool:
    """Rank 0 writes the output and drops the resume file (unless kept); True where written."""
    written = False
    if info.is_main:
        save_checkpoint(best, output)
        written = True
        if not keep_resume and rfile.exists():
            rfile.unlink()
    D.barrier(info)
    return written


def finetune_file(input_path, output, options: FinetuneOptions, *,
                  progress: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Load ``input_path`` and ``options.data``, fine-tune (:func:`edgec.train.loop.finetune`), save the best
    model to ``output`` atomically (rank 0) with a ``finetune`` record appended.

    The resume file (default ``<output>.resume``) is written after every epoch and deleted after the output is
    saved unless ``keep_resume``; ``resume=True`` continues from it. ``distill`` "logits"/"off" without a
    ``teacher`` use the checkpoint the scaffold came from (:func:`edgec.train.distill.find_teacher`).
    ``progress`` receives the training loop's event dicts.
    """
    t0 = time.perf_counter()
    model_path = Path(input_path)
    output, rfile = _check_outputs(model_path, output, options)
    check_device(options.device)

    with D.session() as info:
        if options.fsdp:
            F.check_world(info)  # before loading anything
        model = load_checkpoint(model_path, options)
        options.validate()
        mode = options.distill_mode()
        tmodel, teacher, teacher_source = _resolve_teacher(model_path, model, mode, options, output)
        data, opts = _load_training_data(info, model, options)
        best, report = _train(model, data, tmodel, mode, options, rfile, progress)
        params = _record_params(options, model, data, opts, report, tmodel, teacher, teacher_source)
        record = finetune_record(report["fingerprint"]["model"], best, report, params)
        best.provenance = list(best.provenance) + [record]
        written = _save(info, best, output, rfile, options.keep_resume)

    return _result(model_path, output, rfile, options, info, data, best, report, record, written, teacher,
                   teacher_source, t0)


def _result(model_path, output, rfile, options, info, data, best, report, record, written, teacher,
            teacher_source, t0) -> FinetuneResult:
    return FinetuneResult(
        output=str(output), written=written, rank=info.rank, world_size=report["world_size"],
        input=str(model_path), arch=best.arch, data=data_name(options.data), data_digest=data.digest,
        task=data.task, classes=data.classes, best_epoch=report["best_epoch"], monitor=report["monitor"],
        best=report["best"], history=report["history"], steps=report["steps"], final_lr=report["final_lr"],
        device=report["device"], batch_size_per_process=report["batch_size_per_process"],
        resumed_from=report["resumed_from"], resume_file=str(rfile) if options.keep_resume else None,
        digest=record["output_digest"], params=best.param_count(), bytes=best.nbytes(), notes=report["notes"],
        distill=report["distill"] | {"teacher_file": Path(teacher).name if teacher is not None else None,
                                     "teacher_source": teacher_source},
        seconds=time.perf_counter() - t0, train_seconds=report["seconds"], fsdp=report.get("fsdp"),
    )
