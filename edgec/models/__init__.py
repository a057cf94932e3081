"""The model zoo and user architectures: small, edge-sized models every pass can see inside.

Zoo classes follow one convention so checkpoints can rebuild them from data alone: ``default_config()``,
``Class(**config)``, ``input_spec()`` and a one-line ``summary``. User classes need none of it: an
architecture is also ``path/to/file.py:Class`` or ``package.module:Class``, configured from the constructor's
signature and ``--arch-config``, with example inputs from ``--input-shape`` (see edgec.models.source).
"""
from __future__ import annotations

from edgec.models.source import ZOO, build, full_config, resolve

__all__ = ["ZOO", "build", "full_config", "resolve"]
