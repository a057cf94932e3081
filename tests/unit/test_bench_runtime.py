"""Smoke tests of benchmarks/runtime.py's helpers (no exports, no timing of real models)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rt():
    spec = importlib.util.spec_from_file_location("bench_runtime", ROOT / "benchmarks" / "runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _params(arch, overrides):
    import torch

    from edgec import models

    cls = models.resolve(arch)
    with torch.device("meta"):
        module = cls(**{**cls.default_config(), **overrides})
    return sum(p.numel() for p in module.parameters())


def test_sizes_cover_the_zoo_and_reach_their_targets(rt):
    from edgec import models

    for arch in models.ZOO:
        assert rt.size_config(arch, "default") == {}
        large = rt.size_config(arch, "large")
        assert large is not None, f"{arch} has no large config"
        assert _params(arch, large) >= 25_000_000, arch
    assert 80_000_000 <= _params("conformer", rt.size_config("conformer", "xl")) <= 130_000_000
    assert rt.size_config("resnet", "xl") is None


def test_forms_and_names(rt):
    assert {f for f, _ in rt.FORMS} == {"cast", "dq", "matmulnbits", "auto"}
    assert all(p in ("fp32", "int8") for _, p in rt.FORMS)
    assert rt.variant_name("ternary", "dq", "fp32") == "ternary dq"
    assert rt.variant_name("binary", "auto", "int8") == "binary auto act-int8"
    assert rt.parse_list("1,32") == ["1", "32"] and rt.parse_list("1, 2", int) == [1, 2]
    assert rt.paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0


def _tiny_onnx(doc=""):
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if doc:
        onnx.helper.set_model_props(model, {"note": doc})
    return model.SerializeToString()


def test_graph_key_ignores_metadata_and_side_by_side_timing_runs(rt):
    a, b = _tiny_onnx(), _tiny_onnx("provenance differs")
    assert a != b and rt.graph_key(a) == rt.graph_key(b)
    times = rt.measure_side_by_side([a, b], {"x": np.ones((2, 4), np.float32)}, threads=1, warmup=1, repeats=3,
                                    min_seconds=0.0, max_seconds=1.0)
    assert len(times) == 2 and len(times[0]) == len(times[1]) >= 3
    assert all(t > 0 for ts in times for t in ts)


def test_tables_render_failures_and_missing_cells(rt):
    variants = [{"name": "fp32", "data": b"x" * 100, "forms": "-", "latency": {"b1 t1": 1.5}},
                {"name": "ternary cast", "data": b"x" * 10, "forms": "cast:3", "latency": {"b1 t1": 1.02},
                 "same_graph_as": "ternary cast"},
                {"name": "ternary dq", "error": "CheckFailed: parity"}]
    table = rt.runtime_table("resnet", "default", 1000, variants, ["b1 t1", "b32 t1"])
    assert "| ternary cast | cast:3 |" in table and "1.02x" in table and "1.5 ms" in table
    assert "failed: CheckFailed: parity" in table and "0.100" in table
    rows = [{"arch": "conformer", "size": "default", "params": 1000, "checkpoint_mb": 1.0, "onnx_mb": 0.5,
             "scaffold": {"wall_s": 1.0, "peak_rss_mb": 100.0}, "fold": {"wall_s": 2.0, "peak_rss_mb": 300.0},
             "export": {"wall_s": 3.0, "peak_rss_mb": 400.0, "error": "boom"}}]
    table = rt.toolchain_table(rows)
    assert "| conformer | default | 1,000 |" in table and "failed" in table and "300.0x" in table
