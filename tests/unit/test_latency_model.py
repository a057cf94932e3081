"""Latency tables, the piecewise-linear latency model, per-unit profiling and the SIMD-structured execution path."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgec.core.errors import EdgecError
from edgec.latency import cache, simd
from edgec.latency import model as lat
from edgec.latency import profiling as prof
from edgec.latency import shapes as shapes_mod
from edgec.latency import table as tab
from edgec.latency import units as units_mod

# --- a tiny model --------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """(B, T, 16) -> Linear(16, hidden) -> ReLU -> Linear(hidden, 16) -> 1x1 Conv1d(16, 24) over time -> pool."""

    def __init__(self, hidden=64):
        super().__init__()
        self.l1 = nn.Linear(16, hidden)
        self.act = nn.ReLU()
        self.l2 = nn.Linear(hidden, 16)
        self.pw = nn.Conv1d(16, 24, 1)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        h = self.l2(self.act(self.l1(x)))
        h = self.pw(h.transpose(1, 2)).mean(dim=2)
        return self.head(h)


def tiny_model(hidden=64, seed=0):
    from edgec.core.graph import Model, trace
    from edgec.core.spec import Dim, InputSpec, TensorSpec

    torch.manual_seed(seed)
    module = TinyNet(hidden).eval()
    spec = InputSpec(inputs=(TensorSpec("x", (Dim("batch", 2, 3, 1, 64), Dim("time", 20, 13, 4, 512), 16)),))
    return Model(trace(module), "tests.tiny:TinyNet", {"hidden": hidden}, spec)


@pytest.fixture(scope="module")
def tiny():
    from edgec.onnx.export import to_onnx

    model = tiny_model()
    return model, to_onnx(model).SerializeToString()


# --- a synthetic table -------------------------------------------------------------------------------

def synthetic_table(model=None, threads=1, shapes=None, remainder=3.0):
    model = model or tiny_model()
    shapes = shapes_mod.resolve_shapes(model.spec, shapes)
    units = [
        {"name": "a", "kind": "linear", "width": 64, "layers": ["l1"], "consumers": ["l2"],
         "patterns": {"channel": {"density": [1.0, 0.75, 0.5, 0.25], "kept": [64, 48, 32, 16],
                                  "median_ms": [8.0, 6.0, 4.5, 2.0], "p10_ms": [8.0, 6.0, 4.5, 2.0],
                                  "p90_ms": [8.0, 6.0, 4.5, 2.0]},
                      "simd:8": {"density": [1.0, 0.5], "kept": [128, 64], "median_ms": [8.0, 12.0],
                                 "p10_ms": [8.0, 12.0], "p90_ms": [8.0, 12.0]}},
         "dense_ms": 8.0},
        # noisy: the lowest density measured slower than the one above it
        {"name": "b", "kind": "conv1d", "width": 24, "layers": ["pw"], "consumers": [],
         "patterns": {"channel": {"density": [1.0, 0.5, 0.25], "kept": [24, 12, 6], "median_ms": [2.0, 1.0, 1.25],
                                  "p10_ms": [2.0, 1.0, 1.25], "p90_ms": [2.0, 1.0, 1.25]}},
         "dense_ms": 2.0},
    ]
    key = tab.table_key(model, threads, shapes)
    request = tab.table_request([units_mod.as_unit(u) for u in units], [1.0, 0.75, 0.5, 0.25], ["channel", "simd:8"])
    dense = {"median_ms": 10.0 + remainder, "p10_ms": 13.0, "p90_ms": 13.0, "runs_ms": [13.0, 13.0]}
    return tab.make_table(key=key, request=request, model=model, units=units, dense=dense, units_sum=10.0,
                          overhead=0.01, inputs=tab.inputs_json(model.spec, shapes), protocol={"synthetic": True})


def test_pwl_interpolation_is_exact_on_grid_and_midpoints():
    lm = lat.LatencyModel(synthetic_table())
    for d, t in zip([1.0, 0.75, 0.5, 0.25], [8.0, 6.0, 4.5, 2.0]):
        assert lm.unit_ms("a", d) == t
    assert lm.unit_ms("a", 0.875) == 7.0
    assert lm.unit_ms("a", 0.625) == 5.25
    assert lm.unit_ms("a", 0.375) == 3.25
    assert lm.unit_ms("a", 0.5, "simd:8") == 12.0 and lm.unit_ms("a", 0.75, "simd:8") == 10.0
    # below the grid: the end segment extended, floored at 0
    assert lm.unit_ms("a", 0.125) == 0.75
    assert lm.unit_ms("a", 0.01) == 0.0
    assert lat.interpolate([0.25, 0.5, 1.0], [1.0, 2.0, 4.0], 0.75) == 3.0
    with pytest.raises(EdgecError, match="density"):
        lm.unit_ms("a", 1.5)
    with pytest.raises(EdgecError, match="density"):
        lm.unit_ms("a", 0.0)
    with pytest.raises(EdgecError, match="pattern 'simd:4'"):
        lm.unit_ms("a", 0.5, "simd:4")
    with pytest.raises(EdgecError, match="no unit 'zz'"):
        lm.estimate({"zz": 0.5})


def test_estimate_is_sum_plus_remainder_and_min_latency():
    table = synthetic_table(remainder=3.0)
    assert table["remainder_ms"] == 3.0
    assert lat.estimate(table) == 13.0  # everything dense = measured dense model
    assert lat.estimate(table, {"a": 0.5}) == 4.5 + 2.0 + 3.0
    assert lat.estimate(table, {"a": 0.875, "b": 0.5}) == 7.0 + 1.0 + 3.0
    assert lat.estimate(table, {"a": ("simd:8", 0.5)}) == 12.0 + 2.0 + 3.0
    assert lat.estimate(table, {"a": {"pattern": "simd:8", "density": 0.75}}) == 10.0 + 2.0 + 3.0
    parts = lat.breakdown(table, {"a": 0.25})
    assert parts["units"] == {"a": 2.0, "b": 2.0} and parts["total_ms"] == 7.0
    # min: a at 0.25 (channel), b at its fastest measured point 0.5 (noise made 0.25 slower)
    assert lat.min_latency(table) == 2.0 + 1.0 + 3.0
    # a negative calibrated remainder (units timed alone overlap): clamped to the run overhead of an empty
    # graph and the unit curves scaled so the dense point stays exact — no estimate or reachable minimum
    # below what any graph runs in, and the same proportions between units
    negative = synthetic_table(remainder=-3.5)
    lm = lat.LatencyModel(negative)
    k = (6.5 - 0.01) / 10.0
    assert lm.clamped == {"remainder_ms": -3.5, "clamped_to_ms": 0.01, "unit_scale": pytest.approx(k)}
    assert lm.remainder == 0.01 and lm.estimate() == pytest.approx(6.5)
    assert lm.estimate({"a": 0.25, "b": 0.5}) == pytest.approx(0.01 + k * (2.0 + 1.0))
    assert lat.min_latency(negative) == pytest.approx(0.01 + k * 3.0)
    assert lat.LatencyModel(table).clamped is None
    cfg = lat.min_config(table)
    assert cfg["densities"] == {"a": ("channel", 0.25), "b": ("channel", 0.5)}
    assert lat.min_latency(table, floor=0.5) == 4.5 + 1.0 + 3.0
    assert lat.min_latency(table, patterns=["simd:8"]) == 8.0 + 2.0 + 3.0  # b has no simd entry: stays dense


def test_shared_layer_interaction_term():
    table = synthetic_table(remainder=3.0)
    table["interactions"] = [{"layer": "pw", "out_unit": "b", "in_unit": "a", "slope_ms": 0.5}]
    lm = lat.LatencyModel(table)
    assert lm.estimate() == 13.0
    assert lm.estimate({"a": 0.5}) == 4.5 + 2.0 + 3.0  # one unit alone: its curve, exactly
    assert lm.estimate({"b": 0.5}) == 8.0 + 1.0 + 3.0
    assert lm.estimate({"a": 0.5, "b": 0.5}) == 4.5 + 1.0 + 3.0 + 0.5 * 0.5 * 0.5
    assert lm.breakdown({"a": 0.25, "b": 0.5})["interactions_ms"] == 0.5 * 0.75 * 0.5
    assert lm.estimate({"a": ("simd:8", 0.5), "b": 0.5}) == 12.0 + 1.0 + 3.0  # SIMD keeps shapes: no term
    assert lm.min_latency() == 2.0 + 1.0 + 3.0 + 0.5 * 0.75 * 0.5


def test_table_json_round_trip_and_cache(tmp_path, monkeypatch):
    model = tiny_model()
    calls = []

    def fake_profile(model, units=None, densities=None, threads=1, shapes=None, patterns=None, progress=None, **kw):
        calls.append((threads, shapes))
        t = synthetic_table(model, threads, shapes)
        t["request"] = tab.table_request(units, densities, patterns)
        return t

    monkeypatch.setattr(prof, "profile", fake_profile)
    folder = tmp_path / "cache"
    first = cache.cached(model, threads=1, folder=folder)
    assert first["_cache"]["hit"] is False and len(calls) == 1
    path = first["_cache"]["path"]
    again = cache.cached(model, threads=1, folder=folder)
    assert again["_cache"] == {"hit": True, "path": path} and len(calls) == 1
    assert cache.cached(tiny_model(seed=5), threads=1, folder=folder)["_cache"]["hit"]  # other weights: same latency
    assert not cache.cached(model, threads=2, folder=folder)["_cache"]["hit"]
    assert not cache.cached(model, threads=1, batch=4, folder=folder)["_cache"]["hit"]
    assert not cache.cached(model, threads=1, shapes={"x": (1, 40, 16)}, folder=folder)["_cache"]["hit"]
    assert not cache.cached(model, threads=1, densities=(1.0, 0.5), folder=folder)["_cache"]["hit"]
    assert not cache.cached(tiny_model(hidden=32), threads=1, folder=folder)["_cache"]["hit"]  # other config
    assert len(calls) == 6
    # the file: deterministic JSON without run-time entries; round trip gives the same bytes
    text = Path(path).read_text(encoding="utf-8")
    assert "_cache" not in json.loads(text)
    assert tab.dumps(tab.read_table(path)) == text
    assert list(json.loads(text)) == sorted(json.loads(text))
    # a damaged cache entry is measured again
    Path(path).write_text("{not json")
    assert not cache.cached(model, threads=1, folder=folder)["_cache"]["hit"]
    assert cache.cached(model, threads=1, folder=folder)["_cache"]["hit"]


def test_load_table_key_checks(tmp_path):
    model = tiny_model()
    path = tab.save_table(synthetic_table(model), tmp_path / "t.json")
    assert tab.load_table(path, model)["load_warnings"] == []
    # measured on another device: allowed, with a warning (refused when strict)
    table = json.loads(path.read_text())
    table["key"]["cpu"] = "Cortex-A76"
    table["key"]["threads"] = 4
    other = tab.save_table(table, tmp_path / "device.json")
    warnings = tab.load_table(other, model, threads=1)["load_warnings"]
    assert len(warnings) == 1 and "Cortex-A76" in warnings[0] and "threads" in warnings[0]
    with pytest.raises(EdgecError, match="strict"):
        tab.load_table(other, model, threads=1, strict=True)
    # another architecture/config or input shape: refused
    with pytest.raises(EdgecError, match="another configuration"):
        tab.load_table(path, tiny_model(hidden=32))
    with pytest.raises(EdgecError, match="input shapes"):
        tab.load_table(path, model, batch=8)
    table = json.loads(path.read_text())
    table["units"][0]["layers"] = ["nope"]
    with pytest.raises(EdgecError, match="lacks: nope"):
        tab.load_table(tab.save_table(table, tmp_path / "bad.json"), model)
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(EdgecError, match="not an edgec latency table"):
        tab.load_table(tmp_path / "junk.json")


def test_input_shapes():
    spec = tiny_model().spec
    assert shapes_mod.resolve_shapes(spec) == {"x": (1, 20, 16)}
    assert shapes_mod.resolve_shapes(spec, batch=8) == {"x": (8, 20, 16)}
    assert shapes_mod.parse_input_shapes(spec, ["x=4x50x16"]) == {"x": (4, 50, 16)}
    assert shapes_mod.parse_input_shapes(spec, ["2,30,16"]) == {"x": (2, 30, 16)}
    for bad, msg in [("x=1x20x15", "fixed at 16"), ("x=1x2x16", r"\[4, 512\]"), ("y=1x20x16", "no model input"),
                     ("x=1x20", "3 axes"), ("x=1x2.5x16", "bad dimension .2.5.")]:
        with pytest.raises(EdgecError, match=msg):
            shapes_mod.parse_input_shapes(spec, [bad])


def test_profile_tiny_model(tiny):
    model, onnx_bytes = tiny
    units = [("hidden", ["l1"], 64, ["l2"]), ("mid", ["l2"], 16, ["pw"]), ("pw", ["pw"], 24)]
    table = prof.profile(model, units=units, densities=(0.5, 0.25), patterns=("channel", "simd:4"), shapes=None,
                         batch=2, warmup=2, repeats=5, min_seconds=0.01, rounds=1, dense_repeats=5,
                         dense_min_seconds=0.02, dense_onnx=onnx_bytes)
    tab.validate(table)
    assert table["key"]["inputs"] == [{"name": "x", "shape": [2, 20, 16], "dtype": "float32"}]
    assert table["densities"] == [1.0, 0.5, 0.25]
    assert [u["name"] for u in table["units"]] == ["hidden", "mid", "pw"]
    # l2 shrinks its inputs with "hidden" and its outputs with "mid"; pw likewise with "mid" and "pw"
    assert [(i["layer"], i["out_unit"], i["in_unit"]) for i in table["interactions"]] == [
        ("l2", "mid", "hidden"), ("pw", "pw", "mid")]
    assert all(i["slope_ms"] >= 0 for i in table["interactions"])
    hidden = table["units"][0]
    assert set(hidden["patterns"]) == {"channel", "simd:4"}
    ch = hidden["patterns"]["channel"]
    assert ch["density"] == [1.0, 0.5, 0.25] and ch["kept"] == [64, 32, 16]
    assert hidden["patterns"]["simd:4"]["density"] == [1.0, 0.5, 0.25]
    assert hidden["patterns"]["simd:4"]["median_ms"][0] == ch["median_ms"][0]  # shared dense point
    assert hidden["layer_info"]["l1"]["input_shapes"] == [[2, 20, 16]]
    assert hidden["layer_info"]["l2"]["input_shapes"] == [[2, 20, 64]]
    assert table["units"][2]["layer_info"]["pw"]["input_shapes"] == [[2, 16, 20]]
    for unit in table["units"]:
        for curve in unit["patterns"].values():
            assert all(t > 0 for t in curve["median_ms"])
            assert all(a <= b for a, b in zip(curve["p10_ms"], curve["p90_ms"]))
        low = unit["patterns"]["channel"]["median_ms"]
        assert low[-1] < 3 * low[0]  # monotone-ish (timings are noisy; no strict ordering asserted)
    assert table["remainder_ms"] == pytest.approx(table["dense"]["median_ms"] - table["units_dense_sum_ms"])
    assert lat.estimate(table) == pytest.approx(table["dense"]["median_ms"])
    # each unit's fastest point includes its dense point, so the separable minimum is never above the dense
    # estimate (with interactions the re-estimated minimum can exceed it by timing noise on a model this tiny)
    assert lat.min_latency(dict(table, interactions=[])) <= lat.estimate(table)
    # default units: every Linear/Conv layer alone
    assert [u.name for u in prof.layer_units(model, shapes_mod.resolve_shapes(model.spec))] == ["l1", "l2", "pw", "head"]
    with pytest.raises(EdgecError, match="'nope' is not a module"):
        prof.profile(model, units=[("u", ["nope"], 4)], dense_onnx=onnx_bytes)
    # the model's error against real measurements: the dense model, and a really smaller hidden width
    from edgec.onnx.export import to_onnx

    report = lat.model_error(table, [("dense", {}, onnx_bytes),
                                     ("hidden 0.5", {"hidden": 0.5}, to_onnx(tiny_model(hidden=32)))],
                             repeats=5, min_seconds=0.02)
    assert [r["name"] for r in report["cases"]] == ["dense", "hidden 0.5"]
    for r in report["cases"]:
        assert r["measured_ms"] > 0 and r["estimate_ms"] > 0 and np.isfinite(r["rel_error"])
    assert report["warnings"] == []


@pytest.mark.parametrize("case", ["linear3d", "linear2d_padded", "conv1d", "conv2d", "nobias"])
def test_simd_layer_matches_masked_dense(case):
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    out, inp, n = {"linear3d": (256, 64, 8), "linear2d_padded": (30, 20, 8), "conv1d": (48, 32, 4),
                   "conv2d": (20, 12, 8), "nobias": (64, 40, 8)}[case]
    x_shape = {"linear3d": (2, 50, 64), "linear2d_padded": (7, 20), "conv1d": (2, 32, 17), "conv2d": (2, 12, 5, 6),
               "nobias": (3, 40)}[case]
    conv = case.startswith("conv")
    w = rng.standard_normal((out, inp) + ((1,) * (len(x_shape) - 2) if conv else ())).astype(np.float32)
    b = None if case == "nobias" else rng.standard_normal(out).astype(np.float32)
    mask = simd.vector_mask(w, 0.4, n, balanced=case != "linear3d")  # unbalanced blocks are exact too
    proto = simd.simd_layer_onnx(w, mask, n, bias=b, input_shape=[None] * len(x_shape))
    x = rng.standard_normal(x_shape).astype(np.float32)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    wm = simd.masked_weight(w, mask, n).reshape(out, inp)
    ref = (np.einsum("oi,bi...->bo...", wm, x) if conv else x @ wm.T)
    if b is not None:
        ref = ref + (b.reshape((out,) + (1,) * (len(x_shape) - 2)) if conv else b)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5
    # the pattern: removed weights form whole all-zero vectors of N consecutive output channels
    em = simd.expand_mask(mask, n, out)
    assert np.all(wm[~em] == 0)
    for b in range(simd.n_blocks(out, n)):
        rows = em[b * n:(b + 1) * n]  # the last block may be short
        assert np.all(rows.all(axis=0) | ~rows.any(axis=0))


def test_simd_masks_and_patterns():
    w = np.random.default_rng(0).standard_normal((64, 40)).astype(np.float32)
    m = simd.vector_mask(w, 0.25, 8)
    assert m.shape == (8, 40) and set(m.sum(axis=1)) == {10}
    assert simd.density_of(m) == 0.25
    assert simd.vector_mask(w, 0.25, 8, balanced=False).sum() == 80
    assert simd.parse_pattern("simd:8") == ("simd", 8) and simd.parse_pattern("channel") == ("channel", None)
    for bad in ("simd:1", "simd:x", "block"):
        with pytest.raises(EdgecError, match="unknown pruning pattern"):
            simd.parse_pattern(bad)
    with pytest.raises(EdgecError, match="1x1 conv"):
        simd.vector_mask(np.zeros((8, 4, 3), np.float32), 0.5, 4)


def test_units_from_channel_groups_and_untimed_members():
    model = tiny_model()

    class FakeGroup:  # the fields of edgec.analysis.groups.Group that profiling reads
        name, kind, size, width = "l1", "hidden", 64, 1
        producers, consumers, per_channel = ["l1"], ["l2"], ["act"]

    unit = units_mod.as_unit(FakeGroup())
    assert (unit.name, unit.layers, unit.width, unit.consumers, unit.per_channel) == ("l1", ("l1",), 64, ("l2",), ("act",))
    assert units_mod.as_unit(("u", "pw", 24)).layers == ("pw",)
    shapes = shapes_mod.resolve_shapes(model.spec)
    layers = prof.trace_layers(model, shapes)
    prof.check_units([unit], layers, model)
    assert prof.untimed(unit, layers) == ["act"]
    proto, feed = prof.unit_onnx(unit, layers, 0.5)
    assert sorted(n.op_type for n in proto.graph.node) == ["Add", "Add", "MatMul", "MatMul"]
    assert [tuple(x.shape) for x in feed.values()] == [(1, 20, 16), (1, 20, 32)]  # l2 reads half the hidden units
    shapes_out = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert shapes_out == {"u0c0.x": [1, 20, 16], "u1c0.x": [1, 20, 32]}
    with pytest.raises(EdgecError, match="'nope' is not a module"):
        prof.check_units([units_mod.as_unit(("u", ["l1"], 4, ["nope"]))], layers, model)
    with pytest.raises(EdgecError, match="needs a name"):
        units_mod.as_unit(("u", [], 4))


def test_interaction_slope_is_capped_at_the_layers_own_time():
    # a clearly measurable layer: the formula c_out·c_in / (ℓ(1,1) − overhead), unchanged
    c_out, c_in, slope = prof.interaction_slope(1.0, 0.6, 0.5, 0.7, 0.5, 0.1)
    assert (c_out, c_in) == pytest.approx((0.8, 0.6))
    assert slope == pytest.approx(0.8 * 0.6 / 0.9)
    # a layer within noise of the run overhead (dense − overhead ≤ 0) used to divide by 1e-9: seconds of
    # interaction from a 0.017 ms conv; the correction can never exceed the layer's own time
    c_out, c_in, slope = prof.interaction_slope(0.017, 0.0157, 0.5, 0.0114, 0.5, 0.018)
    assert c_out > 0 and c_in > 0 and slope == 0.017
    # one side saves nothing: no interaction
    assert prof.interaction_slope(0.03, 0.031, 0.5, 0.02, 0.5, 0.01)[2] == 0.0
