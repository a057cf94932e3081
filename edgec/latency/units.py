"""Prunable units: the sets of layers whose channels shrink together, as profiling and latency tables see them."""
from __future__ import annotations

from dataclasses import dataclass

from edgec.core.errors import EdgecError


@dataclass(frozen=True)
class Unit:
    """A prunable unit: ``layers`` (producers), ``consumers`` and ``per_channel`` layers shrink together;
    ``width`` prunable units (channels / hidden units / heads)."""

    name: str
    layers: tuple[str, ...]
    width: int
    consumers: tuple[str, ...] = ()
    kind: str = "group"
    per_channel: tuple[str, ...] = ()

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.layers + self.consumers + self.per_channel))

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "width": int(self.width), "layers": list(self.layers),
                "consumers": list(self.consumers), "per_channel": list(self.per_channel)}


def _names(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(x) for x in value)


def as_unit(obj) -> Unit:
    """Read a unit from a :class:`Unit`; a tuple ``(name, layers, width[, consumers[, per_channel]])``; a dict
    with those keys; an ``edgec.analysis.groups.Group`` (``producers``, ``consumers``, ``per_channel``, ``size``
    units); or any object with ``name``/``layers``/``width`` attributes."""
    if isinstance(obj, Unit):
        return obj
    get = obj.get if isinstance(obj, dict) else (lambda k, d=None: getattr(obj, k, d))
    if isinstance(obj, (tuple, list)) and 3 <= len(obj) <= 5:
        name, layers, width = obj[0], obj[1], obj[2]
        consumers = obj[3] if len(obj) > 3 else ()
        per_channel = obj[4] if len(obj) > 4 else ()
        kind = "group"
    elif get("producers") is not None and get("size") is not None:  # edgec.analysis.groups.Group
        name, layers, width = get("name"), get("producers"), get("size")
        consumers, per_channel, kind = get("consumers"), get("per_channel"), get("kind") or "group"
    elif get("name") is not None and get("layers") is not None and get("width") is not None:
        name, layers, width = get("name"), get("layers"), get("width")
        consumers, per_channel, kind = get("consumers"), get("per_channel"), get("kind") or "group"
    else:
        raise EdgecError(f"cannot read a prunable unit from {type(obj).__name__}: give (name, [layers], width"
                         f"[, [consumers][, [per_channel]]]), a dict with those keys, or a channel Group")
    try:
        width = int(width)
    except (TypeError, ValueError):
        width = 0
    layers = _names(layers)
    if not name or width < 1 or not layers:
        raise EdgecError(f"prunable unit {name!r}: needs a name, at least one layer and a width >= 1 (got {width})")
    return Unit(str(name), layers, width, _names(consumers), str(kind), _names(per_channel))
