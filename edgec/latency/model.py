"""The ALCS latency model: piecewise-linear per-unit curves from a latency table plus a calibrated remainder.

``T(s) = remainder + Σ_u t̂_u(s_u) + Σ_shared c_l·(1 − a_l)(1 − b_l)``, exact at the dense point and at every
measured single-unit point; :func:`min_latency` bounds feasible budgets and :func:`model_error` compares
estimates with measured exports. The math: see docs/methods.md#latency-model.
"""
from __future__ import annotations

from bisect import bisect_left

import numpy as np

from edgec.core.errors import EdgecError
from edgec.latency.table import check_table, normalise_patterns, validate
from edgec.onnx.session import measure_onnx


def interpolate(xs, ys, s: float) -> float:
    """Piecewise-linear ``y(s)`` through points ``(xs[i], ys[i])`` (``xs`` ascending and distinct); exact at the
    points, end segments extended outside them, never below 0."""
    n = len(xs)
    if n == 0:
        raise EdgecError("no latency points to interpolate")
    if n == 1:
        return float(ys[0])
    i = bisect_left(xs, s)
    if i < n and xs[i] == s:
        return float(ys[i])
    i = min(max(i, 1), n - 1)  # segment (i-1, i); i == 0 or n → the end segment
    xa, xb, ya, yb = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, float(ya + (s - xa) * (yb - ya) / (xb - xa)))


def _split(value, default_pattern: str) -> tuple[str, float]:
    if isinstance(value, dict):
        return str(value.get("pattern", default_pattern)), float(value["density"])
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise EdgecError(f"a unit density is a number, (pattern, density) or a dict, got {value!r}")
        return str(value[0]), float(value[1])
    return default_pattern, float(value)


class LatencyModel:
    """A table turned into fast curves: ``estimate`` in the optimiser's inner loop costs a few µs per unit."""

    def __init__(self, table: dict):
        validate(table)
        self.table = table
        self.remainder = float(table["remainder_ms"])
        self.dense = float(table["dense"]["median_ms"])
        # no graph runs faster than an empty one (Identity); tables from before this field: no bound
        self.overhead = min(max(float(table.get("run_overhead_ms") or 0.0), 0.0), self.dense)
        self.curves: dict[str, dict[str, tuple[list, list]]] = {}
        self.widths: dict[str, int] = {}
        self.interactions = [(i["out_unit"], i["in_unit"], float(i["slope_ms"])) for i in table.get("interactions", [])]
        for unit in table["units"]:
            per = {}
            for pattern, curve in unit["patterns"].items():
                order = np.argsort(np.asarray(curve["density"], dtype=np.float64), kind="stable")
                xs = [float(curve["density"][i]) for i in order]
                if xs[-1] != 1.0 or xs[0] <= 0.0:
                    raise EdgecError(f"latency table: unit '{unit['name']}' pattern {pattern} must have densities "
                                     f"in (0, 1] including the dense point 1.0 (got {xs})")
                per[pattern] = (xs, [float(curve["median_ms"][i]) for i in order])
            self.curves[unit["name"]] = per
            self.widths[unit["name"]] = unit.get("width")
        self.clamped = self._clamp_remainder()

    def _clamp_remainder(self) -> dict | None:
        """A remainder below the run overhead (units timed alone overlap in the whole graph, so their times add
        up to more than the dense model) would let estimates — and the reachable minimum — fall below what any
        graph can run in. Set it to the overhead and scale every unit curve and interaction by
        ``k = (dense − overhead) / Σ_u t_u(1)``, which keeps the dense point exact and the curves' shapes.
        Returns what was changed (None when nothing was)."""
        if self.remainder >= self.overhead:
            return None
        units_sum = self.dense - self.remainder  # Σ_u t_u(1), as the table measured it
        k = (self.dense - self.overhead) / units_sum if units_sum > 0 else 1.0
        for per in self.curves.values():
            for pattern, (xs, ys) in per.items():
                per[pattern] = (xs, [y * k for y in ys])
        self.interactions = [(a, b, c * k) for a, b, c in self.interactions]
        clamped = {"remainder_ms": self.remainder, "clamped_to_ms": self.overhead, "unit_scale": k}
        self.remainder = self.overhead
        return clamped

    @property
    def units(self) -> list[str]:
        return list(self.curves)

    def patterns(self, unit: str) -> list[str]:
        return list(self._unit(unit))

    def _unit(self, unit: str) -> dict:
        try:
            return self.curves[unit]
        except KeyError:
            known = ", ".join(list(self.curves)[:8]) + (" ..." if len(self.curves) > 8 else "")
            raise EdgecError(f"the latency table has no unit '{unit}' (units: {known})") from None

    def unit_ms(self, unit: str, density: float, pattern: str = "channel") -> float:
        """``t̂_u,p(density)``."""
        per = self._unit(unit)
        if pattern not in per:
            raise EdgecError(f"unit '{unit}' was not profiled with pattern '{pattern}' "
                             f"(profiled: {', '.join(per)})")
        s = float(density)
        if not 0.0 < s <= 1.0 + 1e-12:
            raise EdgecError(f"unit '{unit}': density must be in (0, 1], got {density}")
        xs, ys = per[pattern]
        return interpolate(xs, ys, min(s, 1.0))

    def breakdown(self, densities: dict | None = None, pattern: str = "channel") -> dict:
        """``{"units": {name: ms}, "remainder_ms", "total_ms"}`` at ``densities`` (see :func:`estimate`)."""
        densities = dict(densities or {})
        unknown = [u for u in densities if u not in self.curves]
        if unknown:
            self._unit(unknown[0])
        per_unit = {}
        for name, per in self.curves.items():
            if name in densities:
                p, s = _split(densities[name], pattern)
                per_unit[name] = self.unit_ms(name, s, p)
            else:
                per_unit[name] = per[next(iter(per))][1][-1]  # the shared dense point
        channel = {}  # channel-pattern density per unit (shapes shrink only under "channel")
        for name, value in densities.items():
            p, s = _split(value, pattern)
            channel[name] = s if p == "channel" else 1.0
        inter = sum(c * (1.0 - channel.get(a, 1.0)) * (1.0 - channel.get(b, 1.0)) for a, b, c in self.interactions)
        total = self.remainder + sum(per_unit.values()) + inter
        return {"units": per_unit, "remainder_ms": self.remainder, "interactions_ms": inter, "total_ms": total}

    def estimate(self, densities: dict | None = None, pattern: str = "channel") -> float:
        return self.breakdown(densities, pattern)["total_ms"]

    def min_config(self, patterns=None, floor: float | None = None) -> dict:
        """The fastest measured configuration: ``{"ms", "densities": {unit: (pattern, density)}}``: each unit at
        its fastest measured point; with interactions ``ms`` is the estimate of that configuration (the
        correction terms are >= 0, so a mix with some units less pruned can in principle estimate a little
        lower — never by more than the correction, which is reported by :meth:`breakdown`). ``patterns``
        limits the patterns (default: all profiled); ``floor`` ignores points below that density. ``ms`` is
        never below the table's measured run overhead: a calibrated remainder can be negative (units timed
        alone overlap), and a budget below what an empty graph takes is unreachable whatever the sum says."""
        allowed = None if patterns is None else set(_pattern_names(patterns))
        choice, total = {}, self.remainder
        for name, per in self.curves.items():
            best = None
            for p, (xs, ys) in per.items():
                if allowed is not None and p not in allowed:
                    continue
                for x, y in zip(xs, ys):
                    if floor is not None and x < float(floor) - 1e-12:
                        continue
                    if best is None or y < best[0] or (y == best[0] and x < best[2]):
                        best = (y, p, x)
            if best is None:  # pattern not applicable to this unit / nothing above the floor: stays dense
                best = (per[next(iter(per))][1][-1], "dense", 1.0)
            choice[name] = (best[1], best[2])
            total += best[0]
        if self.interactions:  # not separable any more: the estimate of the per-unit choice
            total = self.estimate({n: (p, s) for n, (p, s) in choice.items() if p != "dense"})
        return {"ms": max(float(total), self.overhead), "densities": choice}

    def min_latency(self, patterns=None, floor: float | None = None) -> float:
        return self.min_config(patterns, floor)["ms"]


def _pattern_names(patterns) -> list[str]:
    return normalise_patterns(patterns)


def _model(table) -> LatencyModel:
    return table if isinstance(table, LatencyModel) else LatencyModel(table)


def estimate(table, densities: dict | None = None, pattern: str = "channel") -> float:
    """Estimated latency (ms) with unit ``name`` at ``densities[name]``: a density (with ``pattern``), a
    ``(pattern, density)`` pair or ``{"pattern", "density"}``. Units left out stay dense."""
    return _model(table).estimate(densities, pattern)


def breakdown(table, densities: dict | None = None, pattern: str = "channel") -> dict:
    return _model(table).breakdown(densities, pattern)


def min_latency(table, patterns=None, floor: float | None = None) -> float:
    """The least latency the table says is reachable (docs/methods.md#latency-model); budgets below it are infeasible."""
    return _model(table).min_latency(patterns, floor)


def min_config(table, patterns=None, floor: float | None = None) -> dict:
    return _model(table).min_config(patterns, floor)


def table_inputs(table: dict, seed: int = 0) -> dict:
    """Random inputs at the table's input shapes (float: normal; int: ones for masks, else ``[0, high)``)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for e in table["inputs"]:
        shape = tuple(e["shape"])
        if e.get("dtype") == "int64":
            feed[e["name"]] = (np.ones(shape, np.int64) if e.get("ones")
                               else rng.integers(0, e.get("high") or 2, size=shape, dtype=np.int64))
        else:
            feed[e["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _case(case, i: int) -> tuple[str, dict, object]:
    if isinstance(case, dict):
        return str(case.get("name", f"case{i}")), dict(case.get("densities") or {}), case["onnx"]
    if isinstance(case, (tuple, list)) and len(case) == 2:
        return f"case{i}", dict(case[0] or {}), case[1]
    if isinstance(case, (tuple, list)) and len(case) == 3:
        return str(case[0]), dict(case[1] or {}), case[2]
    raise EdgecError("an error case is {'name', 'densities', 'onnx'}, (densities, onnx) or (name, densities, onnx)")


def model_error(table, cases, *, pattern: str = "channel", inputs: dict | None = None, threads: int | None = None,
                warmup: int = 5, repeats: int = 30, min_seconds: float = 0.3) -> dict:
    """Estimated vs measured latency of real (exported) configurations.

    ``cases``: ``{"name", "densities", "onnx"}`` dicts (or ``(densities, onnx)`` / ``(name, densities, onnx)``
    tuples); ``onnx`` is the exported pruned model (bytes, path or ModelProto) whose unit densities are
    ``densities`` (include ``{}`` with the dense model to see calibration drift). Measured with the table's
    thread count on the table's input shapes (``inputs`` overrides). Returns ``{"cases": [{name, estimate_ms,
    measured_ms, p10_ms, p90_ms, error_ms, rel_error}], "mean_abs_rel_error", "max_abs_rel_error", "warnings"}``;
    ``rel_error = (estimate − measured) / measured``.
    """
    lm = _model(table)
    tbl = lm.table
    threads = int(tbl["key"]["threads"] if threads is None else threads)
    warnings = check_table(tbl, None, threads=threads)
    feed = inputs if inputs is not None else table_inputs(tbl)
    rows = []
    for i, case in enumerate(cases):
        name, densities, onnx_model = _case(case, i)
        est = lm.estimate(densities, pattern)
        got = measure_onnx(onnx_model, feed, threads=threads, warmup=warmup, repeats=repeats, min_seconds=min_seconds)
        measured = got["median_ms"]
        rows.append({"name": name, "estimate_ms": est, "measured_ms": measured, "p10_ms": got["p10_ms"],
                     "p90_ms": got["p90_ms"], "error_ms": est - measured,
                     "rel_error": (est - measured) / measured if measured > 0 else float("inf")})
    errs = [abs(r["rel_error"]) for r in rows]
    return {"cases": rows, "mean_abs_rel_error": float(np.mean(errs)) if errs else 0.0,
            "max_abs_rel_error": float(max(errs)) if errs else 0.0, "threads": threads, "warnings": warnings}
