"""Recipes: a TOML list of steps named and parameterised like the CLI commands, for CI pipelines.

    name = "release"
    [[steps]]
    run = "zoo.create"
    name = "conformer"
    output = "base.pt"
    [[steps]]
    run = "export"
    input = "base.pt"
    output = "model.onnx"

Relative paths resolve against the output folder (``--out``, default ``out/<recipe stem>``); the text
``{recipe_dir}`` in a value is replaced by the recipe file's folder, for bundled inputs. Every run writes
``report.json`` in the output folder: each step's parameters, status, result (metrics, checks, digests).
Exit codes: 0 success, 1 a step failed its check, 2 bad input (recipe or data).
"""
from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgec.app.params import FILE_INPUTS, FILE_OUTPUTS, recipe_types, required_fields
from edgec.core.errors import EXIT_INTERNAL, CheckFailed, EdgecError
from edgec.core.fileio import atomic_write
from edgec.core.options import (
    EvalOptions,
    ExportOptions,
    FinetuneOptions,
    FoldOptions,
    InspectOptions,
    ProfileOptions,
    PruneOptions,
    ScaffoldBinaryOptions,
    ScaffoldHrfOptions,
    ScaffoldTernaryOptions,
    ZooCreateOptions,
)


@dataclass(frozen=True)
class StepDef:
    """A step kind: ``api.<func>(*args, options)``; its parameters are ``args`` plus the recipe fields of
    the ``options`` dataclass, with their value types."""

    func: str  # name of the function in edgec.app.api
    options: type | None  # the command's options dataclass (edgec.core.options)
    args: tuple = ("input", "output")  # the call's leading arguments: paths (or the zoo name)
    optional_args: tuple = ()  # those a step may leave out (None: the API's default)

    @property
    def types(self) -> dict[str, tuple[tuple, tuple | None]]:
        """{parameter: (accepted types, list element types)}, in the order the parameters are declared."""
        return {**dict.fromkeys(self.args, ((str,), None)), **(recipe_types(self.options) if self.options else {})}

    @property
    def required(self) -> list[str]:
        names = [a for a in self.args if a not in self.optional_args]
        names += required_fields(self.options) if self.options else []
        return sorted(names, key=lambda k: k == "output")  # the output last, as the CLI reads

    @property
    def inputs(self) -> list[str]:
        """Parameters that are files which must exist (or be produced earlier)."""
        return [k for k in self.types if k in FILE_INPUTS]

    @property
    def outputs(self) -> list[str]:
        """Parameters that are files this step writes."""
        return [k for k in self.types if k in FILE_OUTPUTS]


STEPS: dict[str, StepDef] = {
    "zoo.create": StepDef("zoo_create", ZooCreateOptions, ("name", "output")),
    "import.hf": StepDef("import_hf", None, ("folder", "output")),
    "scaffold.hrf": StepDef("scaffold_hrf", ScaffoldHrfOptions),
    "scaffold.ternary": StepDef("scaffold_ternary", ScaffoldTernaryOptions),
    "scaffold.binary": StepDef("scaffold_binary", ScaffoldBinaryOptions),
    "fold": StepDef("fold", FoldOptions, optional_args=("output",)),
    "export": StepDef("export", ExportOptions, optional_args=("output",)),
    "finetune": StepDef("finetune", FinetuneOptions),
    "eval": StepDef("evaluate", EvalOptions, ("input",)),
    "profile": StepDef("profile", ProfileOptions, optional_args=("output",)),
    "prune": StepDef("prune", PruneOptions),
    "inspect": StepDef("inspect", InspectOptions, ("input",)),
}

# JSON schemas (docs/json.md) of `edgec run --dry-run --json` and of report.json / `edgec run --json`.
PLAN_SCHEMA, REPORT_SCHEMA = "edgec.run.plan/1", "edgec.run/1"

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
               list: "a list of strings", dict: "a table"}


def _check_type(where: str, key: str, value, types: dict) -> None:
    expected, element = types[key]
    ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
    if isinstance(value, list) and ok:
        ok = all(isinstance(v, element) for v in value)
    if not ok:
        names = " or ".join(_TYPE_NAMES[t] for t in expected)
        raise EdgecError(f"{where}: '{key}' must be {names}, got {value!r}")


def _is_entry_point(value: str) -> bool:
    """``package.module:function`` data sources are not files."""
    module, sep, func = value.partition(":")
    return bool(sep) and func.isidentifier() and all(p.isidentifier() for p in module.split("."))


@dataclass
class Step:
    run: str
    params: dict  # with {recipe_dir} substituted
    raw: dict  # as written in the recipe (reported, so reports hold no absolute paths)


@dataclass
class Plan:
    recipe: Path
    name: str
    out_dir: Path
    steps: list[Step]

    def describe(self) -> dict:
        return {"schema": PLAN_SCHEMA, "recipe": self.recipe.name, "name": self.name, "out_dir": str(self.out_dir),
                "steps": [{"run": s.run, "params": s.raw} for s in self.steps]}


def _substitute(value, recipe_dir: str):
    if isinstance(value, str):
        return value.replace("{recipe_dir}", recipe_dir)
    if isinstance(value, list):
        return [_substitute(v, recipe_dir) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, recipe_dir) for k, v in value.items()}
    return value


def _read(recipe: Path) -> dict:
    """The recipe's TOML document, checked at the top level."""
    if not recipe.exists():
        raise EdgecError(f"no such recipe: {recipe}")
    try:
        doc = tomllib.loads(recipe.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgecError(f"{recipe} is not valid TOML: {exc}") from None
    unknown = set(doc) - {"name", "steps", "description"}
    if unknown:
        raise EdgecError(f"{recipe}: unknown top-level key(s) {', '.join(sorted(unknown))}")
    if not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise EdgecError(f"{recipe}: no [[steps]] to run")
    return doc


def _step(where: str, raw, recipe_dir: str) -> Step:
    """One step, its name and parameters checked (names, required ones, value types)."""
    if not isinstance(raw, dict) or "run" not in raw:
        raise EdgecError(f"{where} has no 'run' key; steps: {', '.join(STEPS)}")
    name = raw["run"]
    sdef = STEPS.get(name)
    if sdef is None:
        raise EdgecError(f"{where}: unknown step '{name}'; steps: {', '.join(STEPS)}")
    where = f"{where} ({name})"
    params = {k.replace("-", "_"): _substitute(v, recipe_dir) for k, v in raw.items() if k != "run"}
    types = sdef.types
    extra = sorted(set(params) - set(types))
    if extra:
        raise EdgecError(f"{where}: unknown parameter(s) {', '.join(extra)}; allowed: {', '.join(sorted(types))}")
    missing = [k for k in sdef.required if k not in params]
    if missing:
        raise EdgecError(f"{where}: missing parameter(s) {', '.join(missing)}")
    for key, value in params.items():
        _check_type(where, key, value, types)
    return Step(name, params, {k: v for k, v in raw.items() if k != "run"})


def _check_files(where: str, step: Step, out_dir: Path, produced: set) -> None:
    """Input files must exist or be written by an earlier step; records the files this step writes."""
    sdef, params = STEPS[step.run], step.params
    for key in sdef.inputs:
        if key in params and not _is_entry_point(params[key]):
            path = _resolve(params[key], out_dir)
            if str(path) not in produced and not path.exists():
                raise EdgecError(f"{where} ({step.run}): {key} '{params[key]}' does not exist and no earlier "
                                 "step writes it")
    for key in sdef.outputs:
        if key in params:
            produced.add(str(_resolve(params[key], out_dir)))


def plan(recipe: str | Path, out: str | Path | None = None) -> Plan:
    """Parse and validate a recipe without running anything."""
    recipe = Path(recipe)
    doc = _read(recipe)
    out_dir = Path(out) if out else Path("out") / recipe.stem
    recipe_dir = str(recipe.parent.resolve())
    steps, produced = [], set()
    for i, raw in enumerate(doc["steps"], 1):
        where = f"{recipe}: step {i}"
        steps.append(_step(where, raw, recipe_dir))
        _check_files(where, steps[-1], out_dir, produced)
    return Plan(recipe, str(doc.get("name", recipe.stem)), out_dir, steps)


def _resolve(value: str, out_dir: Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() else out_dir / p


def _call(api, step: Step, out_dir: Path):
    """``api.<func>(*args, options)`` for one step; file parameters resolved against ``out_dir``."""
    sdef = STEPS[step.run]
    params = {k: str(_resolve(v, out_dir)) if k in sdef.inputs + sdef.outputs and not _is_entry_point(v) else v
              for k, v in step.params.items()}
    args = [params.get(a) for a in sdef.args]
    if sdef.options is not None:
        args.append(sdef.options(**{k: v for k, v in params.items() if k not in sdef.args}))
    return getattr(api, sdef.func)(*args)


def _run_step(api, i: int, step: Step, out_dir: Path, report: dict) -> None:
    """Run one step into a report entry; a failure sets the report's status and exit code."""
    entry = {"step": i, "run": step.run, "params": step.raw}
    start = time.perf_counter()
    try:
        entry["result"] = _call(api, step, out_dir).to_dict()
        entry["status"] = "ok"
    except CheckFailed as exc:
        entry.update(status="check failed", error=str(exc))
        report.update(status="failed", exit_code=exc.exit_code)
    except EdgecError as exc:
        entry.update(status="bad input", error=str(exc))
        report.update(status="failed", exit_code=exc.exit_code)
    except Exception as exc:  # a bug: recorded, not a traceback
        entry.update(status="internal error", error=f"{type(exc).__name__}: {exc}")
        report.update(status="failed", exit_code=EXIT_INTERNAL)
    entry["seconds"] = round(time.perf_counter() - start, 2)
    report["steps"].append(entry)


def execute(plan: Plan, progress=None) -> dict:
    """Run the steps in order; stop at the first failure. Always writes report.json."""
    from edgec.app import api  # torch only when steps run: a dry run stays light
    from edgec.core.graph import canonical_json  # imports torch

    plan.out_dir.mkdir(parents=True, exist_ok=True)
    task = progress.add_task(f"recipe {plan.name}", total=len(plan.steps)) if progress else None
    report = {"schema": REPORT_SCHEMA, "recipe": plan.recipe.name, "name": plan.name, "out_dir": str(plan.out_dir),
              "status": "ok", "exit_code": 0, "steps": []}
    for i, step in enumerate(plan.steps, 1):
        if progress:
            progress.update(task, description=f"step {i}/{len(plan.steps)}: {step.run}")
        _run_step(api, i, step, plan.out_dir, report)
        if progress:
            progress.advance(task)
        if report["status"] != "ok":
            break
    atomic_write(plan.out_dir / "report.json", (canonical_json(report) + "\n").encode())
    return report
