"""The Python API for users' own models (``import edgec``; see docs/api.md): ``from_module`` wraps an
``nn.Module`` and example inputs into a ``Model``; the model-level functions run the same passes and pipelines
as the CLI on it in memory. Every transformation is pure (a new ``Model``, the input untouched) and returns
``(model, report)``; options are the CLI's dataclasses, built from keyword arguments."""
from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from edgec.app.api import export_model, fold_model, pass_params, run_passes
from edgec.app.results import ExportResult, SavedCheckpoint
from edgec.core.errors import CheckFailed, EdgecError, first_line
from edgec.core.graph import Model, canonical_json, max_error
from edgec.core.ops import EQUIVALENCE_TOLERANCE
from edgec.core.options import (
    ExportOptions,
    PruneOptions,
    ScaffoldBinaryOptions,
    ScaffoldHrfOptions,
    ScaffoldTernaryOptions,
    SourceOptions,
)
from edgec.core.pass_manager import refuse_skips
from edgec.core.provenance import record as provenance_record
from edgec.core.result import Result

IMPORT_VERSION = 1
DTYPES = {torch.float32: "float32", torch.int64: "int64", torch.bool: "bool"}


@dataclass(frozen=True)
class StepReport(Result):
    """What a scaffold or fold did: ``passes`` has one row per pass run (a fold tries several)."""

    SCHEMA = "edgec.api.step/1"

    step: str  # "scaffold.sttn", "fold", ...
    modified: bool
    summary: str
    skipped: list  # [{"layer", "reason"}]
    checks: dict  # pass name -> its checks
    passes: list  # [{"pass", "modified", "summary", "skipped", "checks"}]
    before: dict  # {"params", "bytes", "digest"}
    after: dict
    scaffolds: int  # training scaffolds the returned model carries


# --- from_module --------------------------------------------------------------------------------------

def from_module(module: nn.Module, example_inputs, *, names: list[str] | None = None,
                dynamic: dict | None = None, arch: str | None = None, config: dict | None = None) -> Model:
    """Capture ``module`` (never modified) as an edgec ``Model`` from example inputs: a tensor, a tuple of
    tensors (positional arguments of ``forward``) or a dict name → tensor (keyword arguments)."""
    from edgec.core.spec import build_spec
    from edgec.models.capture import capture

    if not isinstance(module, nn.Module):
        raise EdgecError(f"from_module() takes a torch.nn.Module (got {type(module).__name__})")
    named = _named_examples(module, example_inputs, names)
    entries = [(name, _dims(name, t, (dynamic or {}).get(name)), _dtype(name, t)) for name, t in named]
    unknown = sorted(set(dynamic or {}) - {n for n, _ in named})
    if unknown:
        raise EdgecError(f"dynamic= names unknown input(s) {', '.join(unknown)}; inputs: "
                         f"{', '.join(n for n, _ in named)}")
    spec = build_spec(entries, vocab=_vocab(module), outputs=None)
    arch = arch or f"{type(module).__module__}:{type(module).__qualname__}"
    cfg = _json_config(config)
    gm, cap = capture(module, spec, label=type(module).__name__)
    model = Model(gm, arch, cfg, spec)
    check = _example_check(module, gm, [t for _, t in named], cap)
    model.provenance = [provenance_record(
        "import.module", IMPORT_VERSION, {"arch": arch, "config": cfg, "config_given": config is not None,
                                          "inputs": spec.to_json()["inputs"]},
        capture=cap, checks={"example": check}, output=model)]
    return model


def _named_examples(module, example_inputs, names) -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor)]`` in ``forward``'s argument order."""
    params = _forward_params(module)
    if isinstance(example_inputs, dict):
        if names is not None:
            raise EdgecError("names= is for tensor or tuple example inputs; a dict's keys are the names")
        unknown = [k for k in example_inputs if params and k not in params]
        if unknown:
            raise EdgecError(f"example input(s) {', '.join(map(str, unknown))} are not arguments of "
                             f"{type(module).__name__}.forward({', '.join(params)})")
        order = params or list(example_inputs)
        items = sorted(example_inputs.items(), key=lambda kv: order.index(kv[0]))
        given = [k for k, _ in items]
        if params and given != params[:len(given)]:
            missing = [p for p in params[:params.index(given[-1])] if p not in given]
            raise EdgecError(f"give example inputs for {', '.join(missing)} too: inputs are passed by position, "
                             f"in forward()'s order ({', '.join(params)})")
    else:
        tensors = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
        if names is None:
            names = params[:len(tensors)] if len(params) >= len(tensors) else [f"input{i}" for i in
                                                                               range(len(tensors))]
        if len(names) != len(tensors):
            raise EdgecError(f"names= has {len(names)} name(s) for {len(tensors)} example input(s)")
        items = list(zip(map(str, names), tensors))
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise EdgecError(f"example input '{name}' is a {type(t).__name__}; give a tensor, a tuple of tensors "
                             "or a dict name -> tensor")
    if not items:
        raise EdgecError("from_module() needs at least one example input")
    return [(n, t.detach()) for n, t in items]


def _forward_params(module) -> list[str]:
    """Names of ``forward``'s positional parameters (empty when it takes ``*args``)."""
    sig = inspect.signature(module.forward)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()):
        return []
    return [p.name for p in sig.parameters.values() if p.kind in kinds]


def _dims(name: str, t: torch.Tensor, axes: dict | None) -> list:
    """``build_spec`` dims: ints, and ``(dim name, example size)`` for the axes ``dynamic`` names."""
    dims = list(t.shape)
    for axis, dim_name in (axes or {}).items():
        if not isinstance(axis, int) or not -len(dims) <= axis < len(dims):
            raise EdgecError(f"dynamic axis {axis!r} of input '{name}' is not an axis of its shape {dims}")
        dims[axis] = (str(dim_name), int(dims[axis]))
    return dims


def _dtype(name: str, t: torch.Tensor) -> str:
    if t.dtype not in DTYPES:
        raise EdgecError(f"example input '{name}' has dtype {t.dtype}; edgec takes float32, int64 or bool inputs "
                         "(convert it, e.g. x.float() or x.long())")
    return DTYPES[t.dtype]


def _vocab(module) -> int | None:
    """The smallest embedding table: int64 sample inputs stay below it."""
    sizes = [m.num_embeddings for m in module.modules() if isinstance(m, nn.Embedding)]
    return min(sizes) if sizes else None


def _json_config(config) -> dict:
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise EdgecError(f"config= must be a dict of constructor arguments (got {type(config).__name__})")
    try:
        canonical_json(config)
    except (TypeError, ValueError) as exc:
        raise EdgecError(f"config= must be JSON-serialisable: checkpoints store it ({first_line(exc)})") from None
    return dict(config)


def _tensors(out) -> tuple:
    """The tensor outputs in order (capture drops constant ``None`` outputs)."""
    return tuple(t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor))


def _example_check(module, gm, tensors, cap: dict) -> dict:
    """The captured graph against the module on the user's own example inputs (eval mode, flags restored)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            ref = module(*tensors)
    except Exception as exc:  # noqa: BLE001 - user code: report the failure as one line
        raise EdgecError(f"{type(module).__name__}.forward failed on the example inputs: {first_line(exc)}") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    was_training = gm.training
    gm.eval()
    with torch.no_grad():
        got = gm(*tensors)
    gm.train(was_training)
    err = max_error(_tensors(ref), _tensors(got))
    tolerance = (cap.get("check") or {}).get("tolerance", EQUIVALENCE_TOLERANCE)
    err.update(tolerance=tolerance, passed=err["rel_error"] <= tolerance)
    if not err["passed"]:
        raise CheckFailed(f"the captured graph differs from {type(module).__name__} on the example inputs: "
                          f"relative error {err['rel_error']:.3g} > {tolerance:.3g}")
    return err


# --- passes -------------------------------------------------------------------------------------------

def scaffold_hrf(model: Model, *, strict: bool = False, progress: Callable[[str], None] | None = None,
                 **params) -> tuple[Model, StepReport]:
    """HRF scaffolds on every FFN (``edgec scaffold hrf``); ``params``: ScaffoldHrfOptions fields."""
    options = _options(ScaffoldHrfOptions, "scaffold_hrf", dict(params, strict=strict))
    return _scaffold(model, "hrf", options, progress)


def scaffold_ternary(model: Model, method: str = "sttn", *, strict: bool = False,
                     progress: Callable[[str], None] | None = None, **params) -> tuple[Model, StepReport]:
    """Ternary scaffolds, ``method`` "sttn" or "dlt" (``edgec scaffold ternary``); ``params``:
    ScaffoldTernaryOptions fields (group_size, activations, include, exclude, keep_first_last, seed)."""
    options = _options(ScaffoldTernaryOptions, "scaffold_ternary", dict(params, method=method, strict=strict))
    options.validate()
    return _scaffold(model, options.method, options, progress)


def scaffold_binary(model: Model, *, strict: bool = False, progress: Callable[[str], None] | None = None,
                    **params) -> tuple[Model, StepReport]:
    """Binary scaffolds (``edgec scaffold binary``); ``params``: ScaffoldBinaryOptions fields."""
    options = _options(ScaffoldBinaryOptions, "scaffold_binary", dict(params, strict=strict))
    return _scaffold(model, "binary", options, progress)


def fold(model: Model, *, strict: bool = False,
         progress: Callable[[str], None] | None = None) -> tuple[Model, StepReport]:
    """Every fold ``edgec fold`` tries (``edgec.app.api.fold_passes()``): scaffolds become deploy layers,
    BatchNorm folds into the layer before it; each fold's output error is checked."""
    model = _input(model, "fold")
    folded, records, summary, skipped = fold_model(model, progress)
    return folded, _step_report("fold", model, folded, records, summary, strict, skipped)


def _scaffold(model, kind: str, options, progress) -> tuple[Model, StepReport]:
    model = _input(model, f"scaffold_{'ternary' if kind in ('sttn', 'dlt') else kind}")
    name = f"scaffold.{kind}"
    out, records = run_passes(model, [name], {name: pass_params(options)}, progress)
    return out, _step_report(name, model, out, records, records[0]["summary"], options.strict)


def prune_to_latency(model: Model, *, latency_ms: float | None = None, latency_ratio: float | None = None,
                     data=None, strict: bool = False, progress: Callable[[str], None] | None = None,
                     **options):
    """ALCS pruning to a latency budget measured in onnxruntime (``edgec prune``); ``(pruned Model,
    PruneResult)``. ``data``: a data source (path, ``package.module:function``) or a ``DataBundle``; without
    it the pruning is one-shot. ``options``: PruneOptions fields. Exit codes 4 (infeasible) and 5 (missed)."""
    from edgec.app import gates
    from edgec.prune.run import prune_model

    model = _input(model, "prune_to_latency")
    opts = _options(PruneOptions, "prune_to_latency", dict(options, latency_ms=latency_ms,
                                                           latency_ratio=latency_ratio, data=data, strict=strict),
                    allow=("input_shape",))
    opts.validate()
    gates.require_data(gates.from_options(opts), data, "prune_to_latency")
    gates.check_task(gates.from_options(opts), model.spec.task, "prune_to_latency")
    pruned, result = prune_model(model, opts, progress=progress)  # strict: refused inside, before any pruning
    return pruned, gates.release_pruned(model, pruned, result, None, opts)  # damage; a failed gate raises


# --- files --------------------------------------------------------------------------------------------

def export(model: Model, path: str | Path, **options) -> ExportResult:
    """Verified ONNX written atomically to ``path`` (``edgec export``): ``opset``, ``weights`` (auto | fp32 |
    int2), ``forms`` (measure | dq | matmulnbits). Refuses a model that still carries scaffolds."""
    from edgec.core.fileio import check_output

    model = _input(model, "export")
    return export_model(model, check_output(path), _options(ExportOptions, "export", options))


def save(model: Model, path: str | Path) -> SavedCheckpoint:
    """An edgec checkpoint (data only, atomic). Warns when ``load`` could not rebuild it as it stands: a
    class defined in ``__main__`` or inside a function, or ``from_module`` without ``config=`` for a class
    whose constructor takes arguments."""
    from edgec.app.api import save as save_checkpoint
    from edgec.core.fileio import check_output

    model = _input(model, "save")
    problem = _reload_problem(model)
    if problem:
        warnings.warn(f"edgec.save({Path(path).name}): {problem}", UserWarning, stacklevel=2)
    return save_checkpoint(model, check_output(path))


def load(path: str | Path, arch: str | None = None) -> Model:
    """A checkpoint as a ``Model``. A user architecture loads only when ``arch`` names it (a checkpoint never
    chooses code): ``package.module:Class`` or ``path/to/file.py:Class``."""
    from edgec.app.api import load as load_checkpoint

    return load_checkpoint(path, arch)


def _reload_problem(model: Model) -> str | None:
    module_name, _, qualname = model.arch.partition(":")
    if not qualname:
        return None  # a zoo name
    if module_name == "__main__" or "<locals>" in qualname:
        return (f"its architecture {model.arch} is defined in a script or a function, which edgec.load cannot "
                "import; define the class in a module and pass arch='file.py:Class' to from_module")
    origin = next((r for r in model.provenance if r.get("pass") == "import.module"), None)
    if origin is None or origin["params"].get("config_given", True):
        return None
    cls = getattr(sys.modules.get(module_name), qualname, None)
    try:
        takes = list(inspect.signature(cls).parameters) if isinstance(cls, type) else []
    except (TypeError, ValueError):  # no introspectable signature: nothing to say
        takes = []
    if takes:
        return (f"the constructor arguments of {model.arch} ({', '.join(takes)}) are unknown: from_module was "
                "called without config=, so edgec.load builds the class with its defaults; pass config={...} "
                "(or config={} when the defaults are right)")
    return None


# --- shared -------------------------------------------------------------------------------------------

def _input(model, fn: str) -> Model:
    """Type-check the model argument; record weights changed since the last record (the user's own training
    loop) so the provenance chain stays unbroken."""
    if isinstance(model, tuple) and model and isinstance(model[0], Model):
        raise EdgecError(f"{fn}() takes a Model, not a (Model, report) tuple; unpack it: model, report = ...")
    if isinstance(model, nn.Module):
        raise EdgecError(f"{fn}() takes an edgec Model; wrap the module first: edgec.from_module(module, inputs)")
    if not isinstance(model, Model):
        raise EdgecError(f"{fn}() takes an edgec Model (got {type(model).__name__})")
    device = next((t.device for t in model.gm.state_dict().values() if t.device.type != "cpu"), None)
    if device is not None:  # checks and exports sample their inputs on the CPU
        raise EdgecError(f"{fn}(): the model's tensors are on {device}; move it back first: model.gm.cpu()")
    last = next((r["output_digest"] for r in reversed(model.provenance) if "output_digest" in r), None)
    digest = model.digest()
    if last is None or last == digest:
        return model
    model = model.clone()
    model.provenance.append(provenance_record(
        "train.external", 1, {}, summary="weights changed outside edgec since the last record (e.g. your own "
                                         "training loop)", input_digest=last, output=model))
    return model


def _options(cls, fn: str, given: dict, allow: tuple = ()):
    """``cls(**given)``, refusing keywords that are not its fields (and the checkpoint-source fields, which
    have no meaning for a model in memory)."""
    source = {f.name for f in fields(SourceOptions)} - set(allow)
    known = [f.name for f in fields(cls) if f.name not in source]
    bad = [k for k in given if k not in known]
    if bad:
        raise EdgecError(f"{fn}() got unknown option(s) {', '.join(bad)}; its options: {', '.join(known)}")
    return cls(**given)


def _summary(model: Model) -> dict:
    return {"params": model.param_count(), "bytes": model.nbytes(), "digest": model.digest()}


def _step_report(step: str, model: Model, out: Model, records: list, summary: str, strict: bool,
                 skipped: list | None = None) -> StepReport:
    rows = [{"pass": r["pass"], "modified": r["modified"], "summary": r["summary"],
             "skipped": list(r.get("skipped") or []), "checks": r["checks"]} for r in records]
    skipped = [s for row in rows for s in row["skipped"]] if skipped is None else skipped
    if strict:
        refuse_skips(step, skipped)
    return StepReport(step=step, modified=any(r["modified"] for r in rows), summary=summary, skipped=skipped,
                      checks={r["pass"]: r["checks"] for r in rows}, passes=rows, before=_summary(model),
                      after=_summary(out), scaffolds=len(out.scaffolds()))


__all__ = ["StepReport", "export", "fold", "from_module", "load", "prune_to_latency", "save", "scaffold_binary",
           "scaffold_hrf", "scaffold_ternary"]
