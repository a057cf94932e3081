"""The allocation target found by measurement: the loosest target (in latency-table ms) whose pruned structure,
exported and measured side by side with the dense model, meets the budget — before any training.

The latency model can be far off (units timed alone overlap in the whole graph; a CNN's estimate was 2.9x its
measurement), and a target the table calls right then prunes much more than the budget needs, which costs
accuracy for nothing. Latency depends only on the structure, not on the weights, so the search probes
one-shot structures (allocate → shrink → export → measure), which is cheap next to training. Each probe is a
secant step in *savings* space — it assumes the measured saving is proportional to the table's,

    k = (1 − f) / ((D − t) / D),      t' = D − (1 − a) · D / k

(``t`` the probed target, ``f`` its measured fraction of dense, ``a`` the aimed fraction, ``D`` the table's
dense ms) — kept inside the bracket of the largest passing and the smallest failing target (bisection when
the step leaves it). See docs/methods.md#alcs.

The search result is cached like the latency table it calibrates (``cached``, next to the table cache,
keyed by the model, the table, the budget and every option the allocation depends on): a second run with the
same inputs reuses it, so pruning stays byte-reproducible on a machine once its table and search are cached.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from edgec.core.fileio import atomic_write
from edgec.latency.cache import cache_dir

MAX_PROBES = 4
TOLERANCE = 0.02  # stop when the bracket (or the step) is within this fraction of the dense latency
GUARD = 0.03  # the aim sits this much below the budget at least (noise; the trained model is measured again)


def search_target(first: float, floor: float, dense: float, aim: float,
                  probe: Callable[[float], float], *, max_probes: int = MAX_PROBES,
                  tolerance: float = TOLERANCE) -> tuple[float | None, list[dict]]:
    """``(target, probes)``: the largest probed target whose measured fraction of dense is ≤ ``aim`` (None when
    none was), and one row per probe (``target_table_ms``, ``measured_fraction``, ``passed``).
    ``probe(t)`` measures the structure allocated at table target ``t`` and returns its fraction of dense."""
    passing: float | None = None
    failing: float | None = None
    rows: list[dict] = []
    t = min(max(first, floor), dense)
    for _ in range(int(max_probes)):
        f = float(probe(t))
        ok = f <= aim
        rows.append({"target_table_ms": t, "measured_fraction": f, "passed": ok})
        if ok:
            passing = t if passing is None else max(passing, t)
        else:
            failing = t if failing is None else min(failing, t)
        lo = passing if passing is not None else floor
        hi = failing if failing is not None else dense
        if hi - lo <= tolerance * dense:
            break
        saved_table, saved = (dense - t) / dense, 1.0 - f
        nxt = dense - (1.0 - aim) * dense * saved_table / saved if saved_table > 0 and saved > 0 else None
        if nxt is None or not lo < nxt < hi:
            if passing is None and t <= floor + 1e-12:
                break  # the floor itself misses: nothing lower to try
            nxt = (lo + hi) / 2
        if abs(nxt - t) <= tolerance * dense * 0.5:
            break
        t = nxt
    return passing, rows


def cache_path(key: dict):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]
    return cache_dir().parent / "search" / f"{digest}.json"


def cached(key: dict, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """``(value, hit)``: the stored measurement-derived ``value`` for exactly this ``key``, else ``compute()``'s,
    stored atomically (a damaged entry is computed again and overwritten). Used for the target search and the
    floor check, so both are measured once per machine, like the latency table."""
    path = cache_path(key)
    if path.is_file():
        try:
            entry = json.loads(path.read_text())
            if entry.get("key") == key:
                return entry["value"], True
        except (OSError, ValueError, KeyError, TypeError):
            pass
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"key": key, "value": value}, sort_keys=True).encode())
    return value, False


__all__ = ["GUARD", "MAX_PROBES", "TOLERANCE", "cache_path", "cached", "search_target"]
