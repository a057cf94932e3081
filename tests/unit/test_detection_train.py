"""Detection training (edgec.train.detection): box utilities, Hungarian matching per image and per query group,
the IoU-aware BCE targets, LW-DETR's loss, set-matched distillation, and a tiny LW-DETR that learns."""
from __future__ import annotations

import math

import pytest
import torch

from edgec.core.errors import EdgecError
from edgec.train.detection import (
    aligned_giou,
    box_iou,
    cxcywh_to_xyxy,
    detection_kd_loss,
    detection_loss,
    detection_terms,
    generalized_box_iou,
    group_count,
    hungarian_match,
    ia_bce_loss,
    ia_bce_targets,
    linear_assignment,
    xyxy_to_cxcywh,
)
from edgec.train.losses import kd_loss, model_output, task_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def targets(rows: list[list[list[float]]], m: int = 4) -> torch.Tensor:
    """[B, m, 5] target rows, padded with class -1."""
    out = torch.full((len(rows), m, 5), -1.0)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r)
    return out


# ------------------------------------------------------------------------------------------------ boxes
def test_box_formats_convert_both_ways():
    b = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    assert torch.allclose(cxcywh_to_xyxy(b), torch.tensor([[0.4, 0.1, 0.6, 0.7]]))
    assert torch.allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(b)), b)


def test_iou_and_giou_hand_cases():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0],  # overlap 1, union 7, enclosing 9
                      [3.0, 0.0, 4.0, 2.0],  # disjoint: union 6, enclosing 8
                      [0.0, 0.0, 2.0, 2.0],  # identical
                      [0.5, 0.5, 1.0, 1.0]])  # inside: 0.25 / 4
    iou, giou = box_iou(a, b), generalized_box_iou(a, b)
    assert iou.shape == giou.shape == (1, 4)
    expect_iou = [1 / 7, 0.0, 1.0, 0.25 / 4]
    expect_giou = [1 / 7 - 2 / 9, 0.0 - 2 / 8, 1.0, 0.25 / 4]
    assert torch.allclose(iou[0], torch.tensor(expect_iou), atol=1e-6)
    assert torch.allclose(giou[0], torch.tensor(expect_giou), atol=1e-6)
    assert torch.allclose(aligned_giou(a.expand(4, 4), b), giou[0])


# ------------------------------------------------------------------------------------------------ matching
def test_assignment_is_optimal_where_greedy_fails():
    cost = torch.tensor([[1.0, 2.0, 9.0], [2.0, 9.0, 9.0], [9.0, 9.0, 1.0]])
    rows, cols = linear_assignment(cost)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]
    assert float(cost[rows, cols].sum()) == 5.0  # greedy (take the cheapest pair first) pays 1 + 1 + 9 = 11


def test_assignment_refuses_non_finite_costs():
    with pytest.raises(EdgecError, match="diverged"):
        linear_assignment(torch.tensor([[float("nan"), 1.0], [1.0, 2.0]]))


def _confident(n: int, c: int, on: dict[int, int]) -> torch.Tensor:
    """Logits [1, n, c]: -6 everywhere, +6 at (query, class) for each entry of ``on``."""
    logits = torch.full((1, n, c), -6.0)
    for q, k in on.items():
        logits[0, q, k] = 6.0
    return logits


def test_hungarian_matches_the_obvious_queries():
    objs = targets([[[1, 0.25, 0.25, 0.2, 0.2], [0, 0.75, 0.7, 0.3, 0.2]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.75, 0.7, 0.3, 0.2], [0.5, 0.2, 0.2, 0.2],
                           [0.25, 0.25, 0.2, 0.2]]])
    logits = _confident(4, 2, {1: 0, 3: 1})
    (q, t), = hungarian_match(logits, boxes, objs)
    assert dict(zip(t.tolist(), q.tolist())) == {0: 3, 1: 1}


def test_groups_are_matched_independently():
    """Two groups of 3 queries; group 1 is group 0 reversed: each group gives every object its own query."""
    objs = targets([[[0, 0.2, 0.2, 0.2, 0.2], [1, 0.7, 0.7, 0.2, 0.2]]])
    g0 = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5], [0.7, 0.7, 0.2, 0.2]])
    boxes = torch.cat([g0, g0.flip(0)])[None]
    logits = torch.zeros(1, 6, 2)
    (q, t), = hungarian_match(logits, boxes, objs, groups=2)
    assert q.tolist() == [0, 2, 3, 5] and t.tolist() == [0, 1, 1, 0]
    # one group of 6: each object is matched once only
    (q1, _), = hungarian_match(logits, boxes, objs, groups=1)
    assert len(q1) == 2
    # the loss of two groups is the sum of the losses of each group alone
    torch.manual_seed(0)
    lg, bx = torch.randn(2, 6, 2), torch.rand(2, 6, 4) * 0.4 + 0.2
    two = targets([[[0, 0.2, 0.2, 0.2, 0.2], [1, 0.7, 0.7, 0.2, 0.2]], [[1, 0.5, 0.5, 0.4, 0.3]]])
    whole = detection_loss((lg, bx), two, groups=2)
    parts = detection_loss((lg[:, :3], bx[:, :3]), two) + detection_loss((lg[:, 3:], bx[:, 3:]), two)
    assert torch.allclose(whole, parts)
    assert not torch.allclose(whole, detection_loss((lg, bx), two, groups=1))


def test_empty_targets_match_nothing_and_only_push_scores_down():
    logits = torch.zeros(1, 3, 2, requires_grad=True)
    boxes = torch.full((1, 3, 4), 0.5, requires_grad=True)
    empty = targets([[]])
    (q, t), = hungarian_match(logits, boxes, empty)
    assert q.numel() == t.numel() == 0
    terms = detection_terms((logits, boxes), empty)
    assert float(terms["l1"].detach()) == float(terms["giou"].detach()) == 0.0
    # every entry is a negative: s²·BCE(s, 0) with s = 0.5, over 6 entries, normalised by max(1, 0 objects)
    assert math.isclose(float(terms["class"].detach()), 6 * 0.25 * math.log(2), rel_tol=1e-6)
    detection_loss((logits, boxes), empty).backward()
    assert bool((logits.grad > 0).all()) and float(boxes.grad.abs().sum()) == 0.0


def test_more_objects_than_queries_is_one_clear_error():
    objs = targets([[[0, 0.2, 0.2, 0.1, 0.1], [0, 0.5, 0.5, 0.1, 0.1], [1, 0.8, 0.8, 0.1, 0.1]]])
    with pytest.raises(EdgecError, match="3 objects but the model has 2 queries per group"):
        hungarian_match(torch.zeros(1, 4, 2), torch.full((1, 4, 4), 0.5), objs, groups=2)


def test_bad_targets_are_refused():
    with pytest.raises(EdgecError, match="class 5 is not a class index in"):
        hungarian_match(torch.zeros(1, 2, 2), torch.full((1, 2, 4), 0.5), targets([[[5, 0.5, 0.5, 0.1, 0.1]]]))
    with pytest.raises(EdgecError, match="not a whole number of groups"):
        group_count((torch.zeros(1, 7, 2), torch.zeros(1, 7, 4)), 3)
    with pytest.raises(EdgecError, match="must output"):
        task_loss(torch.zeros(1, 3, 2), targets([[]]), "detection")


# ------------------------------------------------------------------------------------------------ IA-BCE
def test_ia_bce_targets_by_hand():
    s, u = torch.tensor([0.64, 0.5, 0.9]), torch.tensor([0.81, 1.0, 0.0])
    t = ia_bce_targets(s, u)
    assert torch.allclose(t, torch.tensor([0.64 ** 0.25 * 0.81 ** 0.75, 0.5 ** 0.25, 0.01]), atol=1e-6)


def test_ia_bce_loss_by_hand():
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5]])  # 2 queries x 2 classes; positive: query 0, class 0
    t = torch.tensor([0.6])
    got = ia_bce_loss(x, (torch.tensor([0]), torch.tensor([0])), t)

    def bce(z, y):
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    def sig(z):
        return 1 / (1 + math.exp(-z))

    want = bce(0.3, 0.6) + sum(sig(z) ** 2 * bce(z, 0.0) for z in (-1.2, 2.0, 0.5))
    assert math.isclose(float(got), want, rel_tol=1e-6)


def test_loss_terms_of_one_exact_box_by_hand():
    """One query on one object with the exact box: L1 = GIoU term = 0, u = 1, so the class term is
    BCE(s, s^0.25) at the object's class plus s²·BCE(s, 0) at the other."""
    box = [0.4, 0.5, 0.2, 0.3]
    logits = torch.tensor([[[0.7, -0.4]]])
    terms = detection_terms((logits, torch.tensor([[box]])), targets([[[0] + box]], m=2))
    s0, s1 = torch.sigmoid(torch.tensor(0.7)), torch.sigmoid(torch.tensor(-0.4))
    t = s0 ** 0.25
    want = -(t * s0.log() + (1 - t) * (1 - s0).log()) - s1 ** 2 * (1 - s1).log()
    assert float(terms["l1"]) < 1e-7 and float(terms["giou"]) < 1e-6
    assert math.isclose(float(terms["class"]), float(want), rel_tol=1e-5)
    # the total: 1·class + 5·L1 + 2·GIoU, and "sum" reduction is the same for one object
    assert math.isclose(float(task_loss((logits, torch.tensor([[box]])), targets([[[0] + box]], m=2), "detection")),
                        float(want), rel_tol=1e-5)


def test_loss_is_normalised_by_the_number_of_objects():
    torch.manual_seed(1)
    lg, bx = torch.randn(2, 4, 3), torch.rand(2, 4, 4) * 0.4 + 0.2
    y = targets([[[0, 0.3, 0.3, 0.2, 0.2], [2, 0.6, 0.6, 0.3, 0.2]], [[1, 0.5, 0.5, 0.4, 0.3]]])
    mean = task_loss((lg, bx), y, "detection")
    total = task_loss((lg, bx), y, "detection", reduction="sum")
    assert torch.allclose(total, 3 * mean)
    assert torch.allclose(task_loss((lg, bx), y, "detection", queries=2),
                          detection_loss((lg, bx), y, groups=2))


# ------------------------------------------------------------------------------------------------ distillation
def test_set_matched_distillation():
    torch.manual_seed(2)
    tl, tb = torch.randn(2, 3, 4), torch.rand(2, 3, 4) * 0.4 + 0.3
    # a student equal to the teacher in every group, in any query order, pays nothing
    perm = torch.tensor([2, 0, 1])
    student = (torch.cat([tl, tl[:, perm]], 1), torch.cat([tb, tb[:, perm]], 1))
    assert float(detection_kd_loss(student, (tl, tb), groups=2)) < 1e-5
    assert float(kd_loss(student, (tl, tb), 2.0, "detection", queries=3)) < 1e-5
    # another student pays, and the loss does not depend on the teacher's query order
    sl = torch.randn(2, 6, 4, requires_grad=True)
    sb = torch.rand(2, 6, 4) * 0.4 + 0.3
    a = detection_kd_loss((sl, sb), (tl, tb), groups=2)
    b = detection_kd_loss((sl, sb), (tl[:, perm], tb[:, perm]), groups=2)
    assert float(a.detach()) > 0.1 and torch.allclose(a, b)
    a.backward()
    assert sl.grad is not None and float(sl.grad.abs().sum()) > 0
    with pytest.raises(EdgecError, match="teacher has 3 queries but the student 2"):
        detection_kd_loss((sl[:, :4], sb[:, :4]), (tl, tb), groups=2)


def test_model_output_keeps_both_detection_tensors():
    a, b = torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)
    assert model_output((a, b), "detection") == (a, b)
    assert model_output((a, b), "classification") is a


# ------------------------------------------------------------------------------------------------ learning
def test_a_tiny_lwdetr_learns_with_group_detr():
    from edgec.models.lwdetr import LWDETR

    torch.manual_seed(0)
    model = LWDETR(image_size=32, num_classes=3, patch_size=8, windows=2, embed_dim=32, depth=2, num_heads=2,
                   global_blocks=(1,), out_indices=(1,), dim=32, decoder_layers=2, decoder_heads=2,
                   decoder_ffn=64, num_queries=5, groups=2)
    x = torch.rand(4, 3, 32, 32)
    y = targets([[[0, 0.3, 0.3, 0.2, 0.2], [1, 0.7, 0.6, 0.3, 0.3]], [[2, 0.5, 0.5, 0.5, 0.4]],
                 [[1, 0.2, 0.7, 0.2, 0.3]], [[0, 0.6, 0.3, 0.3, 0.2], [2, 0.3, 0.7, 0.2, 0.2]]], m=3)
    model.train()
    assert model(x)[0].shape[1] == 10  # 2 groups of 5 queries in training
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):
        out = model(x)
        loss = task_loss(model_output(out, "detection"), y, "detection", queries=5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses


# ------------------------------------------------------------------------------------------------ gates
def test_map_gates():
    from edgec.app import gates

    assert gates.PRIMARY["detection"] == "map"
    g = gates.parse(min_metric=["map=0.3", "map50=0.5"])
    assert g.min_metric == {"map": 0.3, "map50": 0.5} and g.drop_metrics("detection") == ["map", "map50"]
    assert gates.parse(max_metric_drop=0.02).drop_metrics("detection") == ["map"]
    gates.check_task(g, "detection", "export")
    with pytest.raises(EdgecError, match="map is a detection metric but the model's task is classification"):
        gates.check_task(g, "classification", "export")
    with pytest.raises(EdgecError, match="must be in"):
        gates.parse(min_metric=["map=1.5"])
    m = gates.Measured(evaluation={"task": "detection", "metrics": {"map": 0.25, "map50": 0.6, "loss": 1.0}})
    report = gates.judge(g, m)
    assert not report["passed"] and report["failed"] == ["map 0.25 < 0.3 (short by 0.05)"]
