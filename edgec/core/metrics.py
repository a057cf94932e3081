"""Evaluation metrics, ParaLBench style (numpy only; inputs may be tensors, arrays or lists).

Accuracy (= WA), UAR and macro-F1 for classification; CCC, MAE and RMSE for regression. Definitions and
edge cases (which classes count, degenerate variances): see docs/methods.md#metrics.
"""
from __future__ import annotations

import numpy as np

from edgec.core.errors import EdgecError


def _as_numpy(a, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(a)
    if arr.dtype == object:
        raise EdgecError(f"metrics: {name} is not numeric")
    return arr


def classification_metrics(y_true, y_pred, num_classes: int | None = None) -> dict:
    t = _as_numpy(y_true, "y_true").reshape(-1)
    p = _as_numpy(y_pred, "y_pred")
    if p.ndim == 2:
        p = p.argmax(axis=1)
    p = p.reshape(-1)
    if t.size != p.size:
        raise EdgecError(f"metrics: y_true has {t.size} labels but y_pred has {p.size}")
    if t.size == 0:
        raise EdgecError("metrics: no examples to score")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.dtype.kind == "f" and not np.all(np.mod(a, 1) == 0):
            raise EdgecError(f"metrics: {name} must hold integer class ids")
    t = t.astype(np.int64)
    p = p.astype(np.int64)
    if num_classes is None:
        num_classes = int(max(t.max(), p.max())) + 1
    lo, hi = int(min(t.min(), p.min())), int(max(t.max(), p.max()))
    if lo < 0 or hi >= num_classes:
        raise EdgecError(f"metrics: class ids must be in [0, {num_classes}), found {lo if lo < 0 else hi}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)  # rows true, columns predicted
    np.add.at(cm, (t, p), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    labelled = present | (predicted > 0)
    accuracy = float(tp.sum() / t.size)
    return {
        "accuracy": accuracy,
        "wa": accuracy,
        "uar": float(recall[present].mean()),
        "macro_f1": float(f1[labelled].mean()),
        "n": int(t.size),
    }


def _ccc_1d(t: np.ndarray, p: np.ndarray) -> float:
    mt, mp = t.mean(), p.mean()
    vt, vp = ((t - mt) ** 2).mean(), ((p - mp) ** 2).mean()
    cov = ((t - mt) * (p - mp)).mean()
    denom = vt + vp + (mt - mp) ** 2
    if denom == 0:
        return 1.0 if np.array_equal(t, p) else 0.0
    return float(2 * cov / denom)


def regression_metrics(y_true, y_pred) -> dict:
    t = _as_numpy(y_true, "y_true").astype(np.float64)
    p = _as_numpy(y_pred, "y_pred").astype(np.float64)
    if t.size != p.size:
        raise EdgecError(f"metrics: y_true has {t.size} values but y_pred has {p.size}")
    if t.size == 0:
        raise EdgecError("metrics: no examples to score")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(p))):
        raise EdgecError("metrics: NaN/Inf in regression targets or predictions")
    if t.ndim == 2 and t.shape[1] > 1:
        p = p.reshape(t.shape)
        ccc = float(np.mean([_ccc_1d(t[:, j], p[:, j]) for j in range(t.shape[1])]))
    else:
        t, p = t.reshape(-1), p.reshape(-1)
        ccc = _ccc_1d(t, p)
    err = t.reshape(-1) - p.reshape(-1)
    return {
        "ccc": ccc,
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "n": int(t.shape[0]) if t.ndim else 1,
    }
