"""Set-prediction training for the ``detection`` task: box utilities, Hungarian matching per image and per
query group, and the LW-DETR loss (IoU-aware BCE + L1 + GIoU). Pure functions of tensors.

A detection model outputs ``(logits [B, N, C], boxes [B, N, 4])``: one sigmoid score per class (no
background class) and boxes ``(cx, cy, w, h)`` normalised to [0, 1]. Targets are float32 ``[B, M, 5]`` rows
``(class, cx, cy, w, h)``, padded with rows of class -1.

- **Matching** (DETR, Carion et al. 2020, arXiv 2005.12872): each image's objects are assigned one-to-one to
  queries by minimising the total cost with the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``).
  Pair cost (Deformable DETR, arXiv 2010.04159, whose weights LW-DETR keeps)
  ``C(i, j) = 2·C_cls + 5·‖b_i − b̂_j‖₁ − 2·GIoU(b_i, b̂_j)`` with the focal-style class cost
  ``C_cls = α(1−p)^γ(−log p) − (1−α)p^γ(−log(1−p))``, ``p = σ(logit_i[c_j])``, α = 0.25, γ = 2.
- **Group DETR** (Chen et al., arXiv 2207.13085): in training the N = G·Q queries form G groups of Q that
  never attend to each other; each group is matched to the objects on its own (one-to-one within a group,
  so every object has G positive queries) and the per-group losses are summed. At inference only group 0
  (Q queries) exists, so G = 1 there.
- **Loss** (LW-DETR, Chen et al. 2024, arXiv 2406.03459), per group, normalised by the number of objects
  ``n`` in the batch: ``L = L_cls + 5·Σ‖b − b̂‖₁ / n + 2·Σ(1 − GIoU) / n`` over the matched pairs, with the
  IoU-aware classification loss (IA-BCE)
  ``L_cls = [Σ_pos BCE(s, t) + Σ_neg s²·BCE(s, 0)] / n``, ``t = s^α · u^(1−α)``, α = 0.25,
  where pos are the (matched query, its object's class) entries, neg every other (query, class) entry,
  ``s = σ(logit)`` (detached in ``t``) and ``u`` the IoU of the matched query's box with its object's box
  (detached). As in LW-DETR's reference code, ``t`` is clamped below at 0.01 and the s² weight of the
  negatives is not detached (the focal-loss form, γ = 2).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from edgec.core.errors import EdgecError

FOCAL_ALPHA = 0.25  # α of the focal class cost and the IA-BCE target exponent
FOCAL_GAMMA = 2.0  # γ of the focal class cost and of the negatives' s^γ weight
COST_CLASS, COST_BBOX, COST_GIOU = 2.0, 5.0, 2.0  # matching cost weights (Deformable DETR / LW-DETR)
LOSS_CLASS, LOSS_BBOX, LOSS_GIOU = 1.0, 5.0, 2.0  # loss weights (DETR / LW-DETR)
TARGET_MIN = 0.01  # IA-BCE targets are clamped below at this (LW-DETR's reference code)
EPS = 1e-7


# ------------------------------------------------------------------------------------------------ boxes
def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(cx, cy, w, h) → (cx − w/2, cy − h/2, cx + w/2, cy + h/2)`` over the last dimension."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(x0, y0, x1, y1) → ((x0 + x1)/2, (y0 + y1)/2, x1 − x0, y1 − y0)`` over the last dimension."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((0.5 * (x0 + x1), 0.5 * (y0 + y1), x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of ``xyxy`` boxes (0 for an inverted box)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(IoU, union, area of the smallest enclosing box) of ``xyxy`` boxes ``a`` and ``b`` (broadcast)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    union = box_area(a) + box_area(b) - inter
    iou = inter / union.clamp_min(EPS)
    enclose = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp_min(0).prod(-1)
    return iou, union, enclose


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``|a ∩ b| / |a ∪ b|`` of ``xyxy`` boxes: a [N, 4], b [M, 4] → [N, M]."""
    return _overlap(a[:, None, :], b[None, :, :])[0]


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019, arXiv 1902.09630) of ``xyxy`` boxes:
    ``GIoU = IoU − (|E| − |a ∪ b|) / |E|``, E the smallest box enclosing both; in [−1, 1]. [N, 4], [M, 4] → [N, M]."""
    return aligned_giou(a[:, None, :], b[None, :, :])


def aligned_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of corresponding ``xyxy`` boxes (shapes broadcast: [K, 4], [K, 4] → [K])."""
    iou, union, enclose = _overlap(a, b)
    return iou - (enclose - union) / enclose.clamp_min(EPS)


def aligned_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding ``xyxy`` boxes (shapes broadcast: [K, 4], [K, 4] → [K])."""
    return _overlap(a, b)[0]


# ------------------------------------------------------------------------------------------------ targets
def split_targets(targets: torch.Tensor, num_classes: int | None = None) -> list[torch.Tensor]:
    """Per image, the row indices of the real objects in ``targets`` [B, M, 5] (rows of class -1 are padding).
    A class that is not a whole number in [0, num_classes) is refused with one line."""
    if targets.ndim != 3 or targets.shape[-1] != 5:
        raise EdgecError(f"detection targets must be [batch, objects, 5] rows (class, cx, cy, w, h); got "
                         f"{list(targets.shape)}")
    cls = targets[..., 0]
    valid = cls >= 0
    bad = valid & ((cls != cls.round()) | ((cls >= num_classes) if num_classes is not None else False))
    if bool(bad.any()):
        value = float(cls[bad][0])
        raise EdgecError(f"detection target class {value:g} is not a class index in [0, {num_classes}) "
                         "(padding rows have class -1)")
    return [torch.nonzero(v, as_tuple=False).flatten() for v in valid]


# ------------------------------------------------------------------------------------------------ matching
def match_cost(logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, tboxes: torch.Tensor) -> torch.Tensor:
    """The matching cost [Q, m] of Q predictions (logits [Q, C], boxes [Q, 4] cxcywh) against m objects
    (labels [m], boxes [m, 4] cxcywh): ``2·C_cls + 5·L1 − 2·GIoU`` (module docstring)."""
    p = logits.float().sigmoid()
    neg = (1 - FOCAL_ALPHA) * p.pow(FOCAL_GAMMA) * -(1 - p + 1e-8).log()
    pos = FOCAL_ALPHA * (1 - p).pow(FOCAL_GAMMA) * -(p + 1e-8).log()
    c_cls = pos[:, labels] - neg[:, labels]
    c_l1 = torch.cdist(boxes.float(), tboxes.float(), p=1)
    c_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(tboxes.float()))
    return COST_CLASS * c_cls + COST_BBOX * c_l1 + COST_GIOU * c_giou


def linear_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimum-cost one-to-one assignment of a [rows, cols] cost (rows >= cols: every column gets a row),
    by ``scipy.optimize.linear_sum_assignment``; (row indices, column indices), sorted by row."""
    c = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(c).all():
        raise EdgecError("training diverged: the matching cost has non-finite values (NaN/inf predictions); "
                         "try a lower lr or gradient clipping")
    rows, cols = linear_sum_assignment(c)
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def query_groups(n: int, groups: int) -> int:
    """Queries per group Q = N / G; a count that does not divide is refused with one line."""
    groups = int(groups)
    if groups < 1 or n % groups:
        raise EdgecError(f"the model outputs {n} queries, which do not split into {groups} equal query groups")
    return n // groups


def group_count(outputs, queries: int | None) -> int:
    """The number of query groups G = N / Q of a detection output with N queries (1 when ``queries`` is None or
    the output is not a pair); N not a multiple of Q is refused with one line."""
    if queries is None or not isinstance(outputs, (tuple, list)) or not outputs:
        return 1
    n, q = int(outputs[0].shape[1]), int(queries)
    if q < 1 or n % q:
        raise EdgecError(f"the model outputs {n} queries, which is not a whole number of groups of {q} queries "
                         "(its query count at inference)")
    return n // q


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, targets: torch.Tensor,
                    groups: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Hungarian matching per image and per query group (Group DETR): queries ``g·Q … (g+1)·Q − 1`` are matched
    to the image's objects on their own, for each of the ``groups`` groups.

    ``logits`` [B, N, C], ``boxes`` [B, N, 4] (cxcywh), ``targets`` [B, M, 5]; N = groups·Q. Returns per image
    ``(query indices into N, target row indices into M)``, two long tensors of length groups·m (m objects in the
    image), group by group, each group's pairs sorted by query. An image with more objects than Q is refused:
    a one-to-one assignment would leave objects without a query."""
    b, n, c = logits.shape
    q = query_groups(n, groups)
    rows = split_targets(targets, c)
    out = []
    for i in range(b):
        objs = rows[i]
        m = int(objs.numel())
        if m > q:
            raise EdgecError(f"an image has {m} objects but the model has {q} queries per group; each object needs "
                             f"its own query: use a model with at least {m} queries")
        if m == 0:
            empty = torch.zeros(0, dtype=torch.long)
            out.append((empty, empty))
            continue
        tgt = targets[i, objs].float()
        labels, tboxes = tgt[:, 0].long(), tgt[:, 1:]
        cost = match_cost(logits[i], boxes[i], labels, tboxes).cpu()
        qs, ts = [], []
        for g in range(groups):
            r, col = linear_assignment(cost[g * q:(g + 1) * q])
            qs.append(r + g * q)
            ts.append(objs.cpu()[col])
        out.append((torch.cat(qs), torch.cat(ts)))
    return out


# ------------------------------------------------------------------------------------------------ loss
def ia_bce_targets(scores: torch.Tensor, ious: torch.Tensor, alpha: float = FOCAL_ALPHA) -> torch.Tensor:
    """IA-BCE targets of matched (query, class) entries: ``t = max(0.01, s^α · u^(1−α))`` with s the predicted
    score and u the IoU with the matched box, both detached (LW-DETR, arXiv 2406.03459, eq. 2)."""
    s, u = scores.detach().float(), ious.detach().float().clamp_min(0)
    return (s.pow(alpha) * u.pow(1 - alpha)).clamp_min(TARGET_MIN)


def ia_bce_loss(logits: torch.Tensor, pos_index: tuple[torch.Tensor, ...], pos_targets: torch.Tensor) -> torch.Tensor:
    """Summed IA-BCE over every entry of ``logits`` (any shape ending in classes): positives (``logits[pos_index]``)
    ``BCE(s, t)`` with targets ``pos_targets``, every other entry ``s²·BCE(s, 0)``. Not normalised."""
    x = logits.float()
    p = x.sigmoid()
    weight = p.pow(FOCAL_GAMMA)
    target = torch.zeros_like(x)
    weight = weight.index_put(pos_index, torch.ones_like(pos_targets))
    target = target.index_put(pos_index, pos_targets.to(x.dtype))
    return (weight * F.binary_cross_entropy_with_logits(x, target, reduction="none")).sum()


def detection_terms(outputs, targets: torch.Tensor, groups: int = 1, *, num_boxes: float | None = None,
                    matches: list | None = None) -> dict[str, torch.Tensor]:
    """The loss terms ``{"class", "l1", "giou"}`` (unweighted, summed over every group, divided by ``num_boxes``,
    default the number of objects in the batch, at least 1) and ``"num_boxes"``. ``matches``: the result of
    :func:`hungarian_match` when the caller already has it."""
    logits, boxes = _unpack(outputs)
    if matches is None:
        matches = hungarian_match(logits, boxes, targets, groups)
    dev = logits.device
    bidx = torch.cat([torch.full_like(qi, i) for i, (qi, _) in enumerate(matches)]).to(dev)
    qidx = torch.cat([qi for qi, _ in matches]).to(dev)
    tgt = torch.cat([targets[i, ti.to(targets.device)] for i, (_, ti) in enumerate(matches)]).to(dev).float()
    n = float(sum(int(v.numel()) for v in split_targets(targets))) if num_boxes is None else float(num_boxes)
    n = max(1.0, n)
    src = boxes[bidx, qidx].float()
    tbox = tgt[:, 1:]
    sx, tx = cxcywh_to_xyxy(src), cxcywh_to_xyxy(tbox)
    labels = tgt[:, 0].long()
    scores = logits[bidx, qidx, labels].float().sigmoid()
    t = ia_bce_targets(scores, aligned_iou(sx.detach(), tx))
    cls = ia_bce_loss(logits, (bidx, qidx, labels), t)
    l1 = (src - tbox).abs().sum()
    giou = (1 - aligned_giou(sx, tx)).sum()
    return {"class": cls / n, "l1": l1 / n, "giou": giou / n, "num_boxes": torch.tensor(n)}


def detection_loss(outputs, targets: torch.Tensor, groups: int = 1, *, num_boxes: float | None = None) -> torch.Tensor:
    """LW-DETR's training loss ``L_cls + 5·L1 + 2·(1 − GIoU)`` (module docstring), matched per image and per query
    group and summed over the ``groups`` groups, each normalised by the number of objects in the batch.

    ``outputs``: ``(logits [B, N, C], boxes [B, N, 4])``; ``targets`` [B, M, 5] (class -1 = padding)."""
    t = detection_terms(outputs, targets, groups, num_boxes=num_boxes)
    return LOSS_CLASS * t["class"] + LOSS_BBOX * t["l1"] + LOSS_GIOU * t["giou"]


def bernoulli_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Elementwise ``KL(Bern(σ(t/T)) ‖ Bern(σ(s/T)))``: each class score is its own sigmoid, so the per-class
    Bernoulli KL is the detection analogue of softmax logits distillation (0 when the scores agree)."""
    s, t = student_logits.float() / temperature, teacher_logits.detach().float() / temperature
    pt = t.sigmoid()
    return F.binary_cross_entropy_with_logits(s, pt, reduction="none") - \
        F.binary_cross_entropy_with_logits(t, pt, reduction="none")


def detection_kd_loss(student, teacher, groups: int = 1, temperature: float = 2.0) -> torch.Tensor:
    """Set-matched logits distillation for detection: within each student query group, the student's queries are
    matched one-to-one to the teacher's (eval-mode, Q_t) predictions by the Hungarian algorithm, with the
    matching cost taking the teacher's predictions as soft objects,
    ``C(i, j) = Σ_c |σ(s_ic) − σ(t_jc)| + 5·‖b_i − b_j‖₁ − 2·GIoU(b_i, b_j)``
    (as DETRDistill, Chang et al. 2023, arXiv 2211.10156, matches teacher and student sets), and each pair pays
    ``T²·Σ_c KL(Bern(σ(t_jc/T)) ‖ Bern(σ(s_ic/T))) + 5·‖b_i − b_j‖₁ + 2·(1 − GIoU)``. Per group, the mean over
    the B·Q_t pairs; summed over groups. Query order carries no meaning in a DETR, hence the matching.
    Student queries left over (Q > Q_t) get no term; Q < Q_t is refused."""
    slog, sbox = _unpack(student)
    tlog, tbox = _unpack(teacher)
    b, n, c = slog.shape
    q = query_groups(n, groups)
    qt = int(tlog.shape[1])
    if tlog.shape[0] != b or tlog.shape[2] != c:
        raise EdgecError(f"detection distillation needs teacher logits [batch, queries, {c}]; got {list(tlog.shape)}")
    if qt > q:
        raise EdgecError(f"detection distillation: the teacher has {qt} queries but the student {q} per group; "
                         "every teacher prediction needs a student query")
    tlog, tbox = tlog.detach().float(), tbox.detach().float()
    with torch.no_grad():
        ps, pt = slog.detach().float().sigmoid(), tlog.sigmoid()
        cost = (torch.cdist(ps, pt, p=1) + COST_BBOX * torch.cdist(sbox.detach().float(), tbox, p=1)
                - COST_GIOU * aligned_giou(cxcywh_to_xyxy(sbox.detach().float())[:, :, None, :],
                                           cxcywh_to_xyxy(tbox)[:, None, :, :]))
    bi, si, ti = [], [], []
    for i in range(b):
        for g in range(groups):
            r, col = linear_assignment(cost[i, g * q:(g + 1) * q])
            bi.append(torch.full_like(r, i))
            si.append(r + g * q)
            ti.append(col)
    bi, si, ti = (torch.cat(v).to(slog.device) for v in (bi, si, ti))
    temp = float(temperature)
    kl = bernoulli_kl(slog[bi, si], tlog[bi, ti], temp).sum() * temp * temp
    src, tgt = sbox[bi, si].float(), tbox[bi, ti]
    l1 = (src - tgt).abs().sum()
    giou = (1 - aligned_giou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt))).sum()
    return (kl + LOSS_BBOX * l1 + LOSS_GIOU * giou) / float(b * qt)


def group0_features(student: dict, teacher: dict, groups: int) -> dict:
    """OFF for Group DETR: the student trains with G query groups, the frozen teacher runs in eval mode with one,
    so a query feature is [B, G·Q, …] in the student and [B, Q, …] in the teacher. Such student features are cut
    to their first Q queries (group 0, the only group kept at inference, which the teacher's group 0 matches
    query for query); the other groups get no feature term. Every other feature is returned unchanged."""
    out = {}
    for name, s in student.items():
        t = teacher.get(name)
        if groups > 1 and isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor) and s.ndim == t.ndim >= 2 \
                and s.shape[0] == t.shape[0] and s.shape[2:] == t.shape[2:] and s.shape[1] == groups * t.shape[1]:
            s = s[:, : t.shape[1]]
        out[name] = s
    return out


def _unpack(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(outputs, (tuple, list)) or len(outputs) < 2:
        raise EdgecError("a detection model must output (logits [batch, queries, classes], boxes [batch, queries, "
                         f"4]); it outputs {_describe(outputs)}")
    logits, boxes = outputs[0], outputs[1]
    if logits.ndim != 3 or boxes.ndim != 3 or boxes.shape[-1] != 4 or logits.shape[:2] != boxes.shape[:2]:
        raise EdgecError("a detection model must output (logits [batch, queries, classes], boxes [batch, queries, "
                         f"4]); it outputs {_describe(outputs)}")
    return logits, boxes


def _describe(outputs) -> str:
    if isinstance(outputs, torch.Tensor):
        return f"one tensor {list(outputs.shape)}"
    if isinstance(outputs, (tuple, list)):
        return "(" + ", ".join(str(list(o.shape)) if isinstance(o, torch.Tensor) else type(o).__name__
                               for o in outputs) + ")"
    return type(outputs).__name__
