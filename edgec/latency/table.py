"""Latency tables: the JSON file ``edgec profile`` writes (``edgec.latency-table/1``), its key, and loading a
device's table.

Written with sorted keys and no timestamps, so the same table is the same bytes. A table from another
machine (``--table``) must match the model's arch, config digest and inputs; runtime, threads and CPU may
differ with a warning. Schema and matching rules: see docs/methods.md#latency-tables.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from edgec import __version__
from edgec.core.errors import EdgecError
from edgec.core.fileio import atomic_write
from edgec.core.limits import load_json, read_text_file
from edgec.latency.shapes import resolve_shapes
from edgec.latency.simd import parse_pattern, pattern_name
from edgec.latency.units import as_unit
from edgec.onnx.session import machine_key

FORMAT = "edgec.latency-table/1"
MUST_MATCH = ("arch", "config_digest", "inputs")
MAY_DIFFER = ("runtime", "runtime_version", "provider", "threads", "cpu", "machine", "cores")


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def normalise_densities(densities) -> list[float]:
    """Distinct densities in (0, 1], descending, 1.0 always included."""
    try:
        values = sorted({float(d) for d in densities} | {1.0}, reverse=True)
    except (TypeError, ValueError):
        raise EdgecError(f"densities must be numbers in (0, 1], got {densities!r}") from None
    bad = [d for d in values if not (0.0 < d <= 1.0) or math.isnan(d)]
    if bad:
        raise EdgecError(f"densities must be in (0, 1], got {bad}")
    return values


def normalise_patterns(patterns) -> list[str]:
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    out = []
    for p in patterns:
        name = pattern_name(*parse_pattern(p))
        if name not in out:
            out.append(name)
    if not out:
        raise EdgecError("no pruning pattern given (use 'channel' and/or 'simd:N')")
    return out


def config_digest(model) -> str:
    """sha256 of what fixes the network's shapes: arch, config and the structural pass log (not the weights)."""
    return hashlib.sha256(_canonical({"arch": model.arch, "config": model.config,
                                      "passes": model.passes}).encode()).hexdigest()


def inputs_json(spec, shapes: dict) -> list[dict]:
    out = []
    for t in spec.inputs:
        entry = {"name": t.name, "shape": [int(d) for d in shapes[t.name]], "dtype": t.dtype}
        if t.dtype == "int64":
            entry.update({"high": t.high, "ones": bool(t.ones)})
        out.append(entry)
    return out


def table_key(model, threads: int, shapes: dict) -> dict:
    """The key of a table for ``model`` at ``shapes`` on this machine with ``threads``."""
    key = {k: v for k, v in machine_key(threads).items() if k != "usable_cores"}
    key.update({"arch": model.arch, "config_digest": config_digest(model),
                "inputs": [{k: e[k] for k in ("name", "shape", "dtype")} for e in inputs_json(model.spec, shapes)]})
    return key


def table_request(units, densities, patterns) -> dict:
    return {"units": [as_unit(u).to_json() for u in units], "densities": normalise_densities(densities),
            "patterns": normalise_patterns(patterns)}


def make_table(*, key: dict, request: dict, model, units: list, dense: dict, units_sum: float, overhead: float,
               inputs: list, protocol: dict, interactions: list | None = None) -> dict:
    return {
        "format": FORMAT,
        "key": key,
        "request": request,
        "model": {"arch": model.arch, "config": model.config, "digest": model.digest()},
        "inputs": inputs,
        "protocol": protocol,
        "machine_info": {"usable_cores": machine_key(key.get("threads", 1))["usable_cores"]},
        "densities": list(request["densities"]),
        "dense": dense,
        "units": units,
        "interactions": list(interactions or []),
        "units_dense_sum_ms": float(units_sum),
        "remainder_ms": float(dense["median_ms"] - units_sum),
        "run_overhead_ms": float(overhead),
        "edgec_version": __version__,
    }


# --- files ------------------------------------------------------------------------------------------

def dumps(table: dict) -> str:
    """Deterministic JSON (sorted keys); entries whose key starts with '_' (run-time info) are left out."""
    clean = {k: v for k, v in table.items() if not k.startswith("_") and k != "load_warnings"}
    return json.dumps(clean, sort_keys=True, indent=1, allow_nan=False) + "\n"


def table_digest(table: dict) -> str:
    """sha256 of the table's file form: what a pruning result depends on (run-time keys excluded)."""
    return hashlib.sha256(dumps(table).encode()).hexdigest()


def save_table(table: dict, path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise EdgecError(f"output {path} is a directory; give a file name")
    atomic_write(path, dumps(table).encode())
    return path


def validate(table, where: str = "latency table") -> dict:
    """Structural check of a table dict (a damaged or foreign file becomes a one-line error)."""
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        found = table.get("format") if isinstance(table, dict) else type(table).__name__
        raise EdgecError(f"{where} is not an edgec latency table (format {found!r}, expected {FORMAT})")
    try:
        key = table["key"]
        for field in MUST_MATCH + MAY_DIFFER:
            key[field]
        _finite(table["remainder_ms"], "remainder_ms", where)
        if not _finite(table["dense"]["median_ms"], "dense.median_ms", where) > 0:
            raise EdgecError(f"{where}: dense.median_ms must be > 0 (got {table['dense']['median_ms']!r})")
        if not _finite(table.get("run_overhead_ms") or 0.0, "run_overhead_ms", where) >= 0:
            raise EdgecError(f"{where}: run_overhead_ms must be >= 0 (got {table['run_overhead_ms']!r})")
        names = set()
        for unit in table["units"]:
            name = unit["name"]
            if name in names:
                raise EdgecError(f"{where}: unit '{name}' appears twice")
            names.add(name)
            if not unit["patterns"]:
                raise EdgecError(f"{where}: unit '{name}' has no measurements")
            for pattern, curve in unit["patterns"].items():
                xs, ys = curve["density"], curve["median_ms"]
                if not xs or len(xs) != len(ys) or len(set(xs)) != len(xs):
                    raise EdgecError(f"{where}: unit '{name}' pattern {pattern}: densities and times do not pair up")
                if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in list(xs) + list(ys)):
                    raise EdgecError(f"{where}: unit '{name}' pattern {pattern}: non-numeric entries")
                if min(ys) < 0 or not all(0 < x <= 1 for x in xs):
                    raise EdgecError(f"{where}: unit '{name}' pattern {pattern}: times must be >= 0 and densities "
                                     "in (0, 1]")
        for inter in table.get("interactions", []):
            if inter["out_unit"] not in names or inter["in_unit"] not in names or not math.isfinite(inter["slope_ms"]):
                raise EdgecError(f"{where}: interaction at layer {inter.get('layer')!r} names unknown units")
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgecError(f"{where} is damaged (missing or bad field {exc})") from None
    return table


def _finite(value, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EdgecError(f"{where}: {name} must be a finite number (got {value!r})")
    return float(value)


def read_table(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise EdgecError(f"no such latency table: {path}")
    table = load_json(read_text_file(path, "latency table"), f"latency table {path}")
    return validate(table, str(path))


def check_table(table: dict, model=None, threads: int | None = None, shapes=None, batch: int | None = None,
                strict: bool = False, machine: dict | None = None) -> list[str]:
    """Check ``table`` against ``model`` (and requested ``shapes``/``batch``/``threads``) and this machine.

    Refuses (EdgecError) a table of another architecture/config, other input shapes (only checked against
    the request when ``shapes`` or ``batch`` is given; always checked against the model's input names and
    axis bounds), or units naming layers the model lacks. Returns warnings for runtime/CPU/thread differences
    (an error instead with ``strict``). ``machine``: this machine's key (default ``machine_key``).
    """
    key = table["key"]
    errors, warnings = [], []
    if model is not None:
        if key["arch"] != model.arch:
            errors.append(f"it was measured for a '{key['arch']}' model, this is '{model.arch}'")
        elif key["config_digest"] != config_digest(model):
            errors.append("it was measured for another configuration of this architecture (config or structural "
                          "passes differ)")
        names = [t.name for t in model.spec.inputs]
        table_shapes = {e["name"]: tuple(e["shape"]) for e in key["inputs"]}
        if list(table_shapes) != names:
            errors.append(f"its inputs {list(table_shapes)} are not the model's {names}")
        elif not errors:
            try:
                resolve_shapes(model.spec, table_shapes)
            except EdgecError as exc:
                errors.append(f"its input shapes do not fit the model ({exc})")
            if shapes is not None or batch is not None:
                want = resolve_shapes(model.spec, shapes, batch)
                if want != table_shapes:
                    errors.append(f"it was measured at input shapes {_fmt_shapes(table_shapes)}, "
                                  f"requested {_fmt_shapes(want)}")
        if not errors:
            modules = set(dict(model.gm.named_modules()))
            for unit in table["units"]:
                members = [*unit.get("layers", []), *unit.get("consumers", []), *unit.get("per_channel", [])]
                missing = [n for n in members if n not in modules]
                if missing:
                    errors.append(f"unit '{unit['name']}' names layers the model lacks: {', '.join(missing)}")
                    break
    if errors:
        raise EdgecError("latency table does not fit: " + "; ".join(errors))
    here = dict(machine or machine_key(threads if threads is not None else key["threads"]))
    if threads is not None:
        here["threads"] = int(threads)
    diffs = [f"{f} {key.get(f)!r} (here {here.get(f)!r})" for f in MAY_DIFFER if key.get(f) != here.get(f)]
    if diffs:
        msg = "latency table was measured elsewhere: " + "; ".join(diffs)
        if strict:
            raise EdgecError(msg + " (strict: refusing)")
        warnings.append(msg)
    return warnings


def _fmt_shapes(shapes: dict) -> str:
    return ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in shapes.items())


def load_table(path: str | Path, model=None, threads: int | None = None, shapes=None, batch: int | None = None,
               strict: bool = False) -> dict:
    """Read a table (e.g. measured on the target device, ``--table``) and check it (:func:`check_table`).
    The returned dict carries ``load_warnings`` (a list of one-line messages, empty when all matched)."""
    table = read_table(path)
    table["load_warnings"] = check_table(table, model, threads=threads, shapes=shapes, batch=batch, strict=strict)
    return table


# --- cache ------------------------------------------------------------------------------------------


# --- reading a table for people -----------------------------------------------------------------------

def summary_rows(table: dict, pattern: str = "channel") -> list[dict]:
    """One row per unit: width, dense ms, ms at the lowest density of ``pattern`` (when measured), share of
    the dense model, and each other pattern's lowest-density ms. For ``edgec profile`` output."""
    total = float(table["dense"]["median_ms"]) or 1.0
    rows = []
    for unit in table["units"]:
        row = {"name": unit["name"], "kind": unit.get("kind", ""), "width": unit.get("width"),
               "dense_ms": unit.get("dense_ms", unit["patterns"][next(iter(unit["patterns"]))]["median_ms"][0])}
        row["share"] = row["dense_ms"] / total
        for p, curve in unit["patterns"].items():
            row[f"{p}@{curve['density'][-1]:g}_ms"] = curve["median_ms"][-1]
        rows.append(row)
    return rows


def plot_table(table: dict, path: str | Path, patterns=None) -> Path:
    """Per-unit latency bars (dense and lowest density per pattern) plus the remainder, as a PNG.
    Needs matplotlib (the plotting extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgecError("plotting needs matplotlib: pip install 'edgec[plot]' (or pip install matplotlib)") from None

    units = table["units"]
    patterns = list(patterns or sorted({p for u in units for p in u["patterns"]}, key=lambda p: p != "channel"))
    names = [u["name"] for u in units] + ["(remainder)"]
    y = np.arange(len(names))
    height = 0.8 / (1 + len(patterns))
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.28 * len(names) + 1.5)))
    dense = [u.get("dense_ms", 0.0) for u in units] + [table["remainder_ms"]]
    ax.barh(y, dense, height, label="dense")
    for i, p in enumerate(patterns):
        vals, label = [], None
        for u in units:
            curve = u["patterns"].get(p)
            vals.append(curve["median_ms"][-1] if curve else 0.0)
            if curve and label is None:
                label = f"{p} @ {curve['density'][-1]:g}"
        ax.barh(y + (i + 1) * height, vals + [0.0], height, label=label or p)
    ax.set_yticks(y + 0.4 - height / 2, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("median latency (ms)")
    key = table["key"]
    ax.set_title(f"{key['arch']} · onnxruntime {key['runtime_version']} · {key['threads']} thread(s) · "
                 f"dense {table['dense']['median_ms']:.3f} ms", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
