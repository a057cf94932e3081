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
from dataclasses import dataclass, field
from pathlib import Path

from edgec.core.errors import EXIT_INTERNAL, CheckFailed, EdgecError


@dataclass(frozen=True)
class StepDef:
    func: str  # name of the function in edgec.app.api
    required: tuple = ()
    optional: tuple = ()
    inputs: tuple = ()  # parameters that are files which must exist (or be produced earlier)
    outputs: tuple = ()  # parameters that are files this step writes
    rename: dict = field(default_factory=dict)  # recipe key -> api keyword


STEPS: dict[str, StepDef] = {
    "zoo.create": StepDef("zoo_create", ("name", "output"), ("set", "seed"), (), ("output",),
                          {"set": "overrides"}),
    "import.hf": StepDef("import_hf", ("folder", "output"), (), ("folder",), ("output",)),
    "scaffold.hrf": StepDef("scaffold_hrf", ("input", "output"), ("expand", "include", "exclude", "init", "seed", "arch"),
                            ("input",), ("output",), {"input": "input_path"}),
    "scaffold.ternary": StepDef("scaffold_ternary", ("input", "output"),
                                ("method", "group_size", "activations", "include", "exclude", "keep_first_last",
                                 "seed", "arch"), ("input",), ("output",), {"input": "input_path"}),
    "scaffold.binary": StepDef("scaffold_binary", ("input", "output"),
                               ("activations", "latent_weight", "include", "exclude", "keep_first_last", "arch"),
                               ("input",), ("output",), {"input": "input_path"}),
    "fold": StepDef("fold", ("input",), ("output", "arch"), ("input",), ("output",), {"input": "input_path"}),
    "export": StepDef("export", ("input",), ("output", "opset", "arch", "weights", "forms"), ("input",), ("output",),
                      {"input": "input_path"}),
    "finetune": StepDef("finetune", ("input", "data", "output"),
                        ("epochs", "batch_size", "lr", "weight_decay", "warmup", "grad_clip", "seed", "teacher",
                         "kd_weight", "kd_temperature", "distill", "off_weight", "off_layers", "binary_weights",
                         "resume", "resume_file", "keep_resume", "device", "n_mels",
                         "frames", "val_fraction", "arch"), ("input", "data", "teacher"), ("output", "resume_file"),
                        {"input": "input_path"}),
    "eval": StepDef("evaluate", ("input", "data"), ("split", "threads", "latency_batch", "no_latency", "arch", "n_mels",
                                                     "frames"), ("input", "data"), (),
                    {"input": "input_path"}),
    "profile": StepDef("profile", ("input",), ("output", "threads", "input_shape", "batch", "table", "plot",
                                               "patterns", "refresh", "arch"),
                       ("input", "table"), ("output", "plot"), {"input": "input_path"}),
    "prune": StepDef("prune", ("input", "output"),
                     ("latency_ms", "latency_ratio", "data", "table", "pattern", "threads", "batch", "input_shape",
                      "admm_epochs", "finetune_epochs", "rho", "lr", "min_density", "max_retries", "seed", "n_mels",
                      "frames", "arch"), ("input", "data", "table"), ("output",), {"input": "input_path"}),
    "inspect": StepDef("inspect", ("input",), ("arch",), ("input",), (), {"input": "path"}),
}


# Value types of step parameters (the same names as the CLI options); checked before anything runs.
_STR, _INT, _NUM, _BOOL = (str,), (int,), (int, float), (bool,)
PARAM_TYPES: dict[str, tuple] = {
    **dict.fromkeys(("name", "output", "input", "folder", "data", "teacher", "arch", "init", "split", "device",
                     "resume_file", "method", "activations", "weights", "distill", "table", "plot", "forms",
                     "pattern"), _STR),
    **dict.fromkeys(("seed", "expand", "opset", "epochs", "batch_size", "threads", "latency_batch", "n_mels",
                     "frames", "group_size", "admm_epochs", "finetune_epochs", "max_retries", "batch"), _INT),
    **dict.fromkeys(("lr", "weight_decay", "warmup", "grad_clip", "kd_weight", "kd_temperature", "val_fraction",
                     "off_weight", "latency_ms", "latency_ratio", "rho", "margin", "min_density"), _NUM),
    **dict.fromkeys(("resume", "keep_resume", "no_latency", "keep_first_last", "refresh"), _BOOL),
    **dict.fromkeys(("include", "exclude", "off_layers", "input_shape", "patterns"), (str, list)),
    "set": (dict,),
    **dict.fromkeys(("latent_weight", "binary_weights"), (str, list)),
}


def _check_type(where: str, key: str, value) -> None:
    expected = PARAM_TYPES.get(key)
    if expected is None:
        return
    ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
    if isinstance(value, list) and ok:
        ok = all(isinstance(v, (int, float) if key in ("latent_weight", "binary_weights") else str) for v in value)
    if not ok:
        names = " or ".join({str: "a string", int: "an integer", float: "a number", bool: "true/false",
                             list: "a list of strings", dict: "a table"}[t] for t in expected)
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
        return {"recipe": self.recipe.name, "name": self.name, "out_dir": str(self.out_dir),
                "steps": [{"run": s.run, "params": s.raw} for s in self.steps]}


def _substitute(value, recipe_dir: str):
    if isinstance(value, str):
        return value.replace("{recipe_dir}", recipe_dir)
    if isinstance(value, list):
        return [_substitute(v, recipe_dir) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, recipe_dir) for k, v in value.items()}
    return value


def plan(recipe: str | Path, out: str | Path | None = None) -> Plan:
    """Parse and validate a recipe without running anything."""
    recipe = Path(recipe)
    if not recipe.exists():
        raise EdgecError(f"no such recipe: {recipe}")
    try:
        doc = tomllib.loads(recipe.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgecError(f"{recipe} is not valid TOML: {exc}") from None
    unknown = set(doc) - {"name", "steps", "description"}
    if unknown:
        raise EdgecError(f"{recipe}: unknown top-level key(s) {', '.join(sorted(unknown))}")
    raw_steps = doc.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise EdgecError(f"{recipe}: no [[steps]] to run")
    out_dir = Path(out) if out else Path("out") / recipe.stem
    recipe_dir = str(recipe.parent.resolve())
    steps, produced = [], set()
    for i, raw in enumerate(raw_steps, 1):
        where = f"{recipe}: step {i}"
        if not isinstance(raw, dict) or "run" not in raw:
            raise EdgecError(f"{where} has no 'run' key; steps: {', '.join(STEPS)}")
        name = raw["run"]
        sdef = STEPS.get(name)
        if sdef is None:
            raise EdgecError(f"{where}: unknown step '{name}'; steps: {', '.join(STEPS)}")
        params = {k.replace("-", "_"): _substitute(v, recipe_dir) for k, v in raw.items() if k != "run"}
        allowed = set(sdef.required) | set(sdef.optional)
        extra = sorted(set(params) - allowed)
        if extra:
            raise EdgecError(f"{where} ({name}): unknown parameter(s) {', '.join(extra)}; "
                             f"allowed: {', '.join(sorted(allowed))}")
        missing = [k for k in sdef.required if k not in params]
        if missing:
            raise EdgecError(f"{where} ({name}): missing parameter(s) {', '.join(missing)}")
        for key, value in params.items():
            _check_type(f"{where} ({name})", key, value)
        for key in sdef.inputs:
            if key in params and not _is_entry_point(params[key]):
                path = _resolve(params[key], out_dir)
                if str(path) not in produced and not path.exists():
                    raise EdgecError(f"{where} ({name}): {key} '{params[key]}' does not exist and no earlier step writes it")
        for key in sdef.outputs:
            if key in params:
                produced.add(str(_resolve(params[key], out_dir)))
        steps.append(Step(name, params, {k: v for k, v in raw.items() if k != "run"}))
    return Plan(recipe, str(doc.get("name", recipe.stem)), out_dir, steps)


def _resolve(value: str, out_dir: Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() else out_dir / p


def execute(plan: Plan, progress=None) -> dict:
    """Run the steps in order; stop at the first failure. Always writes report.json."""
    from edgec.app import api
    from edgec.core.fileio import atomic_write
    from edgec.core.graph import canonical_json

    plan.out_dir.mkdir(parents=True, exist_ok=True)
    task = progress.add_task(f"recipe {plan.name}", total=len(plan.steps)) if progress else None
    report = {"recipe": plan.name, "out_dir": str(plan.out_dir), "status": "ok", "exit_code": 0, "steps": []}
    for i, step in enumerate(plan.steps, 1):
        sdef = STEPS[step.run]
        if progress:
            progress.update(task, description=f"step {i}/{len(plan.steps)}: {step.run}")
        kwargs = {}
        for key, value in step.params.items():
            if (key in sdef.inputs or key in sdef.outputs) and not _is_entry_point(value):
                value = str(_resolve(value, plan.out_dir))
            kwargs[sdef.rename.get(key, key)] = value
        entry = {"step": i, "run": step.run, "params": step.raw}
        start = time.perf_counter()
        try:
            entry["result"] = getattr(api, sdef.func)(**kwargs)
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
        if progress:
            progress.advance(task)
        if report["status"] != "ok":
            break
    atomic_write(plan.out_dir / "report.json", (canonical_json(report) + "\n").encode())
    return report


def step_details(run: str, res: dict) -> str:
    """One readable line per step kind for the summary table."""
    from edgec.app.render import check_text, human_bytes, human_count

    if run in ("zoo.create", "import.hf"):
        return f"{human_count(res['params'])} params, {human_bytes(res['file_bytes'])}"
    if run.startswith("scaffold."):
        return res["summary"]
    if run == "finetune":
        m = res["monitor"]
        return f"best epoch {res['best_epoch']}/{len(res['history'])}: val {m} {res['best'][m]:.3f}, {res['seconds']:.0f} s"
    if run == "fold":
        parts = [f"{p['pass']} {check_text(c)}" for p in res["passes"] for c in (p.get("checks") or {}).values()]
        return "; ".join(parts) or res["summary"]
    if run == "export":
        return f"{human_bytes(res['file_bytes'])}, ORT parity {check_text(res['checks']['ort_parity'])}"
    if run == "eval":
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in res["metrics"].items() if k in ("accuracy", "uar", "ccc", "mae"))
        lat = res.get("latency")
        return metrics + (f", {lat['median_ms']:.2f} ms (batch {lat['batch']})" if lat else "")
    if run == "inspect":
        return f"{len(res['provenance'])} provenance record(s), {human_count(res['params'])} params"
    if run == "prune":
        return (f"budget {res['budget_ms']:.3f} ms: measured {res['measured_ms']:.3f} ms (estimated "
                f"{res['estimated_ms']:.3f}), {res['speedup']:.2f}× vs dense, {res['mode']}")
    if run == "profile":
        return f"{len(res['units'])} groups, dense {res['dense_ms']:.3f} ms" + (" (cached)" if res["cache_hit"] else "")
    return ""


def render_report(report: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"recipe {report['recipe']}: {report['status']}", title_justify="left")
    for col in ("#", "step", "status", "s", "output", "details"):
        table.add_column(col)
    for e in report["steps"]:
        res = e.get("result") or {}
        details = e.get("error") or step_details(e["run"], res)
        table.add_row(str(e["step"]), e["run"], e["status"], f"{e['seconds']:.1f}", Path(str(res.get("output", "-"))).name,
                      details)
    outputs = [e["result"]["output"] for e in report["steps"] if e.get("result", {}).get("output")]
    footer = Text(f"report: {report['out_dir']}/report.json" + (f"   artifact: {outputs[-1]}" if outputs else ""))
    return Group(table, footer)
