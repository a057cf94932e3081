"""The fine-tuning loop: AdamW, linear warm-up + cosine decay, gradient clipping, per-epoch validation,
keep-best, exact resume, logits/OFF distillation, binary latent-weight supervision, DDP under torchrun. Tasks:
classification, regression, causal_lm and detection (the set-prediction loss of :mod:`edgec.train.detection`
over the train-mode query groups; val mAP in eval mode).

``_finetune`` runs as named steps (set-up, resume, epochs of training steps, validation and keep-best,
report); their order of RNG use and float ops is part of the result, so ``resume=True`` ends bit-identical
to an uninterrupted run. The recipe and its loss terms: docs/methods.md#logits-distillation and
docs/methods.md#off-distillation.
"""
from __future__ import annotations

import contextlib
import gc
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, default_collate

from edgec.core.detection_metrics import detection_metrics, postprocess, targets_from_items
from edgec.core.errors import EdgecError
from edgec.core.graph import Model
from edgec.core.metrics import classification_metrics, regression_metrics
from edgec.core.options import DISTILL_MODES
from edgec.data.bundle import check_fits
from edgec.layers.binary import binary_aux_loss, binary_latent_weights, real_mode
from edgec.models.checkpoint import load_state_dict_strict
from edgec.train import distill as DS
from edgec.train import distributed as D
from edgec.train import fsdp as F
from edgec.train.detection import group0_features, group_count
from edgec.train.losses import FeatureTap, combined_loss, first_output, model_output, task_loss
from edgec.train.resume import load_resume, rng_state, save_resume, seed_all, set_rng_state

LOOP_VERSION = 1
MONITOR = {"classification": "uar", "regression": "ccc", "causal_lm": "perplexity", "detection": "map"}
LOWER_IS_BETTER = frozenset({"perplexity"})  # monitored metrics where a smaller value is the better epoch


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
    """Val metrics in eval mode: classification accuracy/uar/macro_f1, regression ccc/mae, plus ``loss``;
    causal_lm: ``perplexity`` (exp of the loss), next-token top-1 ``accuracy`` and ``loss`` per token;
    detection: COCO ``map``/``map50``/``map75`` and ``loss`` per object."""
    gm.eval()
    if task == "causal_lm":
        return _evaluate_lm(gm, ds, batch_size, device)
    if task == "detection":
        return _evaluate_detection(gm, ds, num_classes, batch_size, device)
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


def _evaluate_lm(gm: torch.nn.Module, ds: Dataset, batch_size: int, device: torch.device) -> dict:
    """Causal-LM validation, streamed (no [N, T, V] logits kept): summed NLL and top-1 hits over all tokens."""
    nll, hits, count = 0.0, 0, 0
    n = len(ds)
    for start in range(0, n, batch_size):
        x, y = collate(ds, list(range(start, min(n, start + batch_size))))
        x, y = _to(x, device), y.to(device)
        out = first_output(gm(*_args(x)))
        nll += float(task_loss(out, y, "causal_lm", reduction="sum"))
        hits += int((out.argmax(dim=-1) == y).sum())
        count += y.numel()
    loss = nll / max(1, count)
    return {"perplexity": perplexity(loss), "accuracy": hits / max(1, count), "loss": loss}


def _evaluate_detection(gm: torch.nn.Module, ds: Dataset, num_classes: int | None, batch_size: int,
                        device: torch.device) -> dict:
    """Detection validation in eval mode (one query group): COCO-style mAP of the top-100 (query, class) scores
    per image (:mod:`edgec.core.detection_metrics`) and the set loss summed over images per object."""
    preds, targets = [], []
    loss_sum, objects = 0.0, 0
    n = len(ds)
    for start in range(0, n, batch_size):
        x, y = collate(ds, list(range(start, min(n, start + batch_size))))
        x, y = _to(x, device), y.to(device)
        logits, boxes = model_output(gm(*_args(x)), "detection")
        loss_sum += float(task_loss((logits, boxes), y, "detection", reduction="sum"))
        objects += int((y[..., 0] >= 0).sum())
        preds += postprocess(logits.detach().float().cpu().numpy(), boxes.detach().float().cpu().numpy())
        targets += targets_from_items(y.cpu().numpy())
    metrics = detection_metrics(preds, targets)
    metrics["loss"] = loss_sum / max(1, objects)
    return metrics


def perplexity(loss_per_token: float) -> float:
    """``exp(mean NLL per token)``; inf (not an OverflowError) for a diverged model."""
    return math.exp(loss_per_token) if loss_per_token < 709.0 else math.inf


def is_better(score: float, loss: float, best: dict | None, lower: bool = False) -> bool:
    """Whether an epoch's monitored ``score`` beats ``best`` (higher wins, or lower with ``lower``); ties go to
    the lower val loss; a finite score beats a non-finite one."""
    if best is None:
        return True
    if not math.isfinite(best["score"]) and math.isfinite(score):
        return True
    if score != best["score"]:
        return score < best["score"] if lower else score > best["score"]
    return loss < best["loss"]


# ------------------------------------------------------------------------------------------------ checks
def preflight(model: Model, data, ds: Dataset, device: torch.device, role: str) -> int | None:
    """Run two val examples through the model: clear errors for wrong input shapes or output widths. Returns a
    detection model's query count at inference (eval mode), else None."""
    x, _ = collate(ds, list(range(min(2, len(ds)))))
    if model.spec.task == "detection" and data.task != "detection":
        raise EdgecError(f"the {role} ({model.arch}) is a {model.spec.task} model but the data is a {data.task} task")
    if data.task == "detection":
        return _preflight_detection(model, data, _probe(model, x, device, role, whole=True), role)
    if data.task == "causal_lm":  # token ids 0 first: the vocabulary check comes before an embedding lookup fails
        check_fits(data, model.spec, f"the {role} ({model.arch})")  # e.g. blocks longer than the model's maximum
        _preflight_lm(model, data, _probe(model, tuple(torch.zeros_like(t) for t in _args(x)), device, role),
                      _args(x)[0], role)
    out = _probe(model, x, device, role)
    if data.task == "classification":
        if out.ndim != 2 or out.shape[-1] != data.num_classes:
            raise EdgecError(
                f"the {role} ({model.arch}) outputs shape {list(out.shape)} but the data has {data.num_classes} classes; "
                f"create the model with num_classes={data.num_classes}")
    elif data.task != "causal_lm":
        want = data.output_dim
        if out.numel() != want * len(_args(x)[0]):
            raise EdgecError(f"the {role} ({model.arch}) outputs shape {list(out.shape)} but the regression data has "
                             f"{want} target(s) per example")


def _probe(model: Model, x, device: torch.device, role: str, whole: bool = False):
    """The model's first output (``whole``: all its outputs) on ``x`` in eval mode; a failure is one line
    naming the shapes."""
    gm = model.gm
    gm.eval()
    try:
        with torch.no_grad():
            out = gm(*_args(_to(x, device)))
            return out if whole else first_output(out)
    except Exception as exc:  # noqa: BLE001 - turned into one line for the user
        shape = [list(t.shape) for t in _args(x)]
        expects = [i["shape"] for i in model.spec.to_json()["inputs"]]
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise EdgecError(f"the {role} ({model.arch}) cannot run on this data: inputs {shape} vs expected {expects} ({msg})") from None


def _preflight_detection(model: Model, data, out, role: str) -> int:
    """A detection model outputs ``(logits [B, Q, C], boxes [B, Q, 4])`` with C the data's classes; returns Q
    (checked against the spec's ``queries`` when it has one) and refuses data with more objects than Q."""
    shapes = [list(o.shape) for o in out] if isinstance(out, (tuple, list)) else [list(out.shape)]
    ok = isinstance(out, (tuple, list)) and len(out) >= 2 and out[0].ndim == 3 and out[1].ndim == 3 \
        and out[1].shape[-1] == 4 and out[0].shape[:2] == out[1].shape[:2]
    if not ok:
        raise EdgecError(f"the {role} ({model.arch}) outputs {shapes}; a detection model must output (logits "
                         "[batch, queries, classes], boxes [batch, queries, 4] as cx, cy, w, h in [0, 1])")
    queries, classes = int(out[0].shape[1]), int(out[0].shape[2])
    if classes != data.num_classes:
        raise EdgecError(f"the {role} ({model.arch}) scores {classes} classes but the data has {data.num_classes}; "
                         f"create the model with num_classes={data.num_classes}")
    spec_q = (model.spec.extra or {}).get("queries")
    if isinstance(spec_q, int) and spec_q != queries:
        raise EdgecError(f"the {role} ({model.arch}) outputs {queries} queries at inference but its spec says "
                         f"{spec_q}")
    most = (data.meta or {}).get("max_objects") if isinstance(data.meta, dict) else None
    if isinstance(most, int) and most > queries:
        raise EdgecError(f"the data has images with up to {most} objects but the {role} ({model.arch}) has "
                         f"{queries} queries; each object needs its own query: create it with num_queries >= {most}")
    return queries


def _preflight_lm(model: Model, data, out: torch.Tensor, x: torch.Tensor, role: str) -> None:
    """A causal LM must return logits [B, T, V] for token blocks [B, T], with V covering the data's vocabulary
    (``vocab_size`` in its meta, and every token id of splits held as tensors)."""
    if out.ndim != 3 or tuple(out.shape[:2]) != tuple(x.shape):
        raise EdgecError(f"the {role} ({model.arch}) outputs shape {list(out.shape)} for token blocks "
                         f"{list(x.shape)}; a causal LM must output logits [batch, seq, vocab]")
    width = int(out.shape[-1])
    vocab = data.meta.get("vocab_size") if isinstance(data.meta, dict) else None
    if isinstance(vocab, int) and vocab > width:
        raise EdgecError(f"the data's vocabulary has {vocab} tokens but the {role} ({model.arch}) outputs "
                         f"{width} logits per position; create it with vocab_size={vocab}")
    for name, ds in data.splits.items():
        tensors = [getattr(ds, "inputs", None), getattr(ds, "targets", None)]
        top = max((int(t.max()) for t in tensors if isinstance(t, torch.Tensor) and t.numel()), default=-1)
        if top >= width:
            raise EdgecError(f"the {name} split holds token id {top} but the {role} ({model.arch}) has a vocabulary "
                             f"of {width} (ids 0..{width - 1})")


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
    fsdp: bool = False,
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
    (CUDA if available), "cpu", "cuda", "cuda:1". Under torchrun (WORLD_SIZE > 1) it trains with DDP, or with
    ``fsdp=True`` fully sharded (:mod:`edgec.train.fsdp`; needs WORLD_SIZE > 1; not with distill "off").

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
                         binary_weights=binary_weights, fsdp=bool(fsdp))


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


# ------------------------------------------------------------------------------------------------ steps
@dataclass
class _Nets:
    """The modules a run uses: the student's graph, the frozen teacher's, the OFF feature graphs (sharing
    their modules), whether binary latent-weight supervision runs, what training calls, and feature taps."""

    student: Model
    gm: torch.nn.Module
    tgm: torch.nn.Module | None = None
    layers: list[str] | None = None
    fgm: torch.nn.Module | None = None
    tfgm: torch.nn.Module | None = None
    binary: bool = False
    net: torch.nn.Module | None = None  # fgm or gm, DDP-wrapped when distributed
    taps: dict | None = None
    queries: int | None = None  # detection: the student's query count at inference (train: groups × queries)


@dataclass
class _Run:
    """Everything a run fixes before its first step."""

    data: object
    info: D.DistInfo
    dev: torch.device
    emit: Callable[[dict], None]
    t_start: float
    train_ds: Dataset
    val_ds: Dataset
    nets: _Nets
    hyper: dict  # epochs, batch_size, lr, weight_decay, warmup, grad_clip, seed, kd_temperature
    mode: str
    kd_weight: float
    opts: dict  # resolve_distill's result (with "binary" resolved)
    extra_loss: Callable | None
    sizes: dict  # per_rank, n_train, steps_per_epoch, total_steps, warmup_steps
    fingerprint: dict
    distill_info: dict
    notes: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    resume_file: Path | None
    resume: bool
    fsdp: dict | None = None  # edgec.train.fsdp.shard's summary when sharded
    source: Model | None = None  # the input model (FSDP: the report's unsharded copy is built from it)


@dataclass
class _State:
    """What changes while a run trains (and what a resume file restores)."""

    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    start_epoch: int = 0
    epoch: int = 0
    step: int = 0
    prior_seconds: float = 0.0
    last_lr: float = 0.0


def _finetune(model, data, info: D.DistInfo, *, epochs, batch_size, lr, weight_decay, warmup, grad_clip, seed,
              teacher, kd_weight, kd_temperature, resume_file, resume, progress, extra_loss, feature_layers, device,
              distill, off_weight, off_layers, binary_weights, fsdp=False):
    """One run: check the options, set up, resume if asked, train every remaining epoch, report."""
    _check_hyper(epochs, batch_size, lr, weight_decay, warmup, grad_clip, kd_weight, kd_temperature, info)
    opts = resolve_distill(distill, teacher, kd_weight, off_weight, off_layers, binary_weights)
    if data.task not in MONITOR:
        raise EdgecError(f"cannot fine-tune on a '{data.task}' task (expected {', '.join(MONITOR)})")
    if resume and resume_file is None:
        raise EdgecError("resume=True needs a resume_file")
    if fsdp:
        F.check_world(info)
    if fsdp and opts["mode"] == "off":
        raise EdgecError("fsdp does not support distill 'off' (its feature graph bypasses the shard units); "
                         "use distill 'logits' or DDP")
    hyper = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
             "grad_clip": grad_clip, "seed": seed, "kd_temperature": kd_temperature}
    run = _setup(model, data, info, hyper, opts, teacher=teacher, resume_file=resume_file, resume=resume,
                 progress=progress, extra_loss=extra_loss, feature_layers=feature_layers, device=device, fsdp=fsdp)
    with _private_rng(run.dev):
        seed_all(seed + info.rank)
        state = _resume(run) if resume else _State()
        _train(run, state)
    return _report(run, state)


# ------------------------------------------------------------------------------------------------ set-up
def _setup(model: Model, data, info: D.DistInfo, hyper: dict, opts: dict, *, teacher, resume_file, resume, progress,
           extra_loss, feature_layers, device, fsdp=False) -> _Run:
    """Devices, model copies (checked on val examples), sizes, fingerprint, optimizer and feature taps."""
    train_ds, val_ds = data.split("train"), data.split("val")
    dev = D.device_for(info, device)
    emit = progress if (progress is not None and info.is_main) else (lambda event: None)
    t_start = time.perf_counter()
    start_digest = model.digest()
    notes: list[str] = []
    nets = _prepare_nets(model, teacher, data, val_ds, dev, opts, notes)
    sharded = F.shard(nets.gm, info, dev) if fsdp else None  # before the optimizer: it takes the shards
    sizes = _sizes(len(train_ds), hyper, info, notes)
    fingerprint = _fingerprint(start_digest, data, hyper, info, teacher, extra_loss, feature_layers, opts,
                               nets.layers)
    if sharded is not None:
        fingerprint["fsdp"] = True  # the resume file's optimizer state is keyed by name
    optimizer, scheduler = _optimizer(nets, hyper["lr"], hyper["weight_decay"], sizes)
    nets.taps = _feature_taps(nets, feature_layers)
    return _Run(data=data, info=info, dev=dev, emit=emit, t_start=t_start, train_ds=train_ds, val_ds=val_ds,
                nets=nets, hyper=hyper, mode=opts["mode"], kd_weight=opts["kd_weight"], opts=opts,
                extra_loss=extra_loss, sizes=sizes, fingerprint=fingerprint,
                distill_info=_distill_info(opts, nets.layers, fingerprint["teacher"], hyper["kd_temperature"]),
                notes=notes, optimizer=optimizer, scheduler=scheduler, resume_file=resume_file, resume=resume,
                fsdp=sharded, source=model if sharded is not None else None)


def _prepare_nets(model: Model, teacher: Model | None, data, val_ds: Dataset, dev: torch.device, opts: dict,
                  notes: list[str]) -> _Nets:
    """Copies of the student and the teacher on ``dev`` (both checked on two val examples), the OFF feature
    graphs when ``distill == "off"``, and the binary supervision settings."""
    student = model.clone()
    nets = _Nets(student, student.gm.to(dev))
    nets.queries = preflight(student, data, val_ds, dev, "model")
    if teacher is not None:
        tmodel = teacher.clone()
        nets.tgm = tmodel.gm.to(dev).eval()
        nets.tgm.requires_grad_(False)
        preflight(tmodel, data, val_ds, dev, "teacher")
    if opts["mode"] == "off":
        _prepare_off(nets, opts, val_ds, dev)
    _resolve_binary(nets, opts, notes)
    return nets


def _prepare_off(nets: _Nets, opts: dict, val_ds: Dataset, dev: torch.device) -> None:
    """OFF: feature-extraction copies of the student and the teacher graph (sharing their modules)."""
    nets.layers = DS.resolve_layers(nets.gm, opts["off_layers"], "model")
    nets.fgm = DS.feature_extractor(nets.gm, nets.layers)
    try:
        nets.tfgm = DS.feature_extractor(nets.tgm, nets.layers)
    except EdgecError as exc:
        raise EdgecError(f"the teacher has no layer matching the student's OFF layers ({exc})") from None
    nets.tfgm.eval()
    _preflight_features(nets.fgm, nets.tfgm, nets.layers, val_ds, dev)


def _resolve_binary(nets: _Nets, opts: dict, notes: list[str]) -> None:
    """Binary latent-weight supervision: ``opts["binary"]`` "auto" becomes the weights scaffold.binary
    recorded (its --latent-weight) when they are not all 0, else None; explicit weights need binary scaffolds."""
    if opts["binary"] == "auto":
        opts["binary"] = None
        if DS.has_binary_scaffold(nets.gm):
            recorded = binary_latent_weights(nets.gm)
            if recorded is not None and any(float(v) > 0 for v in recorded):
                opts["binary"] = tuple(float(v) for v in recorded)
                notes.append(f"binary latent-weight supervision λ1,λ2 = {list(opts['binary'])} (recorded by "
                             "scaffold.binary; binary_weights overrides, (0, 0) disables)")
                nets.binary = True
    elif opts["binary"] is not None:
        if not DS.has_binary_scaffold(nets.gm):
            raise EdgecError(f"binary_weights needs a student with binary scaffolds (edgec scaffold binary); "
                             f"the model ({nets.student.arch}) has none")
        nets.binary = True


def _sizes(n_train: int, hyper: dict, info: D.DistInfo, notes: list[str]) -> dict:
    """Per-process batch, steps per epoch, total and warm-up steps."""
    batch_size = hyper["batch_size"]
    per_rank = batch_size // info.world_size
    steps_per_epoch = len(epoch_batches(n_train, 0, hyper["seed"], per_rank, info))
    total_steps = hyper["epochs"] * steps_per_epoch
    warmup_steps = int(round(hyper["warmup"] * total_steps))
    if info.distributed and batch_size % info.world_size:
        notes.append(f"batch_size {batch_size} is not divisible by {info.world_size} processes: "
                     f"{per_rank} per process ({per_rank * info.world_size} per step)")
    return {"per_rank": per_rank, "n_train": n_train, "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "warmup_steps": warmup_steps}


def _fingerprint(start_digest: str, data, hyper: dict, info: D.DistInfo, teacher: Model | None, extra_loss,
                 feature_layers, opts: dict, layers: list[str] | None) -> dict:
    """What a resume file must match: the model and data at the start and every option that decides results."""
    fingerprint = {
        "loop": LOOP_VERSION, "model": start_digest, "data": data.digest, "task": data.task,
        "epochs": hyper["epochs"], "batch_size": hyper["batch_size"], "lr": hyper["lr"],
        "weight_decay": hyper["weight_decay"], "warmup": hyper["warmup"], "grad_clip": hyper["grad_clip"],
        "seed": hyper["seed"], "world_size": info.world_size,
        "teacher": teacher.digest() if teacher is not None else None,
        "extra_loss": _callable_name(extra_loss),
        "feature_layers": list(feature_layers) if feature_layers else None,
    }
    if teacher is not None:
        fingerprint |= {"kd_weight": opts["kd_weight"], "kd_temperature": hyper["kd_temperature"]}
    if opts["mode"] == "off":  # (logits distillation is identified by the teacher and kd keys, as before)
        fingerprint |= {"distill": opts["mode"], "off_weight": opts["off_weight"], "off_layers": layers}
    if opts["binary"] is not None:
        fingerprint["binary_weights"] = list(opts["binary"])
    return fingerprint


def _distill_info(opts: dict, layers: list[str] | None, teacher_digest: str | None, kd_temperature: float) -> dict:
    """The report's ``distill`` entry."""
    mode, on = opts["mode"], opts["mode"] != "none"
    return {"mode": mode, "teacher": teacher_digest,
            "kd_weight": opts["kd_weight"] if on else None,
            "kd_temperature": kd_temperature if on else None,
            "off_weight": opts["off_weight"] if mode == "off" else None, "off_layers": layers,
            "binary_weights": list(opts["binary"]) if opts["binary"] is not None else None}


def _optimizer(nets: _Nets, lr: float, weight_decay: float, sizes: dict):
    """AdamW with weight decay on tensors of rank >= 2 only, and its warm-up + cosine LambdaLR."""
    gm = nets.gm
    decay = [p for p in gm.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in gm.parameters() if p.requires_grad and p.ndim < 2]
    if not decay and not no_decay:
        raise EdgecError(f"the model ({nets.student.arch}) has no trainable parameters")
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  WarmupCosine(sizes["total_steps"], sizes["warmup_steps"]))
    return optimizer, scheduler


def _feature_taps(nets: _Nets, feature_layers) -> dict | None:
    """Forward hooks on the ``feature_layers`` of the student (and teacher) for ``extra_loss``."""
    if not feature_layers:
        return None
    taps = {"student": FeatureTap(nets.gm, feature_layers, "model")}
    if nets.tgm is not None:
        taps["teacher"] = FeatureTap(nets.tgm, feature_layers, "teacher")
    return taps


def _resume(run: _Run) -> _State:
    """Restore weights, optimizer, schedule, history, keep-best and this rank's RNG from the resume file."""
    info, dev, resume_file = run.info, run.dev, run.resume_file
    saved = load_resume(resume_file, run.fingerprint)
    if len(saved["rng"]) != info.world_size:
        raise EdgecError(f"cannot resume from {resume_file}: it holds {len(saved['rng'])} process states, "
                         f"this run has {info.world_size}")
    if run.fsdp is not None:
        F.load_full_state_dict(run.nets.gm, saved["state_dict"], resume_file)
        F.load_optimizer_state_dict(run.nets.gm, run.optimizer, saved["optimizer"])
    else:
        load_state_dict_strict(run.nets.gm, saved["state_dict"], resume_file)
        run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    state = _State(history=list(saved["history"]), best=dict(saved["best"]) if saved["best"] else None,
                   start_epoch=int(saved["epoch"]), step=int(saved["step"]),
                   prior_seconds=float(saved.get("train_seconds", 0.0)))
    set_rng_state(saved["rng"][info.rank], dev)
    run.notes.append(f"resumed after epoch {state.start_epoch} from {Path(resume_file).name}")
    was = (saved.get("threads"), saved.get("device"))
    if was != (torch.get_num_threads(), dev.type):
        run.notes.append(f"the run started with {was[0]} thread(s) on {was[1]} and resumes with "
                         f"{torch.get_num_threads()} on {dev.type}: it continues correctly but is not "
                         "bit-identical to an uninterrupted run")
    return state


# ------------------------------------------------------------------------------------------------ training
def _train(run: _Run, state: _State) -> None:
    """Wrap for DDP, then train the remaining epochs; Ctrl-C becomes TrainingInterrupted."""
    nets, info, sizes, hyper = run.nets, run.info, run.sizes, run.hyper
    find_unused = bool(info.distributed and run.fsdp is None and _unused_parameters(nets.gm, run.val_ds, run.dev))
    # DDP wraps the module that training runs (the feature-extraction copy for OFF): it holds the very
    # same parameters as gm, so gradients are all-reduced exactly as for gm itself.
    # Under FSDP gm is already sharded (in _setup, before the optimizer took its parameters).
    nets.net = nets.gm if run.fsdp is not None else D.wrap_ddp(nets.fgm if nets.fgm is not None else nets.gm,
                                                                info, run.dev, find_unused)
    run.emit({"event": "start", "epochs": hyper["epochs"], "start_epoch": state.start_epoch + 1,
              "steps_per_epoch": sizes["steps_per_epoch"], "total_steps": sizes["total_steps"],
              "world_size": info.world_size, "batch_size": hyper["batch_size"],
              "batch_size_per_process": sizes["per_rank"], "train_examples": sizes["n_train"],
              "val_examples": len(run.val_ds), "monitor": MONITOR[run.data.task], "resumed": bool(run.resume)})
    state.epoch = state.start_epoch
    state.last_lr = run.optimizer.param_groups[0]["lr"] if not state.history else state.history[-1]["lr"]
    try:
        for epoch in range(state.start_epoch, hyper["epochs"]):
            state.epoch = epoch
            t0 = time.perf_counter()
            sums = _train_epoch(run, state, epoch)
            _end_epoch(run, state, epoch, sums, t0)
    except KeyboardInterrupt:
        raise _interrupted(run, state) from None
    finally:
        if nets.taps:
            for tap in nets.taps.values():
                tap.remove()


def _train_epoch(run: _Run, state: _State, epoch: int) -> dict:
    """One epoch of training steps; returns this rank's example-weighted sums of the loss and its parts."""
    nets, sizes = run.nets, run.sizes
    nets.net.train()
    sums = dict.fromkeys(SUM_KEYS, 0.0) | {f"off:{n}": 0.0 for n in (nets.layers or [])}
    for i, idx in enumerate(epoch_batches(sizes["n_train"], epoch, run.hyper["seed"], sizes["per_rank"], run.info)):
        x, y = collate(run.train_ds, idx)
        x, y = _to(x, run.dev), y.to(run.dev)
        loss, parts = _loss(run, x, y)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise EdgecError(f"training diverged: the loss is {value} at epoch {epoch + 1} step {i + 1}; "
                             f"try a lower lr (now {run.hyper['lr']:g}) or gradient clipping")
        grad_norm = _optimizer_step(run, state, loss)
        bn = len(idx)
        sums["loss"] += value * bn
        for k, v in parts.items():
            sums[k] += float(v) * bn
        sums["n"] += bn
        run.emit({"event": "step", "epoch": epoch + 1, "epochs": run.hyper["epochs"], "step": i + 1,
                  "steps": sizes["steps_per_epoch"], "global_step": state.step, "loss": value,
                  "lr": state.last_lr, "grad_norm": grad_norm})
    return sums


def _loss(run: _Run, x, y) -> tuple[torch.Tensor, dict]:
    """The training loss of one batch and its parts: task (+ logits KD) (+ OFF) (+ binary) (+ extra)."""
    nets = run.nets
    if nets.taps:
        for tap in nets.taps.values():
            tap.clear()
    out = nets.net(*_args(x))
    sfeat = None
    if nets.fgm is not None:
        out, sfeat = out
    pred = model_output(out, run.data.task)
    tpred, tfeat = _teacher_forward(nets, x, run.data.task)
    kd_pred = tpred if (run.mode == "logits" or run.kd_weight > 0) else None
    loss, parts = combined_loss(pred, y, run.data.task, kd_pred, run.kd_weight, run.hyper["kd_temperature"],
                                queries=nets.queries)
    if nets.fgm is not None:
        sdict, tdict = dict(zip(nets.layers, sfeat)), dict(zip(nets.layers, tfeat))
        if run.data.task == "detection":  # Group DETR: the train-mode student's extra query groups
            sdict = group0_features(sdict, tdict, group_count(pred, nets.queries))
        loff, per_layer = DS.off_loss(sdict, tdict, nets.layers)
        loss = loss + run.opts["off_weight"] * loff
        parts["off"] = loff.detach()
        parts |= {f"off:{n}": v for n, v in per_layer.items()}
    if nets.binary:
        loss = _add_binary_terms(run, loss, parts, pred, x, y)
    if run.extra_loss is not None:
        feats = {k: dict(t.features) for k, t in nets.taps.items()} if nets.taps else {}
        feats.setdefault("student", {})
        feats.setdefault("teacher", {})
        extra = run.extra_loss(out, (x, y), feats)
        loss = loss + extra
        parts["extra"] = extra.detach()
    return loss, parts


def _teacher_forward(nets: _Nets, x, task: str) -> tuple[torch.Tensor | tuple | None, tuple | None]:
    """The frozen teacher's predictions (and OFF features) for a batch; ``(None, None)`` without a teacher."""
    if nets.tgm is None:
        return None, None
    tfeat = None
    with torch.no_grad():
        if nets.tfgm is not None:
            tout, tfeat = nets.tfgm(*_args(x))
        else:
            tout = nets.tgm(*_args(x))
        tpred = model_output(tout, task)
    return tpred, tfeat


def _add_binary_terms(run: _Run, loss: torch.Tensor, parts: dict, pred, x, y) -> torch.Tensor:
    """``loss + λ1·task(real network) + λ2·mean(1 − cos(y_b, y_r))``; the cosine term reads the binary layers'
    outputs of the forward just run, so it is taken before the real-mode forward."""
    nets = run.nets
    aux = binary_aux_loss(nets.gm, lambda2=1.0).to(loss.device)  # mean over binary layers of 1 − cos
    with real_mode(nets.gm):
        rout = nets.net(*_args(x))
    rpred = model_output(rout[0] if nets.fgm is not None else rout, run.data.task)
    lreal = task_loss(rpred, y, run.data.task, queries=nets.queries)
    lam1, lam2 = run.opts["binary"]
    loss = loss + lam1 * lreal + lam2 * aux
    parts |= {"real": lreal.detach(), "aux": aux.detach()}
    return loss


def _optimizer_step(run: _Run, state: _State, loss: torch.Tensor) -> float | None:
    """Backward, clip, AdamW and schedule step; returns the gradient norm before clipping (None: no clip)."""
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = None
    if run.hyper["grad_clip"] > 0:
        grad_norm = F.clip_grad_norm(run.nets.gm.parameters(), run.hyper["grad_clip"])  # global norm under FSDP
    state.last_lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    state.step += 1
    return grad_norm


# ------------------------------------------------------------------------------------------------ epoch end
def _end_epoch(run: _Run, state: _State, epoch: int, sums: dict, t0: float) -> None:
    """Sum over ranks, validate, keep the best, append the history row, write the resume file, emit."""
    info, gm = run.info, run.nets.gm
    keys = list(sums)
    totals = dict(zip(keys, D.all_reduce_sum([sums[k] for k in keys], info, run.dev)))
    D.broadcast_buffers(gm, info)
    val = evaluate(gm, run.val_ds, run.data.task, run.data.num_classes, run.hyper["batch_size"], run.dev)
    monitor = MONITOR[run.data.task]
    score, vloss = float(val[monitor]), float(val["loss"])
    improved = is_better(score, vloss, state.best, lower=monitor in LOWER_IS_BETTER)
    if run.fsdp is not None:  # the gather below is collective: every rank follows rank 0's decision
        improved = bool(D.gather_objects(improved, info)[0])
    if improved:
        state.best = {"epoch": epoch + 1, "score": score, "loss": vloss, "metrics": val,
                      "state_dict": _cpu_state_dict(gm)}
    row = _history_row(run, epoch, totals, val, time.perf_counter() - t0, improved, state.last_lr)
    state.history.append(row)
    rngs = D.gather_objects(rng_state(run.dev), info)
    if run.resume_file is not None and (info.is_main or run.fsdp is not None):  # FSDP gathers on every rank
        _save_resume(run, state, epoch, rngs)
    run.emit({"event": "epoch", "epoch": epoch + 1, "epochs": run.hyper["epochs"], "train_loss": row["train_loss"],
              "val": val, "lr": state.last_lr, "seconds": row["seconds"], "is_best": improved,
              "best_epoch": state.best["epoch"], "monitor": MONITOR[run.data.task]})


def _cpu_state_dict(gm: torch.nn.Module) -> dict:
    if F.is_sharded(gm):
        return F.full_state_dict(gm)  # collective: every rank calls it
    return {k: v.detach().to("cpu", copy=True) for k, v in gm.state_dict().items()}


def _history_row(run: _Run, epoch: int, totals: dict, val: dict, seconds: float, improved: bool,
                 last_lr: float) -> dict:
    """One epoch of the report's history: mean train loss (and the parts this run has), lr, val metrics."""
    nets = run.nets
    n = max(1.0, totals["n"])
    row = {"epoch": epoch + 1, "train_loss": totals["loss"] / n, "lr": last_lr, "val": val,
           "seconds": seconds, "is_best": improved}
    if nets.tgm is not None or nets.binary:
        row["train_task_loss"] = totals["task"] / n
    if run.kd_weight > 0 or run.mode == "logits":
        row["train_kd_loss"] = totals["kd"] / n
    if nets.fgm is not None:
        row["train_off_loss"] = totals["off"] / n
        row["train_off_layers"] = {name: totals[f"off:{name}"] / n for name in nets.layers}
    if nets.binary:
        row |= {"train_real_loss": totals["real"] / n, "train_binary_aux_loss": totals["aux"] / n}
    if run.extra_loss is not None:
        row["train_extra_loss"] = totals["extra"] / n
    return row


def _save_resume(run: _Run, state: _State, epoch: int, rngs: list) -> None:
    weights = _cpu_state_dict(run.nets.gm)
    optim = (F.optimizer_state_dict(run.nets.gm, run.optimizer) if run.fsdp is not None
             else run.optimizer.state_dict())
    if not run.info.is_main:  # FSDP: the other ranks only took part in the gathers
        return
    save_resume(run.resume_file, {
        "fingerprint": run.fingerprint, "epoch": epoch + 1, "step": state.step,
        "state_dict": weights,
        "best": state.best, "optimizer": optim, "scheduler": run.scheduler.state_dict(),
        "history": state.history, "rng": rngs,
        "train_seconds": state.prior_seconds + time.perf_counter() - run.t_start,
        "threads": torch.get_num_threads(), "device": run.dev.type,
    })


def _interrupted(run: _Run, state: _State) -> TrainingInterrupted:
    done = len(state.history)
    if run.resume_file is None:
        where = "no resume file was configured"
    elif done:
        where = (f"the last completed epoch ({done}) is saved in {run.resume_file}; rerun the same command with "
                 "--resume to continue")
    else:
        where = "no epoch was completed, so there is nothing to resume"
    return TrainingInterrupted(f"interrupted during epoch {state.epoch + 1} of {run.hyper['epochs']}; {where}")


# ------------------------------------------------------------------------------------------------ report
def _report(run: _Run, state: _State) -> tuple[Model, dict]:
    """Load the best epoch's weights into the student (eval mode, CPU); the report; the ``end`` event."""
    best, sizes, gm = state.best, run.sizes, run.nets.gm
    assert best is not None
    if run.fsdp is not None:  # an unsharded copy of the input model takes the best weights
        gm = run.source.clone().gm
    gm.load_state_dict(best["state_dict"])
    student = run.nets.student
    student.gm = gm.to("cpu").eval()
    if run.fsdp is not None:  # free the sharded module (reference cycles) while the process group exists
        run.nets.gm = run.nets.net = run.optimizer = None
        gc.collect()
    seconds = state.prior_seconds + time.perf_counter() - run.t_start
    report = {
        "epochs": run.hyper["epochs"], "best_epoch": best["epoch"], "best": best["metrics"],
        "monitor": MONITOR[run.data.task], "history": state.history, "steps": state.step,
        "total_steps": sizes["total_steps"], "steps_per_epoch": sizes["steps_per_epoch"],
        "final_lr": state.last_lr, "seconds": seconds, "world_size": run.info.world_size,
        "batch_size": run.hyper["batch_size"], "batch_size_per_process": sizes["per_rank"],
        "train_examples": sizes["n_train"], "val_examples": len(run.val_ds),
        "resumed_from": state.start_epoch if run.resume else None, "device": str(run.dev),
        "warmup_steps": sizes["warmup_steps"], "fingerprint": run.fingerprint, "notes": run.notes,
        "rank": run.info.rank, "distill": run.distill_info, "fsdp": run.fsdp,
    }
    run.emit({"event": "end", "best_epoch": best["epoch"], "best": best["metrics"], "seconds": seconds,
              "steps": state.step})
    return student, report
