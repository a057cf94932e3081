"""Quality gates: limits a release artifact must meet before edgec writes it where it was asked to.

``--min-metric uar=0.85`` (a task metric on the data's test split, else val), ``--max-metric-drop 0.02`` (the
same metrics against the input model, same data and split), ``--max-latency-ms`` (median onnxruntime latency
of the exported graph) and ``--max-size-kb`` (the file written). ``prune`` and ``export`` check them on their
own artifact, a recipe's ``[gates]`` table on its last artifact. A failed gate raises ``GateFailed`` (exit 1)
and the artifact goes to ``<output>.rejected`` instead of ``<output>`` (docs/release.md).

Torch-free at import (recipes parse gates on a dry run); measuring imports the heavy layers when it runs.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from edgec.core.errors import EdgecError, GateFailed, first_line

# metric -> the tasks that measure it (a causal LM's accuracy is next-token top-1)
HIGHER_IS_BETTER = {"accuracy": ("classification", "causal_lm"), "uar": ("classification",),
                    "macro_f1": ("classification",), "ccc": ("regression",),
                    "map": ("detection",), "map50": ("detection",), "map75": ("detection",)}
LOWER_IS_BETTER = ("mae", "rmse", "loss", "perplexity", "bits_per_byte")
# The metric --max-metric-drop compares. For a causal LM it is next-token top-1 accuracy: a drop in a fraction,
# like the classifiers' UAR (perplexity is unbounded and lower-is-better, so a "drop" in it has no fixed scale).
PRIMARY = {"classification": "uar", "regression": "ccc", "causal_lm": "accuracy", "detection": "map"}
KIB = 1024
LARGE_DROP = 0.05  # a measured primary-metric drop above this is "large damage"
LARGE_DISAGREEMENT = 0.10  # one-shot estimate: more than this fraction of changed top-1 predictions
LARGE_OUTPUT_CHANGE = 0.30  # ... or a relative output change above this
REJECTED_SUFFIX = ".rejected"


@dataclass(frozen=True)
class Gates:
    """Parsed, validated gate limits (``None`` / empty: not asked)."""

    min_metric: dict = field(default_factory=dict)  # {metric: minimum}
    max_metric_drop: float | None = None
    max_latency_ms: float | None = None
    max_size_kb: float | None = None

    @property
    def empty(self) -> bool:
        return not self.min_metric and self.max_metric_drop is None and self.max_latency_ms is None \
            and self.max_size_kb is None

    @property
    def needs_data(self) -> bool:
        return bool(self.min_metric) or self.max_metric_drop is not None

    def drop_metrics(self, task: str) -> list[str]:
        """The metrics ``max_metric_drop`` applies to: those of ``min_metric``, else the task's primary one."""
        return list(self.min_metric) or [PRIMARY.get(task, "uar")]

    def describe(self) -> dict:
        return {"min_metric": dict(self.min_metric), "max_metric_drop": self.max_metric_drop,
                "max_latency_ms": self.max_latency_ms, "max_size_kb": self.max_size_kb}


# --- parsing ---------------------------------------------------------------------------------------------

def _number(value, label: str, *, low: float | None = None, high: float | None = None, positive=False) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise EdgecError(f"{label} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EdgecError(f"{label} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise EdgecError(f"{label} must be > 0, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise EdgecError(f"{label} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _metric_items(value, label: str) -> list[tuple[str, object]]:
    """``["uar=0.85", ...]``, one such string, or a table ``{uar = 0.85}`` as (name, value) pairs."""
    if isinstance(value, dict):
        return list(value.items())
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise EdgecError(f"{label} takes NAME=VALUE (e.g. uar=0.85), got {value!r}")
    pairs = []
    for item in items:
        name, sep, number = str(item).partition("=")
        if not isinstance(item, str) or not sep or not name.strip():
            raise EdgecError(f"{label} takes NAME=VALUE (e.g. uar=0.85), got {item!r}")
        pairs.append((name.strip(), number))
    return pairs


def _min_metric(value, label: str) -> dict:
    out = {}
    for name, number in _metric_items(value, label):
        if name in LOWER_IS_BETTER:
            raise EdgecError(f"{label} {name}: {name} is lower-is-better; a minimum applies to "
                             f"{', '.join(HIGHER_IS_BETTER)}")
        if name not in HIGHER_IS_BETTER:
            raise EdgecError(f"{label}: unknown metric {name!r}; one of {', '.join(HIGHER_IS_BETTER)}")
        if name in out:
            raise EdgecError(f"{label}: {name} is given twice")
        low = -1.0 if name == "ccc" else 0.0
        out[name] = _number(number, f"{label} {name}", low=low, high=1.0)
    return out


def parse(min_metric=None, max_metric_drop=None, max_latency_ms=None, max_size_kb=None, *,
          where: str = "") -> Gates:
    """Validate gate values from the CLI, a recipe or the Python API; every problem is one EdgecError line.
    ``where`` prefixes the option names (e.g. ``"recipe.toml [gates] "``)."""
    return Gates(
        min_metric=_min_metric(min_metric, f"{where}min_metric") if min_metric not in (None, [], {}) else {},
        max_metric_drop=None if max_metric_drop is None else _number(max_metric_drop, f"{where}max_metric_drop",
                                                                     low=0.0, high=2.0),
        max_latency_ms=None if max_latency_ms is None else _number(max_latency_ms, f"{where}max_latency_ms",
                                                                   positive=True),
        max_size_kb=None if max_size_kb is None else _number(max_size_kb, f"{where}max_size_kb", positive=True))


def from_options(options) -> Gates:
    """The gates of a ``PruneOptions`` / ``ExportOptions``."""
    return parse(getattr(options, "min_metric", None), getattr(options, "max_metric_drop", None),
                 getattr(options, "max_latency_ms", None), getattr(options, "max_size_kb", None))


def require_data(gates: Gates, data, command: str) -> None:
    """Metric gates need data to score on: refuse before any work."""
    if gates.needs_data and data is None:
        raise EdgecError(f"{command}: --min-metric / --max-metric-drop need --data (the metric is measured on "
                         "its test split, else val); without data the gate cannot pass")


def check_task(gates: Gates, task: str, command: str) -> None:
    """A metric of another task (``ccc`` for a classifier) can never be measured: refuse before any work."""
    wrong = [name for name in gates.min_metric if task not in HIGHER_IS_BETTER[name]]
    if wrong and task in PRIMARY:
        raise EdgecError(f"{command}: --min-metric {wrong[0]} is a {' / '.join(HIGHER_IS_BETTER[wrong[0]])} metric but the "
                         f"model's task is {task}")


# --- judging ---------------------------------------------------------------------------------------------

@dataclass
class Measured:
    """What was measured on the artifact (``None``: not measured)."""

    evaluation: dict | None = None  # edgec.evaluation result of the artifact (metrics, split, data digest)
    baseline: dict | None = None  # the same for the input model
    latency_ms: float | None = None
    latency_runs_ms: list | None = None
    machine: dict | None = None
    file_bytes: int | None = None

    def summary(self) -> dict:
        ev, base = self.evaluation or {}, self.baseline or {}
        return {"data": ev.get("data"), "data_digest": ev.get("data_digest"), "split": ev.get("split"),
                "n": ev.get("n"), "metrics": ev.get("metrics"), "baseline_metrics": base.get("metrics"),
                "latency_ms": self.latency_ms, "latency_runs_ms": self.latency_runs_ms, "machine": self.machine,
                "file_bytes": self.file_bytes}


def _row(gate: str, metric: str | None, limit: float, value, margin) -> dict:
    ok = value is not None and margin is not None and math.isfinite(value) and margin >= 0
    return {"gate": gate, "metric": metric, "limit": limit, "value": value, "margin": margin, "passed": bool(ok)}


def _metric(ev: dict | None, name: str, what: str):
    metrics = (ev or {}).get("metrics") or {}
    if name not in metrics:
        have = ", ".join(k for k in metrics if k != "loss") or "none"
        raise EdgecError(f"gate metric {name!r} is not measured for {(ev or {}).get('task', 'this')} data "
                         f"({what} has: {have})")
    return float(metrics[name])


def metric_rows(gates: Gates, m: Measured) -> list[dict]:
    rows = []
    for name, limit in gates.min_metric.items():
        value = _metric(m.evaluation, name, "the artifact")
        rows.append(_row("min_metric", name, limit, value, value - limit))
    if gates.max_metric_drop is not None:
        for name in gates.drop_metrics((m.evaluation or {}).get("task", "classification")):
            value = _metric(m.evaluation, name, "the artifact")
            before = _metric(m.baseline, name, "the input model")
            drop = before - value
            row = _row("max_metric_drop", name, gates.max_metric_drop, drop, gates.max_metric_drop - drop)
            rows.append(row | {"baseline": before, "artifact": value})
    return rows


def judge(gates: Gates, m: Measured) -> dict:
    """Every gate against what was measured: ``{passed, failed, checks: [{gate, metric, limit, value, margin,
    passed}], measured}``. ``margin`` >= 0 passes; negative is by how much the gate was missed."""
    rows = metric_rows(gates, m)
    if gates.max_latency_ms is not None:
        rows.append(_row("max_latency_ms", None, gates.max_latency_ms, m.latency_ms,
                         None if m.latency_ms is None else gates.max_latency_ms - m.latency_ms))
    if gates.max_size_kb is not None:
        kb = None if m.file_bytes is None else m.file_bytes / KIB
        rows.append(_row("max_size_kb", None, gates.max_size_kb, kb, None if kb is None else gates.max_size_kb - kb))
    failed = [describe_row(r) for r in rows if not r["passed"]]
    return {"passed": not failed, "failed": failed, "checks": rows, "measured": m.summary()}


def describe_row(r: dict) -> str:
    """One failed gate in words: which gate and by how much."""
    v, lim, margin = r["value"], r["limit"], r["margin"]
    if v is None or margin is None or not math.isfinite(v):
        return f"{r['gate']} {r['metric'] or ''}: not measurable ({v!r})".replace("  ", " ")
    if r["gate"] == "min_metric":
        return f"{r['metric']} {v:.4g} < {lim:g} (short by {-margin:.4g})"
    if r["gate"] == "max_metric_drop":
        return (f"{r['metric']} dropped {v:.4g} ({r['baseline']:.4g} → {r['artifact']:.4g}) > {lim:g} "
                f"(over by {-margin:.4g})")
    if r["gate"] == "max_latency_ms":
        return f"latency {v:.4g} ms > {lim:g} ms (over by {-margin:.4g} ms)"
    return f"size {v:.4g} KiB > {lim:g} KiB (over by {-margin:.4g} KiB)"


def rejected_path(output: str | Path) -> Path:
    out = Path(output)
    return out.with_name(out.name + REJECTED_SUFFIX)


def refuse(report: dict, output: str | Path | None, rejected: Path | None) -> GateFailed:
    """The exception for a failed gate report (the artifact already went to ``rejected``)."""
    name = None if output is None else Path(output).name
    if name is None:
        where = "nothing was written"
    elif rejected is not None:
        where = f"the artifact was written to {rejected.name} instead; {name} was not written"
    else:
        where = f"{name} was not written"
    report["rejected"] = None if rejected is None else str(rejected)
    return GateFailed(f"gate failed: {'; '.join(report['failed'])}; {where}", report,
                      None if rejected is None else str(rejected))


# --- measuring ---------------------------------------------------------------------------------------------

def is_bundle(data) -> bool:
    return hasattr(data, "split") and hasattr(data, "task")


def score(target, bundle, split: str | None = "test", ort_config: dict | None = None) -> dict:
    """The eval protocol's metrics of ``target`` (a Model, or ONNX bytes run in a session with ``ort_config``)
    on ``bundle``, without latency."""
    from edgec.evaluation import evaluate_model

    return evaluate_model(target, bundle, split=split, latency=False, ort_config=ort_config)


def onnx_latency(onnx_bytes: bytes, spec, threads: int, over: float | None) -> tuple[float, list, dict]:
    """(median ms, runs, machine key) of an ONNX graph on the spec's example inputs at batch 1, with the
    pruning measurement protocol (a second run when the first is over ``over``: noise only adds time)."""
    from edgec.latency.shapes import make_inputs, resolve_shapes
    from edgec.onnx.session import machine_key
    from edgec.prune.run import measure

    feed = make_inputs(spec, resolve_shapes(spec, None, 1), seed=0)
    meas = measure(onnx_bytes, feed, int(threads), over=over)
    return meas["median_ms"], meas["runs_ms"], machine(machine_key(int(threads)))


def machine(key: dict) -> dict:
    """A machine key without what varies between runs on one machine (the usable cores follow affinity)."""
    return {k: v for k, v in key.items() if k != "usable_cores"}


def load_model_data(data, model, options=None):
    """The data a model's gates score on: a DataBundle as it is, else loaded the way ``edgec eval`` loads it
    for this model (features as fine-tuned); ``options`` (DataOptions) override n_mels / frames / val_fraction."""
    from edgec.evaluation import load_eval_data

    if is_bundle(data):
        return data
    kwargs = options.to_kwargs() if options is not None else {}
    bundle, _, _ = load_eval_data(os.fspath(data), model.config or {}, model.provenance, **kwargs)
    return bundle


# --- export -----------------------------------------------------------------------------------------------

def measure_export(model, onnx_bytes: bytes, bundle, gates: Gates, threads: int,
                   ort_config: dict | None = None) -> Measured:
    """Score the exported file on the data (when given: the card reports it too; in a session with
    ``ort_config``, the one the file targets), the input model on the same split for ``max_metric_drop``, and
    time the file for ``max_latency_ms``. The size is measured last, on the final bytes (edgec.app.card.attach)."""
    m = Measured()
    if bundle is not None:
        m.evaluation = score(onnx_bytes, bundle, ort_config=ort_config)
        if gates.max_metric_drop is not None:
            m.baseline = score(model, bundle, split=m.evaluation["split"])
        metric_rows(gates, m)  # an unknown metric for this task: exit 2 here, not a failed gate
    if gates.max_latency_ms is not None:
        m.latency_ms, m.latency_runs_ms, m.machine = onnx_latency(onnx_bytes, model.spec, threads,
                                                                  gates.max_latency_ms)
    return m


def decide_size(gates: Gates, m: Measured):
    """For edgec.app.card.attach: at a final file size, ``(card size entry, card gate rows, gate report or
    None)``; the size gate is judged on the bytes that are written, card included."""
    from edgec.app.card import card_gates

    def decide(file_bytes: int):
        m.file_bytes = int(file_bytes)
        report = None if gates.empty else judge(gates, m)
        return {"file_bytes": int(file_bytes)}, card_gates(report), report
    return decide


def write_or_reject(output: Path, data: bytes, report: dict | None) -> None:
    """Write ``data`` to ``output`` when every gate passed, else to ``<output>.rejected`` and raise."""
    from edgec.core.fileio import atomic_write

    if report is None or report["passed"]:
        atomic_write(output, data)
        return
    rejected = rejected_path(output)
    atomic_write(rejected, data)
    raise refuse(report, output, rejected)


# --- prune -------------------------------------------------------------------------------------------------

def checkpoint_bytes(model) -> int:
    """The size of the checkpoint ``model`` saves as (written to a private temporary folder, never beside the
    output, so an interrupted run leaves nothing there)."""
    import tempfile

    from edgec.models.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory(prefix="edgec-size-") as tmp:
        path = Path(tmp) / "model.pt"
        save_checkpoint(model, path)
        return path.stat().st_size


def estimate_damage(dense, pruned, n: int = 64) -> dict:
    """Without data: how much the pruned model's outputs moved on ``n`` random inputs of the model's spec.
    Only an estimate (random inputs are not the task's data); ``large`` flags likely accuracy damage."""
    inputs = dense.spec.sample(seed=0, batch=n)
    a, b = dense.run(inputs)[0].double(), pruned.run(inputs)[0].double()
    change = float((a - b).norm() / a.norm().clamp_min(1e-12))
    agree = None
    if dense.spec.task == "classification" and a.ndim == 2 and a.shape == b.shape:
        agree = float((a.argmax(-1) == b.argmax(-1)).double().mean())
    large = change > LARGE_OUTPUT_CHANGE or (agree is not None and 1.0 - agree > LARGE_DISAGREEMENT)
    return {"measured": False, "method": "random inputs", "n": int(a.shape[0]), "top1_agreement": agree,
            "rel_output_change": change, "large": bool(large)}


def measured_damage(m: Measured, task: str) -> dict:
    """With data: the primary metric of the input and the pruned model on the same split."""
    name = PRIMARY.get(task, "uar")
    before = _metric(m.baseline, name, "the input model")
    after = _metric(m.evaluation, name, "the pruned model")
    return {"measured": True, "method": f"{m.evaluation['split']} split of {m.evaluation['data']}", "metric": name,
            "before": before, "after": after, "drop": before - after, "large": bool(before - after > LARGE_DROP)}


def damage_note(damage: dict) -> str:
    if "error" in damage:
        return f"accuracy damage not measured: {damage['error']}"
    if damage["measured"]:
        text = (f"{damage['metric']} {damage['before']:.4g} → {damage['after']:.4g} on the "
                f"{damage['method']} (drop {damage['drop']:.4g})")
        return f"WARNING: pruning damaged accuracy: {text}" if damage["large"] else f"accuracy: {text}"
    agree = damage["top1_agreement"]
    moved = (f"on {damage['n']} random inputs the pruned model's outputs changed by "
             f"{damage['rel_output_change']:.0%}" + ("" if agree is None else
                                                     f" and its top-1 agrees with the input model's on {agree:.0%}"))
    if damage["large"]:
        return (f"WARNING: one-shot pruning without --data; accuracy damage is unmeasured and likely large: {moved}. "
                "Pass --data (ADMM + fine-tuning, measured damage) and gate the release with --min-metric")
    return f"one-shot pruning without --data; accuracy damage is unmeasured ({moved})"


def _damage(dense, pruned, options, gates: Gates, m: Measured) -> dict:
    """Measured on the data when there is data, else estimated. Without metric gates a measurement that
    fails (data that cannot be scored) is a note: the pruned model is still written."""
    if options.data is None:
        return estimate_damage(dense, pruned)
    try:
        bundle = load_model_data(options.data, dense, options.data_options)
        m.evaluation = score(pruned, bundle)
        m.baseline = score(dense, bundle, split=m.evaluation["split"])
        return measured_damage(m, m.evaluation["task"])
    except EdgecError as exc:
        if gates.needs_data:
            raise
        m.evaluation = m.baseline = None
        return {"measured": False, "method": "data", "error": first_line(exc), "large": False}


def check_pruned(dense, pruned, result, options, gates: Gates) -> tuple[dict | None, dict, int | None]:
    """(gate report or None, damage, checkpoint bytes or None) of a pruned model against its input."""
    m = Measured()
    damage = _damage(dense, pruned, options, gates, m)
    if gates.max_latency_ms is not None:  # the same measurement of the exported pruned graph as the budget's
        m.latency_ms, m.latency_runs_ms = result.measured_ms, list(result.measured_runs_ms)
        m.machine = machine(_machine_key(result.threads))
    if gates.max_size_kb is not None:
        m.file_bytes = checkpoint_bytes(pruned)
    return (None if gates.empty else judge(gates, m)), damage, m.file_bytes


def _machine_key(threads: int) -> dict:
    from edgec.onnx.session import machine_key

    return machine_key(int(threads))


def release_pruned(dense, pruned, result, output: Path | None, options, progress=None):
    """Damage, gates, then the checkpoint: to ``output`` when the gates pass, else to ``<output>.rejected``
    (GateFailed, exit 1). ``output`` None (the Python API): nothing is written, a failed gate still raises.
    Returns the PruneResult with ``output``, ``gates``, ``damage`` and the damage note filled in."""
    from dataclasses import replace

    from edgec.models.checkpoint import save_checkpoint

    gates = from_options(options)
    report, damage, _ = check_pruned(dense, pruned, result, options, gates)
    note = damage_note(damage)
    if progress is not None and damage["large"]:
        progress(note)
    passed = report is None or report["passed"]
    target = output if passed or output is None else rejected_path(output)
    if target is not None:
        save_checkpoint(pruned, target)
        if progress is not None:
            progress(f"wrote {target}")
    if not passed:
        raise refuse(report, output, target)
    return replace(result, output=None if output is None else str(output), gates=report, damage=damage,
                   notes=list(result.notes) + [note])


# --- recipes ----------------------------------------------------------------------------------------------

RECIPE_KEYS = ("min_metric", "max_metric_drop", "max_latency_ms", "max_size_kb", "artifact", "data", "baseline",
               "arch", "threads")


@dataclass(frozen=True)
class RecipeGates:
    """A recipe's ``[gates]`` table, checked after its last step (paths as written, relative to the output
    folder unless absolute)."""

    gates: Gates
    artifact: str  # default: the last step's output
    data: str | None
    baseline: str | None  # for max_metric_drop; default: the first step's input
    arch: str | None  # loads checkpoints of a user architecture; default: the last step's arch
    threads: int
    raw: dict  # as written (reported)


def _is_entry_point(value: str) -> bool:
    module, sep, func = value.partition(":")
    return bool(sep) and func.isidentifier() and all(p.isidentifier() for p in module.split("."))


def _resolve(value: str, out_dir: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else Path(out_dir) / path


def _last_param(steps, key: str, reverse: bool) -> str | None:
    for step in (reversed(steps) if reverse else steps):
        value = step.params.get(key)
        if isinstance(value, str):
            return value
    return None


def _recipe_paths(table: dict, where: str, steps) -> tuple[str, str | None, str | None]:
    for key in ("artifact", "data", "baseline", "arch"):
        if key in table and not isinstance(table[key], str):
            raise EdgecError(f"{where}: '{key}' must be a string, got {table[key]!r}")
    artifact = table.get("artifact") or _last_param(steps, "output", reverse=True)
    if artifact is None:
        raise EdgecError(f"{where}: no step writes an output; name the file to gate with 'artifact'")
    baseline = table.get("baseline") or _last_param(steps, "input", reverse=False)
    return artifact, table.get("data"), baseline


def _check_exists(where: str, key: str, value: str | None, out_dir: Path, produced: set) -> None:
    if value is None or (key == "data" and _is_entry_point(value)):
        return
    path = _resolve(value, out_dir)
    if str(path) not in produced and not path.exists():
        raise EdgecError(f"{where}: {key} '{value}' does not exist and no step writes it")


def parse_recipe(table, where: str, steps, out_dir: Path, recipe_dir: str) -> RecipeGates | None:
    """Validate a recipe's ``[gates]`` table (dry runs too): known keys, values, and files that exist or that
    a step writes. ``steps``: the plan's steps (``.params``, ``{recipe_dir}`` already substituted)."""
    from edgec.app.params import FILE_OUTPUTS

    if table is None:
        return None
    where = f"{where} [gates]"
    if not isinstance(table, dict):
        raise EdgecError(f"{where} must be a table")
    unknown = sorted(set(table) - set(RECIPE_KEYS))
    if unknown:
        raise EdgecError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(RECIPE_KEYS)}")
    values = {k: v.replace("{recipe_dir}", recipe_dir) if isinstance(v, str) else v for k, v in table.items()}
    gates = parse(*(values.get(k) for k in RECIPE_KEYS[:4]), where=f"{where} ")
    if gates.empty:
        raise EdgecError(f"{where}: no gate set (min_metric, max_metric_drop, max_latency_ms or max_size_kb)")
    artifact, data, baseline = _recipe_paths(values, where, steps)
    if gates.needs_data and data is None:
        raise EdgecError(f"{where}: min_metric / max_metric_drop need 'data' (the metric is measured on it)")
    threads = values.get("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise EdgecError(f"{where}: 'threads' must be an integer >= 1, got {threads!r}")
    produced = {str(_resolve(s.params[k], out_dir)) for s in steps for k in FILE_OUTPUTS
                if isinstance(s.params.get(k), str)}
    _check_exists(where, "artifact", artifact, out_dir, produced)
    _check_exists(where, "data", data, out_dir, produced)
    _check_exists(where, "baseline", baseline if gates.max_metric_drop is not None else None, out_dir, produced)
    arch = values.get("arch") or _last_param(steps, "arch", reverse=True)
    return RecipeGates(gates, artifact, data, baseline if gates.max_metric_drop is not None else None, arch,
                       threads, dict(table))


def artifact_latency(path: Path, threads: int, over: float | None, arch: str | None = None) -> tuple:
    """The latency-gate measurement of a file: an ONNX file with its card's input spec, a checkpoint exported
    in memory; both with the spec's example inputs at batch 1."""
    from edgec.core.spec import spec_from_dict

    if path.suffix.lower() == ".onnx":
        from edgec.app.card import read_card

        data = path.read_bytes()
        card = read_card(data)
        if not card or not isinstance(card.get("spec"), dict):
            raise EdgecError(f"{path.name} carries no edgec model card (metadata 'edgec.card'); its example inputs "
                             "are unknown, so the latency gate cannot time it (export it with this edgec)")
        try:
            spec = spec_from_dict(card["spec"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgecError(f"{path.name}: the model card's spec is malformed ({exc})") from None
        return onnx_latency(data, spec, threads, over)
    from edgec.models.checkpoint import load_checkpoint
    from edgec.onnx.export import to_onnx

    model = load_checkpoint(path, arch)
    return onnx_latency(to_onnx(model).SerializeToString(deterministic=True), model.spec, threads, over)


def measure_recipe(rg: RecipeGates, out_dir: Path) -> Measured:
    from edgec.evaluation import evaluate

    artifact = _resolve(rg.artifact, out_dir)
    if not artifact.is_file():
        raise EdgecError(f"[gates] artifact {rg.artifact} was not written")
    m = Measured(file_bytes=artifact.stat().st_size)
    data = None if rg.data is None else (rg.data if _is_entry_point(rg.data) else str(_resolve(rg.data, out_dir)))
    if data is not None:
        m.evaluation = evaluate(artifact, data, latency=False, arch=rg.arch)
        if rg.gates.max_metric_drop is not None:
            m.baseline = evaluate(_resolve(rg.baseline, out_dir), data, split=m.evaluation["split"], latency=False,
                                  arch=rg.arch)
    if rg.gates.max_latency_ms is not None:
        m.latency_ms, m.latency_runs_ms, m.machine = artifact_latency(artifact, rg.threads, rg.gates.max_latency_ms,
                                                                      rg.arch)
    return m


def _reject_files(rg: RecipeGates, out_dir: Path) -> str:
    """Move the failing artifact (and its card) aside; returns the rejected path as the recipe wrote it."""
    from edgec.app.card import card_path

    artifact = _resolve(rg.artifact, out_dir)
    card = card_path(artifact)
    os.replace(artifact, rejected_path(artifact))
    if artifact.suffix.lower() == ".onnx" and card.is_file():
        os.replace(card, rejected_path(card))
    return str(rejected_path(Path(rg.artifact)))


def check_recipe(rg: RecipeGates, out_dir: Path, report: dict) -> None:
    """Check the gates after the last step; fills ``report["gates"]`` and, when a gate fails, moves the
    artifact to ``<artifact>.rejected`` and sets the report's status (exit 1; 2 for bad input; 3 a bug)."""
    from edgec.core.errors import EXIT_INTERNAL

    try:
        result = judge(rg.gates, measure_recipe(rg, Path(out_dir)))
    except EdgecError as exc:
        report.update(status="failed", exit_code=exc.exit_code,
                      gates={"passed": False, "error": str(exc), "artifact": rg.artifact})
        return
    except Exception as exc:  # a bug: recorded like a step's, never a traceback
        report.update(status="failed", exit_code=EXIT_INTERNAL,
                      gates={"passed": False, "error": f"{type(exc).__name__}: {exc}", "artifact": rg.artifact})
        return
    result = {"artifact": rg.artifact, **result, "rejected": None}
    if not result["passed"]:
        result["rejected"] = _reject_files(rg, Path(out_dir))
        report.update(status="failed", exit_code=GateFailed.exit_code)
    report["gates"] = result


__all__ = ["HIGHER_IS_BETTER", "KIB", "PRIMARY", "Gates", "Measured", "describe_row", "from_options", "judge",
           "load_model_data", "machine", "measure_export", "onnx_latency", "parse", "refuse", "rejected_path",
           "RecipeGates", "check_recipe", "check_task", "decide_size", "parse_recipe", "release_pruned", "require_data", "score",
           "write_or_reject"]
