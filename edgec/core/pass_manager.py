"""Pass infrastructure, modelled on onnx-ir's ``passes`` (itself derived from torch.fx's ``passes/infra``).

``Pass`` is a pure ``Model -> Model`` step with requires/ensures contracts; ``PassManager`` runs a sequence
and appends one provenance record per pass; ``PASSES`` and ``replay`` rebuild a checkpoint's structure from
its structural log. See docs/architecture.md#passes-and-provenance.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from edgec.core.errors import CheckFailed, EdgecError, first_line
from edgec.core.graph import Model
from edgec.core.provenance import record as provenance_record
from edgec.core.provenance import structural
from edgec.core.schema import check_pass_log


class PreconditionError(EdgecError):
    """A pass's ``requires`` contract does not hold for its input."""


class PostconditionError(CheckFailed):
    """A pass's ``ensures`` contract does not hold for its output (a bug or a failed check)."""


@dataclass
class PassResult:
    """What a pass did. ``skipped``: the layers it looked at and left alone, each ``{"layer", "reason"}``, in
    graph order, so that nothing a user might expect to change is left unchanged silently."""

    model: Model
    modified: bool
    checks: dict = field(default_factory=dict)
    summary: str = ""
    skipped: list[dict] = field(default_factory=list)


def skip(layer: str, reason: str, deliberate: bool = False) -> dict:
    """One entry of ``PassResult.skipped``. ``deliberate``: the user's options (--exclude, --keep-first-last) or
    a measurement (no latency saving) left the layer alone, rather than the pass being unable to handle it;
    such skips are reported but do not trip ``--strict``."""
    return {"layer": layer, "reason": reason, "deliberate": bool(deliberate)}


def describe_skips(skipped: list[dict], limit: int = 3) -> str:
    """``"a: why; b: why (+N more)"``: the first ``limit`` skips, for error messages."""
    shown = "; ".join(f"{s['layer']}: {s['reason']}" for s in skipped[:limit])
    return shown + (f" (+{len(skipped) - limit} more)" if len(skipped) > limit else "")


def refuse_skips(what: str, skipped: list[dict]) -> None:
    """``strict``: any layer the pass could not handle is an error (exit 2) that lists the first few; call
    before writing. Deliberate skips (the user's selection, a measured no-saving) are not."""
    forced = [s for s in skipped if not s.get("deliberate")]
    if forced:
        raise EdgecError(f"{what} could not handle {len(forced)} layer(s) and --strict is set: "
                         f"{describe_skips(forced)}; nothing written (fix or exclude those layers, or drop --strict "
                         "to accept the skips)")


class Pass:
    """Base class. Subclasses set ``name``/``version``, implement ``call`` and optionally the contracts.

    ``structural``: the pass changes module structure, so loading a checkpoint must replay it.
    ``scaffold_fold``: for scaffold passes, the name of the fold pass that removes what they insert.
    """

    name: str = ""
    version: int = 1
    structural: bool = True
    scaffold_fold: str | None = None

    def __init__(self, **params):
        self.params = params

    def requires(self, model: Model) -> None:  # raise PreconditionError
        """Contract on the input; default: none."""

    def ensures(self, model: Model) -> None:  # raise PostconditionError
        """Contract on the output; default: none."""

    def call(self, model: Model, *, replay: bool = False) -> PassResult:
        """Transform ``model`` (already a private clone; mutate freely). ``replay``: rebuilding a checkpoint's
        structure on freshly initialised weights, so skip verification and weight-dependent work."""
        raise NotImplementedError

    def __call__(self, model: Model, *, replay: bool = False, owned: bool = False) -> PassResult:
        """Run the pass on a private clone of ``model`` (left unchanged). ``owned``: the caller hands ``model``
        over (an intermediate nobody else holds), so the pass works on it directly instead of a copy."""
        if not replay:
            self.requires(model)
        result = self.call(model if owned else model.clone(), replay=replay)
        if not replay:
            self.ensures(result.model)
        return result

    def record(self) -> dict:
        return structural(self.name, self.version, self.params)


def model_metrics(model: Model) -> dict:
    return {"params": model.param_count(), "bytes": model.nbytes()}


class PassManager:
    """Run passes in order, recording provenance; raise on a failed check."""

    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)

    def __call__(self, model: Model, progress=None, owned: bool = False) -> tuple[Model, list[dict]]:
        """``owned``: the caller gives ``model`` up (it must not use it afterwards), so no pass copies it; else
        it is copied once, by the first pass, and each later pass works on the previous pass's output."""
        records = []
        out_digest = None
        for p in self.passes:
            if progress:
                progress(p.name)
            # the previous output's digest, unless something since changed it (nothing does in this loop)
            before_digest = out_digest if out_digest is not None else model.digest()
            before_metrics = model_metrics(model)
            result = p(model, owned=owned)
            out = result.model
            owned = True
            failed = {k: v for k, v in result.checks.items() if isinstance(v, dict) and v.get("passed") is False}
            if p.structural and result.modified:
                out.passes.append(p.record())
            skipped = {"skipped": list(result.skipped)} if result.skipped else {}
            record = provenance_record(p.name, p.version, dict(p.params), output=out, modified=result.modified,
                                       summary=result.summary, **skipped, input_digest=before_digest,
                                       checks=result.checks,
                                       metrics={"before": before_metrics, "after": model_metrics(out)})
            out_digest = record["output_digest"]
            # A no-op stays out of the artifact's history but is reported to the caller, unless it skipped
            # something: what was left alone, and why, belongs to the artifact's story.
            if result.modified or result.skipped:
                out.provenance.append(record)
            records.append(record)
            if failed:
                name, check = next(iter(failed.items()))
                raise CheckFailed(f"{p.name}: check '{name}' failed: {_describe_check(check)}")
            model = out
        return model, records


def _describe_check(check: dict) -> str:
    if "rel_error" in check:
        return f"relative error {check['rel_error']:.3g} exceeds tolerance {check['tolerance']:.3g}"
    return str(check)


# Registry of pass names -> "module:Class" (lazy, so listing passes imports nothing heavy).
PASSES: dict[str, str] = {
    "fold.batchnorm": "edgec.passes.bnfold:FoldBatchNorm",
    "scaffold.hrf": "edgec.passes.hrf:HRFScaffold",
    "fold.hrf": "edgec.passes.hrf:FoldHRF",
    "scaffold.sttn": "edgec.passes.sttn:STTNScaffold",
    "fold.sttn": "edgec.passes.sttn:FoldSTTN",
    "scaffold.dlt": "edgec.passes.dlt:DLTScaffold",
    "fold.dlt": "edgec.passes.dlt:FoldDLT",
    "prune.channels": "edgec.passes.prune_channels:PruneChannels",
    "scaffold.binary": "edgec.passes.binary:BinaryScaffold",
    "fold.binary": "edgec.passes.binary:FoldBinary",
}


# ``Model.config`` entry written by ``prune.channels``: ``{channel group: units}`` for every group of the
# architecture at the point where its pruning starts (see ``width_run``), so the config states the real widths.
PRUNED_WIDTHS = "pruned_widths"


def width_run(records: list[dict]) -> tuple[int, int]:
    """``(start, end)``: the first contiguous run of ``prune.channels`` records in a pass log, whose effect a
    config's ``PRUNED_WIDTHS`` entry holds (rebuilding applies the widths at ``start`` instead of replaying the
    run); ``(0, 0)`` when the log has none (the widths then apply to the architecture as built)."""
    start = next((i for i, r in enumerate(records) if r.get("pass") == "prune.channels"), None)
    if start is None:
        return 0, 0
    end = start
    while end < len(records) and records[end].get("pass") == "prune.channels":
        end += 1
    return start, end


def get_pass(name: str) -> type[Pass]:
    target = PASSES.get(name)
    if target is None:
        raise EdgecError(f"unknown pass '{name}' in checkpoint; this edgec knows: {', '.join(sorted(PASSES))}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def replay(model: Model, records: list[dict], *, max_elements: int | None = None, what: str = "checkpoint",
           owned: bool = False) -> Model:
    """Rebuild structure by re-running recorded structural passes from their parameters. ``owned``: ``model``
    is the caller's to give up (freshly built), so the passes rebuild it in place instead of on copies.

    ``records`` are checked first (known passes, known parameters within bounds: edgec.core.schema), so a file
    cannot make a pass allocate without limit; ``max_elements`` bounds the weights and buffers the model may hold
    after any step. A record that does not fit the model is an EdgecError naming it, never a crash."""
    check_pass_log(records, what)
    for i, rec in enumerate(records):
        cls = get_pass(rec["pass"])
        if rec["version"] > cls.version:
            raise EdgecError(f"{what} needs pass {rec['pass']} v{rec['version']}; this edgec has v{cls.version}")
        where = f"{what}: passes[{i}] ({rec['pass']})"
        try:
            model = cls(**rec.get("params", {}))(model, replay=True, owned=owned or i > 0).model
        except EdgecError as exc:
            raise EdgecError(f"{where} cannot be replayed on {model.arch}: {exc}") from None
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:  # parameters that do not fit
            raise EdgecError(f"{where} cannot be replayed on {model.arch}: {type(exc).__name__}: "
                             f"{first_line(exc)}") from None
        model.passes.append(dict(rec))
        if max_elements is not None:
            held = sum(t.numel() for t in model.gm.state_dict().values())
            if held > max_elements:
                raise EdgecError(f"{where} grows the model to {held:,} elements, more than the {max_elements:,} "
                                 "this file's weights allow; refusing it")
    return model
