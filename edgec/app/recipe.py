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
``{recipe_dir}`` in a value is replaced by the recipe file's folder, for bundled inputs. ``plan`` checks the
whole recipe before anything runs (also for ``--dry-run``): every step's parameters against the schema of its
command (edgec.app.params), cross-field rules, architectures and data entry points (resolved, not run), input
files and output paths. Every run writes ``report.json`` in the output folder: each step's parameters, status,
result (metrics, checks, digests), with paths relative to that folder. Exit codes: see ``STATUS``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgec.app.gates import RecipeGates, check_recipe, parse_recipe
from edgec.app.params import FILE_INPUTS, FILE_OUTPUTS, check_values, recipe_types, required_fields
from edgec.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUDGET_INFEASIBLE,
    EXIT_BUDGET_MISSED,
    EXIT_CHECK_FAILED,
    EXIT_INTERNAL,
    EdgecError,
    GateFailed,
)
from edgec.core.fileio import atomic_write, check_output, existing_ancestor
from edgec.core.limits import load_toml, read_text_file
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
    default_suffix: str | None = None  # without an output: <input stem><suffix> beside the input (as the API does)

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
    "fold": StepDef("fold", FoldOptions, optional_args=("output",), default_suffix=".folded.pt"),
    "export": StepDef("export", ExportOptions, optional_args=("output",), default_suffix=".onnx"),
    "finetune": StepDef("finetune", FinetuneOptions),
    "eval": StepDef("evaluate", EvalOptions, ("input",)),
    "profile": StepDef("profile", ProfileOptions, optional_args=("output",), default_suffix=".latency.json"),
    "prune": StepDef("prune", PruneOptions),
    "inspect": StepDef("inspect", InspectOptions, ("input",)),
}

# JSON schemas (docs/json.md) of `edgec run --dry-run --json` and of report.json / `edgec run --json`.
PLAN_SCHEMA, REPORT_SCHEMA = "edgec.run.plan/1", "edgec.run/1"
TOP_LEVEL = ("name", "description", "steps", "gates")
REPORT = "report.json"
# A failed step's status, by the exit code of its error (a failed gate is "gate failed", a bug "internal error").
STATUS = {EXIT_CHECK_FAILED: "check failed", EXIT_BAD_INPUT: "bad input", EXIT_BUDGET_INFEASIBLE: "budget infeasible",
          EXIT_BUDGET_MISSED: "budget missed"}
# Inputs that name a folder (the others are files; ``data`` may be either).
FOLDER_INPUTS, EITHER_INPUTS = ("folder",), ("data",)


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
    gates: RecipeGates | None = None  # the [gates] table, checked after the last step (edgec.app.gates)

    def describe(self) -> dict:
        return {"schema": PLAN_SCHEMA, "recipe": self.recipe.name, "name": self.name, "out_dir": self.out_label(),
                "steps": [{"run": s.run, "params": s.raw} for s in self.steps],
                "gates": None if self.gates is None else self.gates.raw}

    def out_label(self) -> str:
        """The output folder as reports show it: as given when relative, else relative to the recipe's folder
        (``{recipe_dir}/...``) or the current one, else just its name: never an absolute path."""
        if not self.out_dir.is_absolute():
            return self.out_dir.as_posix()
        out = self.out_dir.resolve()
        for base, label in ((self.recipe.parent.resolve(), "{recipe_dir}"), (Path.cwd().resolve(), ".")):
            if out == base or base in out.parents:
                rel = out.relative_to(base).as_posix()
                return label if rel == "." else (rel if label == "." else f"{label}/{rel}")
        return out.name


# --- reading and checking a recipe -----------------------------------------------------------------------

def _substitute(value, recipe_dir: str):
    if isinstance(value, str):
        return value.replace("{recipe_dir}", recipe_dir)
    if isinstance(value, list):
        return [_substitute(v, recipe_dir) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, recipe_dir) for k, v in value.items()}
    return value


def _read(recipe: Path) -> dict:
    """The recipe's TOML document (bounded in size and depth), checked at the top level."""
    doc = load_toml(read_text_file(recipe, "recipe"), str(recipe))
    unknown = sorted(set(doc) - set(TOP_LEVEL))
    if unknown:
        raise EdgecError(f"{recipe}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(TOP_LEVEL)}")
    for key in ("name", "description"):
        if key in doc and not isinstance(doc[key], str):
            raise EdgecError(f"{recipe}: '{key}' must be a string, got {type(doc[key]).__name__}")
    if not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise EdgecError(f"{recipe}: no [[steps]] to run ('steps' must be an array of tables)")
    return doc


def _step(where: str, raw, recipe_dir: str) -> Step:
    """One step: its name, parameter names, required ones, values (the command's schema) and cross-field
    rules (the options' ``validate()``)."""
    if not isinstance(raw, dict):
        raise EdgecError(f"{where} must be a table ([[steps]]), got {type(raw).__name__}")
    if "run" not in raw:
        raise EdgecError(f"{where} has no 'run' key; steps: {', '.join(STEPS)}")
    name = raw["run"]
    if not isinstance(name, str):
        raise EdgecError(f"{where}: 'run' must be a string naming a step ({', '.join(STEPS)}), got "
                         f"{type(name).__name__}")
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
    check_values(sdef.options, params, where=where, args=sdef.args)
    options = _options(sdef, params)
    if hasattr(options, "validate"):
        try:
            options.validate()
        except EdgecError as exc:
            raise EdgecError(f"{where}: {exc}") from None
    return Step(name, params, {k: v for k, v in raw.items() if k != "run"})


def _options(sdef: StepDef, params: dict):
    """The step's options object (None for a step without options)."""
    if sdef.options is None:
        return None
    return sdef.options(**{k: v for k, v in params.items() if k not in sdef.args})


def _check_code(where: str, step: Step) -> None:
    """Input shapes parse, architectures resolve (the module or file imports and has the class; the model is
    not built) with a valid config, and data entry points name a module that exists (not imported, not called)."""
    from edgec.core.spec import parse_input_shape
    from edgec.models.source import check_sizes, full_config, parse_arch_config, resolve  # torch: only when used

    params = step.params
    shapes = params.get("input_shape") or []
    try:
        for text in [shapes] if isinstance(shapes, str) else shapes:
            parse_input_shape(text)
        if step.run == "zoo.create":
            full_config(params["name"], params.get("set"))
        elif params.get("arch"):
            resolve(params["arch"])
            check_sizes(params["arch"], parse_arch_config(params.get("arch_config")) or {})
    except EdgecError as exc:
        raise EdgecError(f"{where}: {exc}") from None
    for key in STEPS[step.run].inputs:
        value = params.get(key)
        if isinstance(value, str) and _is_entry_point(value):
            _check_entry_point(where, key, value)


def _check_entry_point(where: str, key: str, value: str) -> None:
    module = value.partition(":")[0]
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)  # as the data loader does
    try:
        spec = importlib.util.find_spec(module)
    except (Exception, SystemExit) as exc:  # a parent package that fails to import
        raise EdgecError(f"{where}: {key} '{value}': cannot import '{module}' ({type(exc).__name__})") from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    if spec is None:
        raise EdgecError(f"{where}: {key} '{value}': no module named '{module}' (the current folder is importable)")
    if spec.origin in ("built-in", "frozen"):
        raise EdgecError(f"{where}: {key} '{value}' names a built-in module, not a function returning data")


class _Files:
    """The files a recipe reads and writes, to refuse an output that would overwrite the recipe, the report,
    an input or another step's output. Keys: resolved absolute paths."""

    def __init__(self, recipe: Path, out_dir: Path):
        self.protected = {_key(recipe): "the recipe", _key(out_dir / REPORT): f"the run's {REPORT}"}
        self.produced: dict[str, tuple[int, str]] = {}  # path -> (the step that writes it, its parameter)
        self.read: dict[str, int] = {}  # path -> the first step that reads it (files the recipe did not write)


def _key(path: Path) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError, ValueError):
        return str(Path(path).absolute())


def _check_inputs(where: str, i: int, step: Step, out_dir: Path, files: _Files) -> list[Path]:
    """Input files exist (with the right kind) or an earlier step writes them; returns their paths."""
    paths = []
    for key in STEPS[step.run].inputs:
        value = step.params.get(key)
        if value is None or _is_entry_point(value):
            continue
        path = _resolve(value, out_dir)
        paths.append(path)
        if _key(path) in files.produced:
            continue
        if not path.exists():
            raise EdgecError(f"{where}: {key} '{value}' does not exist and no earlier step writes it")
        if key in FOLDER_INPUTS and not path.is_dir():
            raise EdgecError(f"{where}: {key} '{value}' is not a folder")
        if key not in FOLDER_INPUTS + EITHER_INPUTS and not path.is_file():
            raise EdgecError(f"{where}: {key} '{value}' is not a regular file")
        files.read.setdefault(_key(path), i)
    return paths


def _step_outputs(step: Step, out_dir: Path) -> list[tuple[str, str, Path]]:
    """``(parameter, value, path)`` of each file the step writes, a default output included."""
    sdef, params = STEPS[step.run], step.params
    outs = [(k, params[k], _resolve(params[k], out_dir)) for k in sdef.outputs if k in params]
    if sdef.default_suffix and "output" not in params and "input" in params:
        src = _resolve(params["input"], out_dir)
        outs.append(("output", f"(default) {src.stem}{sdef.default_suffix}",
                     src.with_name(f"{src.stem}{sdef.default_suffix}")))
    return outs


def _check_outputs(where: str, i: int, step: Step, out_dir: Path, inputs: list[Path], files: _Files) -> None:
    """Each output can be written (edgec.core.fileio.check_output), overwrites no input, the recipe or its
    report, and no two steps write the same file."""
    for key, value, path in _step_outputs(step, out_dir):
        try:
            check_output(path, *inputs)
        except EdgecError as exc:
            raise EdgecError(f"{where}: {key} '{value}': {exc}") from None
        k = _key(path)
        if k in files.protected:
            raise EdgecError(f"{where}: {key} '{value}' would overwrite {files.protected[k]}")
        if k in files.produced:
            j, other = files.produced[k]
            by = f"this step's {other}" if j == i else f"written by step {j}"
            raise EdgecError(f"{where}: {key} '{value}' is also {by}; give each output its own file")
        if k in files.read:
            raise EdgecError(f"{where}: {key} '{value}' is an input of step {files.read[k]}; inputs are never "
                             "overwritten")
        files.produced[k] = (i, key)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgecError(f"--out {out_dir} is a file; give a folder for the outputs and {REPORT}")
    folder = existing_ancestor(out_dir / REPORT)
    if not folder.is_dir():
        raise EdgecError(f"--out {out_dir}: {folder} is a file, not a folder")
    check_output(out_dir / REPORT)


def plan(recipe: str | Path, out: str | Path | None = None) -> Plan:
    """Parse and validate a recipe without running anything: what ``--dry-run`` shows."""
    recipe = Path(recipe)
    doc = _read(recipe)
    out_dir = Path(out) if out else Path("out") / recipe.stem
    _check_out_dir(out_dir)
    recipe_dir = str(recipe.parent.resolve())
    steps, files = [], _Files(recipe, out_dir)
    for i, raw in enumerate(doc["steps"], 1):
        where = f"{recipe}: step {i}"
        step = _step(where, raw, recipe_dir)
        where = f"{where} ({step.run})"
        inputs = _check_inputs(where, i, step, out_dir, files)
        _check_outputs(where, i, step, out_dir, inputs, files)
        _check_code(where, step)
        steps.append(step)
    gates = parse_recipe(doc.get("gates"), str(recipe), steps, out_dir, recipe_dir)
    return Plan(recipe, str(doc.get("name", recipe.stem)), out_dir, steps, gates)


# --- running ---------------------------------------------------------------------------------------------

def _resolve(value: str, out_dir: Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() else out_dir / p


# Steps whose API call takes a one-line progress callback (finetune's takes a training display instead; its
# step line is repeated by the heartbeat while it trains).
_SAYS = ("scaffold_hrf", "scaffold_ternary", "scaffold_binary", "fold", "evaluate", "profile", "prune")


def _call(api, step: Step, out_dir: Path, say=None):
    """``api.<func>(*args, options)`` for one step; file parameters resolved against ``out_dir``; ``say``
    takes the step's progress messages."""
    sdef = STEPS[step.run]
    params = {k: str(_resolve(v, out_dir)) if k in sdef.inputs + sdef.outputs and not _is_entry_point(v) else v
              for k, v in step.params.items()}
    args = [params.get(a) for a in sdef.args]
    if sdef.options is not None:
        args.append(_options(sdef, params))
    return getattr(api, sdef.func)(*args, **({"progress": say} if say and sdef.func in _SAYS else {}))


def _run_step(api, i: int, step: Step, out_dir: Path, report: dict, say=None) -> None:
    """Run one step into a report entry; a failure sets the report's status and exit code."""
    entry = {"step": i, "run": step.run, "params": step.raw}
    start = time.perf_counter()
    try:
        entry["result"] = _call(api, step, out_dir, say).to_dict()
        entry["status"] = "ok"
    except GateFailed as exc:  # the artifact went to <output>.rejected; the entry says which gate and by how much
        entry.update(status="gate failed", error=str(exc), gates=exc.gates)
        report.update(status="failed", exit_code=exc.exit_code)
    except EdgecError as exc:  # CheckFailed included (exit 1)
        entry.update(status=STATUS.get(exc.exit_code, "bad input"), error=str(exc))
        report.update(status="failed", exit_code=exc.exit_code)
    except Exception as exc:  # a bug: recorded, not a traceback
        entry.update(status="internal error", error=f"{type(exc).__name__}: {exc}")
        report.update(status="failed", exit_code=EXIT_INTERNAL)
    entry["seconds"] = round(time.perf_counter() - start, 2)
    report["steps"].append(entry)


def portable(obj, plan: Plan):
    """``obj`` with the absolute paths of this run made relative: inside the output folder to it, inside the
    recipe's folder to ``{recipe_dir}/``, inside the current folder to it (reports move with their folder)."""
    out, recipe_dir, cwd = plan.out_dir.resolve(), plan.recipe.parent.resolve(), Path.cwd().resolve()
    rules = [(f"{out}{os.sep}", ""), (str(out), "."), (f"{recipe_dir}{os.sep}", "{recipe_dir}/"),
             (str(recipe_dir), "{recipe_dir}"), (f"{cwd}{os.sep}", "")]
    if not plan.out_dir.is_absolute() and str(plan.out_dir) not in ("", "."):
        rules.append((f"{plan.out_dir}{os.sep}", ""))  # "out/r/x.pt" as the API was called: "x.pt"
    rules.sort(key=lambda r: -len(r[0]))  # the deepest folder first

    def fix(value):
        if isinstance(value, str):
            for old, new in rules:
                if old in value:
                    value = value.replace(old, new) if old.endswith(os.sep) else _replace_whole(value, old, new)
            return value
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    return fix(obj)


def _replace_whole(text: str, path: str, new: str) -> str:
    """Replace ``path`` where it is a whole path (not the start of a longer name, e.g. ``/tmp/ab`` in
    ``/tmp/abc``)."""
    out, start = [], 0
    while (i := text.find(path, start)) >= 0:
        end = i + len(path)
        whole = end == len(text) or not (text[end].isalnum() or text[end] in "._-")
        out.append(text[start:i] + (new if whole else path))
        start = end
    return "".join(out) + text[start:]


def execute(plan: Plan, progress=None) -> dict:
    """Run the steps in order; stop at the first failure. Always writes report.json."""
    from edgec.app import api  # torch only when steps run: a dry run stays light
    from edgec.core.graph import canonical_json  # imports torch

    plan.out_dir.mkdir(parents=True, exist_ok=True)
    task = progress.add_task(f"recipe {plan.name}", total=len(plan.steps)) if progress else None
    report = {"schema": REPORT_SCHEMA, "recipe": plan.recipe.name, "name": plan.name, "out_dir": plan.out_label(),
              "status": "ok", "exit_code": 0, "steps": [], "gates": None}
    for i, step in enumerate(plan.steps, 1):
        label, say = f"step {i}/{len(plan.steps)}: {step.run}", None
        if progress:
            progress.update(task, description=label)
            say = lambda m, label=label: progress.update(task, description=f"{label}: {m}")  # noqa: E731
        _run_step(api, i, step, plan.out_dir, report, say)
        if progress:
            progress.advance(task)
        if report["status"] != "ok":
            break
    if plan.gates is not None and report["status"] == "ok":
        check_recipe(plan.gates, plan.out_dir, report)
    report = portable(report, plan)
    atomic_write(plan.out_dir / REPORT, (canonical_json(report) + "\n").encode())
    return report
