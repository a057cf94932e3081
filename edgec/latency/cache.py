"""The latency-table cache: a table is profiled once per (model structure, input shapes, threads, machine)
and read back from ``.cache/edgec/latency`` (or ``$EDGEC_CACHE``) afterwards."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from edgec.core.errors import EdgecError
from edgec.latency import profiling as profile_mod
from edgec.latency.shapes import resolve_shapes
from edgec.latency.table import _canonical, read_table, save_table, table_key, table_request


def cache_dir() -> Path:
    root = os.environ.get("EDGEC_CACHE")
    return Path(root) / "latency" if root else Path.cwd() / ".cache" / "edgec" / "latency"


def cache_path(key: dict, request: dict, folder: str | Path | None = None) -> Path:
    digest = hashlib.sha256(_canonical({"key": key, "request": request}).encode()).hexdigest()[:20]
    arch = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key.get("arch", "model")))[:40]
    return (Path(folder) if folder is not None else cache_dir()) / f"{arch}-{digest}.json"


def cached(model, threads: int = 1, shapes=None, *, batch: int = 1, units=None, densities=None, patterns=None,
           refresh: bool = False, folder: str | Path | None = None, progress=None, **profile_options) -> dict:
    """The latency table for ``model`` at ``shapes``/``batch`` with ``threads`` on this machine: read from the
    cache when one with the identical key and request exists (``_cache.hit``), else profiled
    (:func:`edgec.latency.profiling.profile`, ``profile_options`` passed on) and stored atomically.
    The returned dict has ``_cache = {"hit": bool, "path": str}`` (not written to files)."""
    densities = profile_mod.DEFAULT_DENSITIES if densities is None else densities
    patterns = profile_mod.DEFAULT_PATTERNS if patterns is None else patterns
    shapes = resolve_shapes(model.spec, shapes, batch)
    layers = profile_mod.trace_layers(model, shapes)
    units = profile_mod.resolve_units(model, units, shapes, layers)
    key = table_key(model, threads, shapes)
    request = table_request(units, densities, patterns)
    path = cache_path(key, request, folder)
    if not refresh and path.is_file():
        try:
            table = read_table(path)
            if table["key"] == key and table["request"] == request:
                table["_cache"] = {"hit": True, "path": str(path)}
                return table
        except EdgecError:
            pass  # a damaged cache entry is measured again and overwritten
    table = profile_mod.profile(model, units=units, densities=densities, threads=threads, shapes=shapes,
                                patterns=patterns, progress=progress, **profile_options)
    save_table(table, path)
    table["_cache"] = {"hit": False, "path": str(path)}
    return table
