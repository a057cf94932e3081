"""The fine-tuning loop: AdamW, linear warm-up + cosine decay, gradient clipping, per-epoch validation,
keep-best, exact resume, optional logits distillation, DDP under torchrun.

Choices that decide results (all recorded in the report, and in the resume fingerprint):

* Optimizer: AdamW(lr, weight_decay) with weight decay only on tensors of rank >= 2 (weights of linear
  and conv layers); biases, norm parameters and per-channel scales (rank <= 1) get none.
* Schedule, per optimizer step ``i`` (0-based) of ``S = epochs * steps_per_epoch``, ``W = round(warmup * S)``:
  ``lr_i = lr * (i + 1) / W`` for ``i < W``, then ``lr * ½(1 + cos(π (i − W) / (S − W)))``.
* Gradient clipping: global L2 norm ``grad_clip`` (0 disables).
* Batches: shuffled per epoch with a generator seeded ``seed + epoch`` (DistributedSampler, also with one
  process); a trailing batch of a single example is dropped (BatchNorm cannot train on one value per
  channel; the example is seen in other epochs).
* Loss: cross-entropy (classification) / MSE (regression); with a teacher
  ``(1 − kd_weight)·task + kd_weight·T²·KL(softmax(t/T) ‖ softmax(s/T))``; plus ``extra_loss`` if given.
  ``distill``: "none", "logits" (the line above; ``kd_weight`` 1.0 is pure distillation, STTN's recipe) or
  "off": ``(1 − kd_weight)·task + kd_weight·KD + off_weight · L_OFF`` (kd_weight defaults to 0 here, so
  ``task + λ·L_OFF`` as in TernaryLLM), ``L_OFF`` = mean over the ``off_layers`` (default: every block
  output) and positions of ``1 − cos(h_student, h_teacher)``; see :mod:`edgec.train.distill` for how block
  outputs are found in the traced graph and over which dimension the cosine runs.
  Binary scaffolds (latent-weight supervision, arXiv 2110.05850): ``+ λ1·task(real-network outputs) +
  λ2·mean over binary layers (1 − cos(y_b, y_r))``; the real network is one more forward of the same graph
  under ``edgec.passes.binary.real_mode`` (every binary layer computes with its real latent weight), the
  cosine term is ``binary_aux_loss`` from the binary layers' outputs of the main forward. (λ1, λ2) default
  to the ``latent_weight`` scaffold.binary recorded; ``binary_weights`` overrides, (0, 0) disables.
* Validation after every epoch on ``data.split("val")`` in eval mode; keep-best by val UAR
  (classification) or CCC (regression), ties broken by the lower val loss (then the earlier epoch).
  The returned model carries the best epoch's weights, in eval mode, on the CPU.
* RNG: the run seeds torch/python/numpy with ``seed + rank`` inside a private RNG scope, so the caller's
  global RNG state is left as it was.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, default_collate

from edgec.core.errors import EdgecError
from edgec.core.graph import Model
from edgec.train import distill as DS
from edgec.train import distributed as D
from edgec.train.losses import FeatureTap, combined_loss, first_output, task_loss
from edgec.train.resume import load_resume, rng_state, save_resume, seed_all, set_rng_state

LOOP_VERSION = 1
DISTILL_MODES = ("none", "logits", "off")
MONITOR = {"classification": "uar", "regression": "ccc"}


class TrainingInterrupted(EdgecError):
    """Ctrl-C during training: the resume file of the last completed epoch is intact."""

    exit_code = 130


class WarmupCosine:
    """LambdaLR factor: linear warm-up over ``warmup_steps`` then cosine decay to 0 at ``total_steps``.

    A callable object with plain attributes, so LambdaLR's state_dict stores them as data."""

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ data
def epoch_batches(n: int, epoch: int, seed: int, per_rank_batch: int, info: D.DistInfo) -> list[list[int]]:
    """This rank's batches (lists of example indices) for ``epoch``."""
    sampler = DistributedSampler(range(n), num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    chunks = [idx[i : i + per_rank_batch] for i in range(0, len(idx), per_rank_batch)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks.pop()
    return chunks


def collate(ds: Dataset, idx: list[int]):
    inputs, targets = getattr(ds, "inputs", None), getattr(ds, "targets", None)
    if isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor):  # TensorPairDataset fast path
        t = torch.as_tensor(idx, dtype=torch.long)
        return inputs[t], targets[t]
    x, y = default_collate([ds[i] for i in idx])
    return x, y


def _to(x, device: torch.device):
    if isinstance(x, (tuple, list)):
        return tuple(_to(v, device) for v in x)
    return x.to(device, non_blocking=True)


def _args(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


# ------------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(gm: torch.nn.Module, ds: Dataset, task: str, num_classes: int | None, batch_size: int,
             device: torch.device) -> dict:
    """Val metrics in eval mode: classification accuracy/uar/macro_f1, regression ccc/mae, plus ``loss``."""
    from edgec.core.metrics import classification_metrics, regression_metrics

    gm.eval()
    preds, targets = [], []
    loss_sum, count = 0.0, 0
    n = len(ds)
    for start in range(0, n, batch_size):
        x, y = collate(ds, list(range(start, min(n, start + batch_size))))
        x, y = _to(x, device), y.to(device)
        out = first_output(gm(*_args(x)))
        loss_sum += float(task_loss(out, y, task, reduction="sum"))
        count += y.numel()
        preds.append(out.detach().float().cpu())
        targets.append(y.cpu())
    pred, target = torch.cat(preds), torch.cat(targets)
    if task == "classification":
        metrics = classification_metrics(target, pred, num_classes)
    else:
        metrics = regression_metrics(target, pred.reshape(target.shape))
    metrics["loss"] = loss_sum / max(1, count)
    return metrics


def is_better(score: float, loss: float, best: dict | None) -> bool:
    if best is None:
        return True
    if not math.isfinite(best["score"]) and math.isfinite(score):
        return True
    if score != best["score"]:
        return score > best["score"]
    return loss < best["loss"]


# ------------------------------------------------------------------------------------------------ checks
def preflight(model: Model, data, ds: Dataset, device: torch.device, role: str) -> None:
    """Run two val examples through the model: clear errors for wrong input shapes or output widths."""
    x, _ = collate(ds, list(range(min(2, len(ds)))))
    gm = model.gm
    gm.eval()
    try:
        with torch.no_grad():
            out = first_output(gm(*_args(_to(x, device))))
    except Exception as exc:  # noqa: BLE001 - turned into one line for the user
        shape = [list(t.shape) for t in _args(x)]
        expects = [i["shape"] for i in model.spec.to_json()["inputs"]]
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise EdgecError(f"the {role} ({model.arch}) cannot run on this data: inputs {shape} vs expected {expects} ({msg})") from None
    if data.task == "classification":
        if out.ndim != 2 or out.shape[-1] != data.num_classes:
            raise EdgecError(
                f"the {role} ({model.arch}) outputs shape {list(out.shape)} but the data has {data.num_classes} classes; "
                f"create the model with num_classes={data.num_classes}")
    else:
        want = data.output_dim
        if out.numel() != want * len(_args(x)[0]):
            raise EdgecError(f"the {role} ({model.arch}) outputs shape {list(out.shape)} but the regression data has "
                             f"{want} target(s) per example")


def _preflight_features(fgm, tfgm, layers, ds: Dataset, device: torch.device) -> None:
    """Two val examples through the student and teacher feature graphs: refuse features that differ in shape."""
    x, _ = collate(ds, list(range(min(2, len(ds)))))
    fgm.eval()
    with torch.no_grad():
        _, s = fgm(*_args(_to(x, device)))
        _, t = tfgm(*_args(_to(x, device)))
    DS.check_features(dict(zip(layers, s)), dict(zip(layers, t)))


def _unused_parameters(gm: torch.nn.Module, ds: Dataset, device: torch.device) -> list[str]:
    """Trainable parameters that get no gradient (one eval-mode forward/backward, no state change)."""
    x, _ = collate(ds, list(range(min(2, len(ds)))))
    gm.eval()
    out = gm(*_args(_to(x, device)))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    total = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)
    params = [(n, p) for n, p in gm.named_parameters() if p.requires_grad]
    if isinstance(total, torch.Tensor):
        grads = torch.autograd.grad(total, [p for _, p in params], allow_unused=True)
    else:
        grads = [None] * len(params)
    return [n for (n, _), g in zip(params, grads) if g is None]


SUM_KEYS = ("loss", "task", "kd", "off", "real", "aux", "extra", "n")


def _check_hyper(epochs, batch_size, lr, weight_decay, warmup, grad_clip, kd_weight, kd_temperature, info) -> None:
    problems = []
    if int(epochs) < 1:
        problems.append(f"epochs must be >= 1 (got {epochs})")
    if int(batch_size) < 1:
        problems.append(f"batch_size must be >= 1 (got {batch_size})")
    elif int(batch_size) < info.world_size:
        problems.append(f"batch_size {batch_size} is smaller than the number of processes ({info.world_size}); "
                        "batch_size is the global batch, split across processes")
    if not (float(lr) >= 0 and math.isfinite(lr)):
        problems.append(f"lr must be a finite number >= 0 (got {lr})")
    if not float(weight_decay) >= 0:
        problems.append(f"weight_decay must be >= 0 (got {weight_decay})")
    if not 0.0 <= float(warmup) < 1.0:
        problems.append(f"warmup is a fraction of the total steps in [0, 1) (got {warmup})")
    if grad_clip is not None and not float(grad_clip) >= 0:
        problems.append(f"grad_clip must be >= 0 (0 disables; got {grad_clip})")
    if kd_weight is not None and not 0.0 <= float(kd_weight) <= 1.0:
        problems.append(f"kd_weight must be in [0, 1] (got {kd_weight})")
    if not float(kd_temperature) > 0:
        problems.append(f"kd_temperature must be > 0 (got {kd_temperature})")
    if problems:
        raise EdgecError("; ".join(problems))


def _callable_name(fn) -> str | None:
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


@contextlib.contextmanager
def _private_rng(device: torch.device):
    """Run with the global RNGs saved and restored afterwards (the caller's random streams are untouched)."""
    py, npst = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npst)


# ------------------------------------------------------------------------------------------------ main
def finetune(
    model: Model,
    data,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup: float = 0.1,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    teacher: Model | None = None,
    kd_weight: float | None = None,
    kd_temperature: float = 2.0,
    resume_file: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[dict], None] | None = None,
    extra_loss: Callable | None = None,
    feature_layers: list[str] | None = None,
    device: str | None = None,
    distill: str | None = None,
    off_weight: float = 1.0,
    off_layers: list[str] | str | None = None,
    binary_weights: tuple[float, float] | str | None = None,
) -> tuple[Model, dict]:
    """Fine-tune a copy of ``model`` on ``data`` (an ``edgec.data.DataBundle``); return ``(best model, report)``.

    ``model`` itself is not modified. ``teacher`` (frozen, eval mode) is the distillation teacher.
    ``distill``: None (= "logits" when a teacher is given, else "none"), "none", "logits" or "off" (both
    need ``teacher``). ``kd_weight``: weight of the logits term, default 0.5 with "logits" and 0 with "off"
    (1.0 = pure distillation). ``off_weight`` (λ, default 1) and ``off_layers`` (module names or globs;
    default every block output) configure OFF. ``binary_weights=(λ1, λ2)``: latent-weight supervision of
    binary scaffolds (the student must have some); None uses the weights scaffold.binary recorded (its
    ``latent_weight``) when the student has binary scaffolds, (0, 0) or "off" disables.
    ``resume_file``: written after every epoch (rank 0); with ``resume=True`` the run continues from it and
    ends bit-identical to an uninterrupted run. ``progress(event: dict)`` receives ``start``/``step``/
    ``epoch``/``end`` events (rank 0 only). ``extra_loss(outputs, (inputs, targets), features)`` returns a
    tensor added to the loss; ``features`` is ``{"student": {name: tensor}, "teacher": {name: tensor}}``
    captured from the leaf modules named by ``feature_layers`` (globs allowed). ``device``: None/"auto"
    (CUDA if available), "cpu", "cuda", "cuda:1". Under torchrun (WORLD_SIZE > 1) it trains with DDP.

    Report: ``history`` (per epoch: train_loss [+ train_task_loss/train_kd_loss/train_off_loss/
    train_off_layers/train_real_loss/train_binary_aux_loss/train_extra_loss], lr,
    val metrics, seconds, is_best), ``best_epoch``, ``best`` (val metrics), ``monitor``, ``steps``,
    ``final_lr``, ``seconds``, ``world_size``, ``batch_size_per_process``, ``resumed_from``, ``distill``
    (mode, teacher digest, weights, OFF layers), sizes, notes.
    """
    with D.session() as info:
        return _finetune(model, data, info, epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
                         weight_decay=float(weight_decay), warmup=float(warmup),
                         grad_clip=float(grad_clip or 0.0), seed=int(seed), teacher=teacher,
                         kd_weight=None if kd_weight is None else float(kd_weight),
                         kd_temperature=float(kd_temperature),
                         resume_file=Path(resume_file) if resume_file else None, resume=bool(resume),
                         progress=progress, extra_loss=extra_loss, feature_layers=feature_layers, device=device,
                         distill=distill, off_weight=off_weight, off_layers=off_layers,
                         binary_weights=binary_weights)


def resolve_distill(distill, teacher, kd_weight, off_weight, off_layers, binary_weights) -> dict:
    """Check the distillation options; return ``{"mode", "kd_weight", "off_weight", "off_layers", "binary"}``."""
    mode = ("logits" if teacher is not None else "none") if distill in (None, "auto") else str(distill).lower()
    if mode not in DISTILL_MODES:
        raise EdgecError(f"distill must be one of {', '.join(DISTILL_MODES)} (got {distill!r})")
    if mode != "none" and teacher is None:
        raise EdgecError(f"distill '{mode}' needs a teacher (the full-precision model the scaffold came from)")
    if mode == "none" and teacher is not None:
        raise EdgecError("a teacher was given but distill is 'none'; use distill 'logits' or 'off'")
    kd = (0.5 if mode == "logits" else 0.0) if kd_weight is None else float(kd_weight)
    if mode == "none":
        kd = 0.0
    try:
        lam = float(off_weight)
    except (TypeError, ValueError):
        raise EdgecError(f"off_weight must be a number >= 0 (got {off_weight!r})") from None
    if not (lam >= 0 and math.isfinite(lam)):
        raise EdgecError(f"off_weight must be a finite number >= 0 (got {off_weight})")
    if isinstance(off_layers, str):
        off_layers = [p.strip() for p in off_layers.split(",") if p.strip()]
    off_layers = list(off_layers) if off_layers else None
    if mode != "off" and off_layers:
        raise EdgecError(f"off_layers only applies with distill 'off' (distill is '{mode}')")
    binary = "auto"
    if binary_weights is False or (isinstance(binary_weights, str) and binary_weights.lower() in ("off", "none")):
        binary = None
    elif binary_weights is not None and not (isinstance(binary_weights, str) and binary_weights.lower() == "auto"):
        if isinstance(binary_weights, str):
            binary_weights = binary_weights.split(",")
        try:
            binary = tuple(float(v) for v in binary_weights)
        except (TypeError, ValueError):
            binary = ()
        if len(binary) != 2 or not all(v >= 0 and math.isfinite(v) for v in binary):
            raise EdgecError(f"binary_weights must be two numbers λ1,λ2 >= 0 (got {binary_weights!r})")
        if binary == (0.0, 0.0):
            binary = None
    return {"mode": mode, "kd_weight": kd, "off_weight": lam, "off_layers": off_layers, "binary": binary}


def _finetune(model, data, info: D.DistInfo, *, epochs, batch_size, lr, weight_decay, warmup, grad_clip, seed,
              teacher, kd_weight, kd_temperature, resume_file, resume, progress, extra_loss, feature_layers, device,
              distill, off_weight, off_layers, binary_weights):
    _check_hyper(epochs, batch_size, lr, weight_decay, warmup, grad_clip, kd_weight, kd_temperature, info)
    opts = resolve_distill(distill, teacher, kd_weight, off_weight, off_layers, binary_weights)
    mode, kd_weight = opts["mode"], opts["kd_weight"]
    if data.task not in MONITOR:
        raise EdgecError(f"cannot fine-tune on a '{data.task}' task (expected classification or regression)")
    if resume and resume_file is None:
        raise EdgecError("resume=True needs a resume_file")
    train_ds, val_ds = data.split("train"), data.split("val")
    dev = D.device_for(info, device)
    emit = progress if (progress is not None and info.is_main) else (lambda event: None)
    t_start = time.perf_counter()

    start_digest = model.digest()
    student = model.clone()
    gm = student.gm.to(dev)
    preflight(student, data, val_ds, dev, "model")
    tgm = None
    if teacher is not None:
        tmodel = teacher.clone()
        tgm = tmodel.gm.to(dev).eval()
        tgm.requires_grad_(False)
        preflight(tmodel, data, val_ds, dev, "teacher")

    notes: list[str] = []
    # OFF: feature-extraction copies of the student and the teacher graph (sharing their modules).
    layers, fgm, tfgm = None, None, None
    if mode == "off":
        layers = DS.resolve_layers(gm, opts["off_layers"], "model")
        fgm = DS.feature_extractor(gm, layers)
        try:
            tfgm = DS.feature_extractor(tgm, layers)
        except EdgecError as exc:
            raise EdgecError(f"the teacher has no layer matching the student's OFF layers ({exc})") from None
        tfgm.eval()
        _preflight_features(fgm, tfgm, layers, val_ds, dev)
    binary_fns = None
    if opts["binary"] == "auto":  # the weights scaffold.binary recorded (its --latent-weight), if any
        opts["binary"] = None
        if DS.has_binary_scaffold(gm):
            binary_fns = DS.binary_api()
            recorded = binary_fns[2](gm)
            if recorded is not None and any(float(v) > 0 for v in recorded):
                opts["binary"] = tuple(float(v) for v in recorded)
                notes.append(f"binary latent-weight supervision λ1,λ2 = {list(opts['binary'])} (recorded by "
                             "scaffold.binary; binary_weights overrides, (0, 0) disables)")
            else:
                binary_fns = None
    elif opts["binary"] is not None:
        if not DS.has_binary_scaffold(gm):
            raise EdgecError(f"binary_weights needs a student with binary scaffolds (edgec scaffold binary); "
                             f"the model ({student.arch}) has none")
        binary_fns = DS.binary_api()

    per_rank = batch_size // info.world_size
    n_train = len(train_ds)
    steps_per_epoch = len(epoch_batches(n_train, 0, seed, per_rank, info))
    total_steps = epochs * steps_per_epoch
    warmup_steps = int(round(warmup * total_steps))
    if info.distributed and batch_size % info.world_size:
        notes.append(f"batch_size {batch_size} is not divisible by {info.world_size} processes: "
                     f"{per_rank} per process ({per_rank * info.world_size} per step)")

    fingerprint = {
        "loop": LOOP_VERSION, "model": start_digest, "data": data.digest, "task": data.task,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
        "grad_clip": grad_clip, "seed": seed, "world_size": info.world_size,
        "teacher": teacher.digest() if teacher is not None else None,
        "extra_loss": _callable_name(extra_loss),
        "feature_layers": list(feature_layers) if feature_layers else None,
    }
    if teacher is not None:
        fingerprint |= {"kd_weight": kd_weight, "kd_temperature": kd_temperature}
    if mode == "off":  # (logits distillation is identified by the teacher and kd keys, as before)
        fingerprint |= {"distill": mode, "off_weight": opts["off_weight"], "off_layers": layers}
    if opts["binary"] is not None:
        fingerprint["binary_weights"] = list(opts["binary"])
    distill_info = {"mode": mode, "teacher": fingerprint["teacher"],
                    "kd_weight": kd_weight if mode != "none" else None,
                    "kd_temperature": kd_temperature if mode != "none" else None,
                    "off_weight": opts["off_weight"] if mode == "off" else None, "off_layers": layers,
                    "binary_weights": list(opts["binary"]) if opts["binary"] is not None else None}

    decay = [p for p in gm.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in gm.parameters() if p.requires_grad and p.ndim < 2]
    if not decay and not no_decay:
        raise EdgecError(f"the model ({student.arch}) has no trainable parameters")
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps))

    taps = None
    if feature_layers:
        taps = {"student": FeatureTap(gm, feature_layers, "model")}
        if tgm is not None:
            taps["teacher"] = FeatureTap(tgm, feature_layers, "teacher")

    with _private_rng(dev):
        seed_all(seed + info.rank)
        history: list[dict] = []
        best: dict | None = None
        start_epoch, step, prior_seconds = 0, 0, 0.0
        if resume:
            state = load_resume(resume_file, fingerprint)
            if len(state["rng"]) != info.world_size:
                raise EdgecError(f"cannot resume from {resume_file}: it holds {len(state['rng'])} process states, "
                                 f"this run has {info.world_size}")
            from edgec.models.checkpoint import load_state_dict_strict

            load_state_dict_strict(gm, state["state_dict"], resume_file)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            history = list(state["history"])
            best = dict(state["best"]) if state["best"] else None
            start_epoch, step = int(state["epoch"]), int(state["step"])
            prior_seconds = float(state.get("train_seconds", 0.0))
            set_rng_state(state["rng"][info.rank], dev)
            notes.append(f"resumed after epoch {start_epoch} from {Path(resume_file).name}")
            was = (state.get("threads"), state.get("device"))
            if was != (torch.get_num_threads(), dev.type):
                notes.append(f"the run started with {was[0]} thread(s) on {was[1]} and resumes with "
                             f"{torch.get_num_threads()} on {dev.type}: it continues correctly but is not "
                             "bit-identical to an uninterrupted run")

        find_unused = bool(info.distributed and _unused_parameters(gm, val_ds, dev))
        # DDP wraps the module that training runs (the feature-extraction copy for OFF): it holds the very
        # same parameters as gm, so gradients are all-reduced exactly as for gm itself.
        net = D.wrap_ddp(fgm if fgm is not None else gm, info, dev, find_unused)

        emit({"event": "start", "epochs": epochs, "start_epoch": start_epoch + 1, "steps_per_epoch": steps_per_epoch,
              "total_steps": total_steps, "world_size": info.world_size, "batch_size": batch_size,
              "batch_size_per_process": per_rank, "train_examples": n_train, "val_examples": len(val_ds),
              "monitor": MONITOR[data.task], "resumed": bool(resume)})
        epoch = start_epoch
        last_lr = optimizer.param_groups[0]["lr"] if not history else history[-1]["lr"]
        try:
            for epoch in range(start_epoch, epochs):
                t0 = time.perf_counter()
                net.train()
                sums = dict.fromkeys(SUM_KEYS, 0.0) | {f"off:{n}": 0.0 for n in (layers or [])}
                for i, idx in enumerate(epoch_batches(n_train, epoch, seed, per_rank, info)):
                    x, y = collate(train_ds, idx)
                    x, y = _to(x, dev), y.to(dev)
                    if taps:
                        for tap in taps.values():
                            tap.clear()
                    out = net(*_args(x))
                    if fgm is not None:
                        out, sfeat = out
                    pred = first_output(out)
                    tpred = None
                    if tgm is not None:
                        with torch.no_grad():
                            if tfgm is not None:
                                tout, tfeat = tfgm(*_args(x))
                            else:
                                tout = tgm(*_args(x))
                            tpred = first_output(tout)
                    kd_pred = tpred if (mode == "logits" or kd_weight > 0) else None
                    loss, parts = combined_loss(pred, y, data.task, kd_pred, kd_weight, kd_temperature)
                    if fgm is not None:
                        loff, per_layer = DS.off_loss(dict(zip(layers, sfeat)), dict(zip(layers, tfeat)), layers)
                        loss = loss + opts["off_weight"] * loff
                        parts["off"] = loff.detach()
                        parts |= {f"off:{n}": v for n, v in per_layer.items()}
                    if binary_fns is not None:
                        aux_fn, real_mode, _ = binary_fns
                        aux = aux_fn(gm, lambda2=1.0).to(pred.device)  # mean over binary layers of 1 − cos
                        with real_mode(gm):
                            rout = net(*_args(x))
                        rpred = first_output(rout[0] if fgm is not None else rout)
                        lreal = task_loss(rpred, y, data.task)
                        lam1, lam2 = opts["binary"]
                        loss = loss + lam1 * lreal + lam2 * aux
                        parts |= {"real": lreal.detach(), "aux": aux.detach()}
                    if extra_loss is not None:
                        feats = {k: dict(t.features) for k, t in taps.items()} if taps else {}
                        feats.setdefault("student", {})
                        feats.setdefault("teacher", {})
                        extra = extra_loss(out, (x, y), feats)
                        loss = loss + extra
                        parts["extra"] = extra.detach()
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise EdgecError(f"training diverged: the loss is {value} at epoch {epoch + 1} step {i + 1}; "
                                         f"try a lower lr (now {lr:g}) or gradient clipping")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = None
                    if grad_clip > 0:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(gm.parameters(), grad_clip))
                    last_lr = optimizer.param_groups[0]["lr"]
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    bn = len(idx)
                    sums["loss"] += value * bn
                    for k, v in parts.items():
                        sums[k] += float(v) * bn
                    sums["n"] += bn
                    emit({"event": "step", "epoch": epoch + 1, "epochs": epochs, "step": i + 1,
                          "steps": steps_per_epoch, "global_step": step, "loss": value, "lr": last_lr,
                          "grad_norm": grad_norm})
                keys = list(sums)
                totals = dict(zip(keys, D.all_reduce_sum([sums[k] for k in keys], info, dev)))
                D.broadcast_buffers(gm, info)
                val = evaluate(gm, val_ds, data.task, data.num_classes, batch_size, dev)
                score, vloss = float(val[MONITOR[data.task]]), float(val["loss"])
                improved = is_better(score, vloss, best)
                if improved:
                    best = {"epoch": epoch + 1, "score": score, "loss": vloss, "metrics": val,
                            "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in gm.state_dict().items()}}
                n = max(1.0, totals["n"])
                row = {"epoch": epoch + 1, "train_loss": totals["loss"] / n, "lr": last_lr, "val": val,
                       "seconds": time.perf_counter() - t0, "is_best": improved}
                if tgm is not None or binary_fns is not None:
                    row["train_task_loss"] = totals["task"] / n
                if kd_weight > 0 or mode == "logits":
                    row["train_kd_loss"] = totals["kd"] / n
                if fgm is not None:
                    row["train_off_loss"] = totals["off"] / n
                    row["train_off_layers"] = {name: totals[f"off:{name}"] / n for name in layers}
                if binary_fns is not None:
                    row |= {"train_real_loss": totals["real"] / n, "train_binary_aux_loss": totals["aux"] / n}
                if extra_loss is not None:
                    row["train_extra_loss"] = totals["extra"] / n
                history.append(row)
                rngs = D.gather_objects(rng_state(dev), info)
                if resume_file is not None and info.is_main:
                    save_resume(resume_file, {
                        "fingerprint": fingerprint, "epoch": epoch + 1, "step": step,
                        "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in gm.state_dict().items()},
                        "best": best, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "history": history, "rng": rngs,
                        "train_seconds": prior_seconds + time.perf_counter() - t_start,
                        "threads": torch.get_num_threads(), "device": dev.type,
                    })
                emit({"event": "epoch", "epoch": epoch + 1, "epochs": epochs, "train_loss": row["train_loss"],
                      "val": val, "lr": last_lr, "seconds": row["seconds"], "is_best": improved,
                      "best_epoch": best["epoch"], "monitor": MONITOR[data.task]})
        except KeyboardInterrupt:
            done = len(history)
            if resume_file is None:
                where = "no resume file was configured"
            elif done:
                where = (f"the last completed epoch ({done}) is saved in {resume_file}; rerun the same command with "
                         "--resume to continue")
            else:
                where = "no epoch was completed, so there is nothing to resume"
            raise TrainingInterrupted(f"interrupted during epoch {epoch + 1} of {epochs}; {where}") from None
        finally:
            if taps:
                for tap in taps.values():
                    tap.remove()

    assert best is not None
    gm.load_state_dict(best["state_dict"])
    student.gm = gm.to("cpu").eval()
    seconds = prior_seconds + time.perf_counter() - t_start
    report = {
        "epochs": epochs, "best_epoch": best["epoch"], "best": best["metrics"], "monitor": MONITOR[data.task],
        "history": history, "steps": step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "final_lr": last_lr, "seconds": seconds, "world_size": info.world_size, "batch_size": batch_size,
        "batch_size_per_process": per_rank, "train_examples": n_train, "val_examples": len(val_ds),
        "resumed_from": start_epoch if resume else None, "device": str(dev), "warmup_steps": warmup_steps,
        "fingerprint": fingerprint, "notes": notes, "rank": info.rank, "distill": distill_info,
    }
    emit({"event": "end", "best_epoch": best["epoch"], "best": best["metrics"], "seconds": seconds,
          "steps": step})
    return student, report
