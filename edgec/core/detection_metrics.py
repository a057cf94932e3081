"""Detection metrics, COCO style (numpy only; inputs may be tensors, arrays or lists).

    preds = postprocess(logits, boxes, k=100)        # model outputs -> per-image top-k detections
    gts = targets_from_items(y)                      # data items' [M, 5] rows -> per-image ground truth
    detection_metrics(preds, gts)                    # {"map", "map50", "map75", "n", "objects"}

``postprocess`` is DETR's (arXiv 2005.12872, as LW-DETR 2406.03459 uses it): sigmoid scores of every
(query, class) pair, the top K = min(k, N·C) pairs of each image by score (ties: the lower flat index first), each
with its query's box converted from (cx, cy, w, h) to (x0, y0, x1, y1).

``detection_metrics`` is COCOeval's bbox protocol (Lin et al., arXiv 1405.0312; pycocotools ``COCOeval``) with
area "all" and no crowd regions, reproduced step by step: per image and class, detections sorted by score
(stable) and cut to ``max_dets``; per IoU threshold t in .50:.05:.95, each detection in turn takes the unmatched
ground-truth box of highest IoU ≥ t (a later box wins a tie, as in COCOeval), else it is a false positive; per
class, the detections of all images in image order are sorted by score (stable), precision is made
non-increasing from the right, and read at the 101 recall points 0, .01, …, 1 (the first detection reaching
each recall; 0 past the last recall reached). AP = the mean over recall points; a class without ground truth
is left out; mAP = the mean over classes and thresholds, map50 / map75 at t = .5 / .75. IoU is invariant to
scaling x and y separately, so normalised and pixel boxes give the same numbers.
"""
from __future__ import annotations

import numpy as np

from edgec.core.errors import EdgecError

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCOeval's np.linspace(.5, 0.95, int(np.round((.95 - .5) / .05)) + 1)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETS = 100


def _np(a, name: str, dtype=np.float64) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.dtype == object:
        raise EdgecError(f"detection metrics: {name} is not numeric")
    return arr.astype(dtype, copy=False)


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def postprocess(logits, boxes, k: int = MAX_DETS) -> list[dict]:
    """Per image ``{"scores" [K], "labels" [K] int64, "boxes" [K, 4] xyxy}`` from logits [B, N, C] (raw, one
    sigmoid per class, no background) and boxes [B, N, 4] (cx, cy, w, h), K = min(k, N·C), scores descending."""
    z, b = _np(logits, "logits"), _np(boxes, "boxes")
    if z.ndim != 3 or b.ndim != 3 or b.shape[-1] != 4 or b.shape[:2] != z.shape[:2]:
        raise EdgecError(f"a detection model must output logits [batch, queries, classes] and boxes [batch, "
                         f"queries, 4]; got {list(z.shape)} and {list(b.shape)}")
    if not (np.all(np.isfinite(z)) and np.all(np.isfinite(b))):
        raise EdgecError("the model produced NaN/Inf logits or boxes on the data")
    n, c = z.shape[1], z.shape[2]
    kk = min(int(k), n * c)
    out = []
    for zi, bi in zip(z, b):
        p = sigmoid(zi.reshape(-1))
        top = np.argsort(-p, kind="stable")[:kk]
        out.append({"scores": p[top], "labels": (top % c).astype(np.int64),
                    "boxes": cxcywh_to_xyxy(bi[top // c])})
    return out


def targets_from_items(y) -> list[dict]:
    """Per image ``{"labels" [G] int64, "boxes" [G, 4] xyxy}`` from data targets [B, M, 5] rows (class, cx, cy,
    w, h), padding rows (class < 0) dropped."""
    t = _np(y, "targets")
    if t.ndim != 3 or t.shape[-1] != 5:
        raise EdgecError(f"detection targets must be [batch, objects, 5] rows (class, cx, cy, w, h); got {list(t.shape)}")
    out = []
    for ti in t:
        keep = ti[:, 0] >= 0
        out.append({"labels": ti[keep, 0].astype(np.int64), "boxes": cxcywh_to_xyxy(ti[keep, 1:])})
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] IoU of xyxy boxes (0 where the union is empty)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match(iou: np.ndarray) -> np.ndarray:
    """[T, D] bool: detection d (in score order) is a true positive at threshold t (COCOeval's greedy match)."""
    n_det, n_gt = iou.shape
    tp = np.zeros((len(IOU_THRESHOLDS), n_det), dtype=bool)
    if n_det == 0 or n_gt == 0:
        return tp
    best = iou.max(axis=1)
    for ti, t in enumerate(IOU_THRESHOLDS):
        thr = min(float(t), 1 - 1e-10)
        taken = np.zeros(n_gt, dtype=bool)
        for d in np.flatnonzero(best >= thr):
            m, cur = -1, thr
            for g in range(n_gt):
                if taken[g] or iou[d, g] < cur:
                    continue
                cur, m = iou[d, g], g
            if m >= 0:
                taken[m] = True
                tp[ti, d] = True
    return tp


def _check(items: list, name: str, need_scores: bool) -> list[tuple]:
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "boxes" not in it or "labels" not in it or (need_scores and "scores" not in it):
            raise EdgecError(f"detection metrics: {name}[{i}] needs 'boxes', 'labels'"
                             + (" and 'scores'" if need_scores else ""))
        boxes = _np(it["boxes"], f"{name}[{i}] boxes").reshape(-1, 4)
        labels = _np(it["labels"], f"{name}[{i}] labels", np.int64).reshape(-1)
        scores = _np(it["scores"], f"{name}[{i}] scores").reshape(-1) if need_scores else None
        if len(labels) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
            raise EdgecError(f"detection metrics: {name}[{i}] has {len(boxes)} boxes, {len(labels)} labels"
                             + (f" and {len(scores)} scores" if scores is not None else ""))
        if not np.all(np.isfinite(boxes)) or (scores is not None and not np.all(np.isfinite(scores))):
            raise EdgecError(f"detection metrics: {name}[{i}] holds NaN/Inf")
        out.append((boxes, labels, scores))
    return out


def detection_metrics(predictions: list[dict], targets: list[dict], max_dets: int = MAX_DETS) -> dict:
    """COCO bbox mAP@[.5:.95], mAP50 and mAP75 (area all, ``max_dets`` per image and class) of per-image
    predictions ``{"boxes" xyxy, "scores", "labels"}`` against ``{"boxes" xyxy, "labels"}``; ``n`` images,
    ``objects`` ground-truth boxes, ``classes`` the number of classes with ground truth (those averaged)."""
    if len(predictions) != len(targets):
        raise EdgecError(f"detection metrics: {len(predictions)} predictions for {len(targets)} images")
    preds, gts = _check(predictions, "predictions", True), _check(targets, "targets", False)
    classes = sorted(set(np.concatenate([g[1] for g in gts] + [np.zeros(0, np.int64)]).tolist()))
    if not classes:
        raise EdgecError("detection metrics: no ground-truth objects to score")
    n_thr = len(IOU_THRESHOLDS)
    ap = np.zeros((n_thr, len(classes)))
    for ci, c in enumerate(classes):
        scores, tps, n_gt = [], [], 0
        for (pb, pl, ps), (gb, gl, _) in zip(preds, gts):
            g = gb[gl == c]
            n_gt += len(g)
            sel = np.flatnonzero(pl == c)
            sel = sel[np.argsort(-ps[sel], kind="mergesort")][:max_dets]
            scores.append(ps[sel])
            tps.append(_match(box_iou(pb[sel], g)))
        s = np.concatenate(scores)
        order = np.argsort(-s, kind="mergesort")
        tp = np.concatenate(tps, axis=1)[:, order]
        tp_sum = np.cumsum(tp, axis=1, dtype=np.float64)
        fp_sum = np.cumsum(~tp, axis=1, dtype=np.float64)
        for ti in range(n_thr):
            rc = tp_sum[ti] / n_gt
            pr = tp_sum[ti] / (tp_sum[ti] + fp_sum[ti] + np.spacing(1))
            pr = np.maximum.accumulate(pr[::-1])[::-1]  # non-increasing from the right
            idx = np.searchsorted(rc, RECALL_POINTS, side="left")
            q = np.where(idx < len(pr), pr[np.minimum(idx, max(len(pr) - 1, 0))] if len(pr) else 0.0, 0.0)
            ap[ti, ci] = float(np.mean(q))
    return {"map": float(ap.mean()), "map50": float(ap[0].mean()), "map75": float(ap[5].mean()),
            "n": len(targets), "objects": int(sum(len(g[1]) for g in gts)), "classes": len(classes)}
