"""Per-unit importance of channel groups: how much the task loss would rise if a unit were removed.

Two scores, both per unit of a coupled channel group (docs/methods.md#unit-importance):

* ``l2`` — ``‖v‖²``: the squared norm of the unit's producer rows, summed over coupled producers (ALCS,
  arXiv 2109.00170). Needs no data; it is blind to where a unit sits, so a narrow layer that every later layer
  depends on (a stem conv) looks cheap to cut.
* ``taylor`` — the first-order Taylor estimate of the loss change when the unit's parameters are zeroed, squared
  per batch and averaged over held-out batches (Molchanov et al. 2019, "Importance Estimation for Neural Network
  Pruning", group form)::

      I_u = (1/B) Σ_b ( Σ_{θ ∈ S_u} θ · ∂L_b/∂θ )²

  where ``S_u`` is every parameter that removing unit ``u`` deletes: its producer rows and biases, its
  per-channel entries (BatchNorm γ/β, depthwise kernels), its columns in every consumer and its embedding
  columns. Squaring per batch makes it a Fisher-style sensitivity (a unit whose removal changes the loss in
  either direction matters) rather than a signed mean that cancels across batches.

Batches are drawn from the data's ``val`` split (else ``train``) with a generator seeded by ``seed``, and the
model runs in eval mode (BatchNorm running statistics, no dropout): the same model, data and seed give the same
scores, bit for bit, on one machine.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from edgec.core.errors import EdgecError
from edgec.train.loop import collate
from edgec.train.losses import model_output, task_loss

TAYLOR_BATCHES = 8  # held-out batches averaged (enough to rank units; each is one forward + backward)
TAYLOR_BATCH_SIZE = 32


def resolve_importance(name: str, has_data: bool) -> str:
    """``auto`` → ``taylor`` with data, ``l2`` without (``PruneOptions.validate`` has refused unknown names and
    ``taylor`` without data)."""
    return ("taylor" if has_data else "l2") if name == "auto" else name


def _unit_params(module, kind: str) -> list[tuple[torch.Tensor, int]]:
    """``(parameter, axis)`` pairs whose index ``p`` along ``axis`` is slot position ``p``."""
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    if kind == "in":
        return [(w, 1)] if w is not None else []
    if kind == "embedding":
        return [(w, 1)]
    return [(t, 0) for t in (w, b) if isinstance(t, torch.Tensor)]  # out rows / per-channel entries


def _positions_sum(t: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """``Σ`` of ``t`` over everything but ``axis``, as ``n`` positions (a head's rows are grouped by the slot)."""
    t = t.detach().double().movedim(axis, 0)
    return t.reshape(n, -1).sum(dim=1)


def taylor_scores(model, data, analysis, groups, *, seed: int = 0, batches: int = TAYLOR_BATCHES,
                  batch_size: int = TAYLOR_BATCH_SIZE) -> dict[str, np.ndarray]:
    """``{group name: (size,) float64}``: the group Taylor importance of every unit (module docstring).
    ``model`` is not modified (gradients are taken on a clone)."""
    work = model.clone()
    gm = work.gm.cpu()
    gm.eval()
    modules = dict(gm.named_modules())
    ds = data.split("val") if data.has_split("val") else data.split("train")
    if len(ds) == 0:
        raise EdgecError("taylor importance needs at least one held-out example")
    wanted = {g.index for g in groups}
    slots = [s for s in analysis.slots
             if s.kind in ("out", "in", "channel", "embedding") and s.gid is not None and np.isin(s.gid, list(wanted)).any()]
    totals = {g.index: np.zeros(g.size, dtype=np.float64) for g in groups}
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(ds), generator=gen).tolist()
    n_batches = max(1, min(int(batches), math.ceil(len(ds) / int(batch_size))))
    for b in range(n_batches):
        idx = order[b * batch_size:(b + 1) * batch_size] or order[:batch_size]
        x, y = collate(ds, idx)
        gm.zero_grad(set_to_none=True)
        out = gm(*(tuple(x) if isinstance(x, (tuple, list)) else (x,)))
        task_loss(model_output(out, data.task), y, data.task, queries=model.spec.extra.get("queries")).backward()
        per_batch = {gi: np.zeros_like(t) for gi, t in totals.items()}
        for s in slots:
            m = modules[s.target]
            n = len(s.ids)
            contrib = torch.zeros(n, dtype=torch.float64)
            for param, axis in _unit_params(m, s.kind):
                if param.grad is None or param.shape[axis] != n:
                    continue
                contrib += _positions_sum(param * param.grad, axis, n)
            c = contrib.numpy()
            for gi, acc in per_batch.items():
                sel = np.nonzero(s.gid == gi)[0]
                if len(sel):
                    np.add.at(acc, s.unit[sel], c[sel])
        for gi, acc in per_batch.items():
            totals[gi] += acc ** 2
    return {g.name: totals[g.index] / n_batches for g in groups}


__all__ = ["TAYLOR_BATCHES", "resolve_importance", "taylor_scores"]
