"""benchmarks/paralbench.py's pure helpers without training anything: aggregation over seeds, the
ParaLBench-style table (two tasks side by side, per-task figures that differ), the budget label and
--report on a finished run's JSON."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"epochs": 3, "ft_epochs": 1, "admm_epochs": 1}


@pytest.fixture(scope="module")
def pb():
    spec = importlib.util.spec_from_file_location("bench_paralbench", ROOT / "benchmarks" / "paralbench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(task, arch, variant, seed, metrics, params=1000, **extra):
    return {"task": task, "arch": arch, "variant": variant, "seed": seed, **SETTINGS, "metrics": metrics,
            "params": params, **extra}


def rows():
    out = []
    for seed, (uar, ccc) in enumerate([(0.5, 0.2), (0.7, 0.4), (0.9, 0.6)]):
        lat = {"onnx_bytes": 4096, "latency_ms": 2.0, "latency_ratio": 1.0} if seed == 0 else {}
        out.append(row("speech", "conformer", "fp32", seed, {"uar": uar, "accuracy": uar}, **lat))
        out.append(row("arousal", "conformer", "fp32", seed, {"ccc": ccc, "mae": 1.0 - ccc}, **lat))
        prune = {"budget": 0.75, "unreachable_budgets": [0.6], "prune": {"dense_ms": 2.0, "measured_ms": 1.4}}
        out.append(row("speech", "conformer", "pruned", seed, {"uar": uar - 0.1, "accuracy": uar - 0.1},
                       params=600, **prune))
        out.append(row("arousal", "conformer", "pruned", seed, {"ccc": ccc, "mae": 0.5}, params=500, **prune))
    out.append(dict(row("speech", "hafformer", "ternary", 0, {}), error="EdgecError: boom"))
    del out[-1]["metrics"]
    return out


def test_mean_and_sample_std(pb):
    assert pb.mean_std([]) == (None, None)
    assert pb.mean_std([2.0]) == (2.0, 0.0)
    m, s = pb.mean_std([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7) and s == pytest.approx(0.2)  # sample std (n - 1)
    assert pb.mean_std([1.0, None, 3.0]) == (2.0, pytest.approx(2 ** 0.5))


def test_aggregate_over_seeds(pb):
    agg = {(a["task"], a["arch"], a["variant"]): a for a in pb.aggregate(rows())}
    fp = agg[("speech", "conformer", "fp32")]
    assert fp["n"] == 3 and fp["uar_mean"] == pytest.approx(0.7) and fp["uar_std"] == pytest.approx(0.2)
    assert fp["latency_ms"] == 2.0 and fp["onnx_bytes"] == 4096  # from the export seed only
    pr = agg[("arousal", "conformer", "pruned")]
    assert pr["budgets"] == [0.75] and pr["prune_ratio"] == pytest.approx(0.7) and pr["params"] == 500
    bad = agg[("speech", "hafformer", "ternary")]
    assert bad["n"] == 0 and bad["uar_mean"] is None and bad["errors"] == ["EdgecError: boom"]
    assert list(agg) == sorted(agg, key=lambda k: (k[0] != "speech", k[1] != "conformer", k[2] != "fp32"))


def test_table_puts_both_tasks_on_one_line(pb):
    text = pb.table(rows())
    lines = text.splitlines()
    assert lines[0].split(" | ")[-5:] == ["speech UAR", "speech WA", "arousal CCC", "arousal MAE", "seeds |"]
    fp = next(x for x in lines if "conformer | fp32" in x)
    assert "0.700 ± 0.200" in fp and "0.400 ± 0.200" in fp and "| 1.0 k |" in fp and "| 4 |" in fp
    pruned = next(x for x in lines if "conformer | pruned" in x)
    assert "pruned 0.6x latency (0.75x in 6 of 6 runs: 0.6x unreachable or missed)" in pruned
    assert pruned.endswith("| 3/3 |")
    assert "0.6 k (0.5 k)" in pruned  # the arousal model differs by more than 2 %: in brackets
    failed = next(x for x in lines if "hafformer" in x)
    assert "| 0/0 (1 failed: EdgecError: boom) |" in failed and failed.count("–") >= 4


def test_report_reads_a_finished_json(pb, tmp_path, capsys):
    path = tmp_path / "run.json"
    meta = {"settings": SETTINGS, "trainings": 96, "wall_seconds": 600.0, "load_average_start": [1, 1, 1],
            "load_average_end": [2, 2, 2]}
    path.write_text(json.dumps({"meta": meta, "rows": rows()}))
    pb.main(["--report", "--json", str(path)])
    out = capsys.readouterr().out
    assert "conformer | fp32" in out and "13 trainings (seeds [0, 1, 2], 1 failed)" in out
    more = tmp_path / "more.json"
    extra = row("speech", "conformer", "fp32", 3, {"uar": 0.7, "accuracy": 0.7})
    more.write_text(json.dumps({"meta": meta, "rows": [rows()[0], extra, dict(extra, epochs=9, seed=4)]}))
    pb.main(["--report", "--json", str(path), "--merge", str(more)])
    out = capsys.readouterr().out
    assert "14 trainings (seeds [0, 1, 2, 3], 1 failed)" in out  # a duplicate and other settings are left out
    assert "0.700 ± 0.163" in out  # 0.5, 0.7, 0.9, 0.7
