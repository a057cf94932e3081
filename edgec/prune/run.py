"""``prune_file``: what ``edgec prune MODEL --latency-ms B`` runs (ALCS under a measured latency budget).

1. Load the checkpoint; export it in memory and **measure** its median latency in onnxruntime (the protocol of
   :mod:`edgec.onnx.session`, at ``threads`` and inputs of the spec's example shape with batch ``batch``).
   ``latency_ratio`` budgets are relative to this measurement.
2. The latency table: ``table`` (a file, e.g. measured on the target device; checked against the model, batch
   and input shapes), else the cached/profiled table of the model's prunable channel groups on this machine
   (:func:`edgec.latency.cache.cached`, ``units="groups"``; patterns ``channel`` plus ``simd:N`` when asked).
3. Calibration. Table and measurement disagree a little (drift, load): ``scale = table dense / measured dense``
   converts local ms to table ms. A budget in ms is local ms when the table was measured on this machine, and
   *device* ms when the table was measured elsewhere (``load_warnings``: other CPU/runtime/threads); then the
   check here is the budget scaled by the same ratio (a relative-speedup check), and the result says so.
4. Feasibility, before any work: a budget below the table's fastest configuration (``min_latency`` over the
   channel pattern, every group at its fastest measured density) is refused with
   ``EdgecError(exit_code=EXIT_INFEASIBLE)`` (4) naming the minimum; nothing is written.
5. Attempts (at most ``1 + max_retries``), each from the dense model: allocation to the target
   (:func:`edgec.prune.alcs.allocate`); with ``data``: ADMM (:func:`edgec.prune.alcs.admm`, ``admm_epochs``
   rounds) whose last allocation gives the kept units; the hard mask is the structural pass
   ``prune.channels`` (physically smaller; it verifies pruned == masked original); with ``data`` a short
   fine-tune (:func:`edgec.train.finetune`, ``finetune_epochs``, keep-best on val); then the verified export
   (:func:`edgec.onnx.export.export`) is measured. A measured median over the local budget is measured once
   more (the lower median counts: load from other processes only adds time; both runs are recorded). Over
   budget: the target is tightened by the measured/estimated ratio (at least 2 %; further until the structure
   changes) and the next attempt starts from the dense model. Without ``data`` the pruning is one-shot by
   importance, with the same allocation (lower quality: nothing recovers the accuracy lost).
6. Success: the checkpoint is written atomically with the provenance records ``prune.channels`` (structural:
   the checkpoint replays), ``finetune`` (with data) and ``prune.alcs`` (budget, pattern, table key, seed, ρ,
   epochs; estimated / measured / dense ms, densities, retries, latency-model error). Still over budget after
   the retries: ``EdgecError(exit_code=EXIT_BUDGET_MISSED)`` (5) with the best measured latency; nothing written.

Patterns: ``channel`` is executed. ``simd:N`` makes the table include the SIMD execution path's measurements
and lets the allocation consider it per unit; the result's ``simd`` entry says per unit whether the table has a
SIMD entry and where it measured faster or slower than channel pruning. edgec has no export path for
SIMD-masked layers inside a whole model yet, so units for which the table says SIMD would pay off are channel
pruned instead and a note says so; where the table shows SIMD slower (the usual case for onnxruntime's MLAS
on x86: the gathered-blocks path loses to a dense MatMul of the same density) the note says that instead.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from edgec.core.errors import EdgecError
from edgec.prune.alcs import EXIT_BUDGET_MISSED, EXIT_INFEASIBLE

PRUNE_VERSION = 1
TIGHTEN_MIN = 0.02  # a retry's target is at least this fraction below the previous one
MEASURE = {"warmup": 5, "repeats": 30, "min_seconds": 0.3}


# ------------------------------------------------------------------------------------------- helpers

def _check_args(latency_ms, latency_ratio, threads, batch, admm_epochs, finetune_epochs, rho, lr, max_retries, margin,
                min_density) -> None:
    problems = []
    if (latency_ms is None) == (latency_ratio is None):
        problems.append("give exactly one of --latency-ms and --latency-ratio")
    if latency_ms is not None and not (isinstance(latency_ms, (int, float)) and math.isfinite(latency_ms)
                                       and latency_ms > 0):
        problems.append(f"--latency-ms must be a number > 0 (got {latency_ms!r})")
    if latency_ratio is not None and not (isinstance(latency_ratio, (int, float)) and 0 < latency_ratio <= 1):
        problems.append(f"--latency-ratio must be in (0, 1] (got {latency_ratio!r})")
    if int(threads) < 1:
        problems.append(f"threads must be >= 1 (got {threads})")
    if int(batch) < 1:
        problems.append(f"batch must be >= 1 (got {batch})")
    if int(admm_epochs) < 0 or int(finetune_epochs) < 0:
        problems.append("epochs must be >= 0")
    if not (float(rho) >= 0 and math.isfinite(rho)):
        problems.append(f"rho must be a finite number >= 0 (got {rho})")
    if not (float(lr) > 0 and math.isfinite(lr)):
        problems.append(f"lr must be a finite number > 0 (got {lr})")
    if int(max_retries) < 0:
        problems.append(f"max_retries must be >= 0 (got {max_retries})")
    if not 0.0 <= float(margin) < 1.0:
        problems.append(f"margin is a fraction of the budget in [0, 1) (got {margin})")
    if min_density is not None and not 0.0 < float(min_density) <= 1.0:
        problems.append(f"min_density must be in (0, 1] (got {min_density})")
    if problems:
        raise EdgecError("; ".join(problems))


def _load_bundle(data, model, data_options):
    from edgec.data import load_data

    if hasattr(data, "split") and hasattr(data, "task"):  # already a DataBundle
        return data, getattr(data, "name", None) or "bundle"
    from edgec.train.job import data_name

    opts = dict(data_options or {})
    if isinstance(model.config.get("n_mels"), int):
        opts.setdefault("n_mels", model.config["n_mels"])
    return load_data(os.fspath(data), **opts), data_name(data)


def measure(onnx_bytes, feed, threads: int, over: float | None = None, options: dict | None = None) -> dict:
    """Median latency of ``onnx_bytes`` (``MEASURE`` protocol). When ``over`` is given and the first median exceeds
    it, measure once more and keep the lower median (interference from other processes only adds time)."""
    from edgec.onnx.session import measure_onnx

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
    from edgec.latency.profile import trace_layers

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



# ------------------------------------------------------------------------------------------- main

def prune_file(model_path, output, *, latency_ms: float | None = None, latency_ratio: float | None = None,
               data=None, table=None, pattern: str = "channel", threads: int = 1, batch: int = 1,
               admm_epochs: int = 3, finetune_epochs: int = 3, rho: float = 1e-3, lr: float = 1e-3,
               batch_size: int = 32, seed: int = 0, max_retries: int = 3, margin: float = 0.0,
               min_density: float | None = None, densities=None, input_shape=None, arch: str | None = None,
               data_options: dict | None = None, profile_options: dict | None = None,
               measure_options: dict | None = None, progress=None) -> dict:
    """Prune ``model_path`` to a latency budget and write ``output`` (module docstring). Returns a plain dict.

    ``latency_ms`` (ms per ``session.run``) or ``latency_ratio`` (fraction of the dense model's measured
    latency): exactly one. ``data``: a data source (as ``edgec finetune --data``) or a ``DataBundle``: enables
    ADMM + fine-tuning; without it the pruning is one-shot. ``table``: a latency table file (``edgec profile``
    with the channel groups as units). ``pattern``: "channel" or "simd:N". ``threads``/``batch``: onnxruntime
    threads and the batch size the latency is measured (and profiled) at; other input dims are the spec's
    example unless ``input_shape`` (``edgec profile --input-shape`` values, e.g. ``["pixels=1x1x32x32"]``) says
    otherwise. ``margin``: aim this fraction below the budget. ``min_density``: no group below this density
    (default: the table's lowest measured one). ``densities``: the profiling grid when a table is measured
    (default ``edgec.latency.profile.DEFAULT_DENSITIES``); ``profile_options`` / ``measure_options``: passed to
    the profiler / the measurement protocol. ``progress``: callable taking one-line messages.
    """
    from edgec.core.fileio import check_output
    from edgec.models.checkpoint import load_checkpoint, save_checkpoint
    from edgec.latency import simd as simd_mod
    from edgec.latency import table as tab
    from edgec.latency.model import LatencyModel
    from edgec.latency.profile import DEFAULT_DENSITIES
    from edgec.latency.shapes import make_inputs, parse_input_shapes, resolve_shapes
    from edgec.latency.cache import cached as cached_table
    from edgec.core.pass_manager import PassManager
    from edgec.onnx.export import export, refuse_scaffolds, to_onnx
    from edgec.passes.prune_channels import PruneChannels
    from edgec.prune import alcs
    from edgec.analysis.groups import analyse

    t_start = time.perf_counter()
    say = progress or (lambda _m: None)
    _check_args(latency_ms, latency_ratio, threads, batch, admm_epochs, finetune_epochs, rho, lr, max_retries, margin,
                min_density)
    threads, batch = int(threads), int(batch)
    kind, n = simd_mod.parse_pattern(pattern)
    pattern = simd_mod.pattern_name(kind, n)
    model_path = Path(model_path)
    out = check_output(output, model_path)
    notes: list[str] = []

    model = load_checkpoint(model_path, arch=arch)
    model.gm.eval()
    refuse_scaffolds(model)
    bundle, data_label = _load_bundle(data, model, data_options) if data is not None else (None, None)
    if isinstance(input_shape, str):
        input_shape = [input_shape]
    given = parse_input_shapes(model.spec, input_shape) if input_shape else None
    shapes = resolve_shapes(model.spec, given, batch)
    feed = make_inputs(model.spec, shapes, seed=0)

    # 1. dense latency, measured
    say("exporting and measuring the dense model")
    dense_proto = to_onnx(model)
    dense_meas = measure(dense_proto.SerializeToString(), feed, threads, options=measure_options)
    dense_ms = dense_meas["median_ms"]

    # 2. latency table
    patterns = ["channel"] + ([pattern] if kind == "simd" else [])
    if table is not None:
        say(f"reading the latency table {Path(table).name}")
        T = tab.load_table(table, model, threads=threads, shapes=shapes)
        source = f"file:{Path(table).name}"
        for w in T.get("load_warnings", []):
            notes.append(w)
        if kind == "simd" and not any(pattern in u["patterns"] for u in T["units"]):
            notes.append(f"the latency table has no {pattern} measurements; SIMD was not considered "
                         f"(profile with patterns channel,{pattern})")
    else:
        say("profiling the channel groups (cached when the key matches)")
        T = cached_table(model, threads, shapes, batch=batch, units="groups",
                       densities=DEFAULT_DENSITIES if densities is None else densities, patterns=patterns,
                       progress=lambda m: say(f"profile: {m}"), dense_onnx=dense_proto, **(profile_options or {}))
        source = "cache" if T.get("_cache", {}).get("hit") else "profiled"
    lm = LatencyModel(T)
    analysis = analyse(model)
    groups = alcs.table_groups(lm, analysis)
    foreign = bool(T.get("load_warnings"))
    table_dense = lm.dense
    scale = table_dense / dense_ms  # table ms per local ms

    # 3. budget in local and table ms
    if latency_ms is not None:
        budget_ms = float(latency_ms)
        if foreign:
            budget_table, budget_local = budget_ms, budget_ms / scale
            notes.append(f"the latency table was measured elsewhere: the budget {budget_ms:g} ms applies to the "
                         f"table's device; here the pruned model must measure <= {budget_local:.4g} ms (budget x "
                         f"dense here / dense on the device = {1 / scale:.3g})")
        else:
            budget_local, budget_table = budget_ms, budget_ms * scale
    else:
        budget_local, budget_table = float(latency_ratio) * dense_ms, float(latency_ratio) * table_dense
        budget_ms = budget_table if foreign else budget_local

    # 4. feasibility (before any work)
    floor = None if min_density is None else float(min_density)
    min_table = lm.min_latency(["channel"], floor=floor)
    min_local = min_table / scale
    shown_min = min_table if foreign else min_local
    if budget_table < min_table - 1e-12:
        raise EdgecError(
            f"latency budget {budget_ms:.4g} ms is infeasible: the fastest configuration the latency table reaches "
            f"(every channel group at its fastest measured density"
            + (f" >= {floor:g}" if floor is not None else "") + f") is {shown_min:.4g} ms "
            f"(dense {dense_ms:.4g} ms measured{' here' if foreign else ''}); nothing written",
            exit_code=EXIT_INFEASIBLE)

    # SIMD: consider it per unit when the table has it; we can only execute channel pruning
    exec_patterns = ["channel"]
    simd_info = None
    if kind == "simd":
        simd_info = simd_report(lm, groups, pattern)
        if not simd_info["units_with_entry"]:
            notes.append(f"{pattern} not chosen: no unit has a SIMD entry in the latency table "
                         "(its producers are not Linear / 1x1 conv)")
        elif not simd_info["faster_units"]:
            notes.append(f"{pattern} not chosen for any layer: the latency table measured the SIMD path slower than "
                         f"channel pruning at every density on {'its device' if foreign else 'this CPU'} "
                         f"({T['key'].get('cpu')}, onnxruntime {T['key'].get('runtime_version')})"
                         + (f" (e.g. {simd_info['examples'][0]})" if simd_info["examples"] else ""))
        else:
            try:
                trial = alcs.allocate(lm, model, max(budget_table * (1 - margin), min_table),
                                      patterns=["channel", pattern], analysis=analysis, min_density=floor)
                chose = [u for u, (p, _) in trial.choice.items() if p == pattern]
            except EdgecError:
                chose = []
            if chose:
                notes.append(f"the latency table says {pattern} would pay off for {', '.join(chose)}; edgec cannot "
                             "export SIMD-masked layers inside a whole model yet, so they were channel-pruned instead")
            else:
                faster = ", ".join(simd_info["faster_units"])
                notes.append(f"{pattern} measured faster than channel pruning for {faster} at some densities, but "
                             "the allocation preferred channel pruning everywhere")
        simd_info["chosen"] = False

    # 5. attempts
    params_before = model.param_count()
    macs_before = macs(model, shapes)
    target = max(budget_table * (1.0 - float(margin)), min_table)
    attempts: list[dict] = []
    best = None
    prev_sig = None
    for attempt in range(int(max_retries) + 1):
        alloc0 = alcs.allocate(lm, model, target, patterns=exec_patterns, analysis=analysis, min_density=floor)
        while prev_sig is not None and alloc0.signature() == prev_sig and target > min_table + 1e-12:
            target = max(min_table, target * (1.0 - TIGHTEN_MIN))
            alloc0 = alcs.allocate(lm, model, target, patterns=exec_patterns, analysis=analysis, min_density=floor)
        if prev_sig is not None and alloc0.signature() == prev_sig:
            notes.append("the allocation is already at the table's fastest configuration; no further retry possible")
            break
        prev_sig = alloc0.signature()
        say(f"attempt {attempt + 1}: target {target / scale:.4g} ms (estimate {alloc0.estimated_ms / scale:.4g} ms), "
            f"{len(alloc0.choice)} group(s) pruned")
        t_attempt = time.perf_counter()
        admm_info = None
        ft_record = None
        work = model
        alloc = alloc0
        if bundle is not None and alloc0.choice and int(admm_epochs) > 0:
            res = alcs.admm(model, bundle, lm, target, patterns=exec_patterns, epochs=int(admm_epochs), rho=float(rho),
                            lr=float(lr), batch_size=int(batch_size), seed=int(seed), min_density=floor,
                            progress=say)
            work, alloc = res.model, res.allocation
            admm_info = {"rounds": res.history, "seconds": res.seconds}
        pm = PassManager([PruneChannels(keep=alloc.keep)])
        pruned, records = pm(work)
        if bundle is not None and alloc.choice and int(finetune_epochs) > 0:
            from edgec.train.loop import finetune
            from edgec.train.record import finetune_record

            say(f"fine-tuning the pruned model ({finetune_epochs} epoch(s))")
            tuned, report = finetune(pruned, bundle, epochs=int(finetune_epochs), lr=float(lr),
                                     batch_size=int(batch_size), seed=int(seed))
            ft_record = finetune_record(pruned.digest(), tuned, report, {
                "epochs": int(finetune_epochs), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
                "data": data_label, "data_digest": getattr(bundle, "digest", None), "after": "prune.channels"})
            tuned.provenance = list(pruned.provenance) + [ft_record]
            pruned = tuned
        say("exporting (verified) and measuring the pruned model")
        onnx_bytes, export_record = export(pruned)
        meas = measure(onnx_bytes, feed, threads, over=budget_local, options=measure_options)
        measured = meas["median_ms"]
        est_local = alloc.estimated_ms / scale
        row = {"attempt": attempt + 1, "target_ms": target / scale, "estimated_ms": est_local,
               "estimated_table_ms": alloc.estimated_ms, "measured_ms": measured, "measured_runs_ms": meas["runs_ms"],
               "p10_ms": meas["p10_ms"], "p90_ms": meas["p90_ms"],
               "model_error": (est_local - measured) / measured if measured > 0 else None,
               "densities": {u: round(d, 6) for u, (_, d) in alloc.choice.items()},
               "seconds": time.perf_counter() - t_attempt}
        attempts.append(row)
        say(f"attempt {attempt + 1}: measured {measured:.4g} ms (estimated {est_local:.4g}, budget "
            f"{budget_local:.4g})")
        if best is None or measured < best["row"]["measured_ms"]:
            best = {"row": row, "model": pruned, "alloc": alloc, "admm": admm_info, "export": export_record,
                    "records": records, "finetune": ft_record}
        if measured <= budget_local:
            break
        if attempt == int(max_retries):
            break
        ratio = measured / est_local if est_local > 0 else 1.0
        wanted = budget_table * (1.0 - float(margin)) / ratio
        new_target = max(min_table, min(wanted, target * (1.0 - TIGHTEN_MIN)))
        if new_target >= target - 1e-12:
            notes.append("the allocation is already at the table's fastest configuration; no further retry possible")
            break
        target = new_target

    chosen = best
    if chosen["row"]["measured_ms"] > budget_local:
        b = chosen["row"]
        raise EdgecError(
            f"latency budget missed: the best pruned model measured {b['measured_ms']:.4g} ms (estimated "
            f"{b['estimated_ms']:.4g} ms, attempt {b['attempt']} of {len(attempts)}) against a budget of "
            f"{budget_local:.4g} ms{' (scaled from the device budget)' if foreign else ''}; "
            f"dense measures {dense_ms:.4g} ms; nothing written", exit_code=EXIT_BUDGET_MISSED)

    # 6. write
    final, alloc, row = chosen["model"], chosen["alloc"], chosen["row"]
    params_after = final.param_count()
    macs_after = macs(final, shapes)
    densities_out = {g.name: 1.0 for g in groups} | {u: d for u, (_, d) in alloc.choice.items()}
    kept = {g.name: [len(alloc.keep.get(g.name, range(g.size))), g.size] for g in groups}
    model_error = row["model_error"]
    mode = "one-shot" if bundle is None else ("admm" if int(admm_epochs) > 0 else "finetune")
    if bundle is None:
        notes.append("one-shot pruning by weight importance (no --data): no ADMM and no fine-tuning, so expect an "
                     "accuracy drop; pass --data for ADMM + fine-tuning")
    if not alloc.choice:
        notes.append("the budget is above the model's estimated latency: nothing was pruned")
    record = {
        "pass": "prune.alcs", "version": PRUNE_VERSION,
        "params": {"budget_ms": budget_ms, "local_budget_ms": budget_local, "latency_ms": latency_ms,
                   "latency_ratio": latency_ratio, "pattern": pattern, "threads": threads, "batch": batch,
                   "input_shapes": {k: list(v) for k, v in shapes.items()}, "table": _key_summary(T, source),
                   "seed": int(seed), "rho": float(rho),
                   "admm_epochs": int(admm_epochs) if bundle is not None else 0,
                   "finetune_epochs": int(finetune_epochs) if bundle is not None else 0, "lr": float(lr),
                   "batch_size": int(batch_size), "margin": float(margin), "max_retries": int(max_retries),
                   "min_density": floor, "data": data_label, "mode": mode},
        "input_digest": model.digest(),
        "metrics": {"dense_ms": dense_ms, "estimated_ms": row["estimated_ms"], "measured_ms": row["measured_ms"],
                    "measured_runs_ms": row["measured_runs_ms"], "estimated_table_ms": row["estimated_table_ms"],
                    "densities": densities_out, "kept": kept, "retries": len(attempts) - 1,
                    "attempts": [{k: a[k] for k in ("attempt", "target_ms", "estimated_ms", "measured_ms")}
                                 for a in attempts],
                    "model_error": model_error, "calibration": {"table_dense_ms": table_dense, "scale": scale},
                    "params": {"before": params_before, "after": params_after},
                    "macs": {"before": macs_before, "after": macs_after}},
        "checks": {"latency": {"measured_ms": row["measured_ms"], "budget_ms": budget_local,
                               "passed": row["measured_ms"] <= budget_local},
                   "export": {"ort_parity_rel_error": chosen["export"]["checks"]["ort_parity"]["rel_error"],
                              "passed": chosen["export"]["checks"]["ort_parity"]["passed"]}},
    }
    if chosen["admm"] is not None:
        record["metrics"]["admm"] = [{k: r[k] for k in ("round", "task_loss", "primal_residual", "estimated_ms")}
                                     for r in chosen["admm"]["rounds"]]
    final.provenance = list(final.provenance) + [record]
    record["output_digest"] = final.digest()
    save_checkpoint(final, out)
    say(f"wrote {out}")

    result = {
        "output": str(out), "input": str(model_path), "arch": model.arch,
        "budget_ms": budget_ms, "local_budget_ms": budget_local, "budget_from": "ms" if latency_ms else "ratio",
        "latency_ratio": latency_ratio, "dense_ms": dense_ms, "estimated_ms": row["estimated_ms"],
        "measured_ms": row["measured_ms"], "measured_runs_ms": row["measured_runs_ms"],
        "estimated_table_ms": row["estimated_table_ms"], "calibration": {"table_dense_ms": table_dense, "scale": scale},
        "speedup": dense_ms / row["measured_ms"] if row["measured_ms"] > 0 else None,
        "min_reachable_ms": shown_min, "table_foreign": foreign,
        "params_before": params_before, "params_after": params_after,
        "macs_before": macs_before, "macs_after": macs_after,
        "flop_reduction": macs_before / macs_after if macs_after else None,
        "densities": densities_out, "kept": kept, "retries": len(attempts) - 1, "attempts": attempts,
        "pattern": pattern, "pattern_chosen": "channel", "simd": simd_info, "model_error": model_error,
        "mode": mode, "admm": chosen["admm"],
        "finetune": chosen["finetune"]["metrics"] if chosen["finetune"] else None,
        "table": _key_summary(T, source) | {"warnings": list(T.get("load_warnings", []))},
        "digest": final.digest(), "notes": notes, "seconds": time.perf_counter() - t_start,
        "threads": threads, "batch": batch, "input_shapes": {k: list(v) for k, v in shapes.items()},
    }
    return result


__all__ = ["EXIT_BUDGET_MISSED", "EXIT_INFEASIBLE", "macs", "measure", "prune_file", "simd_report"]
