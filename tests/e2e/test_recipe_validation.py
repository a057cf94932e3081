"""Recipes: `--dry-run` catches every bad recipe before anything runs (exit 2, one line naming the step and
parameter), step statuses follow exit codes, and report.json holds no absolute paths. In process (the CLI's
main()), so each case costs milliseconds."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from gate_helpers import run_main

from edgec.core.errors import CheckFailed, EdgecError

ZOO = 'run = "zoo.create"\nname = "resnet"\noutput = "base.pt"\nset = {base_width = 4, blocks_per_stage = [1, 1, 1, 1]}\n'




def steps(*bodies: str) -> str:
    return "".join(f"[[steps]]\n{b}\n" for b in bodies)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.py").write_text("import torch\nclass Net(torch.nn.Module):\n    def __init__(self:\n")
    (tmp_path / "fine.py").write_text("import torch\nclass Other(torch.nn.Module):\n    pass\n")
    (tmp_path / "o").mkdir()
    np.savez(tmp_path / "o" / "d.npz", inputs=np.zeros((4, 1, 8, 8), np.float32), targets=np.arange(4))
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "o" / "pipe.onnx")
    return tmp_path


BAD = {
    "run is a list": (steps('run = ["fold"]'), "step 1: 'run' must be a string naming a step", ()),
    "run is a table": (steps("run = {x = 1}"), "step 1: 'run' must be a string naming a step", ()),
    "unknown step": (steps('run = "fly"'), "step 1: unknown step 'fly'", ()),
    "step not a table": ("steps = [1]\n", "step 1 must be a table", ()),
    "no steps": ('name = "x"\n', "no [[steps]] to run", ()),
    "unknown top-level key": ('nme = "x"\n' + steps(ZOO), "unknown top-level key(s) nme", ()),
    "name not a string": ("name = 3\n" + steps(ZOO), "'name' must be a string", ()),
    "deep arrays": ("x = " + "[" * 2000 + "]" * 2000 + "\n", "nested", ()),
    "unknown parameter": (steps(ZOO, 'run = "fold"\ninput = "base.pt"\nimput = "x"'), "unknown parameter(s) imput", ()),
    "missing parameter": (steps('run = "finetune"\ninput = "o/d.npz"\noutput = "f.pt"'),
                          "step 1 (finetune): missing parameter(s) data", ()),
    "wrong type": (steps(ZOO, 'run = "finetune"\ninput = "base.pt"\ndata = "d.npz"\noutput = "f.pt"\nepochs = "3"'),
                   "step 2 (finetune): 'epochs' must be an integer (got '3')", ()),
    "seed out of range": (steps(ZOO.replace("output", "seed = 18446744073709551616\noutput")),
                          "step 1 (zoo.create): 'seed' must be less than or equal to", ()),
    "device meta": (steps(ZOO, 'run = "finetune"\ninput = "base.pt"\ndata = "d.npz"\noutput = "f.pt"\ndevice = "meta"'),
                    "'device' must be auto, cpu, mps, cuda or cuda:N (got 'meta')", ()),
    "method dtl": (steps(ZOO, 'run = "scaffold.ternary"\ninput = "base.pt"\noutput = "t.pt"\nmethod = "dtl"'),
                   "step 2 (scaffold.ternary): 'method' must be one of sttn, dlt (got 'dtl')", ()),
    "both budgets": (steps(ZOO, 'run = "prune"\ninput = "base.pt"\noutput = "p.pt"\nlatency_ms = 1.0\n'
                                'latency_ratio = 0.5'),
                     "step 2 (prune): give exactly one of --latency-ms and --latency-ratio", ()),
    "opset 17": (steps(ZOO, 'run = "export"\ninput = "base.pt"\nopset = 17'), "'opset' must be greater than or equal to 18", ()),
    "arch module missing": (steps('run = "zoo.create"\nname = "nosuchmodule:Net"\noutput = "a.pt"'),
                            "cannot import architecture 'nosuchmodule:Net'", ()),
    "arch file missing": (steps(ZOO, 'run = "fold"\ninput = "base.pt"\narch = "nofile.py:Net"'),
                          "step 2 (fold): architecture 'nofile.py:Net': no such file nofile.py", ()),
    "arch file broken": (steps(ZOO, 'run = "fold"\ninput = "base.pt"\narch = "broken.py:Net"'),
                         "importing broken.py:3 for architecture 'broken.py:Net' failed: SyntaxError", ()),
    "arch class missing": (steps(ZOO, 'run = "fold"\ninput = "base.pt"\narch = "fine.py:Net"'),
                           "no class 'Net' in fine.py; classes there: Other", ()),
    "zoo size 0": (steps(ZOO.replace("base_width = 4", "base_width = 4, num_classes = 0")),
                   "resnet: config 'num_classes' is a size and must be >= 1 (got 0)", ()),
    "zoo unknown key": (steps(ZOO.replace("base_width = 4", "base_width = 4, num_layers = 2")),
                        "'num_layers' is not a config key of resnet", ()),
    "data builtins:exit": (steps(ZOO, 'run = "finetune"\ninput = "base.pt"\ndata = "builtins:exit"\noutput = "f.pt"'),
                           "data 'builtins:exit' names a built-in module", ()),
    "data module missing": (steps(ZOO, 'run = "eval"\ninput = "base.pt"\ndata = "nosuchmodule:make"'),
                            "no module named 'nosuchmodule'", ()),
    "input missing": (steps('run = "fold"\ninput = "missing.pt"'), "input 'missing.pt' does not exist", ()),
    "input is a folder": (steps('run = "export"\ninput = "{recipe_dir}/o"\noutput = "m.onnx"'),
                          "is not a regular file", ()),
    "resume file is the output": (steps(ZOO, 'run = "finetune"\ninput = "base.pt"\ndata = "d.npz"\noutput = "f.pt"\n'
                                             'resume_file = "f.pt"'),
                                  "resume_file 'f.pt' is also this step's output", ()),
    "two steps, one output": (steps(ZOO, 'run = "fold"\ninput = "base.pt"', 'run = "export"\ninput = "base.folded.pt"\n'
                                                                            'output = "base.pt"'),
                              "step 3 (export): output 'base.pt' is also written by step 1", ()),
    "output is an input": (steps('run = "eval"\ninput = "d.npz"\ndata = "d.npz"', ZOO.replace("base.pt", "d.npz")),
                           "output 'd.npz' is an input of step 1", ()),
    "output is the recipe": (steps(ZOO.replace("base.pt", "{recipe_dir}/r.toml")), "would overwrite the recipe", ()),
    "output is the report": (steps(ZOO.replace("base.pt", "report.json")), "would overwrite the run's report.json", ()),
    "output under a file": (steps(ZOO.replace("base.pt", "d.npz/base.pt")), "d.npz is a file, not a folder", ()),
    "output a FIFO": (steps(ZOO, 'run = "export"\ninput = "base.pt"\noutput = "pipe.onnx"'),
                      "exists and is not a regular file", ()),
    "out is a file": (steps(ZOO), "--out afile is a file", ("--out", "afile")),
    "out under a file": (steps(ZOO), "--out afile/sub: afile is a file, not a folder", ("--out", "afile/sub")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_dry_run_refuses(workdir, monkeypatch, capsys, case):
    text, message, extra = BAD[case]
    (workdir / "r.toml").write_text(text)
    before = sorted(p.name for p in (workdir / "o").iterdir())
    code, out, err = run_main(monkeypatch, capsys, "run", "r.toml", "--dry-run", *(extra or ("--out", "o")))
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err and out == ""
    assert sorted(p.name for p in (workdir / "o").iterdir()) == before  # nothing written
    code, out, _ = run_main(monkeypatch, capsys, "run", "r.toml", *(extra or ("--out", "o")))  # a real run: the same
    assert code == 2 and not (workdir / "o" / "report.json").exists()


def test_recipe_path_that_is_a_folder(workdir, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "run", "o", "--dry-run")
    assert code == 2 and "recipe o: not a regular file" in err


def test_a_good_plan_with_default_outputs(workdir, monkeypatch, capsys):
    (workdir / "r.toml").write_text(steps(ZOO, 'run = "fold"\ninput = "base.pt"',
                                          'run = "export"\ninput = "base.folded.pt"\nopset = 18\nweights = "fp32"',
                                          'run = "eval"\ninput = "base.folded.onnx"\ndata = "d.npz"\n'
                                          'no_latency = true'))
    code, out, err = run_main(monkeypatch, capsys, "run", "r.toml", "--dry-run", "--json", "--out", workdir / "o")
    assert code == 0, err
    plan = json.loads(out)
    assert [s["run"] for s in plan["steps"]] == ["zoo.create", "fold", "export", "eval"]
    assert plan["out_dir"] == "{recipe_dir}/o"  # an absolute --out is shown relative


def test_step_status_follows_the_exit_code():
    from edgec.app.recipe import Step, _run_step

    class FakeApi:
        def __init__(self, exc):
            self.exc = exc

        def prune(self, *args):
            raise self.exc

    cases = [(EdgecError("budget 0.1 ms below the reachable 0.5 ms", exit_code=4), "budget infeasible", 4),
             (EdgecError("missed by 3 %", exit_code=5), "budget missed", 5),
             (CheckFailed("parity 1e-2"), "check failed", 1),
             (EdgecError("no such file"), "bad input", 2),
             (ZeroDivisionError("division by zero"), "internal error", 3)]
    for exc, status, code in cases:
        report = {"status": "ok", "exit_code": 0, "steps": []}
        step = Step("prune", {"input": "a.pt", "output": "b.pt", "latency_ratio": 0.5}, {})
        _run_step(FakeApi(exc), 1, step, Path("o"), report)
        assert (report["steps"][0]["status"], report["exit_code"], report["status"]) == (status, code, "failed")


def test_portable_paths(tmp_path, monkeypatch):
    from edgec.app.recipe import Plan, portable

    monkeypatch.chdir(tmp_path)
    recipe_dir = tmp_path / "recipes"
    plan = Plan(recipe_dir / "r.toml", "r", tmp_path / "runs" / "o", [])
    out = str(tmp_path / "runs" / "o")
    report = {"a": f"{out}/model.onnx", "b": [f"refusing to overwrite {out}/x.pt; choose"],
              "c": {"d": f"{recipe_dir}/data.npz", "e": out, "f": f"{out}2/x", "g": f"{tmp_path}/elsewhere/y.pt"}}
    assert portable(report, plan) == {"a": "model.onnx", "b": ["refusing to overwrite x.pt; choose"],
                                      "c": {"d": "{recipe_dir}/data.npz", "e": ".", "f": "runs/o2/x",
                                            "g": "elsewhere/y.pt"}}
    relative = Plan(recipe_dir / "r.toml", "r", Path("runs/o"), [])
    assert portable({"a": "runs/o/m.onnx", "b": "no such file: runs/o/x.pt"}, relative) == \
        {"a": "m.onnx", "b": "no such file: x.pt"}
    assert relative.out_label() == "runs/o" and plan.out_label() == "runs/o"


def test_report_holds_no_absolute_paths(tmp_path, monkeypatch, capsys):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    np.savez(recipes / "d.npz", inputs=np.zeros((4, 1, 8, 8), np.float32), targets=np.arange(4) % 2)
    (recipes / "r.toml").write_text(steps(ZOO, 'run = "fold"\ninput = "base.pt"\noutput = "f.pt"',
                                          'run = "eval"\ninput = "f.pt"\ndata = "{recipe_dir}/d.npz"\n'
                                          'no_latency = true',
                                          'run = "inspect"\ninput = "corrupt.pt"'))
    out = tmp_path / "runs" / "o"
    out.mkdir(parents=True)
    (out / "corrupt.pt").write_bytes(b"PK\x03\x04 not a zip")
    monkeypatch.chdir(tmp_path / "runs")
    code, _, err = run_main(monkeypatch, capsys, "run", recipes / "r.toml", "--out", out)
    assert code == 2, err
    text = (out / "report.json").read_text()
    report = json.loads(text)
    assert [s["status"] for s in report["steps"]] == ["ok", "ok", "ok", "bad input"]
    assert str(tmp_path) not in text and report["out_dir"] == "o"
    fold = report["steps"][1]["result"]
    assert (fold["input"], fold["output"]) == ("base.pt", "f.pt")
    assert "corrupt.pt" in report["steps"][3]["error"] and "/corrupt.pt" not in report["steps"][3]["error"]

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, (list, dict)):
            for v in (value.values() if isinstance(value, dict) else value):
                yield from strings(v)

    assert not [s for s in strings(report) if s.startswith("/") or " /" in s]
