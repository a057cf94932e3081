"""``prune_file``: what ``edgec prune MODEL --latency-ms B`` runs: ALCS pruning to a latency budget measured in
onnxruntime (dense measurement → latency table → budget → allocation → ADMM → shrink → fine-tune → export and
measure, with retries → ``prune.alcs`` record → save). The pipeline and its calibration are described in
docs/methods.md#alcs and docs/architecture.md#latency-and-pruning."""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgec.analysis.groups import analyse
from edgec.core.errors import EdgecError
from edgec.core.fileio import check_output
from edgec.core.options import PruneOptions
from edgec.core.pass_manager import PassManager, describe_skips, refuse_skips, skip
from edgec.core.provenance import record
from edgec.data import check_fits, load_data
from edgec.latency import simd as simd_mod
from edgec.latency import table as tab
from edgec.latency.cache import cached as cached_table
from edgec.latency.model import LatencyModel
from edgec.latency.profiling import DEFAULT_DENSITIES, trace_layers
from edgec.latency.shapes import make_inputs, parse_input_shapes, resolve_shapes
from edgec.models.checkpoint import load_checkpoint, save_checkpoint
from edgec.onnx.export import export, refuse_scaffolds, to_onnx
from edgec.onnx.session import measure_interleaved, measure_onnx
from edgec.passes.prune_channels import PruneChannels
from edgec.prune import alcs
from edgec.prune.alcs import EXIT_BUDGET_MISSED, EXIT_INFEASIBLE
from edgec.prune.result import PruneResult
from edgec.prune.search import GUARD, cached, search_target
from edgec.prune.sensitivity import resolve_importance, taylor_scores
from edgec.train.job import data_name, image_size
from edgec.train.loop import finetune
from edgec.train.record import finetune_record

PRUNE_VERSION = 1
# Retry k aims (1 − RETRY_STEP)^(k(k+1)/2) below the first target (5 %, 14 %, 26 %, 40 %, 54 % …, in table ms):
# a fixed schedule, not one scaled by how far the last measurement missed, so with a given table every
# attempt's allocation is the same from run to run and only the pass/fail check depends on the measurement
# (docs/methods.md#alcs); it escalates so that a latency model that is far off is still caught up with.
RETRY_STEP = 0.05
TIGHTEN_MIN = 0.02  # a retry that gives the same structure as the last one tightens by this much more
MAX_TIGHTEN = 200  # bound on those extra tightenings (0.98**200 ≈ 0.02 of the target)
MEASURE = {"warmup": 5, "repeats": 30, "min_seconds": 0.3}
# Below the table's floor estimate but at least this fraction of it, the fastest configuration is measured before
# the budget is refused (the latency model's floor can be off by 2x and more: units timed alone overlap in the
# whole graph; a 2-layer 512-wide MLP's floor was estimated at 0.56 x dense and measured at 0.24 x).
FLOOR_MEASURE_FROM = 0.25
NO_FURTHER_RETRY = "the allocation is already at the table's fastest configuration; no further retry possible"


# ------------------------------------------------------------------------------------------- helpers

def measure_against(dense_bytes, onnx_bytes, feed, threads: int, options: dict | None = None) -> tuple[dict, dict]:
    """``(dense, candidate)`` measured side by side (interleaved runs): for a budget that is a ratio of the
    dense latency, the ratio of the two is what matters, and load on the machine then affects both alike."""
    opts = {k: v for k, v in dict(MEASURE, **(options or {})).items() if k != "config"}
    dense, cand = measure_interleaved([dense_bytes, onnx_bytes], feed, threads=threads, **opts)
    return dense, dict(cand, runs_ms=[cand["median_ms"]])


def measure(onnx_bytes, feed, threads: int, over: float | None = None, options: dict | None = None) -> dict:
    """Median latency of ``onnx_bytes`` (``MEASURE`` protocol). When ``over`` is given and the first median exceeds
    it, measure once more and keep the lower median (interference from other processes only adds time)."""
    opts = dict(MEASURE, **(options or {}))
    first = measure_onnx(onnx_bytes, feed, threads=threads, **opts)
    runs = [first]
    if over is not None and first["median_ms"] > over:
        runs.append(measure_onnx(onnx_bytes, feed, threads=threads, **opts))
    best = min(runs, key=lambda r: r["median_ms"])
    return dict(best, runs_ms=[r["median_ms"] for r in runs])


def macs(model, shapes: dict) -> int:
    """Multiply-accumulates of the model's Linear / Conv1d / Conv2d layers at ``shapes`` (other ops — attention
    products, norms, activations — are not counted)."""
    total = 0
    for info in trace_layers(model, shapes).values():
        m = info.module
        for out in info.out_shapes:
            n_out = math.prod(int(d) for d in out)
            if info.kind == "linear":
                total += n_out * int(m.in_features)
            else:
                total += n_out * (int(m.in_channels) // int(m.groups)) * math.prod(int(k) for k in m.kernel_size)
    return int(total)


def simd_report(lm, groups, pattern: str) -> dict:
    """Per unit: does the table have a ``pattern`` entry, and at which measured densities was the SIMD path
    faster than channel pruning / than dense."""
    units, faster_units, examples = {}, [], []
    for g in groups:
        curves = lm.curves[g.name]
        if pattern not in curves:
            units[g.name] = {"entry": False, "note": "no SIMD-eligible producer (SIMD needs Linear or 1x1 conv)"}
            continue
        xs, ys = curves[pattern]
        rows = []
        for d, t in zip(xs, ys):
            if d >= 1.0:
                continue
            tc = lm.unit_ms(g.name, max(d, min(curves["channel"][0])), "channel") if "channel" in curves else None
            rows.append({"density": d, "simd_ms": t, "channel_ms": tc, "dense_ms": ys[-1]})
        faster = [r["density"] for r in rows if r["channel_ms"] is not None and r["simd_ms"] < r["channel_ms"]]
        faster_dense = [r["density"] for r in rows if r["simd_ms"] < r["dense_ms"]]
        units[g.name] = {"entry": True, "faster_than_channel_at": faster, "faster_than_dense_at": faster_dense,
                         "points": rows}
        if faster:
            faster_units.append(g.name)
        elif rows:
            mid = min(rows, key=lambda r: abs(r["density"] - 0.5))
            examples.append(f"{g.name} at density {mid['density']:.2g}: simd {mid['simd_ms']:.4g} ms, channel "
                            f"{mid['channel_ms']:.4g} ms, dense {mid['dense_ms']:.4g} ms")
    with_entry = [u for u, r in units.items() if r["entry"]]
    return {"pattern": pattern, "units": units, "units_with_entry": with_entry, "faster_units": faster_units,
            "examples": examples}


def _key_summary(table: dict, source: str) -> dict:
    key = table["key"]
    return {"source": source, "runtime": f"{key.get('runtime')} {key.get('runtime_version')}",
            "threads": key.get("threads"), "cpu": key.get("cpu"), "arch": key.get("arch"),
            "config_digest": str(key.get("config_digest", ""))[:16],
            "inputs": {e["name"]: e["shape"] for e in key.get("inputs", [])},
            "patterns": table.get("request", {}).get("patterns"),
            "densities": table.get("densities"), "dense_ms": table["dense"]["median_ms"],
            "remainder_ms": table["remainder_ms"]}


@dataclass
class _Run:
    """What the steps of one ``prune_file`` call share; filled in step by step."""

    options: PruneOptions
    say: Callable[[str], None]
    pattern: str  # canonical name ("channel" | "simd:N")
    kind: str  # "channel" | "simd"
    out: Path | None = None
    model: object = None  # the dense input model
    bundle: object = None  # DataBundle or None (one-shot)
    data_label: str | None = None
    shapes: dict | None = None
    feed: dict | None = None
    notes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # [{"layer": group, "reason"}] left at full density
    # dense measurement and latency table
    dense_ms: float = 0.0
    dense_bytes: bytes = b""
    T: dict | None = None
    source: str = ""
    lm: LatencyModel | None = None
    analysis: object = None
    groups: list | None = None
    foreign: bool = False  # the table was measured elsewhere
    table_dense: float = 0.0
    scale: float = 1.0  # table ms per local ms
    # budget
    budget_ms: float = 0.0
    budget_local: float = 0.0
    budget_table: float = 0.0
    floor: float | None = None
    min_table: float = 0.0
    shown_min: float = 0.0
    simd_info: dict | None = None
    aim_table: float = 0.0  # the budget the allocation aims at, table ms (calibrated when the floor was measured)
    floor_check: dict | None = None  # the fastest configuration measured, when the table called the budget infeasible
    # importance
    importance: str = "l2"
    scores: dict | None = None  # per-unit taylor importance of the dense model, per group
    probes: list | None = None  # the measured search of the allocation target (``search``), when it ran
    params_before: int = 0
    macs_before: int = 0

    @property
    def threads(self) -> int:
        return int(self.options.threads)

    @property
    def batch(self) -> int:
        return int(self.options.batch)

    @property
    def input_shapes(self) -> dict:
        return {k: list(v) for k, v in self.shapes.items()}


@dataclass
class _Attempt:
    """One allocation → (ADMM) → shrink → (fine-tune) → export → measurement."""

    row: dict
    model: object
    alloc: object
    admm: dict | None
    export: dict
    records: list
    finetune: dict | None


# ------------------------------------------------------------------------------------------- steps

def _load_bundle(options: PruneOptions, model):
    data = options.data
    if hasattr(data, "split") and hasattr(data, "task"):  # already a DataBundle
        return data, getattr(data, "name", None) or "bundle"
    opts = options.data_options.to_kwargs()
    if isinstance(model.config.get("n_mels"), int):
        opts.setdefault("n_mels", model.config["n_mels"])
    size = image_size(model.spec)  # a detection folder's images are resized to the model's input
    return load_data(os.fspath(data), **opts, **({"image_size": size} if size else {})), data_name(data)


def _load(input_path, output, options: PruneOptions, say) -> _Run:
    """Validate, guard the output, load the checkpoint, then ``_setup``."""
    options.validate()
    simd_mod.parse_pattern(options.pattern)
    model_path = Path(input_path)
    out = check_output(output, model_path)
    model = load_checkpoint(model_path, options)
    run = _setup(model, options, say)
    run.out = out
    return run


def _setup(model, options: PruneOptions, say) -> _Run:
    """Validate, take the model (and load the data), fix the input shapes and the measurement feed."""
    options.validate()
    kind, n = simd_mod.parse_pattern(options.pattern)
    run = _Run(options, say, simd_mod.pattern_name(kind, n), kind)
    run.model = model
    model.gm.eval()
    refuse_scaffolds(model)
    run.bundle, run.data_label = _load_bundle(options, model) if options.data is not None else (None, None)
    if run.bundle is not None:  # before any measuring or training: data the export would refuse is bad input
        check_fits(run.bundle, model.spec, f"the model ({model.arch})")
    input_shape = [options.input_shape] if isinstance(options.input_shape, str) else options.input_shape
    given = parse_input_shapes(model.spec, input_shape) if input_shape else None
    run.shapes = resolve_shapes(model.spec, given, run.batch)
    run.feed = make_inputs(model.spec, run.shapes, seed=0)
    return run


def _measure_dense(run: _Run):
    """Export the dense model in memory and measure it; returns the ONNX proto (reused by the profiler)."""
    run.say("exporting and measuring the dense model")
    dense_proto = to_onnx(run.model)
    run.dense_bytes = dense_proto.SerializeToString()
    meas = measure(run.dense_bytes, run.feed, run.threads, options=run.options.measure_options)
    run.dense_ms = meas["median_ms"]
    return dense_proto


def _latency_table(run: _Run, dense_proto) -> None:
    """The given table file (checked against the model), else the cached/profiled one of this machine."""
    o = run.options
    patterns = ["channel"] + ([run.pattern] if run.kind == "simd" else [])
    if o.table is not None:
        run.say(f"reading the latency table {Path(o.table).name}")
        T = tab.load_table(o.table, run.model, threads=run.threads, shapes=run.shapes)
        run.source = f"file:{Path(o.table).name}"
        for w in T.get("load_warnings", []):
            run.notes.append(w)
        if run.kind == "simd" and not any(run.pattern in u["patterns"] for u in T["units"]):
            run.notes.append(f"the latency table has no {run.pattern} measurements; SIMD was not considered "
                             f"(profile with patterns channel,{run.pattern})")
    else:
        run.say("profiling the channel groups (cached when the key matches)")
        T = cached_table(run.model, run.threads, run.shapes, batch=run.batch, units="groups",
                         densities=DEFAULT_DENSITIES if o.densities is None else o.densities, patterns=patterns,
                         progress=lambda m: run.say(f"profile: {m}"), dense_onnx=dense_proto,
                         **(o.profile_options or {}))
        run.source = "cache" if T.get("_cache", {}).get("hit") else "profiled"
    run.T = T
    run.lm = LatencyModel(T)
    run.analysis = analyse(run.model)
    run.groups = alcs.table_groups(run.lm, run.analysis)
    run.foreign = bool(T.get("load_warnings"))
    run.table_dense = run.lm.dense
    run.scale = run.table_dense / run.dense_ms


def _skip_groups(run: _Run) -> None:
    """Report the groups left dense (``--strict``: refuse them here, before any pruning or writing)."""
    run.skipped = skipped_groups(run.analysis, run.groups, run.lm, run.options.min_density)
    if run.skipped:
        run.say(f"{len(run.skipped)} channel group(s) stay dense: {describe_skips(run.skipped)}")
    if run.options.strict:
        refuse_skips("prune", run.skipped)


def skipped_groups(analysis, groups: list, lm: LatencyModel, min_density: float | None = None) -> list[dict]:
    """The channel groups pruning leaves at full density, with why: the analysis found them unprunable (its
    first reason), a single unit, no latency-table entry, or the table measures no saving at any density >=
    ``min_density``. ``groups``: those the table covers. Groups that only the model output pins are not
    listed: the output width is the model's contract, not a choice."""
    in_table, floor, out = {g.name for g in groups}, float(min_density or 0.0), []
    for g in analysis.groups:
        if not g.prunable:
            if not all("reaches the model output" in r for r in g.reasons):
                extra = f" (+{len(g.reasons) - 1} more)" if len(g.reasons) > 1 else ""
                out.append(skip(g.name, f"not prunable: {g.reasons[0]}{extra}"))
        elif g.size < 2:
            out.append(skip(g.name, "a single unit; nothing to remove", deliberate=True))
        elif g.name not in in_table:
            out.append(skip(g.name, "the latency table has no entry for this group"))
        elif (why := _no_saving(lm, g.name, floor)) is not None:
            out.append(skip(g.name, why, deliberate=True))
    return out


def _no_saving(lm: LatencyModel, unit: str, floor: float) -> str | None:
    """Why pruning ``unit`` cannot pay off per the table (no measured density below 1 is faster), else None."""
    xs, ys = lm.curves[unit].get("channel", ([], []))
    dense = lm.unit_ms(unit, 1.0) if xs else 0.0
    pruned = [(y, x) for x, y in zip(xs, ys) if floor <= x < 1.0]
    if not pruned:
        return None
    best_ms, at = min(pruned)
    if best_ms < dense:
        return None
    return (f"the latency table measures no saving ({dense:.4g} ms dense, {best_ms:.4g} ms at density {at:g}); "
            "kept dense")


def _plan_budget(run: _Run) -> None:
    """The budget in table ms (what the allocation aims at: it never depends on this run's measurements, so a
    given table gives the same allocations every run) and in local ms (what the measured check compares with).
    A ms budget with a foreign table is the table device's; a ratio is of the table's dense latency for the
    allocation and of the dense model measured side by side for the check."""
    o = run.options
    if o.latency_ms is not None:
        budget_ms = budget_table = float(o.latency_ms)
        budget_local = budget_ms / run.scale if run.foreign else budget_ms
        if run.foreign:
            run.notes.append(f"the latency table was measured elsewhere: the budget {budget_ms:g} ms applies to "
                             f"the table's device; here the pruned model must measure <= {budget_local:.4g} ms "
                             f"(budget x dense here / dense on the device = {1 / run.scale:.3g})")
    else:
        ratio = float(o.latency_ratio)
        budget_local, budget_table = ratio * run.dense_ms, ratio * run.table_dense
        budget_ms = budget_table if run.foreign else budget_local
    run.budget_ms, run.budget_local, run.budget_table = budget_ms, budget_local, budget_table
    if run.lm.clamped:
        c = run.lm.clamped
        run.notes.append(f"the latency table's calibrated remainder was negative ({c['remainder_ms']:.4g} ms: layers "
                         f"timed alone add up to more than the whole model); clamped to the run overhead "
                         f"{c['clamped_to_ms']:.4g} ms and every layer's times scaled by {c['unit_scale']:.3g}")


def _check_feasible(run: _Run) -> None:
    """Aim the allocation at the budget when the table reaches it. When the table's estimate of its fastest
    configuration (every group at its floor) is above the budget, that configuration is built and measured
    (once per machine: cached like the search): the latency model is a model, and a budget that the real model
    reaches is accepted. The table's savings are then calibrated so that its floor lands on the measured floor,
    and the allocation aims at the calibrated budget. Refused (exit 4, nothing written) when the measured floor
    is over the budget too."""
    o = run.options
    run.floor = floor = None if o.min_density is None else float(o.min_density)
    run.min_table = min_table = run.lm.min_latency(["channel"], floor=floor)
    min_local = min_table / run.scale
    run.shown_min = min_table if run.foreign else min_local
    run.aim_table = run.budget_table
    if run.budget_table >= min_table - 1e-12:
        return
    if run.foreign or run.budget_table < FLOOR_MEASURE_FROM * min_table:
        # a table from another device is the only word on that device; far below the floor no model error helps
        raise _infeasible(run, f"is {run.shown_min:.4g} ms")
    check, _ = cached(_measure_key(run, "floor"), lambda: _measure_floor(run))
    run.floor_check = check
    if not check["passed"]:
        raise _infeasible(run, f"estimates {run.shown_min:.4g} ms and measured {check['measured_ms']:.4g} ms against "
                               f"a budget of {check['budget_ms']:.4g} ms here")
    dense_t, floor_t = run.table_dense, check["measured_fraction_of_dense"] * run.table_dense
    # savings scaled so that the table's floor estimate maps onto the measured floor: B' = D - (D - B)(D - F̂)/(D - F)
    run.aim_table = max(min_table, dense_t - (dense_t - run.budget_table) * (dense_t - min_table) / (dense_t - floor_t))
    run.notes.append(f"the latency table estimates its fastest configuration at {run.shown_min:.4g} ms, above the "
                     f"budget, but it measured {check['measured_ms']:.4g} ms (budget {check['budget_ms']:.4g} ms): "
                     f"the budget is reachable; the allocation aims at the table's savings calibrated to that "
                     f"measurement ({run.aim_table:.4g} table ms)")


def _infeasible(run: _Run, floor_detail: str) -> EdgecError:
    floor = run.floor
    return EdgecError(
        f"latency budget {run.budget_ms:.4g} ms is infeasible: the fastest configuration the latency table "
        f"reaches (every channel group at its fastest measured density"
        + (f" >= {floor:g}" if floor is not None else "") + f") {floor_detail} "
        f"(dense {run.dense_ms:.4g} ms measured{' here' if run.foreign else ''}); nothing written",
        exit_code=EXIT_INFEASIBLE)


def _measure_floor(run: _Run) -> dict:
    """The table's fastest configuration, exported and measured (side by side with dense for a ratio budget)."""
    run.say("the latency table puts the budget below its fastest configuration: measuring that configuration")
    meas, budget_local, dense_side = _measure_for_budget(run, _structure_onnx(run, _allocate(run, run.min_table)))
    return {"estimated_table_ms": run.min_table, "measured_ms": meas["median_ms"],
            "measured_fraction_of_dense": meas["median_ms"] / (dense_side or run.dense_ms), "budget_ms": budget_local,
            "passed": meas["median_ms"] <= budget_local}


def _structure_onnx(run: _Run, alloc) -> bytes:
    """The dense model shrunk one-shot to ``alloc`` (no training), exported unverified: for timing only."""
    pruned, _ = PassManager([PruneChannels(keep=alloc.keep)])(run.model)
    return to_onnx(pruned).SerializeToString()


def _measure_for_budget(run: _Run, onnx_bytes: bytes) -> tuple[dict, float, float | None]:
    """``(measurement, local budget ms, dense ms side by side or None)``: a relative budget is checked against
    the dense model measured side by side (interleaved: load slows both alike), a ms budget against the median
    (measured again once when over)."""
    o, relative = run.options, _relative_budget(run)
    if relative is not None:
        dense, meas = measure_against(run.dense_bytes, onnx_bytes, run.feed, run.threads, o.measure_options)
        return meas, relative * dense["median_ms"], dense["median_ms"]
    meas = measure(onnx_bytes, run.feed, run.threads, over=run.budget_local, options=o.measure_options)
    return meas, run.budget_local, None


def _simd_notes(run: _Run) -> None:
    """SIMD is considered per unit where the table has it, but only channel pruning is executed: say why."""
    if run.kind != "simd":
        return
    pattern, T = run.pattern, run.T
    run.simd_info = info = simd_report(run.lm, run.groups, pattern)
    if not info["units_with_entry"]:
        run.notes.append(f"{pattern} not chosen: no unit has a SIMD entry in the latency table "
                         "(its producers are not Linear / 1x1 conv)")
    elif not info["faster_units"]:
        run.notes.append(f"{pattern} not chosen for any layer: the latency table measured the SIMD path slower than "
                         f"channel pruning at every density on {'its device' if run.foreign else 'this CPU'} "
                         f"({T['key'].get('cpu')}, onnxruntime {T['key'].get('runtime_version')})"
                         + (f" (e.g. {info['examples'][0]})" if info["examples"] else ""))
    else:
        try:
            trial = alcs.allocate(run.lm, run.model, max(run.aim_table * (1 - run.options.margin), run.min_table),
                                  patterns=["channel", pattern], analysis=run.analysis, min_density=run.floor,
                                  scores=run.scores, align=int(run.options.align))
            chose = [u for u, (p, _) in trial.choice.items() if p == pattern]
        except EdgecError:
            chose = []
        if chose:
            run.notes.append(f"the latency table says {pattern} would pay off for {', '.join(chose)}; edgec cannot "
                             "export SIMD-masked layers inside a whole model yet, so they were channel-pruned instead")
        else:
            faster = ", ".join(info["faster_units"])
            run.notes.append(f"{pattern} measured faster than channel pruning for {faster} at some densities, but "
                             "the allocation preferred channel pruning everywhere")
    info["chosen"] = False


def _allocate(run: _Run, target: float):
    return alcs.allocate(run.lm, run.model, target, patterns=["channel"], analysis=run.analysis,
                         min_density=run.floor, scores=run.scores, align=int(run.options.align))


def _score_units(run: _Run) -> None:
    """Per-unit importance: ``taylor`` sensitivity on held-out batches (with data), else ``‖v‖²`` at allocation."""
    run.importance = resolve_importance(run.options.importance, run.bundle is not None)
    if run.importance == "taylor":
        run.say("scoring channel importance (Taylor sensitivity on held-out batches)")
        run.scores = taylor_scores(run.model, run.bundle, run.analysis, run.groups, seed=int(run.options.seed))


def _allocate_new(run: _Run, target: float, prev_sig):
    """Allocate to ``target``; on a retry tighten it until the structure differs from the previous attempt's."""
    alloc = _allocate(run, target)
    for _ in range(MAX_TIGHTEN):
        if prev_sig is None or alloc.signature() != prev_sig or target <= run.min_table + 1e-12:
            break
        target = max(run.min_table, target * (1.0 - TIGHTEN_MIN))
        alloc = _allocate(run, target)
    return target, alloc


def _finetune_pruned(run: _Run, pruned):
    """A short fine-tune of the shrunk model; returns it with its ``finetune`` record appended."""
    o = run.options
    run.say(f"fine-tuning the pruned model ({o.finetune_epochs} epoch(s))")
    tuned, report = finetune(pruned, run.bundle, epochs=int(o.finetune_epochs), lr=float(o.lr),
                             batch_size=int(o.batch_size), seed=int(o.seed))
    ft_record = finetune_record(pruned.digest(), tuned, report, {
        "epochs": int(o.finetune_epochs), "batch_size": int(o.batch_size), "lr": float(o.lr), "seed": int(o.seed),
        "data": run.data_label, "data_digest": getattr(run.bundle, "digest", None), "after": "prune.channels"})
    tuned.provenance = list(pruned.provenance) + [ft_record]
    return tuned, ft_record


def _relative_budget(run: _Run) -> float | None:
    """The budget as a fraction of the dense latency when that is what it means here: a ratio budget, or a ms
    budget on a table from another device (a speed-up to reproduce); None for a ms budget on this machine."""
    if run.options.latency_ratio is not None:
        return float(run.options.latency_ratio)
    return run.budget_table / run.table_dense if run.foreign else None


def _attempt(run: _Run, attempt: int, target: float, alloc0) -> _Attempt:
    """From the dense model: (ADMM) → ``prune.channels`` → (fine-tune) → verified export → measurement."""
    o = run.options
    t_attempt = time.perf_counter()
    work, alloc, admm_info, ft_record = run.model, alloc0, None, None
    if run.bundle is not None and alloc0.choice and int(o.admm_epochs) > 0:
        res = alcs.admm(run.model, run.bundle, run.lm, target, patterns=["channel"], epochs=int(o.admm_epochs),
                        rho=float(o.rho), lr=float(o.lr), batch_size=int(o.batch_size), seed=int(o.seed),
                        min_density=run.floor, importance=run.importance, align=int(o.align), progress=run.say)
        work, alloc = res.model, res.allocation
        admm_info = {"rounds": res.history, "seconds": res.seconds}
    pruned, records = PassManager([PruneChannels(keep=alloc.keep)])(work)
    if run.bundle is not None and alloc.choice and int(o.finetune_epochs) > 0:
        pruned, ft_record = _finetune_pruned(run, pruned)
    run.say("exporting (verified) and measuring the pruned model")
    onnx_bytes, export_record = export(pruned)
    meas, budget_local, dense_side = _measure_for_budget(run, onnx_bytes)
    measured = meas["median_ms"]
    est_local = alloc.estimated_ms / run.scale
    row = {"attempt": attempt + 1, "target_ms": target / run.scale, "target_table_ms": target,
           "estimated_ms": est_local, "budget_ms": budget_local, "dense_side_by_side_ms": dense_side,
           "passed": measured <= budget_local,
           "estimated_table_ms": alloc.estimated_ms, "measured_ms": measured, "measured_runs_ms": meas["runs_ms"],
           "p10_ms": meas["p10_ms"], "p90_ms": meas["p90_ms"],
           "model_error": (est_local - measured) / measured if measured > 0 else None,
           "densities": {u: round(d, 6) for u, (_, d) in alloc.choice.items()},
           "seconds": time.perf_counter() - t_attempt}
    return _Attempt(row, pruned, alloc, admm_info, export_record, records, ft_record)


def _first_target(run: _Run) -> float:
    """The table's target for ``budget × (1 − margin)``; with ``search`` (on this machine's table), the loosest
    target whose one-shot structure measures within the budget (``edgec.prune.search``), when one does."""
    o = run.options
    first = max(run.aim_table * (1.0 - float(o.margin)), run.min_table)
    if not o.search or run.foreign or not _allocate(run, first).choice:
        return first
    relative = _relative_budget(run)
    aim = (relative if relative is not None else run.budget_local / run.dense_ms) * (1.0 - max(float(o.margin), GUARD))
    measured: dict[tuple, float] = {}

    def probe(target: float) -> float:
        alloc = _allocate(run, target)
        sig = alloc.signature()
        if sig not in measured:
            dense, meas = measure_against(run.dense_bytes, _structure_onnx(run, alloc), run.feed, run.threads,
                                          o.measure_options)
            measured[sig] = meas["median_ms"] / dense["median_ms"]
            run.say(f"search: target {target / run.scale:.4g} ms (table) measured {measured[sig]:.3f} x dense "
                    f"(aim {aim:.3f})")
        return measured[sig]

    def search() -> dict:
        run.say("searching the allocation target by measuring pruned structures (no training)")
        target, probes = search_target(first, run.min_table, run.table_dense, aim, probe)
        return {"target": target, "probes": probes}

    value, hit = cached(_measure_key(run, "search", first=first, aim=aim), search)
    run.probes = value["probes"]
    if hit:
        run.notes.append("the allocation target comes from this machine's cached search for the same model, "
                         "table, budget and options")
    return first if value["target"] is None else max(value["target"], run.min_table)


def _measure_key(run: _Run, kind: str, **extra) -> dict:
    """Everything a measured decision (``floor`` check, target ``search``) depends on: its cache key."""
    o = run.options
    return {"kind": kind, "version": PRUNE_VERSION, "model": run.model.digest(), "table": tab.table_digest(run.T),
            "budget": [o.latency_ms, o.latency_ratio], "margin": float(o.margin), "floor": run.min_table,
            "align": int(o.align), "min_density": run.floor, "importance": run.importance, "seed": int(o.seed),
            "data": getattr(run.bundle, "digest", None), "threads": run.threads, "shapes": run.input_shapes,
            "measure": o.measure_options, **extra}


def _attempts(run: _Run) -> tuple[list[dict], _Attempt]:
    """Up to ``1 + max_retries`` attempts; a measurement over budget tightens the target on the fixed
    ``RETRY_STEP`` schedule.
    Returns the attempt rows and the first attempt that passed (else the one closest to its budget)."""
    o = run.options
    target = first = _first_target(run)
    attempts: list[dict] = []
    best, prev_sig = None, None
    for attempt in range(int(o.max_retries) + 1):
        target, alloc0 = _allocate_new(run, target, prev_sig)
        if prev_sig is not None and alloc0.signature() == prev_sig:
            run.notes.append(NO_FURTHER_RETRY)
            break
        prev_sig = alloc0.signature()
        run.say(f"attempt {attempt + 1}: target {target / run.scale:.4g} ms (estimate "
                f"{alloc0.estimated_ms / run.scale:.4g} ms), {len(alloc0.choice)} group(s) pruned")
        cand = _attempt(run, attempt, target, alloc0)
        attempts.append(cand.row)
        measured, est_local = cand.row["measured_ms"], cand.row["estimated_ms"]
        run.say(f"attempt {attempt + 1}: measured {measured:.4g} ms (estimated {est_local:.4g}, budget "
                f"{cand.row['budget_ms']:.4g})")
        if cand.row["passed"]:  # the first attempt that passes is the result (deterministic given the table)
            return attempts, cand
        if best is None or measured / cand.row["budget_ms"] < best.row["measured_ms"] / best.row["budget_ms"]:
            best = cand
        if attempt == int(o.max_retries):
            break
        k = attempt + 1  # the retry about to run
        scheduled = first * (1.0 - RETRY_STEP) ** (k * (k + 1) // 2)
        new_target = max(run.min_table, min(scheduled, target * (1.0 - TIGHTEN_MIN)))
        if new_target >= target - 1e-12:
            run.notes.append(NO_FURTHER_RETRY)
            break
        target = new_target
    return attempts, best


def _check_met(run: _Run, best: _Attempt, attempts: list[dict]) -> None:
    """Still over budget after the retries: exit 5, nothing written."""
    b = best.row
    if not b["passed"]:
        side = " (dense measured side by side)" if _relative_budget(run) is not None else ""
        raise EdgecError(
            f"latency budget missed: the best pruned model measured {b['measured_ms']:.4g} ms (estimated "
            f"{b['estimated_ms']:.4g} ms, attempt {b['attempt']} of {len(attempts)}) against a budget of "
            f"{b['budget_ms']:.4g} ms{side}{' (scaled from the device budget)' if run.foreign else ''}; "
            f"dense measures {run.dense_ms:.4g} ms{'; ' + NO_FURTHER_RETRY if NO_FURTHER_RETRY in run.notes else ''}"
            "; nothing written (aim lower with --margin, allow more --max-retries, or profile a fresh --table)",
            exit_code=EXIT_BUDGET_MISSED)


def _summary(run: _Run, best: _Attempt) -> dict:
    """Sizes and densities of the chosen model, the mode, and the closing notes."""
    final, alloc = best.model, best.alloc
    summary = {"params_after": final.param_count(), "macs_after": macs(final, run.shapes),
               "densities": {g.name: 1.0 for g in run.groups} | {u: d for u, (_, d) in alloc.choice.items()},
               "kept": {g.name: [len(alloc.keep.get(g.name, range(g.size))), g.size] for g in run.groups},
               "mode": "one-shot" if run.bundle is None else ("admm" if int(run.options.admm_epochs) > 0
                                                              else "finetune")}
    if run.bundle is None:
        run.notes.append("one-shot pruning by weight importance (no --data): no ADMM and no fine-tuning, so expect "
                         "an accuracy drop; pass --data for ADMM + fine-tuning")
    if not alloc.choice:
        run.notes.append("the budget is above the model's estimated latency: nothing was pruned")
    return summary


def _prune_record(run: _Run, best: _Attempt, attempts: list[dict], s: dict) -> dict:
    """The ``prune.alcs`` provenance record (key order is part of the checkpoint bytes). It holds what was
    decided — the budget, the table (by digest), the allocation and its estimate in table ms — and that the
    measured check passed, but not the measured milliseconds: those differ from run to run, and the same
    inputs, seed and table must give a byte-identical checkpoint and ONNX file. The measurements are in the
    command's result (``--json``, a recipe's report.json)."""
    o, row, has_data = run.options, best.row, run.bundle is not None
    params = {"latency_ms": o.latency_ms, "latency_ratio": o.latency_ratio, "budget_table_ms": run.budget_table,
              "pattern": run.pattern, "threads": run.threads, "batch": run.batch,
              "input_shapes": run.input_shapes, "table": _table_summary(run),
              "seed": int(o.seed), "rho": float(o.rho), "admm_epochs": int(o.admm_epochs) if has_data else 0,
              "finetune_epochs": int(o.finetune_epochs) if has_data else 0, "lr": float(o.lr),
              "batch_size": int(o.batch_size), "margin": float(o.margin), "max_retries": int(o.max_retries),
              "min_density": run.floor, "importance": run.importance, "align": int(o.align), "search": bool(o.search),
              "aim_table_ms": run.aim_table, "data": run.data_label, "mode": s["mode"]}
    metrics = {"estimated_table_ms": row["estimated_table_ms"], "densities": s["densities"], "kept": s["kept"],
               "attempt": row["attempt"],
               "attempts": [{"attempt": a["attempt"], "target_table_ms": a["target_table_ms"],
                             "estimated_table_ms": a["estimated_table_ms"]} for a in attempts],
               "params": {"before": run.params_before, "after": s["params_after"]},
               "macs": {"before": run.macs_before, "after": s["macs_after"]}}
    if best.admm is not None:
        metrics["admm"] = [{k: r[k] for k in ("round", "task_loss", "primal_residual", "estimated_ms")}
                           for r in best.admm["rounds"]]
    parity = best.export["checks"]["ort_parity"]
    relative = _relative_budget(run)
    budget = f"{run.budget_ms:g} ms" if relative is None else f"{relative:.6g} x dense measured side by side"
    checks = {"latency": {"budget": budget,
                          "passed": bool(row["passed"])},
              "export": {"ort_parity_rel_error": parity["rel_error"], "passed": parity["passed"]}}
    skipped = {"skipped": list(run.skipped)} if run.skipped else {}
    return record("prune.alcs", PRUNE_VERSION, params, **skipped, input_digest=run.model.digest(), metrics=metrics,
                  checks=checks, output=best.model)


def _table_summary(run: _Run) -> dict:
    """The table as the record names it: its digest and key, not where it was read from (a cache hit and the
    profiling run that filled the cache must record the same thing)."""
    summary = _key_summary(run.T, "file" if run.options.table is not None else "this machine")
    return summary | {"digest": tab.table_digest(run.T)}


def _result(run: _Run, best: _Attempt, attempts: list[dict], s: dict, input_label, t_start: float) -> PruneResult:
    row, final = best.row, best.model
    return PruneResult(
        output=None if run.out is None else str(run.out), input=input_label, arch=run.model.arch,
        budget_ms=run.budget_ms, local_budget_ms=row["budget_ms"],
        budget_from="ms" if run.options.latency_ms else "ratio", latency_ratio=run.options.latency_ratio,
        dense_ms=run.dense_ms, estimated_ms=row["estimated_ms"], measured_ms=row["measured_ms"],
        measured_runs_ms=row["measured_runs_ms"], estimated_table_ms=row["estimated_table_ms"],
        calibration={"table_dense_ms": run.table_dense, "scale": run.scale},
        speedup=(row["dense_side_by_side_ms"] or run.dense_ms) / row["measured_ms"] if row["measured_ms"] > 0 else None,
        min_reachable_ms=run.shown_min, table_foreign=run.foreign,
        params=s["params_after"], macs=s["macs_after"], before={"params": run.params_before, "macs": run.macs_before},
        flop_reduction=run.macs_before / s["macs_after"] if s["macs_after"] else None,
        densities=s["densities"], kept=s["kept"], retries=len(attempts) - 1, attempts=attempts,
        pattern=run.pattern, pattern_chosen="channel", simd=run.simd_info, model_error=row["model_error"],
        mode=s["mode"], admm=best.admm, finetune=best.finetune["metrics"] if best.finetune else None,
        table=_key_summary(run.T, run.source) | {"warnings": list(run.T.get("load_warnings", []))},
        digest=final.digest(), notes=run.notes, skipped=run.skipped, seconds=time.perf_counter() - t_start,
        threads=run.threads, batch=run.batch, input_shapes=run.input_shapes, importance=run.importance,
        floor_check=run.floor_check, search=run.probes,
    )


# ------------------------------------------------------------------------------------------- main

def prune_file(input_path, output, options: PruneOptions, *,
               progress: Callable[[str], None] | None = None) -> PruneResult:
    """Prune ``input_path`` to ``options``' latency budget and write ``output`` (see docs/methods.md#alcs).

    Exit codes via :class:`EdgecError`: ``EXIT_INFEASIBLE`` (4) for a budget below the table's reachable minimum
    (refused before any work), ``EXIT_BUDGET_MISSED`` (5) when every attempt measured over budget; nothing is
    written then. ``options.data`` may also be a ``DataBundle``. ``progress`` takes one-line messages.
    """
    t_start = time.perf_counter()
    run = _load(input_path, output, options, progress or (lambda _m: None))
    best, attempts, summary = _prune(run)
    save_checkpoint(best.model, run.out)
    run.say(f"wrote {run.out}")
    return _result(run, best, attempts, summary, str(Path(input_path)), t_start)


def prune_model(model, options: PruneOptions, *, progress: Callable[[str], None] | None = None,
                input_label: str | None = None) -> tuple:
    """``(pruned Model, PruneResult)``: ``prune_file`` without the files. ``model`` is never modified (the
    pipeline works on a clone); the result's ``output`` is None and its ``input`` is ``input_label``. The same
    exit codes as ``prune_file``."""
    t_start = time.perf_counter()
    run = _setup(model.clone(), options, progress or (lambda _m: None))
    best, attempts, summary = _prune(run)
    return best.model, _result(run, best, attempts, summary, input_label, t_start)


def _prune(run: _Run) -> tuple[_Attempt, list[dict], dict]:
    """Every step between loading and saving; the best attempt carries the ``prune.alcs`` record."""
    dense_proto = _measure_dense(run)
    _latency_table(run, dense_proto)
    _skip_groups(run)
    _score_units(run)
    _plan_budget(run)
    _check_feasible(run)
    _simd_notes(run)
    run.params_before, run.macs_before = run.model.param_count(), macs(run.model, run.shapes)
    attempts, best = _attempts(run)
    _check_met(run, best, attempts)
    summary = _summary(run, best)
    rec = _prune_record(run, best, attempts, summary)
    best.model.provenance = list(best.model.provenance) + [rec]
    return best, attempts, summary


__all__ = ["EXIT_BUDGET_MISSED", "EXIT_INFEASIBLE", "macs", "measure", "prune_file", "prune_model", "simd_report",
           "skipped_groups"]
