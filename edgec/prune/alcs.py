"""ALCS: allocate per-group densities (channel or 1×N SIMD pruning) to meet a latency target by least
importance lost per millisecond saved, and ADMM training towards that structure (arXiv 2109.00170).
See docs/methods.md#alcs and docs/methods.md#admm."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edgec.analysis.groups import analyse, resolve_keep
from edgec.core.errors import EdgecError
from edgec.latency import simd as simd_mod
from edgec.latency.model import LatencyModel
from edgec.latency.table import normalise_patterns
from edgec.prune.sensitivity import taylor_scores
from edgec.train.loop import collate, preflight
from edgec.train.losses import model_output, task_loss

EXIT_INFEASIBLE = 4  # the budget is below what the latency table says is reachable
EXIT_BUDGET_MISSED = 5  # the exported model still measured over the budget after the retries

_EPS = 1e-12


# ------------------------------------------------------------------------------------------- helpers

def _latency_model(table):
    return table if isinstance(table, LatencyModel) else LatencyModel(table)


def simd_eligible(module) -> bool:
    """Linear, or a 1×1 stride-1 unpadded ungrouped Conv1d/2d (what the SIMD execution path handles)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (module.groups == 1 and all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride)
                and not isinstance(module.padding, str) and all(p == 0 for p in module.padding))
    return False


def producer_names(group) -> list[str]:
    """Modules whose weights hold the group's units (``out`` rows / ``embedding`` columns)."""
    return list(dict.fromkeys(s.target for s in group.slots if s.kind in ("out", "embedding")))


def producer_weights(model, groups) -> dict[str, torch.Tensor]:
    """``{module name: weight}`` (detached float copies) of every producer of ``groups``."""
    modules = dict(model.gm.named_modules())
    out = {}
    for g in groups:
        for name in producer_names(g):
            out[name] = modules[name].weight.detach().clone()
    return out


def unit_sq_norms(group, weights: dict[str, torch.Tensor]) -> np.ndarray:
    """``‖v‖²`` per unit of ``group``: the squared L2 norm of all its producer rows (embedding columns), summed
    over coupled producers. float64, shape ``(size,)``."""
    total = np.zeros(group.size, dtype=np.float64)
    for s in group.slots:
        if s.kind not in ("out", "embedding"):
            continue
        w = weights[s.target].detach().double()
        if s.kind == "embedding":
            w = w.t()
        w = w.reshape(len(s.ids), -1)
        sel = np.nonzero(s.gid == group.index)[0]
        if not len(sel):
            continue
        sq = (w[torch.from_numpy(sel)] ** 2).sum(dim=1).numpy()
        np.add.at(total, s.unit[sel], sq)
    return total


def unit_scores(group, weights: dict[str, torch.Tensor], scores: dict | None = None) -> np.ndarray:
    """The units' importance: ``scores[group]`` when given (e.g. Taylor sensitivity), else ``‖v‖²``."""
    return scores[group.name] if scores and group.name in scores else unit_sq_norms(group, weights)


def _simd_layers(group, modules) -> list[str]:
    return [s.target for s in group.slots if s.kind == "out" and simd_eligible(modules[s.target])]


# ------------------------------------------------------------------------------------------- options

@dataclass
class Option:
    """One way of pruning one unit: its levels (level 0 = dense), their densities (as the latency table counts
    them), the units / vectors kept, and the cumulative importance removed."""

    unit: str
    pattern: str
    densities: list[float]
    kept: list[int]
    cost: list[float]
    breakpoints: list[int]
    order: list[int] | None = None  # channel: unit indices, least important first
    layers: list[str] = field(default_factory=list)  # simd: eligible producers
    layer_kept: list[dict] = field(default_factory=list)  # simd: per level, vectors kept per block per layer
    n: int | None = None  # simd: vector length


def _breakpoints(densities: list[float], grid: list[float]) -> list[int]:
    """Level indices whose density is (closest to) a measured grid point."""
    out = set()
    arr = np.asarray(densities)
    for g in grid:
        out.add(int(np.argmin(np.abs(arr - g))))
    return sorted(out)


def aligned_counts(size: int, k_min: int, align: int) -> list[int]:
    """Kept-unit counts from ``size`` down to ``k_min``: every count, or with ``align > 1`` (and a group of at
    least 4 × ``align`` units) only multiples of ``align`` plus the dense width and the lowest count."""
    if align <= 1 or size < 4 * align:
        return list(range(size, k_min - 1, -1))
    steps = [k for k in range(size - 1, k_min - 1, -1) if k % align == 0]
    return list(dict.fromkeys([size] + steps + [k_min]))


def channel_option(unit: str, group, scores: np.ndarray, grid: list[float], min_density: float | None = None,
                   align: int = 1) -> Option:
    """Levels: kept counts (:func:`aligned_counts`), removing the least important units first."""
    size = group.size
    lowest = max(min(grid), float(min_density or 0.0))
    k_min = max(1, int(math.ceil(size * lowest - 1e-9)))
    order = sorted(range(size), key=lambda i: (float(scores[i]), -i))  # least important first; ties: keep lower i
    cum = np.concatenate([[0.0], np.cumsum([float(scores[i]) for i in order])])
    kept = aligned_counts(size, k_min, int(align))
    dens = [k / size for k in kept]
    cost = [float(cum[size - k]) for k in kept]
    return Option(unit, "channel", dens, kept, cost, _breakpoints(dens, grid), order=order)


def simd_option(unit: str, pattern: str, n: int, group, weights: dict, modules, grid: list[float],
                min_density: float | None = None) -> Option | None:
    layers = _simd_layers(group, modules)
    if not layers:
        return None
    norms = {name: simd_mod.vector_norms(weights[name].detach().cpu().numpy(), n) for name in layers}
    sorted_norms = {name: np.sort(v, axis=1) for name, v in norms.items()}  # ascending per block
    cums = {name: np.concatenate([np.zeros((v.shape[0], 1)), np.cumsum(v, axis=1)], axis=1)
            for name, v in sorted_norms.items()}
    ins = {name: v.shape[1] for name, v in norms.items()}
    total = sum(v.size for v in norms.values())
    lowest = max(min(grid), float(min_density or 0.0))
    top = max(ins.values())
    dens, kept, cost, layer_kept, seen = [], [], [], [], set()
    for j in range(top, 0, -1):
        d = j / top
        ks = {name: simd_mod.kept_vectors(i, d) for name, i in ins.items()}
        key = tuple(ks.values())
        if key in seen:
            continue
        seen.add(key)
        n_kept = sum(ks[name] * norms[name].shape[0] for name in layers)
        actual = n_kept / total
        if actual < lowest - 1e-9 and dens:
            break
        removed = sum(float(cums[name][:, ins[name] - ks[name]].sum()) for name in layers)
        dens.append(actual)
        kept.append(n_kept)
        cost.append(removed)
        layer_kept.append(ks)
    return Option(unit, pattern, dens, kept, cost, _breakpoints(dens, grid), layers=layers, layer_kept=layer_kept,
                  n=n)


# ------------------------------------------------------------------------------------------- allocation

@dataclass
class Allocation:
    """The result of :func:`allocate`: per unit ``(pattern, density)`` (dense units left out), the kept unit
    indices of channel-pruned groups, the vector masks of SIMD-pruned layers, the estimate and bookkeeping."""

    target_ms: float
    estimated_ms: float
    dense_ms: float
    choice: dict[str, tuple[str, float]]
    keep: dict[str, list[int]]
    masks: dict[str, tuple[int, np.ndarray]]  # SIMD: {layer: (N, vector mask (n_blocks, in))}
    sizes: dict[str, int]
    removed_importance: float
    total_importance: float
    moves: int

    def densities(self) -> dict[str, tuple[str, float]]:
        """``{unit: (pattern, density)}`` as :func:`edgec.latency.model.estimate` reads it."""
        return dict(self.choice)

    def patterns(self) -> dict[str, str]:
        return {u: p for u, (p, _) in self.choice.items()}

    def signature(self) -> tuple:
        """Identifies the structure (for 'did the retry change anything')."""
        return tuple(sorted((u, p, round(d, 9)) for u, (p, d) in self.choice.items()))

    def to_json(self) -> dict:
        return {"target_ms": self.target_ms, "estimated_ms": self.estimated_ms,
                "densities": {u: {"pattern": p, "density": d} for u, (p, d) in self.choice.items()},
                "kept": {u: [len(k), self.sizes[u]] for u, k in self.keep.items()},
                "removed_importance_fraction": (self.removed_importance / self.total_importance
                                                if self.total_importance > 0 else 0.0),
                "moves": self.moves}


def table_groups(lm, analysis) -> list:
    """The prunable groups the latency table has units for, checked (same name, width = group size).
    A table profiled per layer (``units="layers"``) or for another structure is refused."""
    groups = {g.name: g for g in analysis.groups}
    found, problems = [], []
    for name in lm.units:
        g = groups.get(name)
        if g is None:
            problems.append(f"unit '{name}' is no channel group of the model")
            continue
        if not g.prunable:
            problems.append(f"group '{name}' is not prunable ({g.reasons[0] if g.reasons else 'unknown reason'})")
            continue
        width = lm.widths.get(name)
        if width is not None and int(width) != g.size:
            problems.append(f"unit '{name}' has width {width}, the group has {g.size} units")
            continue
        found.append(g)
    if problems:
        raise EdgecError("the latency table's units are not this model's prunable channel groups ("
                         + "; ".join(problems[:3]) + (f"; +{len(problems) - 3} more" if len(problems) > 3 else "")
                         + "); profile it with the groups as units (edgec.latency.profiling.group_units)")
    if not found:
        raise EdgecError("the latency table has no unit for any prunable channel group of the model")
    return found


def build_options(lm, model, groups, weights: dict, patterns: list[str], min_density: float | None = None,
                  scores: dict | None = None, align: int = 1) -> dict[str, list[Option]]:
    """Pruning options per unit for the allowed ``patterns`` that the table measured for it (no level below
    the lowest measured density, nor below ``min_density``). ``scores``: per-unit importance per group (e.g.
    :func:`edgec.prune.sensitivity.taylor_scores`); groups not in it are scored by ``‖v‖²`` of ``weights``.
    ``align``: channel levels keep multiples of it (see :func:`channel_option`)."""
    modules = dict(model.gm.named_modules())
    options: dict[str, list[Option]] = {}
    for g in groups:
        per = []
        curves = lm.curves[g.name]
        for p in patterns:
            if p not in curves:
                continue
            grid = list(curves[p][0])
            if len(grid) < 2:
                continue
            kind, n = simd_mod.parse_pattern(p)
            if kind == "channel":
                if g.size < 2:
                    continue
                per.append(channel_option(g.name, g, unit_scores(g, weights, scores), grid, min_density, align))
            else:
                opt = simd_option(g.name, p, n, g, weights, modules, grid, min_density)
                if opt is not None and len(opt.densities) > 1:
                    per.append(opt)
        if per:
            options[g.name] = per
    return options


class _State:
    """Incremental latency bookkeeping: per-unit ms and channel densities, interaction terms."""

    def __init__(self, lm, units: list[str]):
        self.lm = lm
        self.level = dict.fromkeys(units, 0)
        self.option: dict[str, Option | None] = dict.fromkeys(units)
        self.inter: dict[str, list[tuple[str, str, float]]] = {}
        for a, b, c in lm.interactions:
            self.inter.setdefault(a, []).append((a, b, c))
            if b != a:
                self.inter.setdefault(b, []).append((a, b, c))
        self._cache: dict[tuple, float] = {}

    def unit_ms(self, unit: str, opt: Option | None, level: int) -> float:
        if opt is None or level == 0:
            per = self.lm.curves[unit]
            return per[next(iter(per))][1][-1]
        key = (unit, opt.pattern, level)
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = self.lm.unit_ms(unit, opt.densities[level], opt.pattern)
        return v

    def channel_density(self, unit: str, opt=None, level=None) -> float:
        if opt is None:
            opt, level = self.option.get(unit), self.level.get(unit, 0)
        if opt is None or level == 0 or opt.pattern != "channel":
            return 1.0
        return opt.densities[level]

    def delta(self, unit: str, opt: Option, level: int) -> float:
        """Latency saved (ms, > 0 = faster) by moving ``unit`` to ``opt`` at ``level``."""
        cur_opt, cur_lvl = self.option[unit], self.level[unit]
        saved = self.unit_ms(unit, cur_opt, cur_lvl) - self.unit_ms(unit, opt, level)
        new_cd = self.channel_density(unit, opt, level)
        old_cd = self.channel_density(unit)
        for a, b, c in self.inter.get(unit, []):
            other = b if a == unit else a
            if a == b:
                before, after = (1 - old_cd) ** 2, (1 - new_cd) ** 2
            else:
                od = self.channel_density(other)
                before, after = (1 - old_cd) * (1 - od), (1 - new_cd) * (1 - od)
            saved -= c * (after - before)
        return saved

    def apply(self, unit: str, opt: Option, level: int) -> None:
        self.option[unit] = opt if level > 0 else None
        self.level[unit] = level

    def densities(self) -> dict[str, tuple[str, float]]:
        return {u: (o.pattern, o.densities[self.level[u]]) for u, o in self.option.items()
                if o is not None and self.level[u] > 0}

    def cost(self) -> float:
        return sum(o.cost[self.level[u]] for u, o in self.option.items() if o is not None)


def _best_move(state: _State, units: list[str], options: dict):
    """The move with the least importance removed per ms saved (ties: the larger saving), or None."""
    best = None
    for u in units:
        cur_opt = state.option[u]
        lvl0 = state.level[u]
        for opt in ([cur_opt] if cur_opt is not None else options[u]):
            start = lvl0 if cur_opt is not None else 0
            last = len(opt.densities) - 1
            if start >= last:
                continue
            cands = {start + 1, last} | {b for b in opt.breakpoints if b > start}
            for lvl in sorted(cands):
                saved = state.delta(u, opt, lvl)
                if saved <= 1e-9:
                    continue
                removed = opt.cost[lvl] - opt.cost[start]
                ratio = removed / saved
                key = (ratio, -saved)
                if best is None or key < best[0]:
                    best = (key, u, opt, lvl, saved)
    return best


def _greedy(state: _State, units: list[str], options: dict, target: float, current: float) -> int:
    """Apply best moves until the running estimate is within ``target`` or no move saves time; the move count."""
    moves = 0
    while current > target + _EPS:
        best = _best_move(state, units, options)
        if best is None:
            break
        _, u, opt, lvl, saved = best
        state.apply(u, opt, lvl)
        current -= saved
        moves += 1
    return moves


def allocate(table, model, target_ms: float, *, patterns=("channel",), weights: dict | None = None,
             analysis=None, add_back: bool = True, min_density: float | None = None, scores: dict | None = None,
             align: int = 1) -> Allocation:
    """Per-unit densities with the latency model's estimate ≤ ``target_ms`` (docs/methods.md#alcs).

    ``table``: a latency table dict or a ``LatencyModel`` whose units are the model's channel groups.
    ``patterns``: the patterns units may use ("channel", "simd:N"). ``weights``: ``{producer module: weight}``
    to score units with (ADMM passes ``W + U``); default the model's own weights. ``scores``: per-unit importance
    per group instead of ``‖v‖²`` (:mod:`edgec.prune.sensitivity`). ``min_density``: no unit below it (default:
    the table's lowest measured density). ``align``: kept widths in multiples of it where a group is wide. Raises ``EdgecError`` with
    ``exit_code = EXIT_INFEASIBLE`` when the target cannot be reached on the table's measured grid.
    """
    lm = _latency_model(table)
    analysis = analysis or analyse(model)
    groups = table_groups(lm, analysis)
    if weights is None:
        weights = producer_weights(model, groups)
    patterns = normalise_patterns(patterns)
    options = build_options(lm, model, groups, weights, patterns, min_density, scores, align)
    units = list(options)
    state = _State(lm, units)
    dense_ms = lm.estimate({})
    target = float(target_ms)
    moves = _greedy(state, units, options, target, dense_ms)
    current = lm.estimate(state.densities())
    if current > target + 1e-9:
        floor = lm.min_latency(patterns, floor=min_density)
        raise EdgecError(
            f"latency target {target:.4g} ms is not reachable: the latency table's fastest configuration "
            f"estimates {floor:.4g} ms (greedy allocation reached {current:.4g} ms; dense {dense_ms:.4g} ms)",
            exit_code=EXIT_INFEASIBLE)
    if add_back:
        saved_state = (dict(state.option), dict(state.level))
        _add_back(state, units, target, current)
        if lm.estimate(state.densities()) > target + 1e-9:  # incremental bookkeeping drifted: undo the add-back
            state.option, state.level = saved_state
    return _finish(lm, analysis, state, options, weights, target, lm.estimate(state.densities()), dense_ms, moves,
                   scores)


def _add_back(state: _State, units: list[str], target: float, current: float) -> float:
    """Restore single levels (most importance regained per ms first) while the estimate stays ≤ target."""
    while True:
        best = None
        for u in units:
            opt, lvl = state.option[u], state.level[u]
            if opt is None or lvl == 0:
                continue
            cost_back = opt.cost[lvl] - opt.cost[lvl - 1]
            added = -state.delta(u, opt, lvl - 1)  # ms added by going one level up
            if current + added > target + _EPS:
                continue
            key = (-(cost_back / max(added, 1e-9)), -cost_back)
            if best is None or key < best[0]:
                best = (key, u, opt, lvl - 1, added)
        if best is None:
            return current
        _, u, opt, lvl, added = best
        state.apply(u, opt, lvl)
        current += added


def _finish(lm, analysis, state: _State, options, weights, target, estimate, dense_ms, moves, scores=None
            ) -> Allocation:
    keep, masks, choice, sizes = {}, {}, {}, {}
    for u, opt in state.option.items():
        lvl = state.level[u]
        if opt is None or lvl == 0:
            continue
        g = analysis.group(u)
        sizes[u] = g.size
        choice[u] = (opt.pattern, opt.densities[lvl])
        if opt.pattern == "channel":
            n_remove = g.size - opt.kept[lvl]
            keep[u] = sorted(opt.order[n_remove:])
        else:
            for name in opt.layers:
                w = weights[name].detach().cpu().numpy()
                ins = w.shape[1]
                masks[name] = (opt.n, simd_mod.vector_mask(w, opt.layer_kept[lvl][name] / ins, opt.n, balanced=True))
    total = float(sum(unit_scores(analysis.group(u), weights, scores).sum() for u in options))
    return Allocation(target_ms=float(target), estimated_ms=float(estimate), dense_ms=float(dense_ms), choice=choice,
                      keep=keep, masks=masks, sizes=sizes, removed_importance=state.cost(), total_importance=total,
                      moves=moves)


# ------------------------------------------------------------------------------------------- projection

def project(weights: dict[str, torch.Tensor], analysis, allocation: Allocation, pattern_n: dict | None = None
            ) -> dict[str, torch.Tensor]:
    """``Z``: a copy of ``weights`` ({producer module: weight}) with every dropped unit's rows (channel; embedding
    columns) and every dropped 1×N vector (SIMD masks of ``allocation``) set to zero."""
    z = {k: v.detach().clone() for k, v in weights.items()}
    keep_idx = resolve_keep(analysis, allocation.keep) if allocation.keep else {}
    for s in analysis.slots:
        if s.kind not in ("out", "embedding") or s.target not in z:
            continue
        kept = set(s.kept_positions(keep_idx))
        drop = [p for p in range(len(s.ids)) if p not in kept]
        if not drop:
            continue
        idx = torch.tensor(drop, dtype=torch.long)
        with torch.no_grad():
            if s.kind == "embedding":
                z[s.target][:, idx] = 0
            else:
                z[s.target][idx] = 0
    for name, (n, mask) in allocation.masks.items():
        w = z[name]
        elem = torch.from_numpy(simd_mod.expand_mask(mask, n, w.shape[0])).to(w.dtype)
        z[name] = w * elem.reshape(elem.shape + (1,) * (w.ndim - 2))
    return z


# ------------------------------------------------------------------------------------------- ADMM

@dataclass
class AdmmResult:
    model: object
    allocation: Allocation
    history: list[dict]
    seconds: float


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    chunks = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:  # BatchNorm cannot train on one example
        chunks.pop()
    return chunks


def _check_admm_args(data, epochs: int, rho: float) -> None:
    if int(epochs) < 1:
        raise EdgecError(f"admm epochs must be >= 1 (got {epochs})")
    if not (rho >= 0 and math.isfinite(rho)):
        raise EdgecError(f"rho must be a finite number >= 0 (got {rho})")
    if data.task not in ("classification", "regression", "detection"):
        raise EdgecError(f"cannot train on a '{data.task}' task (expected classification, regression or detection)")


def _w_step(gm, params: dict, z: dict, u: dict, train_ds, task: str, opt, gen, batch_size: int, rho: float,
            grad_clip: float, r: int, queries: int | None = None) -> tuple[float, float, int]:
    """One epoch of Adam on task loss + ρ/2 Σ‖W − Z + U‖²; returns (task loss sum, penalty sum, examples).
    Detection: the set-prediction loss over the ``(logits, boxes)`` outputs, ``queries`` per query group."""
    gm.train()
    loss_sum, pen_sum, count = 0.0, 0.0, 0
    for idx in _batches(len(train_ds), int(batch_size), gen):
        x, y = collate(train_ds, idx.tolist())
        out = gm(*(tuple(x) if isinstance(x, (tuple, list)) else (x,)))
        lt = task_loss(model_output(out, task), y, task, queries=queries)
        pen = sum(((params[n] - z[n] + u[n]) ** 2).sum() for n in params)
        loss = lt + 0.5 * rho * pen
        value = float(loss.detach())
        if not math.isfinite(value):
            raise EdgecError(f"ADMM diverged: the loss is {value} in round {r + 1}; try a lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(gm.parameters(), grad_clip)
        opt.step()
        loss_sum += float(lt.detach()) * len(idx)
        pen_sum += float(pen.detach()) * len(idx)
        count += len(idx)
    return loss_sum, pen_sum, count


def _residual(w: dict, z: dict) -> float:
    """‖W − Z‖ / ‖W‖ over all producer weights."""
    w_norm = math.sqrt(sum(float((w[n] ** 2).sum()) for n in w)) or 1.0
    return math.sqrt(sum(float(((w[n] - z[n]) ** 2).sum()) for n in w)) / w_norm


def admm(model, data, table, target_ms: float, *, patterns=("channel",), epochs: int = 3, rho: float = 1e-3,
         lr: float = 1e-3, batch_size: int = 32, seed: int = 0, grad_clip: float = 1.0,
         min_density: float | None = None, importance: str = "l2", align: int = 1, progress=None) -> AdmmResult:
    """ALCS ADMM on a copy of ``model`` (docs/methods.md#admm). ``data``: an ``edgec.data.DataBundle``. Returns the
    trained (still dense) model, the final allocation on its weights, and per-round history (task loss,
    ‖W − Z‖ / ‖W‖, estimate). The caller applies the hard mask (``prune.channels``) and fine-tunes.
    ``importance``: ``l2`` scores units by ``‖W + U‖²`` each round; ``taylor`` re-scores them each round by the
    Taylor sensitivity of the current weights on held-out batches (:mod:`edgec.prune.sensitivity`)."""
    say = progress or (lambda _m: None)
    _check_admm_args(data, epochs, rho)
    t0 = time.perf_counter()
    lm = _latency_model(table)
    student = model.clone()
    gm = student.gm.cpu()
    analysis = analyse(student)
    groups = table_groups(lm, analysis)
    train_ds = data.split("train")
    # a detection model's query count at inference: the query-group size of the train-mode outputs
    queries = preflight(student, data, data.split("val") if data.has_split("val") else train_ds, torch.device("cpu"),
                        "model")
    modules = dict(gm.named_modules())
    names = list(dict.fromkeys(n for g in groups for n in producer_names(g)))
    params = {n: modules[n].weight for n in names}

    def allocate_on(w, r):
        scores = (taylor_scores(student, data, analysis, groups, seed=seed + r) if importance == "taylor"
                  else None)
        return allocate(lm, student, target_ms, patterns=patterns, weights=w, analysis=analysis,
                        min_density=min_density, scores=scores, align=align)

    history = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        w = {n: p.detach().clone() for n, p in params.items()}
        z = project(w, analysis, allocate_on(w, 0))
        u = {n: torch.zeros_like(v) for n, v in w.items()}
        opt = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=lr)
        for r in range(int(epochs)):
            loss_sum, pen_sum, count = _w_step(gm, params, z, u, train_ds, data.task, opt, gen, batch_size, rho,
                                               grad_clip, r, queries=queries)
            w = {n: p.detach().clone() for n, p in params.items()}
            wu = {n: w[n] + u[n] for n in names}
            alloc = allocate_on(wu, r + 1)
            z = project(wu, analysis, alloc)
            for n in names:
                u[n] = u[n] + w[n] - z[n]
            resid = _residual(w, z)
            row = {"round": r + 1, "task_loss": loss_sum / max(1, count), "penalty": pen_sum / max(1, count),
                   "primal_residual": resid, "estimated_ms": alloc.estimated_ms,
                   "densities": {k: round(d, 4) for k, (_, d) in alloc.choice.items()}}
            history.append(row)
            say(f"ADMM round {r + 1}/{epochs}: task loss {row['task_loss']:.4f}, ‖W−Z‖/‖W‖ {resid:.3g}")
    gm.eval()
    student.gm = gm
    final = allocate_on(None, int(epochs) + 1)
    return AdmmResult(student, final, history, time.perf_counter() - t0)


__all__ = ["EXIT_BUDGET_MISSED", "EXIT_INFEASIBLE", "AdmmResult", "Allocation", "Option", "admm", "allocate",
           "build_options", "channel_option", "producer_names", "producer_weights", "project", "simd_eligible",
           "simd_option", "table_groups", "unit_scores", "unit_sq_norms"]
