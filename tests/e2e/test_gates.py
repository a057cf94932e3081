"""Quality gates on the final artifact: `export` and `prune` (--min-metric, --max-metric-drop, --max-latency-ms,
--max-size-kb), a recipe's [gates] table, exit codes, `<output>.rejected`, the one-shot damage warning.

Pruning itself is tested in test_prune.py; here ``prune_model`` is replaced by a stand-in that returns a
changed model, so the tests cover what happens after pruning in seconds."""
import json
from dataclasses import MISSING, fields

import pytest
import torch
from gate_helpers import make_project, run_main

from edgec.app import api
from edgec.app import gates as G
from edgec.core.errors import GateFailed
from edgec.core.options import PruneOptions
from edgec.models.checkpoint import load_checkpoint
from edgec.prune.result import PruneResult


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gates")
    model = make_project(folder)
    from edgec.onnx.export import export

    return folder, model, export(model)


@pytest.fixture
def work(project, monkeypatch):
    """In the project folder (the checkpoint names its arch relative to it), with the exporter's bytes cached:
    the gates run after the export and do not need a fresh one each time."""
    folder, model, bare = project
    monkeypatch.chdir(folder)
    monkeypatch.setattr("edgec.onnx.export.export", lambda *a, **k: (bare[0], dict(bare[1])))
    return folder, model


# --- export ---------------------------------------------------------------------------------------------------

def test_export_passing_gates_writes_the_artifact_and_its_card(work, monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "export", "m.pt", "--arch", "mlp.py:Mlp", "-o", "ok.onnx",
                            "--data", "d.pt", "--min-metric", "accuracy=0.99", "--min-metric", "uar=0.9",
                            "--max-metric-drop", "0", "--max-latency-ms", "10000", "--max-size-kb", "100", "--json")
    assert code == 0, out
    res = json.loads(out)
    gates = res["gates"]
    assert gates["passed"] is True and gates["failed"] == []
    assert [(r["gate"], r["metric"]) for r in gates["checks"]] == [
        ("min_metric", "accuracy"), ("min_metric", "uar"), ("max_metric_drop", "accuracy"),
        ("max_metric_drop", "uar"), ("max_latency_ms", None), ("max_size_kb", None)]
    assert gates["checks"][0]["value"] == 1.0 and gates["checks"][2]["value"] == 0.0  # ONNX = the checkpoint
    assert gates["measured"]["split"] == "test" and gates["measured"]["n"] == 30
    assert 0 < gates["measured"]["latency_ms"] < 10000 and gates["measured"]["machine"]["runtime"] == "onnxruntime"
    assert gates["checks"][5]["value"] == pytest.approx(res["file_bytes"] / 1024)
    assert res["card"] == "ok.card.md" and (work[0] / "ok.card.md").is_file() and (work[0] / "ok.onnx").is_file()
    assert not (work[0] / "ok.onnx.rejected").exists()


def test_a_failed_gate_exits_1_writes_rejected_and_keeps_the_old_output(work, monkeypatch, capsys):
    folder = work[0]
    (folder / "rel.onnx").write_bytes(b"the released model")
    code, out, err = run_main(monkeypatch, capsys, "export", "m.pt", "--arch", "mlp.py:Mlp", "-o", "rel.onnx",
                              "--data", "d.pt", "--min-metric", "accuracy=0.99", "--max-latency-ms", "1e-9",
                              "--max-size-kb", "1", "--json")
    assert code == 1
    error = json.loads(out)
    assert error["kind"] == "gate" and error["exit_code"] == 1
    msg = error["error"]
    assert msg.startswith("gate failed: latency ") and "ms > 1e-09 ms (over by" in msg
    assert "KiB > 1 KiB (over by" in msg and "accuracy" not in msg  # the passing gate is not listed
    assert "written to rel.onnx.rejected instead; rel.onnx was not written" in msg and "error: gate failed" in err
    assert (folder / "rel.onnx").read_bytes() == b"the released model"
    rejected = (folder / "rel.onnx.rejected").read_bytes()
    from edgec.app.card import read_card

    card = read_card(rejected)
    assert [g["passed"] for g in card["gates"]] == [True, False, False]  # the rejected file says why
    assert not (folder / "rel.card.md").exists()  # a card describes a released file only
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


@pytest.mark.parametrize("args, message", [
    (["--min-metric", "uar=0.8"], "--min-metric / --max-metric-drop need --data"),
    (["--max-metric-drop", "0.01"], "--min-metric / --max-metric-drop need --data"),
    (["--min-metric", "mae=0.1", "--data", "d.pt"], "mae is lower-is-better"),
    (["--min-metric", "ccc=0.1", "--data", "d.pt"], "ccc is a regression metric but the model's task is class"),
    (["--max-size-kb", "-3"], "max_size_kb must be > 0"),
])
def test_bad_gates_are_exit_2_and_write_nothing(work, monkeypatch, capsys, args, message):
    code, out, err = run_main(monkeypatch, capsys, "export", "m.pt", "--arch", "mlp.py:Mlp", "-o", "bad.onnx",
                              *args)
    assert code == 2 and message in err, err
    assert not list(work[0].glob("bad*"))


# --- prune ----------------------------------------------------------------------------------------------------

def _result(**over) -> PruneResult:
    required = {f.name: None for f in fields(PruneResult) if f.default is MISSING}
    return PruneResult(**(required | {"notes": ["pruned"], "measured_ms": 0.5, "measured_runs_ms": [0.5],
                                      "threads": 1} | over))


def _damaged(model, keep: int = 1):
    """A stand-in for a pruned model: the input with all but ``keep`` hidden units cut off."""
    out = model.clone()
    with torch.no_grad():
        out.gm.l1.weight[keep:] = 0
        out.gm.l1.bias[keep:] = 0
    return out


@pytest.fixture
def fake_prune(work, monkeypatch):
    calls = []

    def prune_model(model, options, progress=None, input_label=None):
        calls.append(options)
        return _damaged(model), _result(input=input_label)

    monkeypatch.setattr("edgec.prune.run.prune_model", prune_model)
    return calls


def test_prune_metric_gate_failure_writes_rejected(work, fake_prune):
    folder = work[0]
    opts = PruneOptions(arch="mlp.py:Mlp", latency_ratio=0.5, data="d.pt", min_metric=["accuracy=0.9"],
                        max_metric_drop=0.05, max_latency_ms=0.6)
    with pytest.raises(GateFailed) as exc:
        api.prune("m.pt", "p.pt", opts)
    assert not (folder / "p.pt").exists() and (folder / "p.pt.rejected").is_file()
    report = exc.value.gates
    rows = {(r["gate"], r["metric"]): r for r in report["checks"]}
    acc = rows[("min_metric", "accuracy")]
    assert acc["passed"] is False and acc["value"] < 0.9 and acc["margin"] == pytest.approx(acc["value"] - 0.9)
    drop = rows[("max_metric_drop", "accuracy")]
    assert drop["baseline"] == 1.0 and drop["value"] == pytest.approx(1.0 - acc["value"]) and not drop["passed"]
    assert rows[("max_latency_ms", None)] | {} == {"gate": "max_latency_ms", "metric": None, "limit": 0.6,
                                                   "value": 0.5, "margin": pytest.approx(0.1), "passed": True}
    assert exc.value.rejected == "p.pt.rejected" and "p.pt was not written" in str(exc.value)
    # the rejected file is the pruned model, loadable for a look
    assert load_checkpoint(folder / "p.pt.rejected", "mlp.py:Mlp").digest() == \
        _damaged(load_checkpoint(folder / "m.pt", "mlp.py:Mlp")).digest()


def test_prune_passing_gates_and_measured_damage(work, fake_prune):
    folder = work[0]
    opts = PruneOptions(arch="mlp.py:Mlp", latency_ratio=0.5, data="d.pt", min_metric=["accuracy=0.1"],
                        max_size_kb=50)
    res = api.prune("m.pt", "p2.pt", opts).to_dict()
    assert res["output"] == "p2.pt" and (folder / "p2.pt").is_file() and not (folder / "p2.pt.rejected").exists()
    assert res["gates"]["passed"] is True
    size = res["gates"]["checks"][1]
    assert size["value"] == pytest.approx((folder / "p2.pt").stat().st_size / 1024)  # the file as written
    damage = res["damage"]
    assert damage["measured"] is True and damage["metric"] == "uar" and damage["before"] == 1.0
    assert damage["drop"] == pytest.approx(1.0 - damage["after"]) and damage["large"] is True
    assert res["notes"][0] == "pruned" and res["notes"][-1].startswith("WARNING: pruning damaged accuracy: uar 1")


def test_one_shot_pruning_warns_loudly_and_refuses_metric_gates(work, fake_prune, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "prune", "m.pt", "--arch", "mlp.py:Mlp", "-o", "os.pt",
                            "--latency-ratio", "0.5", "--min-metric", "uar=0.5")
    assert code == 2 and "need --data" in err and fake_prune == []  # refused before any pruning
    code, out, _ = run_main(monkeypatch, capsys, "prune", "m.pt", "--arch", "mlp.py:Mlp", "-o", "os.pt",
                            "--latency-ratio", "0.5", "--json")
    assert code == 0
    res = json.loads(out)
    damage = res["damage"]
    assert damage["measured"] is False and damage["n"] == 64 and damage["large"] is True
    assert damage["top1_agreement"] < 0.9 and res["gates"] is None
    assert res["notes"][-1].startswith("WARNING: one-shot pruning without --data; accuracy damage is unmeasured "
                                       "and likely large: on 64 random inputs")


def test_damage_estimate_without_data():
    from edgec.app.python_api import from_module

    lin = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    model = from_module(lin, torch.randn(2, 4), config={})
    same = G.estimate_damage(model, model.clone())
    assert same["top1_agreement"] == 1.0 and same["rel_output_change"] == 0.0 and same["large"] is False
    assert G.damage_note(same).startswith("one-shot pruning without --data; accuracy damage is unmeasured (")


# --- recipes --------------------------------------------------------------------------------------------------

RECIPE = """
name = "release"
[[steps]]
run = "export"
input = "{{recipe_dir}}/m.pt"
arch = "mlp.py:Mlp"
output = "model.onnx"
{gates}
"""


def _recipe(folder, gates: str, name="r.toml"):
    path = folder / name
    path.write_text(RECIPE.format(gates=gates))
    return path


@pytest.mark.parametrize("gates, message", [
    ('[gates]\nmin_metric = {uar = 0.5}', "min_metric / max_metric_drop need 'data'"),
    ('[gates]\nmax_size_kb = 10\nspeed = 1', "unknown key(s) speed"),
    ('[gates]\ndata = "{recipe_dir}/d.pt"', "no gate set"),
    ('[gates]\nmax_size_kb = 10\nartifact = "other.onnx"', "artifact 'other.onnx' does not exist and no step"),
    ('[gates]\nmin_metric = ["uar=2"]\ndata = "{recipe_dir}/d.pt"', "[gates] min_metric uar must be in [0, 1]"),
    ('[gates]\nmax_latency_ms = 5\nthreads = 0', "'threads' must be an integer >= 1"),
])
def test_recipe_gates_are_checked_on_a_dry_run(work, monkeypatch, capsys, gates, message):
    code, _, err = run_main(monkeypatch, capsys, "run", _recipe(work[0], gates), "--out", "o", "--dry-run")
    assert code == 2 and message in " ".join(err.split()), err


def test_recipe_gates_after_the_last_step(work, monkeypatch, capsys):
    folder = work[0]
    ok = _recipe(folder, '[gates]\ndata = "{recipe_dir}/d.pt"\nmin_metric = {accuracy = 0.99}\nmax_size_kb = 100',
                 "ok.toml")
    code, out, _ = run_main(monkeypatch, capsys, "run", ok, "--out", "o1", "--json")
    report = json.loads(out)
    assert code == 0 and report["status"] == "ok" and report["gates"]["passed"] is True
    assert report["gates"]["artifact"] == "model.onnx" and (folder / "o1" / "model.onnx").is_file()
    bad = _recipe(folder, '[gates]\ndata = "{recipe_dir}/d.pt"\nmax_metric_drop = 0.01\nmax_size_kb = 1\n'
                          'baseline = "{recipe_dir}/other.pt"', "bad.toml")
    from edgec.app.python_api import save

    save(_damaged(work[1]), folder / "other.pt")
    code, out, _ = run_main(monkeypatch, capsys, "run", bad, "--out", "o2", "--json")
    report = json.loads(out)
    assert code == 1 and report["status"] == "failed" and report["exit_code"] == 1
    assert report["steps"][0]["status"] == "ok"
    gates = report["gates"]
    assert gates["passed"] is False and gates["rejected"] == "model.onnx.rejected"
    (drop,) = [r for r in gates["checks"] if r["gate"] == "max_metric_drop"]
    assert drop["value"] < 0 and drop["passed"]  # the artifact beats the damaged baseline
    (failed,) = gates["failed"]
    assert failed.startswith("size ") and "> 1 KiB (over by" in failed
    on_disk = json.loads((folder / "o2" / "report.json").read_text())
    assert on_disk["gates"] == gates
    assert not (folder / "o2" / "model.onnx").exists() and (folder / "o2" / "model.onnx.rejected").is_file()
    assert (folder / "o2" / "model.card.md.rejected").is_file()


def test_a_step_gate_failure_is_reported_as_gate_failed(work, monkeypatch, capsys):
    path = work[0] / "step.toml"
    path.write_text(RECIPE.format(gates="max_size_kb = 1"))
    code, out, _ = run_main(monkeypatch, capsys, "run", path, "--out", "o3", "--json")
    report = json.loads(out)
    assert code == 1 and report["exit_code"] == 1 and report["gates"] is None
    (step,) = report["steps"]
    assert step["status"] == "gate failed" and step["error"].startswith("gate failed: size ")
    assert step["gates"]["checks"][0]["gate"] == "max_size_kb" and step["gates"]["checks"][0]["passed"] is False
    assert (work[0] / "o3" / "model.onnx.rejected").is_file() and not (work[0] / "o3" / "model.onnx").exists()

