"""Training losses: the task loss (cross-entropy / MSE / the set-prediction loss of detection, see
:mod:`edgec.train.detection`), logits distillation (Hinton et al. 2015, see docs/methods.md#logits-distillation)
and :class:`FeatureTap`, which records leaf-module outputs for an ``extra_loss``.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F

from edgec.core.errors import EdgecError
from edgec.train.detection import detection_kd_loss, detection_loss, group_count


def first_output(out) -> torch.Tensor:
    """The logits/predictions of a model output: the tensor itself or the first element of a tuple/list."""
    if isinstance(out, (tuple, list)):
        if not out:
            raise EdgecError("the model returned an empty tuple")
        return out[0]
    return out


def model_output(out, task: str):
    """What the task loss takes from a model's output: ``(logits, boxes)`` for detection (the first two outputs),
    else the first output (:func:`first_output`)."""
    if task == "detection":
        if isinstance(out, (tuple, list)) and len(out) >= 2:
            return tuple(out[:2])
        return out  # refused by the loss with one line naming what the model outputs
    return first_output(out)


def task_loss(pred, target: torch.Tensor, task: str, reduction: str = "mean", *,
              queries: int | None = None) -> torch.Tensor:
    """Cross-entropy (classification), MSE (regression) or next-token cross-entropy (causal_lm: logits
    [B, T, V] against token ids [B, T], over all B·T positions; "mean" is per token, "sum" the total NLL).
    Detection: ``pred = (logits, boxes)`` (:func:`model_output`), LW-DETR's loss
    (:func:`edgec.train.detection.detection_loss`) over N / ``queries`` query groups (one group when
    ``queries`` is None); "mean" is normalised by the number of objects, "sum" is not."""
    if task == "detection":
        groups = group_count(pred, queries)
        return detection_loss(pred, target, groups, num_boxes=1.0 if reduction == "sum" else None)
    if task == "classification":
        return F.cross_entropy(pred, target, reduction=reduction)
    if task == "causal_lm":
        logits, tokens = lm_positions(pred, target)
        return F.cross_entropy(logits.float(), tokens, reduction=reduction)
    return F.mse_loss(as_target_shape(pred, target).float(), target.float(), reduction=reduction)


def lm_positions(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM logits [B, T, V] and next-token ids [B, T] as one row per position: ([B·T, V], [B·T])."""
    if pred.ndim != 3 or tuple(pred.shape[:2]) != tuple(target.shape):
        raise EdgecError(f"a causal LM must output logits [batch, seq, vocab] matching the targets "
                         f"{list(target.shape)}; the model outputs shape {list(pred.shape)}")
    return pred.reshape(-1, pred.shape[-1]), target.reshape(-1).long()


def as_target_shape(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Regression output (N, k) or (N, 1) laid out like the target ((N,) or (N, k))."""
    if pred.shape == target.shape:
        return pred
    if pred.numel() != target.numel():
        raise EdgecError(f"model predicts shape {list(pred.shape)} but the regression targets have shape {list(target.shape)}")
    return pred.reshape(target.shape)


def kd_loss(student, teacher, temperature: float = 2.0, task: str = "classification", *,
            queries: int | None = None) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` averaged over the batch (MSE for regression); for
    causal_lm over every token position (logits [B, T, V]: the mean of the B·T per-position terms); for
    detection (``(logits, boxes)`` pairs) the set-matched distillation of
    :func:`edgec.train.detection.detection_kd_loss` over N / ``queries`` student query groups."""
    if task == "detection":
        return detection_kd_loss(student, teacher, group_count(student, queries), temperature)
    teacher = teacher.detach()
    if task == "causal_lm":
        if student.ndim != 3 or teacher.shape != student.shape:
            raise EdgecError(f"per-token distillation needs student and teacher logits of one shape [batch, seq, "
                             f"vocab]; got {list(student.shape)} and {list(teacher.shape)}")
        student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    elif task != "classification":
        return F.mse_loss(student.float(), teacher.float().reshape(student.shape))
    t = float(temperature)
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * (t * t)


def combined_loss(pred, target, task: str, teacher_pred=None, kd_weight: float = 0.5,
                  kd_temperature: float = 2.0, *, queries: int | None = None) -> tuple[torch.Tensor, dict]:
    """Total loss and its parts (floats, for logging): ``(1 − w)·task + w·kd`` with a teacher, else task.
    ``queries``: a detection model's query count at inference (:func:`task_loss`)."""
    lt = task_loss(pred, target, task, queries=queries)
    if teacher_pred is None:
        return lt, {"task": lt.detach()}
    lk = kd_loss(pred, teacher_pred, kd_temperature, task, queries=queries)
    w = float(kd_weight)
    return (1.0 - w) * lt + w * lk, {"task": lt.detach(), "kd": lk.detach()}


class FeatureTap:
    """Record the outputs of leaf modules matching ``patterns`` (exact names or fnmatch globs).

    ``tap.features`` maps module name -> output tensor of the latest forward (still attached to the
    autograd graph, so a loss on it trains the student). Call :meth:`clear` before each forward and
    :meth:`remove` when done. In a traced graph only leaf modules run (containers are inlined), so names
    that are not called are refused; for block outputs use ``distill="off"``.
    """

    def __init__(self, module: torch.nn.Module, patterns: list[str] | tuple[str, ...], role: str = "model"):
        called = _called_modules(module)
        names: list[str] = []
        for pat in patterns:
            hits = [n for n in called if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                close = ", ".join(called[:8]) + (", ..." if len(called) > 8 else "")
                raise EdgecError(f"feature layer '{pat}' matches no module the {role} calls (it calls: {close})")
            names += [h for h in hits if h not in names]
        self.names = names
        self.features: dict[str, torch.Tensor] = {}
        modules = dict(module.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self.features[name] = output

        return hook

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _called_modules(module: torch.nn.Module) -> list[str]:
    graph = getattr(module, "graph", None)
    if graph is None:  # a plain nn.Module: every named submodule may run
        return [n for n, _ in module.named_modules() if n]
    return [str(node.target) for node in graph.nodes if node.op == "call_module"]
