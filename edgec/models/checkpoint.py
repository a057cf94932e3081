"""The one module that reads and writes edgec checkpoints.

A checkpoint is plain data, never code: ``{format, model: {arch, config}, passes, state_dict, provenance,
digest}``, written atomically with ``torch.save`` and read with ``torch.load(weights_only=True)``; loading
rebuilds the architecture and replays the structural passes. See docs/architecture.md#checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import torch

from edgec import models
from edgec.core.errors import EdgecError, first_line
from edgec.core.fileio import atomic_write, read_data, serialize
from edgec.core.graph import Model, trace
from edgec.core.pass_manager import replay
from edgec.core.provenance import record as provenance_record

FORMAT = "edgec.checkpoint/1"


def save_checkpoint(model, path: str | Path) -> str:
    """Write ``model`` (an ``edgec.core.graph.Model``) atomically; return its digest."""
    digest = model.digest()
    container = {
        "format": FORMAT,
        "model": {"arch": model.arch, "config": model.config},
        "passes": model.passes,
        "state_dict": model.state_dict(),
        "provenance": model.provenance,
        "digest": digest,
    }
    atomic_write(path, serialize(container))
    return digest


def _describe_non_checkpoint(obj) -> str:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return (f"a bare state_dict ({len(obj)} tensors), not an edgec checkpoint; "
                "pass --arch NAME or --arch package.module:Class to load it into an architecture")
    if isinstance(obj, dict):
        keys = ", ".join(sorted(map(str, obj))[:6])
        return f"not an edgec checkpoint (a dict with keys: {keys})"
    return f"not an edgec checkpoint (a {type(obj).__name__})"


def load_checkpoint(path: str | Path, arch: str | None = None, config: dict | None = None):
    """Rebuild the model: architecture from the zoo (or ``arch``), replay structural passes, load weights strictly.

    With ``arch`` a bare state_dict is accepted and wrapped with that architecture (default config
    updated by ``config``).
    """
    path = Path(path)
    obj = read_data(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        try:
            arch_name = arch or obj["model"]["arch"]
            cfg = dict(obj["model"]["config"])
            passes, state_dict = list(obj["passes"]), obj["state_dict"]
            provenance = list(obj.get("provenance", []))
        except (KeyError, TypeError) as exc:
            raise EdgecError(f"{path} is a damaged edgec checkpoint (missing {exc})") from None
        stored = obj["model"]["arch"]
        if arch is not None and arch != stored:
            raise EdgecError(f"{path} holds a '{stored}' model, not '{arch}'; drop --arch or pass --arch {stored}")
        if arch is None and stored not in models.ZOO:
            if ":" not in stored:
                models.resolve(stored)  # raises: unknown architecture, listing the zoo
            # Importing a module named inside a file would let the file choose code to run.
            raise EdgecError(f"{path} uses the user architecture '{stored}'; "
                             f"pass --arch {stored} to allow importing it")
    elif isinstance(obj, dict) and str(obj.get("format", "")).startswith("edgec.checkpoint/"):
        raise EdgecError(f"{path} has format {obj['format']}; this edgec reads {FORMAT} (upgrade edgec)")
    elif arch is not None and isinstance(obj, dict) and not _describe_non_checkpoint(obj).startswith("not"):
        arch_name, cfg, passes, state_dict = arch, models.full_config(arch, config), [], obj
        provenance = [provenance_record("import.state_dict", 1, {"arch": arch, "config": cfg, "source": path.name})]
    else:
        raise EdgecError(f"{path} is {_describe_non_checkpoint(obj)}")

    check_finite(state_dict, path)
    module = models.build(arch_name, cfg)
    model = Model(trace_or_error(module, arch_name), arch_name, cfg, module.input_spec())
    model = replay(model, passes)
    load_state_dict_strict(model.gm, state_dict, path)
    model.provenance = provenance
    model.gm.eval()
    if isinstance(obj, dict) and obj.get("digest") and model.digest() != obj["digest"]:
        raise EdgecError(f"{path} is corrupt: its content digest does not match the one stored in it")
    return model


def trace_or_error(module, arch: str):
    try:
        return trace(module)
    except Exception as exc:  # fx raises many types for untraceable code
        raise EdgecError(f"architecture '{arch}' cannot be traced by torch.fx ({first_line(exc)}); "
                         "avoid data-dependent control flow in forward()") from None


def check_finite(state_dict: dict, path) -> None:
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise EdgecError(f"{path}: state_dict entry '{name}' is a {type(t).__name__}, not a tensor")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise EdgecError(f"{path}: tensor '{name}' contains {bad} values")


def load_state_dict_strict(gm, state_dict: dict, path) -> None:
    expected = gm.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. '{missing[0]}'")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) e.g. '{unexpected[0]}'")
        raise EdgecError(f"{path}: weights do not fit the architecture: {'; '.join(parts)}")
    for name, ref in expected.items():
        got = state_dict[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise EdgecError(f"{path}: tensor '{name}' has shape {list(got.shape)} "
                             f"but the architecture expects {list(ref.shape)}")
        if got.dtype != ref.dtype:
            raise EdgecError(f"{path}: tensor '{name}' has dtype {got.dtype} but the architecture expects {ref.dtype}")
    gm.load_state_dict(state_dict, strict=True)


def new_model(arch: str, overrides: dict | None = None, seed: int = 0, origin: dict | None = None):
    """A freshly initialised zoo (or user) model, deterministic in ``seed``."""
    cfg = models.full_config(arch, overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = models.build(arch, cfg)
    model = Model(trace_or_error(module, arch), arch, cfg, module.input_spec())
    record = origin or provenance_record("zoo.create", 1, {"arch": arch, "config": cfg, "seed": seed})
    record["output_digest"] = model.digest()
    model.provenance = [record]
    return model
