"""The model zoo: small, edge-sized architectures, every one traceable by torch.fx.

Each zoo class follows one convention so checkpoints can rebuild it from data alone:

* ``Class.default_config() -> dict`` of JSON-serialisable constructor kwargs;
* ``Class(**config)`` builds the model;
* ``model.input_spec() -> edgec.core.spec.InputSpec`` declares inputs (names, shapes, dtypes, dynamic axes);
* ``Class.summary`` is a one-line description for ``edgec zoo list``.

User architectures outside the zoo follow the same convention and are named ``package.module:Class``.
"""
from __future__ import annotations

import importlib

from edgec.core.errors import EdgecError, first_line

ZOO: dict[str, str] = {
    "convtransformer": "edgec.models.convtransformer:ConvTransformer",
    "conformer": "edgec.models.conformer:Conformer",
    "hafformer": "edgec.models.hafformer:HAFFormer",
    "resnet": "edgec.models.resnet:ResNet",
    "bert": "edgec.models.bert:Bert",
}


def resolve(arch: str):
    """Return the class for a zoo name or an explicit ``package.module:Class``."""
    target = ZOO.get(arch)
    if target is None:
        if ":" not in arch:
            raise EdgecError(f"unknown architecture '{arch}'; known: {', '.join(sorted(ZOO))} (or give --arch package.module:Class)")
        target = arch
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise EdgecError(f"cannot import architecture '{arch}': {exc}") from None
    for attr in ("default_config", "input_spec"):
        if not hasattr(cls, attr):
            raise EdgecError(f"architecture '{arch}' lacks {attr}(); see edgec.models for the convention")
    return cls


def full_config(arch: str, overrides: dict | None = None) -> dict:
    """Defaults merged with overrides; unknown keys are refused so typos do not pass silently."""
    config = dict(resolve(arch).default_config())
    for key, value in (overrides or {}).items():
        if key not in config:
            raise EdgecError(f"'{key}' is not a config key of {arch}; keys: {', '.join(sorted(config))}")
        config[key] = value
    return config


def build(arch: str, config: dict):
    """Instantiate an architecture (eval mode); a config the class rejects is bad input, not a crash."""
    cls = resolve(arch)
    try:
        model = cls(**config)
    except EdgecError:
        raise
    except (ValueError, TypeError, AssertionError, RuntimeError, ZeroDivisionError) as exc:
        raise EdgecError(f"{arch}: invalid config ({first_line(exc)})") from None
    return model.eval()
