"""``finetune_file``: load a checkpoint and a dataset, fine-tune, save the best model (rank 0), report.

This is what ``edgec finetune`` calls (also under ``torchrun ... -m edgec finetune``). It works unchanged under
``torchrun`` (see :mod:`edgec.train.distributed`): every rank loads and trains, only rank 0 writes the
output and the resume file, and every rank returns the result (``written`` is true on rank 0 only).

Distillation: ``distill="logits"|"off"`` without ``teacher`` uses the full-precision checkpoint the
scaffold came from: the newest ``scaffold.*`` provenance record of the model names its ``input_digest``,
and the ``.pt`` file next to the model whose stored digest equals it is loaded (and its digest re-checked);
see :func:`edgec.train.distill.find_teacher`. The teacher's file name, digest and how it was found are
recorded in the ``finetune`` provenance record with the other distillation options.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from edgec.core.errors import EdgecError
from edgec.train import distributed as D
from edgec.train.record import finetune_record



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
    from edgec.models.checkpoint import load_checkpoint

    try:
        return load_checkpoint(path)
    except EdgecError as exc:
        if arch and f"user architecture '{arch}'" in str(exc):
            return load_checkpoint(path, arch=arch)
        raise


def default_resume_file(output) -> Path:
    out = Path(output)
    return out.with_name(out.name + ".resume")


def finetune_file(
    model_path,
    data_source,
    output,
    *,
    arch: str | None = None,
    teacher=None,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup: float = 0.1,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    kd_weight: float | None = None,
    kd_temperature: float = 2.0,
    distill: str | None = None,
    off_weight: float = 1.0,
    off_layers=None,
    binary_weights=None,
    resume: bool = False,
    resume_file=None,
    keep_resume: bool = False,
    progress: Callable[[dict], None] | None = None,
    device: str | None = None,
    data_options: dict | None = None,
) -> dict:
    """Load ``model_path`` (and ``teacher``, a checkpoint path), ``edgec.data.load_data(data_source,
    **data_options)``, fine-tune, and save the best model to ``output`` atomically (rank 0).

    The resume file (default ``<output>.resume``) is written after every epoch and deleted after the
    output is saved unless ``keep_resume``; ``resume=True`` continues from it. A ``finetune`` provenance
    record is appended (not a structural pass). Returns a JSON-able dict.

    ``distill`` (None = "logits" with a teacher, else "none"; "none" | "logits" | "off"), ``kd_weight``,
    ``off_weight``, ``off_layers`` and ``binary_weights`` are passed to :func:`edgec.train.loop.finetune`;
    "logits"/"off" without ``teacher`` look the teacher up by digest (module docstring).
    """
    from edgec.models.checkpoint import load_checkpoint, save_checkpoint
    from edgec.core.fileio import check_output
    from edgec.data import load_data
    from edgec.train.distill import find_teacher, scaffold_sources
    from edgec.train.loop import DISTILL_MODES, finetune

    t0 = time.perf_counter()
    model_path = Path(model_path)
    inputs = (model_path, data_source if os.path.exists(os.fspath(data_source)) else None, teacher)
    output = check_output(output, *inputs)
    rfile = check_output(Path(resume_file) if resume_file else default_resume_file(output), *inputs)
    opts = dict(data_options or {})

    with D.session() as info:
        model = load_checkpoint(model_path, arch=arch)
        mode = ("logits" if teacher is not None else "none") if distill in (None, "auto") else str(distill).lower()
        if mode not in DISTILL_MODES:
            raise EdgecError(f"--distill must be one of {', '.join(DISTILL_MODES)} (got {distill!r})")
        teacher_source = "given" if teacher is not None else None
        if teacher is None and mode in ("logits", "off"):
            teacher, want = find_teacher(model_path, model, mode, exclude=[output])
            teacher_source = "scaffold provenance"
        tmodel = _load_teacher(teacher, arch) if teacher is not None else None
        if teacher_source == "scaffold provenance" and tmodel.digest() != want:
            raise EdgecError(f"{Path(teacher).name} claims digest {want[:12]}… but its weights hash to "
                             f"{tmodel.digest()[:12]}…; pass --teacher CKPT explicitly")
        # Rank 0 loads first so that it alone computes and caches audio features; the others then read the cache.
        if not info.is_main:
            D.barrier(info)
        if isinstance(model.config.get("n_mels"), int):
            opts.setdefault("n_mels", model.config["n_mels"])  # featurise audio for the model's front-end
        data = load_data(os.fspath(data_source), **opts)
        if info.is_main:
            D.barrier(info)

        best, report = finetune(
            model, data, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
            grad_clip=grad_clip, seed=seed, teacher=tmodel, kd_weight=kd_weight, kd_temperature=kd_temperature,
            resume_file=rfile, resume=resume, progress=progress, device=device, distill=mode, off_weight=off_weight,
            off_layers=off_layers, binary_weights=binary_weights,
        )
        dinfo = report["distill"]

        params = {
            "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr), "weight_decay": float(weight_decay),
            "warmup": float(warmup), "grad_clip": float(grad_clip or 0.0), "seed": int(seed),
            "data": data_name(data_source), "data_digest": data.digest, "world_size": report["world_size"],
            "data_options": {k: v for k, v in sorted(opts.items()) if k != "cache_dir"},
        }
        if tmodel is not None:
            params |= {"distill": dinfo["mode"], "teacher": Path(teacher).name, "teacher_digest": tmodel.digest(),
                       "teacher_source": teacher_source, "kd_weight": dinfo["kd_weight"],
                       "kd_temperature": float(kd_temperature)}
            if dinfo["mode"] == "off":
                params |= {"off_weight": dinfo["off_weight"], "off_layers": dinfo["off_layers"]}
            sources = scaffold_sources(model)
            if sources and tmodel.digest() not in sources:
                report["notes"].append(f"the teacher {Path(teacher).name} is not the checkpoint the scaffold came "
                                       f"from (digest {sources[0][:12]}…)")
        if dinfo["binary_weights"] is not None:
            params["binary_weights"] = dinfo["binary_weights"]
        record = finetune_record(report["fingerprint"]["model"], best, report, params)
        best.provenance = list(best.provenance) + [record]

        written = False
        if info.is_main:
            save_checkpoint(best, output)
            written = True
            if not keep_resume and rfile.exists():
                rfile.unlink()
        D.barrier(info)

    return {
        "output": str(output),
        "written": written,
        "rank": info.rank,
        "world_size": report["world_size"],
        "input": str(model_path),
        "arch": best.arch,
        "data": data_name(data_source),
        "data_digest": data.digest,
        "task": data.task,
        "classes": data.classes,
        "best_epoch": report["best_epoch"],
        "monitor": report["monitor"],
        "best": report["best"],
        "history": report["history"],
        "steps": report["steps"],
        "final_lr": report["final_lr"],
        "device": report["device"],
        "batch_size_per_process": report["batch_size_per_process"],
        "resumed_from": report["resumed_from"],
        "resume_file": str(rfile) if keep_resume else None,
        "digest": record["output_digest"],
        "params": best.param_count(),
        "bytes": best.nbytes(),
        "notes": report["notes"],
        "distill": dinfo | {"teacher_file": Path(teacher).name if teacher is not None else None,
                            "teacher_source": teacher_source},
        "seconds": time.perf_counter() - t0,
        "train_seconds": report["seconds"],
    }
