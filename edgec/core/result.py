"""The base of every command result: ``to_dict()`` is the JSON that ``--json`` prints and report.json holds.

Each result type names its JSON schema (``edgec.<command>/<version>``, documented in docs/json.md); the
``schema`` key comes first so a reader can dispatch on it before reading anything else. Torch-free.
"""
from __future__ import annotations

from dataclasses import fields
from typing import ClassVar


class Result:
    """Mixin for result dataclasses: ``SCHEMA`` names the JSON schema; the fields are its keys."""

    SCHEMA: ClassVar[str] = ""

    def field_values(self) -> dict:
        """The dataclass fields in declaration order, without ``schema`` (to build another result from)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_dict(self) -> dict:
        return {"schema": self.SCHEMA, **self.field_values()}
