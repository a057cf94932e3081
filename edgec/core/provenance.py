"""The one constructor of provenance records: every step that changes or emits a model (passes, fine-tuning,
pruning, export, imports) describes itself with :func:`record`, so all records share one shape."""
from __future__ import annotations


def record(name: str, version: int, params: dict, *, output=None, **fields) -> dict:
    """``{"pass": name, "version": version, "params": params, **fields}``, plus ``output_digest`` (last) when
    ``output`` (a ``Model``) is given. ``fields`` are the step's own entries: ``input_digest``, ``checks``,
    ``metrics``, ``summary``, ``modified``, ``tools`` …; their order is kept (checkpoints pickle it)."""
    rec = {"pass": name, "version": int(version), "params": params, **fields}
    if output is not None:
        rec["output_digest"] = output.digest()
    return rec


def structural(name: str, version: int, params: dict) -> dict:
    """The short form kept in ``Model.passes`` (the log replayed on load): name, version and parameters."""
    return {"pass": name, "version": int(version), "params": dict(params)}
