"""The edgec command line: typer parses, edgec.app.api works, edgec.app.render shows. No torch at import time."""
from __future__ import annotations

import inspect as pyinspect
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from edgec import __version__
from edgec.app import render as r
from edgec.app.params import cli_parameters, from_cli, option_fields
from edgec.core.errors import (
    EXIT_BUDGET_INFEASIBLE,
    EXIT_BUDGET_MISSED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    CheckFailed,
    EdgecError,
    GateFailed,
    first_line,
)
from edgec.core.options import (
    EvalOptions,
    ExportOptions,
    FinetuneOptions,
    FoldOptions,
    GenerateOptions,
    InspectOptions,
    ProfileOptions,
    PruneOptions,
    ScaffoldBinaryOptions,
    ScaffoldHrfOptions,
    ScaffoldTernaryOptions,
    SourceOptions,
    ZooCreateOptions,
)

PROG = "edgec"
# `-h` as well as `--help` everywhere (sub-contexts inherit it; set on each group all the same).
CONTEXT = {"help_option_names": ["-h", "--help"]}
# Shell completion: `edgec --install-completion` / `--show-completion`; the shell calls back with
# _EDGEC_COMPLETE set, answered before any command runs (so without importing torch).
app = typer.Typer(no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False, context_settings=CONTEXT,
                  help="edgec: PyTorch checkpoints → small, fast, verified ONNX artifacts.")
zoo_app = typer.Typer(no_args_is_help=True, context_settings=CONTEXT, help="The model zoo: list and create models.")
import_app = typer.Typer(no_args_is_help=True, context_settings=CONTEXT, help="Import checkpoints from other formats.")
app.add_typer(zoo_app, name="zoo")
app.add_typer(import_app, name="import")
scaffold_app = typer.Typer(no_args_is_help=True, context_settings=CONTEXT,
                           help="Insert training-time scaffolds (folded back by `edgec fold`).")
app.add_typer(scaffold_app, name="scaffold")

STATE = {"debug": bool(os.environ.get("EDGEC_DEBUG"))}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
OutOpt = Annotated[Path | None, typer.Option("-o", "--output", help="Output file.")]


def _version(value: bool):
    if value:
        typer.echo(f"edgec {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
):
    if debug:
        STATE["debug"] = True


def parse_sets(items: list[str] | None) -> dict:
    """`--set key=value`: values parsed as JSON when they parse (numbers, lists, true/false), else strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EdgecError(f"--set expects key=value, got '{item}'")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def with_options(cls):
    """Decorator: the command's ``opts`` parameter becomes ``cls``'s CLI options (edgec.core.options), in
    field order at that place; the command receives ``opts`` as a ``cls`` instance."""
    names = [f.name for f in option_fields(cls, where="cli")]

    def decorate(fn):
        sig = pyinspect.signature(fn, eval_str=True)
        params = []
        for p in sig.parameters.values():
            params += cli_parameters(cls) if p.name == "opts" else [p.replace(kind=p.KEYWORD_ONLY)]

        def command(**values):
            opts = from_cli(cls, {k: values.pop(k) for k in names}, parse_sets)
            return fn(opts=opts, **values)

        command.__signature__ = sig.replace(parameters=params)
        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        return command
    return decorate


def show(res, as_json: bool, view=None) -> None:
    """``--json``: the result's dict on stdout; else ``view(dict)`` rendered."""
    data = res.to_dict() if hasattr(res, "to_dict") else res
    if as_json:
        return r.print_json(data)
    r.console.print(view(data))


# --- zoo -------------------------------------------------------------------------------------------

@zoo_app.command("list")
def zoo_list(as_json: JsonOpt = False):
    """List the zoo's architectures with their default sizes and inputs."""
    from edgec.app import api

    show(api.zoo_list(), as_json, r.zoo_table)


@zoo_app.command("create")
@with_options(ZooCreateOptions)
def zoo_create(
    name: Annotated[str, typer.Argument(help="Zoo architecture (see `edgec zoo list`) or package.module:Class.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint to write.")],
    opts: ZooCreateOptions,
    as_json: JsonOpt = False,
):
    """Create a freshly initialised model checkpoint."""
    from edgec.app import api

    show(api.zoo_create(name, output, opts), as_json, lambda res: r.created_table(name, res))


@import_app.command("hf")
def import_hf(
    folder: Annotated[Path, typer.Argument(help="Folder with config.json and model.safetensors (or a sharded index): "
                                           "BERT, or a Llama / Qwen2 / Mistral causal LM.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint to write.")],
    as_json: JsonOpt = False,
):
    """Import a Hugging Face BERT or Llama-family (Llama, Qwen2, Mistral) checkpoint (no transformers needed)."""
    from edgec.app import api

    with r.spinner(f"importing {folder}", not as_json):
        res = api.import_hf(folder, output)
    show(res, as_json, r.imported_table)


@import_app.command("torch")
@with_options(SourceOptions)
def import_torch(
    file: Annotated[Path, typer.Argument(help="state_dict .pt/.pth, .safetensors, Lightning .ckpt, or a pickled "
                                              "module (with --trust-pickle).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint to write.")],
    opts: SourceOptions,
    as_json: JsonOpt = False,
):
    """Import a PyTorch checkpoint into --arch (your class) and write an edgec checkpoint once."""
    from edgec.app import api

    with r.spinner(f"importing {file}", not as_json):
        res = api.import_torch(file, output, opts)
    show(res, as_json, lambda res: r.kv_table("imported", [
        ("output", res["output"]), ("arch", res["arch"]), ("params", r.human_count(res["params"])),
        ("config", json.dumps(res["config"])), ("digest", res["digest"][:16])]))


# --- passes ----------------------------------------------------------------------------------------

@scaffold_app.command("hrf")
@with_options(ScaffoldHrfOptions)
def scaffold_hrf(
    model: Annotated[Path, typer.Argument(help="Checkpoint with transformer FFNs.")],
    output: OutOpt = None,
    opts: ScaffoldHrfOptions = None,
    as_json: JsonOpt = False,
):
    """HRF: insert H (d → K·d) in front of every FFN's first linear; `edgec fold` folds it back exactly."""
    from edgec.app import api

    with r.spinner("scaffolding", not as_json) as update:
        res = api.scaffold_hrf(model, output, opts, progress=update)
    show(res, as_json, r.scaffold_table)


@scaffold_app.command("ternary")
@with_options(ScaffoldTernaryOptions)
def scaffold_ternary(
    model: Annotated[Path, typer.Argument(help="Checkpoint to ternarise.")],
    output: OutOpt = None,
    opts: ScaffoldTernaryOptions = None,
    as_json: JsonOpt = False,
):
    """Ternary training scaffold on Conv/Linear weights (STTN or DLT); `edgec fold` turns it into 2-bit layers."""
    from edgec.app import api

    with r.spinner("scaffolding", not as_json) as update:
        res = api.scaffold_ternary(model, output, opts, progress=update)
    show(res, as_json, r.scaffold_table)


@scaffold_app.command("binary")
@with_options(ScaffoldBinaryOptions)
def scaffold_binary(
    model: Annotated[Path, typer.Argument(help="Checkpoint to binarise.")],
    output: OutOpt = None,
    opts: ScaffoldBinaryOptions = None,
    as_json: JsonOpt = False,
):
    """Binary weights sign(W)·α, with the real latent weights as a supervised parallel path while training."""
    from edgec.app import api

    with r.spinner("scaffolding", not as_json) as update:
        res = api.scaffold_binary(model, output, opts, progress=update)
    show(res, as_json, r.scaffold_table)


@app.command("fold")
@with_options(FoldOptions)
def fold(
    model: Annotated[Path, typer.Argument(help="Checkpoint to fold.")],
    output: OutOpt = None,
    opts: FoldOptions = None,
    as_json: JsonOpt = False,
):
    """Fold everything foldable (training scaffolds, BatchNorm) and verify the result. Default output: <stem>.folded.pt."""
    from edgec.app import api

    with r.spinner("folding", not as_json) as update:
        res = api.fold(model, output, opts, progress=update)
    show(res, as_json, r.fold_view)


@app.command("export")
@with_options(ExportOptions)
def export(
    model: Annotated[Path, typer.Argument(help="Checkpoint to export.")],
    output: OutOpt = None,
    opts: ExportOptions = None,
    as_json: JsonOpt = False,
):
    """Export to ONNX, verify against torch in onnxruntime, embed provenance. Default output: <stem>.onnx."""
    from edgec.app import api

    with r.spinner("exporting and verifying", not as_json) as update:
        res = api.export(model, output, opts, progress=update)
    show(res, as_json, r.export_table)


@app.command("finetune")
@with_options(FinetuneOptions)
def finetune(
    model: Annotated[Path, typer.Argument(help="Checkpoint to train (scaffolded or not).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Best checkpoint to write.")],
    opts: FinetuneOptions,
    as_json: JsonOpt = False,
):
    """Fine-tune on real data: AdamW, warm-up + cosine, clipping, keep-best, resumable; DDP under torchrun.

    Progress goes to stderr (also with --json); under torchrun only rank 0 prints and writes."""
    from edgec.app import api

    with r.TrainProgress() as progress:
        res = api.finetune(model, output, opts, progress=progress)
    if res.to_dict().get("rank", 0) == 0:
        show(res, as_json, r.finetune_table)


@app.command("eval")
@with_options(EvalOptions)
def eval_(
    model: Annotated[Path, typer.Argument(help="A .pt checkpoint or an .onnx file.")],
    opts: EvalOptions,
    as_json: JsonOpt = False,
):
    """Score a checkpoint or ONNX file with one protocol: accuracy/WA, UAR, macro-F1 (or CCC, MAE; perplexity,
    bits per byte for causal LMs), size, latency."""
    from edgec.app import api

    with r.spinner("evaluating", not as_json) as update:
        res = api.evaluate(model, opts, progress=update)
    show(res, as_json, r.eval_table)


@app.command("generate")
@with_options(GenerateOptions)
def generate(
    model: Annotated[Path, typer.Argument(help="A .pt checkpoint or a KV-cache .onnx (`edgec export --kv-cache`).")],
    opts: GenerateOptions,
    as_json: JsonOpt = False,
):
    """Generate text with a KV cache (greedy, or seeded sampling); prints prefill and decode tokens/s."""
    from edgec.generation import generate_file

    with r.spinner("generating", not as_json) as update:
        res = generate_file(model, opts, progress=update)
    show(res, as_json, r.generate_view)


@app.command("profile")
@with_options(ProfileOptions)
def profile(
    model: Annotated[Path, typer.Argument(help="Checkpoint to profile.")],
    output: OutOpt = None,
    opts: ProfileOptions = None,
    as_json: JsonOpt = False,
):
    """Measure per-group latency over a density grid in onnxruntime (cached by runtime, threads, CPU, shape)."""
    from edgec.app import api

    with r.spinner("profiling", not as_json) as update:
        res = api.profile(model, output, opts, progress=update)
    show(res, as_json, r.profile_table)


@app.command("prune")
@with_options(PruneOptions)
def prune(
    model: Annotated[Path, typer.Argument(help="Checkpoint to prune.")],
    output: OutOpt = None,
    opts: PruneOptions = None,
    as_json: JsonOpt = False,
):
    """Prune to a latency budget: per-group densities from measured latency tables, ADMM, physical shrink,
    fine-tune, then export and measure for real. Exit 4: budget below the reachable minimum; 5: missed."""
    from edgec.app import api

    opts.validate()
    with r.spinner("pruning", not as_json) as update:
        res = api.prune(model, output, opts, progress=update)
    show(res, as_json, r.prune_table)


@app.command("inspect")
@with_options(InspectOptions)
def inspect(
    file: Annotated[Path, typer.Argument(help="A .pt checkpoint or an .onnx file.")],
    opts: InspectOptions,
    as_json: JsonOpt = False,
):
    """Show architecture, size, bit widths, ops and the provenance chain of a checkpoint or ONNX file."""
    from edgec.app import api

    show(api.inspect(file, opts), as_json, lambda res: r.inspect_view(res, opts.layers))


@app.command("run")
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: out/<recipe stem>).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, run nothing.")] = False,
    as_json: JsonOpt = False,
):
    """Run a recipe: a list of steps named like the CLI commands. Exit 0 ok, 1 a check failed, 2 bad input."""
    from edgec.app import recipe as rec

    plan = rec.plan(recipe, out)
    if dry_run:
        return show(plan.describe(), as_json, lambda res: r.plan_table(recipe, res))
    with r.progress_bar(f"recipe {recipe.name}", len(plan.steps), not as_json) as progress:
        report = rec.execute(plan, progress)
    show(report, as_json, r.report_view)
    if report["status"] != "ok":
        raise typer.Exit(report["exit_code"])


def _click_classes(name: str) -> tuple:
    """``name`` from click and from the click that typer bundles (typer >= 0.20 parses with its own copy)."""
    modules = [click.exceptions]
    try:
        from typer._click import exceptions as bundled  # absent in typer versions without a copy
        modules.append(bundled)
    except ImportError:
        pass
    return tuple(dict.fromkeys(getattr(m, name) for m in modules if hasattr(m, name)))


_EXIT, _CLICK_ERRORS, _ABORT = (_click_classes(n) for n in ("Exit", "ClickException", "Abort"))


ERROR_SCHEMA = "edgec.error/1"


def fail(kind: str, message: str, exit_code: int, as_json: bool) -> None:
    """Exit with ``exit_code``; under ``--json`` stdout gets exactly one error object (docs/json.md). The
    human message has already gone to stderr."""
    if as_json:
        r.print_json({"schema": ERROR_SCHEMA, "error": r.plain(message), "exit_code": exit_code, "kind": kind})
    sys.exit(exit_code)


def _error_kind(exc: EdgecError) -> str:
    if isinstance(exc, GateFailed):
        return "gate"
    if isinstance(exc, CheckFailed):
        return "check"
    return "budget" if exc.exit_code in (EXIT_BUDGET_INFEASIBLE, EXIT_BUDGET_MISSED) else "input"


COMPLETE_VAR = "_EDGEC_COMPLETE"


def _accept_click_completion_style() -> None:
    """Click documents ``_EDGEC_COMPLETE=bash_source``; typer reads ``source_bash``: accept both."""
    shell, _, instruction = os.environ.get(COMPLETE_VAR, "").partition("_")
    if shell in ("bash", "zsh", "fish", "powershell", "pwsh") and instruction in ("source", "complete"):
        os.environ[COMPLETE_VAR] = f"{instruction}_{shell}"


def main() -> None:
    """Console entry point: one-line errors and documented exit codes instead of tracebacks; under
    ``--json`` each error is also one JSON object on stdout."""
    args = sys.argv[1:]
    debug = STATE["debug"] or "--debug" in args
    as_json = "--json" in args
    _accept_click_completion_style()
    try:
        code = app(args=args, prog_name=PROG, complete_var=COMPLETE_VAR, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except _EXIT as exc:
        sys.exit(exc.exit_code)
    except _CLICK_ERRORS as exc:  # usage errors (unknown option or command, missing argument): exit 2
        exc.show()
        fail("usage", exc.format_message(), exc.exit_code, as_json)
    except (*_ABORT, KeyboardInterrupt):
        r.err_console.print("interrupted")
        fail("interrupted", "interrupted", EXIT_INTERRUPTED, as_json)
    except EdgecError as exc:
        if debug:
            raise
        r.error_line("error", str(exc))
        fail(_error_kind(exc), str(exc), exc.exit_code, as_json)
    except Exception as exc:  # a bug: still one line, with a way to get the traceback
        if debug:
            raise
        message = f"{type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)"
        r.error_line("internal error", message)
        fail("internal", message, EXIT_INTERNAL, as_json)


if __name__ == "__main__":
    main()
