"""CLI behaviour: lazy imports, version, fold/export/inspect output, recipes and their exit codes."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from conftest import ROOT, run_cli


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["zoo", "--help"], ["export", "--help"]])
def test_help_and_version_do_not_import_torch(args):
    code = (f"import sys; from edgec.app.cli import app; sys.argv=['edgec', *{args!r}]\n"
            "try:\n  app()\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr
    if args == ["--version"]:
        assert proc.stdout.startswith("edgec ")


def test_zoo_list_json():
    rows = json.loads(run_cli("zoo", "list", "--json", check=0).stdout)["models"]
    assert {r["name"] for r in rows} == {"convtransformer", "conformer", "hafformer", "speechformer", "resnet", "mobilenet", "bert", "llama", "lwdetr"}
    assert all(r["params"] > 10_000 for r in rows)


def test_zoo_create_set_and_bad_key(tmp_path):
    out = tmp_path / "m.pt"
    res = json.loads(run_cli("zoo", "create", "convtransformer", "--set", "d_model=32", "--set", "num_layers=1",
                             "-o", out, "--json", check=0).stdout)
    assert res["config"]["d_model"] == 32 and out.exists()
    proc = run_cli("zoo", "create", "convtransformer", "--set", "dmodel=32", "-o", tmp_path / "x.pt")
    assert proc.returncode == 2 and "'dmodel' is not a config key" in proc.stderr
    assert not (tmp_path / "x.pt").exists()


def test_fold_default_name_and_nothing_to_fold(tmp_path, conformer_ckpt):
    src = tmp_path / "c.pt"
    src.write_bytes(conformer_ckpt.read_bytes())
    res = json.loads(run_cli("fold", src, "--json", check=0).stdout)
    assert res["output"].endswith("c.folded.pt") and res["folded"]
    assert src.read_bytes() == conformer_ckpt.read_bytes()  # input untouched
    proc = run_cli("fold", tmp_path / "c.folded.pt", "-o", tmp_path / "again.pt", check=0)
    assert "nothing to fold" in proc.stdout
    proc = run_cli("fold", src, "-o", src)
    assert proc.returncode == 2 and "refusing to overwrite the input" in proc.stderr


def test_inspect_pt_and_onnx(tmp_path, conformer_ckpt):
    folded = tmp_path / "f.pt"
    run_cli("fold", conformer_ckpt, "-o", folded, check=0)
    pt = json.loads(run_cli("inspect", folded, "--json", check=0).stdout)
    assert pt["kind"] == "checkpoint" and pt["arch"] == "conformer"
    assert [r["pass"] for r in pt["provenance"]] == ["zoo.create", "fold.batchnorm"]
    assert pt["structural_passes"][0]["pass"] == "fold.batchnorm"
    assert "BatchNorm1d" not in pt["modules"]
    onnx_path = tmp_path / "f.onnx"
    run_cli("export", folded, "-o", onnx_path, check=0)
    info = json.loads(run_cli("inspect", onnx_path, "--json", check=0).stdout)
    assert info["kind"] == "onnx" and info["opsets"]["ai.onnx"] == 20
    assert [r["pass"] for r in info["provenance"]] == ["zoo.create", "fold.batchnorm", "export.onnx"]
    assert info["ops"]["Conv"] >= 1 and info["file_bytes"] == onnx_path.stat().st_size
    human = run_cli("inspect", onnx_path, check=0).stdout
    assert "provenance" in human and "fold.batchnorm" in human and "export.onnx" in human


RECIPE = """
name = "t"
[[steps]]
run = "zoo.create"
name = "resnet"
output = "base.pt"
set = {base_width = 8}
[[steps]]
run = "fold"
input = "base.pt"
output = "folded.pt"
[[steps]]
run = "export"
input = "folded.pt"
output = "model.onnx"
[[steps]]
run = "inspect"
input = "model.onnx"
"""


def test_recipe_dry_run_and_run(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    plan = json.loads(run_cli("run", recipe, "--out", out, "--dry-run", "--json", check=0).stdout)
    assert [s["run"] for s in plan["steps"]] == ["zoo.create", "fold", "export", "inspect"]
    assert not out.exists()
    run_cli("run", recipe, "--out", out, check=0)
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and [s["status"] for s in report["steps"]] == ["ok"] * 4
    model = onnx.load(str(out / "model.onnx"))
    prov = json.loads(next(p.value for p in model.metadata_props if p.key == "edgec.provenance"))
    assert [r["pass"] for r in prov["passes"]] == ["zoo.create", "fold.batchnorm", "export.onnx"]
    assert report["steps"][2]["result"]["sha256"]
    assert str(tmp_path) not in (out / "report.json").read_text().replace(str(out), "")


def test_recipe_bad_input_exit_2(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[[steps]]\nrun = "fold"\ninput = "missing.pt"\n')
    proc = run_cli("run", recipe, "--out", tmp_path / "o")
    assert proc.returncode == 2 and "missing.pt" in proc.stderr and "does not exist" in proc.stderr
    recipe.write_text('[[steps]]\nrun = "fold"\nimput = "x.pt"\n')
    proc = run_cli("run", recipe, "--dry-run")
    assert proc.returncode == 2 and "unknown parameter(s) imput" in proc.stderr
    recipe.write_text('[[steps]]\nrun = "fly"\n')
    proc = run_cli("run", recipe, "--dry-run")
    assert proc.returncode == 2 and "unknown step 'fly'" in proc.stderr


def test_recipe_step_failure_writes_report(tmp_path, conformer_ckpt):
    bad = tmp_path / "o" / "corrupt.pt"
    bad.parent.mkdir()
    bad.write_bytes(conformer_ckpt.read_bytes()[:4000])
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\nrun = "export"\ninput = "corrupt.pt"\noutput = "m.onnx"\n')
    proc = run_cli("run", recipe, "--out", tmp_path / "o")
    assert proc.returncode == 2
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["steps"][0]["status"] == "bad input" and "truncated" in report["steps"][0]["error"]
    assert not (tmp_path / "o" / "m.onnx").exists()


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("--debug", "inspect", tmp_path / "missing.pt")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_demo_recipe_is_valid():
    if not (ROOT / "fixtures" / "speech" / "labels.csv").exists():
        pytest.skip("fixtures/speech is generated by `make test` (fixtures/make_speech.py)")
    proc = run_cli("run", ROOT / "fixtures" / "demo.toml", "--dry-run", "--json", check=0)
    assert json.loads(proc.stdout)["steps"]


def test_profile_measures_then_reuses_the_cached_table(tmp_path):
    src = tmp_path / "r.pt"
    run_cli("zoo", "create", "resnet", "--set", "base_width=4", "--set", "blocks_per_stage=[1,1,1,1]", "-o", src,
            check=0)
    first = json.loads(run_cli("profile", src, "-o", tmp_path / "t.json", "--json", check=0).stdout)
    assert not first["cache_hit"] and first["dense_ms"] > 0 and first["units"]
    assert first["key"]["threads"] == 1 and first["key"]["inputs"][0]["shape"][0] == 1
    second = json.loads(run_cli("profile", src, "-o", tmp_path / "t2.json", "--json", check=0).stdout)
    assert second["cache_hit"] and second["dense_ms"] == first["dense_ms"]
    table = json.loads((tmp_path / "t.json").read_text())
    assert "_cache" not in table and table["format"].startswith("edgec.latency-table/")
    # a table from "the device" is accepted for the same model and shape, refused for another model
    run_cli("profile", src, "--table", tmp_path / "t.json", "-o", tmp_path / "t3.json", check=0)
    other = tmp_path / "c.pt"
    run_cli("zoo", "create", "convtransformer", "--set", "num_layers=1", "-o", other, check=0)
    proc = run_cli("profile", other, "--table", tmp_path / "t.json", "-o", tmp_path / "t4.json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_prune_infeasible_budget_exit_4_and_nothing_written(tmp_path, conformer_ckpt):
    out = tmp_path / "p.pt"
    proc = run_cli("prune", conformer_ckpt, "--latency-ms", "0.0001", "-o", out)
    assert proc.returncode == 4, proc.stderr
    assert "infeasible" in proc.stderr and "ms" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    proc = run_cli("prune", conformer_ckpt, "-o", out)
    assert proc.returncode == 2 and "--latency-ms" in proc.stderr


def test_prune_meets_a_generous_budget_and_replays(tmp_path, conformer_ckpt):
    from edgec.models.checkpoint import load_checkpoint

    out = tmp_path / "p.pt"
    res = json.loads(run_cli("prune", conformer_ckpt, "--latency-ratio", "0.85", "--margin", "0.05", "-o", out,
                             "--json", check=0).stdout)
    assert res["measured_ms"] <= res["local_budget_ms"] and res["params"] < res["before"]["params"]
    model = load_checkpoint(out)  # the prune.channels record replays the smaller structure
    assert model.param_count() == res["params"]
    alcs = [r for r in model.provenance if r["pass"] == "prune.alcs"][0]
    assert alcs["metrics"]["estimated_table_ms"] == res["estimated_table_ms"] and alcs["params"]["margin"] == 0.05
    run_cli("export", out, "-o", tmp_path / "p.onnx", check=0)


def test_finetune_never_overwrites_its_inputs(tmp_path, conformer_ckpt):
    import torch

    data = tmp_path / "d.pt"
    torch.save({"inputs": torch.randn(8, 200, 40), "targets": torch.arange(8) % 4}, data)
    before = data.read_bytes()
    for extra in (["-o", data], ["-o", tmp_path / "ok.pt", "--resume-file", conformer_ckpt]):
        proc = run_cli("finetune", conformer_ckpt, "--data", data, "--epochs", "1", *extra)
        assert proc.returncode == 2 and "refusing to overwrite the input" in proc.stderr, proc.stderr
    assert data.read_bytes() == before and not (tmp_path / "ok.pt").exists()


# --- CLI conventions: usage errors, -h, completion, JSON errors and schemas, progress in logs ----------------

EDGEC = Path(sys.executable).parent / "edgec"  # the installed console script


def run_edgec(*args, env=None):
    """The installed entry point (``edgec``), as users and CI call it."""
    full_env = {k: v for k, v in os.environ.items() if k != "EDGEC_DEBUG"} | (env or {})
    cmd = [str(EDGEC)] if EDGEC.exists() else [sys.executable, "-m", "edgec"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=600)


@pytest.mark.parametrize("args, message, hint", [
    ([], "Usage: edgec [OPTIONS] COMMAND", None),
    (["fold", "--bogus"], "No such option: --bogus", "edgec fold -h"),
    (["bogus"], "No such command 'bogus'", "edgec -h"),
    (["finetune", "x.pt", "-o", "y.pt"], "Missing option '--data'", "edgec finetune -h"),
    (["fold"], "Missing argument 'model'", "edgec fold -h"),
    (["scaffold", "hrf", "m.pt", "--seed", "abc"], "Invalid value for '--seed'", "edgec scaffold hrf -h"),
])
def test_usage_errors_exit_2_with_clicks_message(args, message, hint):
    proc = run_edgec(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stdout + proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    if hint:  # a real usage error: usage line, hint and message on stderr, nothing on stdout
        assert proc.stdout == "" and f"Try '{hint}' for help." in proc.stderr and "Usage: edgec" in proc.stderr


def _command_paths(cmd, prefix=()):
    yield prefix
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from _command_paths(sub, (*prefix, name))


def test_dash_h_on_every_command_and_group():
    from typer.main import get_command
    from typer.testing import CliRunner

    from edgec.app.cli import app

    paths = list(_command_paths(get_command(app)))
    assert ("fold",) in paths and ("scaffold", "hrf") in paths and ("zoo", "list") in paths and len(paths) >= 16
    runner = CliRunner()
    for path in paths:
        short = runner.invoke(app, [*path, "-h"], prog_name="edgec")
        assert short.exit_code == 0, (path, short.output)
        assert f"Usage: {' '.join(('edgec', *path))}" in short.output
        assert short.output == runner.invoke(app, [*path, "--help"], prog_name="edgec").output


def test_shell_completion_script_and_answers_without_torch():
    for instruction in ("bash_source", "source_bash"):  # click's spelling and typer's
        proc = run_cli(env={"_EDGEC_COMPLETE": instruction}, check=0)
        assert "_edgec_completion()" in proc.stdout and "complete -o" in proc.stdout and "_EDGEC_COMPLETE" in proc.stdout
    proc = run_cli(env={"_EDGEC_COMPLETE": "zsh_source"}, check=0)
    assert proc.stdout.lstrip().startswith("#compdef edgec")
    # the shell's callback: completes commands and options, and never imports torch
    answer = subprocess.run([sys.executable, "-X", "importtime", "-m", "edgec"], capture_output=True, text=True,
                            env=dict(os.environ, _EDGEC_COMPLETE="complete_bash", COMP_WORDS="edgec fold --st",
                                     COMP_CWORD="2"))
    assert answer.returncode == 0 and answer.stdout.split() == ["--strict"], answer.stdout
    assert not re.search(r"\|\s+torch$", answer.stderr, flags=re.M), "completion imported torch"
    # (no exit-code check: without a detectable parent shell, e.g. a detached CI runner, typer exits 1 here)
    assert "edgec --install-completion" not in run_cli("--show-completion", "bash").stderr
    assert "--install-completion" in run_cli("--help", check=0).stdout


@pytest.mark.parametrize("args, code, kind, message", [
    (["fold", "--bogus"], 2, "usage", "No such option: --bogus"),
    (["bogus"], 2, "usage", "No such command 'bogus'."),
    (["finetune", "x.pt", "-o", "y.pt"], 2, "usage", "Missing option '--data'."),
    (["inspect", "missing.pt"], 2, "input", "no such file: missing.pt"),
])
def test_errors_under_json_are_one_object_on_stdout(tmp_path, args, code, kind, message):
    proc = run_cli(*args, "--json", cwd=tmp_path)
    assert proc.returncode == code
    assert json.loads(proc.stdout) == {"schema": "edgec.error/1", "error": message, "exit_code": code, "kind": kind}
    assert message.rstrip(".") in proc.stderr  # the human message stays on stderr
    plain = run_cli(*args, cwd=tmp_path)
    assert plain.returncode == code and plain.stdout == ""


@pytest.mark.parametrize("exc, code, kind", [("CheckFailed('parity 1e-2 over 1e-4')", 1, "check"),
                                             ("EdgecError('over budget', exit_code=5)", 5, "budget"),
                                             ("ZeroDivisionError('division by zero')", 3, "internal")])
def test_check_budget_and_internal_errors_under_json(exc, code, kind):
    script = ("import sys\nfrom edgec.app import api\nfrom edgec.core.errors import CheckFailed, EdgecError\n"
              f"def boom(*a, **k):\n    raise {exc}\n"
              "api.inspect = boom\nsys.argv = ['edgec', 'inspect', 'x.pt', '--json']\n"
              "from edgec.app.cli import main\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "EDGEC_DEBUG"})
    assert proc.returncode == code, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["exit_code"] == code and obj["kind"] == kind and obj["schema"] == "edgec.error/1"
    if kind == "internal":
        assert obj["error"] == "ZeroDivisionError: division by zero (rerun with --debug for the traceback)"
        assert "internal error: ZeroDivisionError" in proc.stderr and "Traceback" not in proc.stderr


LOG_LINE = re.compile(r"^[^\x00-\x1f\x7f]+ \[\d+ s\]$")


def test_progress_without_a_terminal_is_plain_lines_and_json_stays_pure(tmp_path, conformer_ckpt):
    proc = run_cli("fold", conformer_ckpt, "-o", tmp_path / "f.pt", "--json", env={"EDGEC_PROGRESS_INTERVAL": "0.2"},
                   check=0)
    res = json.loads(proc.stdout)  # stdout: the result and nothing else
    assert res["schema"] == "edgec.fold/1" and res["input"] == str(conformer_ckpt)
    lines = proc.stderr.splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines), proc.stderr
    assert lines[0] == "folding [0 s]" and lines[-1].startswith("folding: done [")
    assert any(line.startswith("folding: fold.") for line in lines), lines
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr


def test_log_lines_heartbeat_and_train_progress(capsys):
    from edgec.app import render

    with render.LogLines("work", interval=0.05) as log:
        log.step("loading \x1b[1mx\x1b[0m\r")
        time.sleep(0.4)
        log.update("step 3")
        time.sleep(0.2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "work [0 s]" and lines[1] == "work: loading x [0 s]"
    assert lines.count("work: loading x [0 s]") >= 3  # repeated while nothing else happens
    assert "work: step 3 [0 s]" in lines and lines[-1].startswith("work: done [")
    assert all(LOG_LINE.match(line) for line in lines)

    with render.TrainProgress() as progress:
        progress({"event": "start", "start_epoch": 1, "steps_per_epoch": 2, "total_steps": 4})
        progress({"event": "step", "epoch": 1, "epochs": 2, "global_step": 1, "loss": 1.5})
        progress({"event": "epoch", "epoch": 1, "epochs": 2, "train_loss": 1.25, "monitor": "uar",
                  "val": {"uar": 0.5, "accuracy": 0.75}, "best_epoch": 1, "is_best": True})
    lines = capsys.readouterr().err.splitlines()
    assert lines[:3] == ["fine-tuning [0 s]", "fine-tuning: 4 steps from epoch 1 [0 s]",
                         "fine-tuning: epoch 1/2: train loss 1.2500, val uar 0.5000, val accuracy 0.7500 * [0 s]"]


def test_results_carry_their_schema(tmp_path):
    out = tmp_path / "r.pt"
    created = json.loads(run_cli("zoo", "create", "resnet", "--set", "base_width=4", "-o", out, "--json",
                                 check=0).stdout)
    assert created["schema"] == "edgec.zoo.create/1" and created["output"] == str(out)
    assert created["file_bytes"] == out.stat().st_size
    info = json.loads(run_cli("inspect", out, "--json", check=0).stdout)
    assert info["schema"] == "edgec.inspect.checkpoint/1" and info["input"] == "r.pt"
    assert info["digest"] == created["digest"] and info["params"] == created["params"]
    listing = json.loads(run_cli("zoo", "list", "--json", check=0).stdout)
    assert listing["schema"] == "edgec.zoo.list/1"
