"""COCO-style detection mAP (edgec.core.detection_metrics) on hand-computed cases, DETR post-processing, and
equality with pycocotools' COCOeval on random cases when it is installed."""
import contextlib
import io

import numpy as np
import pytest

from edgec.core.detection_metrics import detection_metrics, postprocess, targets_from_items
from edgec.core.errors import EdgecError

pytestmark = pytest.mark.usefixtures("one_thread")


def _pred(boxes, labels, scores):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4), "labels": np.asarray(labels, np.int64),
            "scores": np.asarray(scores, float)}


def _gt(boxes, labels):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4), "labels": np.asarray(labels, np.int64)}


A, B, C = [0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.8], [0.0, 0.6, 0.2, 1.0]


def test_perfect_detections_score_one():
    gts = [_gt([A, B], [0, 1]), _gt([C], [2])]
    preds = [_pred([A, B], [0, 1], [0.9, 0.8]), _pred([C], [2], [0.7])]
    m = detection_metrics(preds, gts)
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0) and m["map75"] == pytest.approx(1.0)
    assert (m["n"], m["objects"], m["classes"]) == (2, 3, 3)


def test_false_positive_ranked_above_the_true_positive_halves_precision():
    # ranks: FP (0.9) then TP (0.8): precision 1/2 at every recall point (non-increasing from the right)
    m = detection_metrics([_pred([B, A], [0, 0], [0.9, 0.8])], [_gt([A], [0])])
    assert m["map"] == pytest.approx(0.5) and m["map50"] == pytest.approx(0.5) and m["map75"] == pytest.approx(0.5)
    # ranked below the TP, the FP costs nothing
    m = detection_metrics([_pred([A, B], [0, 0], [0.9, 0.8])], [_gt([A], [0])])
    assert m["map"] == pytest.approx(1.0)


def test_box_at_iou_0_62_counts_for_thresholds_050_to_060_only():
    gt, det = [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.62, 1.0]  # IoU = 0.62: a TP at .50, .55, .60; a FP above
    m = detection_metrics([_pred([det], [0], [0.5])], [_gt([gt], [0])])
    assert m["map"] == pytest.approx(3 / 10, abs=1e-12)
    assert m["map50"] == pytest.approx(1.0) and m["map75"] == pytest.approx(0.0)


def test_class_without_detections_scores_zero_and_class_without_ground_truth_is_left_out():
    gts = [_gt([A, B], [0, 1])]
    preds = [_pred([A, C], [0, 2], [0.9, 0.95])]  # class 1 missed; class 2 has no ground truth
    m = detection_metrics(preds, gts)
    assert m["map"] == pytest.approx(0.5) and m["classes"] == 2


def test_duplicate_detection_is_a_false_positive():
    # ranks: A (TP), A again (FP: A is taken), B (TP): recall .5, .5, 1; precision 1, 1/2, 2/3 -> 1, 2/3, 2/3.
    # 101 recall points: 0 .. .50 (51 points) read 1, .51 .. 1 (50 points) read 2/3 -> AP = (51 + 100/3) / 101.
    m = detection_metrics([_pred([A, A, B], [0, 0, 0], [0.9, 0.8, 0.7])], [_gt([A, B], [0, 0])])
    assert m["map50"] == pytest.approx(253 / 303, abs=1e-12)
    assert m["map"] == pytest.approx(253 / 303, abs=1e-12)


def test_detection_metrics_refuses_bad_input():
    with pytest.raises(EdgecError, match="2 predictions for 1 images"):
        detection_metrics([_pred([A], [0], [1.0])] * 2, [_gt([A], [0])])
    with pytest.raises(EdgecError, match="no ground-truth objects"):
        detection_metrics([_pred([A], [0], [1.0])], [_gt([], [])])
    with pytest.raises(EdgecError, match="1 boxes, 2 labels"):
        detection_metrics([_pred([A], [0, 1], [1.0])], [_gt([A], [0])])


def test_postprocess_top_k_over_query_class_pairs():
    logits = np.array([[[0.0, 3.0], [2.0, -1.0], [-5.0, 1.0]]])  # [1, N=3, C=2]
    boxes = np.array([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5], [0.1, 0.9, 0.2, 0.2]]])
    (out,) = postprocess(logits, boxes, k=4)
    # pairs by score: (q0, c1) 3.0, (q1, c0) 2.0, (q2, c1) 1.0, (q0, c0) 0.0
    assert out["labels"].tolist() == [1, 0, 1, 0]
    np.testing.assert_allclose(out["scores"], 1 / (1 + np.exp(-np.array([3.0, 2.0, 1.0, 0.0]))), rtol=1e-12)
    np.testing.assert_allclose(out["boxes"], [[0.4, 0.3, 0.6, 0.7], [0.0, 0.0, 0.5, 0.5], [0.0, 0.8, 0.2, 1.0],
                                              [0.4, 0.3, 0.6, 0.7]], atol=1e-12)
    assert len(postprocess(logits, boxes, k=100)[0]["scores"]) == 6  # K = min(k, N * C)
    with pytest.raises(EdgecError, match="logits \\[batch, queries, classes\\]"):
        postprocess(logits[0], boxes)


def test_targets_from_items_drop_padding_rows():
    y = np.array([[[1, 0.5, 0.5, 0.2, 0.2], [-1, 0, 0, 0, 0]], [[-1, 0, 0, 0, 0], [-1, 0, 0, 0, 0]]], np.float32)
    t = targets_from_items(y)
    assert t[0]["labels"].tolist() == [1] and t[1]["labels"].tolist() == []
    np.testing.assert_allclose(t[0]["boxes"], [[0.4, 0.4, 0.6, 0.6]], atol=1e-6)


# ---------------------------------------------------------------------------------------------- pycocotools
def _random_case(rng, classes=3):
    def boxes(n):
        xy = rng.uniform(0, 0.7, (n, 2))
        return np.concatenate([xy, xy + rng.uniform(0.05, 0.3, (n, 2))], 1)

    gts, preds = [], []
    for _ in range(int(rng.integers(1, 8))):
        g = boxes(int(rng.integers(0, 6)))
        gl = rng.integers(0, classes, len(g))
        gts.append(_gt(g, gl))
        cxcy, wh = (g[:, :2] + g[:, 2:]) / 2, g[:, 2:] - g[:, :2]
        wh = wh * rng.uniform(0.7, 1.3, wh.shape)
        cxcy = cxcy + rng.normal(0, 0.02, cxcy.shape)
        jit = np.concatenate([cxcy - wh / 2, cxcy + wh / 2], 1)
        r = boxes(int(rng.integers(0, 8)))
        keep = rng.random(len(jit)) < 0.8
        pb = np.concatenate([jit[keep], jit[keep][:1], r])  # a duplicate too
        pl = np.concatenate([gl[keep], gl[keep][:1], rng.integers(0, classes, len(r))])
        scores = np.round(rng.uniform(0, 1, len(pb)), 2)  # ties across images and classes
        preds.append(_pred(pb, pl, scores))
    return preds, gts


def _cocoeval(preds, gts, classes=3):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    anns = [{"id": k + 1, "image_id": i + 1, "category_id": int(lab) + 1, "bbox": xywh(b), "iscrowd": 0,
             "area": float((b[2] - b[0]) * (b[3] - b[1]))}
            for k, (i, b, lab) in enumerate((i, b, lab) for i, g in enumerate(gts)
                                            for b, lab in zip(g["boxes"], g["labels"]))]
    gt = COCO()
    gt.dataset = {"images": [{"id": i + 1, "width": 1, "height": 1} for i in range(len(gts))], "annotations": anns,
                  "categories": [{"id": c + 1, "name": str(c)} for c in range(classes)]}
    dets = [{"image_id": i + 1, "category_id": int(lab) + 1, "bbox": xywh(b), "score": float(s)}
            for i, p in enumerate(preds) for b, lab, s in zip(p["boxes"], p["labels"], p["scores"])]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:3]


def test_equals_pycocotools_cocoeval_on_random_cases():
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(25):
        preds, gts = _random_case(rng)
        if sum(len(g["labels"]) for g in gts) == 0 or sum(len(p["labels"]) for p in preds) == 0:
            continue
        m = detection_metrics(preds, gts)
        np.testing.assert_allclose([m["map"], m["map50"], m["map75"]], _cocoeval(preds, gts), atol=1e-12)
        checked += 1
    assert checked >= 20
