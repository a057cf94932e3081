"""edgec: PyTorch checkpoints to small, fast, verified ONNX artifacts.

The Python API (docs/api.md) is reached as ``edgec.from_module``, ``edgec.fold``, ... and loaded on first
use, so ``import edgec`` (and ``edgec --help``) does not import torch."""

import importlib

__version__ = "0.1.0"

# name -> module that defines it. importlib, not an import statement: every layer imports this package
# (``from edgec import __version__``), and a static import of edgec.app here would make each of them depend
# on the top layer.
_API = dict.fromkeys(("from_module", "scaffold_hrf", "scaffold_ternary", "scaffold_binary", "fold",
                      "prune_to_latency", "export", "save", "load", "StepReport"), "edgec.app.python_api")
_API.update({"Model": "edgec.core.graph", "EdgecError": "edgec.core.errors", "CheckFailed": "edgec.core.errors"})

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'edgec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
