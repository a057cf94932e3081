"""ALCS pruning under a latency budget: allocation, ADMM projection, and ``prune_file`` measured in onnxruntime.

Latency is measured for real while other processes share the CPU, so the end-to-end tests use generous
budgets (0.85 x dense with a 5 % aim-below margin and retries) and assert the tool's own side-by-side
measurement; no test times the model again on its own (a loaded CI machine makes that a coin toss); the strict
figures belong to ``benchmarks/prune.py``.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from edgec.analysis.groups import analyse
from edgec.core.errors import EdgecError
from edgec.core.options import PruneOptions
from edgec.latency import cache
from edgec.latency import model as lat
from edgec.latency import profiling as prof
from edgec.latency import shapes as shapes_mod
from edgec.latency import simd as simd_mod
from edgec.latency import table as tab
from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
from edgec.prune import alcs
from edgec.prune import run as run_mod
from edgec.prune.run import measure, prune_file, simd_report

# --- a tiny model and synthetic tables ---------------------------------------------------------------


class TinyNet(nn.Module):
    """(B, T, 16) -> l1 (16->64) -> ReLU -> l2 (64->32) -> ReLU -> 1x1 conv (32->24) -> ReLU -> mean -> head."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 64)
        self.a1 = nn.ReLU()
        self.l2 = nn.Linear(64, 32)
        self.a2 = nn.ReLU()
        self.pw = nn.Conv1d(32, 24, 1)
        self.a3 = nn.ReLU()
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        h = self.a2(self.l2(self.a1(self.l1(x))))
        h = self.a3(self.pw(h.transpose(1, 2))).mean(dim=2)
        return self.head(h)


def tiny_model(seed=0):
    from edgec.core.graph import Model, trace
    from edgec.core.spec import Dim, InputSpec, TensorSpec

    torch.manual_seed(seed)
    module = TinyNet().eval()
    spec = InputSpec(inputs=(TensorSpec("x", (Dim("batch", 2, 3, 1, 64), Dim("time", 20, 13, 4, 512), 16)),),
                     task="classification")
    return Model(trace(module), "tests.tiny:TinyNet", {}, spec)


def synthetic_table(model, grid=(1.0, 0.75, 0.5, 0.25), simd=None, per_unit=None, remainder=1.0,
                    interactions=()):
    """A table whose units are the model's prunable groups; ``per_unit[name](density) -> ms`` (default: linear
    with a slope that differs per unit); ``simd = (pattern, factor)`` adds a SIMD curve ``factor x channel``
    for units with an eligible producer."""
    shapes = shapes_mod.resolve_shapes(model.spec)
    units = prof.group_units(model)
    modules = dict(model.gm.named_modules())
    entries = []
    for i, u in enumerate(units):
        fn = (per_unit or {}).get(u.name) or (lambda d, i=i: (1.0 + i) * (0.2 + 0.8 * d))
        dens = [float(d) for d in grid]
        kept = [max(1, int(math.floor(u.width * d + 0.5))) for d in dens]
        dens = [k / u.width for k in kept]
        ms = [float(fn(d)) for d in dens]
        curve = {"density": dens, "kept": kept, "median_ms": ms, "p10_ms": ms, "p90_ms": ms}
        patterns = {"channel": curve}
        if simd is not None and any(alcs.simd_eligible(modules[name]) for name in u.layers):
            p, factor = simd
            sms = [ms[0]] + [factor * m for m in ms[1:]]
            patterns[p] = {"density": dens, "kept": kept, "median_ms": sms, "p10_ms": sms, "p90_ms": sms}
        entries.append(u.to_json() | {"patterns": patterns, "dense_ms": ms[0], "untimed": [], "layer_info": {}})
    units_sum = sum(e["dense_ms"] for e in entries)
    pats = ["channel"] + ([simd[0]] if simd else [])
    key = tab.table_key(model, 1, shapes)
    request = tab.table_request(units, list(grid), pats)
    dense = {"median_ms": units_sum + remainder, "p10_ms": units_sum + remainder, "p90_ms": units_sum + remainder,
             "runs_ms": [units_sum + remainder] * 2}
    return tab.make_table(key=key, request=request, model=model, units=entries, dense=dense, units_sum=units_sum,
                          overhead=0.01, inputs=tab.inputs_json(model.spec, shapes), protocol={"synthetic": True},
                          interactions=list(interactions))


# --- allocation ---------------------------------------------------------------------------------------

def test_table_units_are_the_prunable_groups():
    model = tiny_model()
    names = {g.name for g in analyse(model).prunable}
    assert names == {"l1", "l2", "pw"}
    lm = lat.LatencyModel(synthetic_table(model))
    assert {g.name for g in alcs.table_groups(lm, analyse(model))} == names


def test_allocation_never_exceeds_the_budget_on_a_synthetic_table():
    model = tiny_model()
    # noisy, non-monotonic curves with a plateau, plus an interaction (l2 shrinks with l1 and with l2)
    per_unit = {"l1": lambda d: {1.0: 4.0, 0.75: 4.0, 0.5: 2.0, 0.25: 1.5}[round(d, 4)],
                "l2": lambda d: 1.0 + 2.0 * d,
                "pw": lambda d: {1.0: 1.0, 0.75: 0.6, 0.5: 0.7, 0.25: 0.5}[round(d, 4)]}
    inter = [{"layer": "l2", "out_unit": "l2", "in_unit": "l1", "slope_ms": 0.8, "dense_ms": 3.0, "ref_density": 0.5,
              "out_ms": 2.6, "in_ms": 2.6}]
    table = synthetic_table(model, per_unit=per_unit, interactions=inter)
    lm = lat.LatencyModel(table)
    dense, lowest = lm.estimate({}), lm.min_latency(["channel"])
    analysis = analyse(model)
    for frac in np.linspace(0.0, 1.0, 15):
        target = lowest + frac * (dense - lowest)
        alloc = alcs.allocate(lm, model, target, analysis=analysis)
        est = lat.estimate(table, alloc.densities())
        assert est <= target + 1e-9, (target, est, alloc.choice)
        assert est == pytest.approx(alloc.estimated_ms)
        for name, kept in alloc.keep.items():
            size = analysis.group(name).size
            assert kept == sorted(set(kept)) and 1 <= len(kept) < size
            assert len(kept) / size >= 0.25 - 1e-9  # never below the lowest measured density
    with pytest.raises(EdgecError) as exc:
        alcs.allocate(lm, model, lowest * 0.9, analysis=analysis)
    assert exc.value.exit_code == alcs.EXIT_INFEASIBLE
    assert f"{lowest:.4g}" in str(exc.value)


def test_allocation_removes_the_least_important_units_per_ms():
    model = tiny_model()
    with torch.no_grad():  # make units 0..7 of l1 nearly dead
        model.gm.l1.weight[:8] *= 1e-3
    table = synthetic_table(model, per_unit={"l1": lambda d: 10.0 * d, "l2": lambda d: 0.1 + 0.0 * d,
                                             "pw": lambda d: 0.1 + 0.0 * d})
    lm = lat.LatencyModel(table)
    alloc = alcs.allocate(lm, model, lm.dense - 1.25, analysis=analyse(model))  # 1.25 ms = 8 of 64 units
    assert set(alloc.choice) == {"l1"}  # only l1 saves time (the others are flat)
    assert alloc.keep["l1"] == list(range(8, 64))


def test_min_density_floor_is_respected():
    model = tiny_model()
    lm = lat.LatencyModel(synthetic_table(model))
    floor = lm.min_latency(["channel"], floor=0.5)
    alloc = alcs.allocate(lm, model, floor, min_density=0.5)
    assert all(d >= 0.5 - 1e-9 for _, d in alloc.choice.values())
    with pytest.raises(EdgecError) as exc:
        alcs.allocate(lm, model, floor * 0.95, min_density=0.5)
    assert exc.value.exit_code == alcs.EXIT_INFEASIBLE


def test_a_table_of_other_units_is_refused():
    model = tiny_model()
    shapes = shapes_mod.resolve_shapes(model.spec)
    table = synthetic_table(model)
    table["units"][0]["name"] = "l1_renamed"
    with pytest.raises(EdgecError, match="channel groups"):
        alcs.table_groups(lat.LatencyModel(table), analyse(model))
    assert shapes  # (the key is still the model's)


# --- ADMM projection -----------------------------------------------------------------------------------

def test_channel_projection_zeroes_whole_units_including_heads():
    model = new_model("convtransformer", {"num_layers": 1})
    analysis = analyse(model)
    lm = lat.LatencyModel(synthetic_table(model))
    alloc = alcs.allocate(lm, model, lm.dense * 0.6, analysis=analysis)
    assert "blocks.0.attn.q_proj" in alloc.keep  # heads are pruned too at this target
    weights = alcs.producer_weights(model, alcs.table_groups(lm, analysis))
    u = {k: torch.randn_like(v) * 0.01 for k, v in weights.items()}
    wu = {k: weights[k] + u[k] for k in weights}
    z = alcs.project(wu, analysis, alloc)
    for name, kept in alloc.keep.items():
        g = analysis.group(name)
        for s in g.slots:
            if s.kind != "out":
                continue
            rows = z[s.target].reshape(len(s.ids), -1)
            for p in range(len(s.ids)):
                if s.gid[p] != g.index:
                    continue
                if int(s.unit[p]) in kept:
                    assert torch.equal(rows[p], wu[s.target].reshape(len(s.ids), -1)[p])
                else:
                    assert not rows[p].any(), f"{s.target} row {p} of a pruned unit is not zero"
    # a head is removed whole: q, k and v lose head_dim rows each
    g = analysis.group("blocks.0.attn.q_proj")
    n_heads_kept = len(alloc.keep[g.name])
    for layer in ("blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj"):
        zero_rows = int((z[layer].abs().sum(dim=1) == 0).sum())
        assert zero_rows == (g.size - n_heads_kept) * g.width


def test_simd_projection_zeroes_whole_vectors_of_width_n():
    model = new_model("convtransformer", {"num_layers": 1})
    analysis = analyse(model)
    table = synthetic_table(model, simd=("simd:8", 0.5))  # SIMD half the cost of channel pruning: chosen
    lm = lat.LatencyModel(table)
    alloc = alcs.allocate(lm, model, lm.dense * 0.7, patterns=["channel", "simd:8"], analysis=analysis)
    simd_units = [u for u, (p, _) in alloc.choice.items() if p == "simd:8"]
    assert simd_units and alloc.masks
    assert lat.estimate(table, alloc.densities()) <= lm.dense * 0.7 + 1e-9
    weights = alcs.producer_weights(model, alcs.table_groups(lm, analysis))
    z = alcs.project(weights, analysis, alloc)
    for layer, (n, mask) in alloc.masks.items():
        assert n == 8
        w, zl = weights[layer], z[layer]
        out, inp = w.shape[:2]
        nb = simd_mod.n_blocks(out, n)
        pad = torch.zeros(nb * n, inp)
        pad[:out] = zl.reshape(out, inp)
        vec_zero = (pad.reshape(nb, n, inp) == 0).all(dim=1)  # (nb, in): the whole 1xN vector is zero
        assert torch.equal(vec_zero, torch.from_numpy(~mask))
        kept = torch.from_numpy(mask).sum(dim=1)
        assert (kept == kept[0]).all() and 0 < int(kept[0]) < inp  # balanced: same count per block
        keep_el = torch.from_numpy(simd_mod.expand_mask(mask, n, out))
        assert torch.equal(zl.reshape(out, inp)[keep_el], w.reshape(out, inp)[keep_el])
    report = simd_report(lm, alcs.table_groups(lm, analysis), "simd:8")
    assert report["faster_units"] and report["units_with_entry"]


def test_simd_report_says_slower_when_the_table_says_so():
    model = new_model("convtransformer", {"num_layers": 1})
    analysis = analyse(model)
    lm = lat.LatencyModel(synthetic_table(model, simd=("simd:8", 1.6)))
    report = simd_report(lm, alcs.table_groups(lm, analysis), "simd:8")
    assert report["units_with_entry"] and not report["faster_units"] and report["examples"]
    alloc = alcs.allocate(lm, model, lm.dense * 0.7, patterns=["channel", "simd:8"], analysis=analysis)
    assert all(p == "channel" for p, _ in alloc.choice.values())


def test_admm_rounds_meet_the_target_and_keep_the_pattern(tmp_path):
    from edgec.data import load_data

    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 20, 16, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    torch.save({"inputs": x, "targets": y}, tmp_path / "d.pt")
    bundle = load_data(str(tmp_path / "d.pt"))
    table = synthetic_table(model)
    lm = lat.LatencyModel(table)
    target = lm.dense * 0.7
    res = alcs.admm(model, bundle, table, target, epochs=2, rho=1e-2, lr=1e-3, batch_size=16, seed=0)
    assert len(res.history) == 2 and all(math.isfinite(r["task_loss"]) for r in res.history)
    assert all(r["estimated_ms"] <= target + 1e-9 for r in res.history)
    assert res.allocation.estimated_ms <= target + 1e-9
    assert res.model is not model and model.digest() == tiny_model().digest()  # input untouched


# --- prune_file end to end (real onnxruntime measurements) ----------------------------------------------

RESNET = {"base_width": 8, "image_size": 32}
GRID = (1.0, 0.75, 0.5, 0.25)
E2E = {"latency_ratio": 0.85, "margin": 0.05, "max_retries": 3, "densities": GRID}


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("prune") / "resnet.pt"
    save_checkpoint(new_model("resnet", RESNET, seed=0), path)
    return path


@pytest.fixture(scope="module")
def one_shot(resnet_ckpt):
    out = resnet_ckpt.with_name("resnet-pruned.pt")
    return prune_file(resnet_ckpt, out, PruneOptions(**E2E)).to_dict(), out


def _feed(model, batch=1):
    shapes = shapes_mod.resolve_shapes(model.spec, None, batch)
    return shapes_mod.make_inputs(model.spec, shapes, seed=0)


def test_prune_meets_a_feasible_budget_as_measured(one_shot):
    result, out = one_shot
    assert out.is_file()
    assert result["measured_ms"] <= result["local_budget_ms"]
    assert result["budget_ms"] == pytest.approx(0.85 * result["dense_ms"])
    assert result["params"] < result["before"]["params"] and result["flop_reduction"] > 1.0
    assert any(d < 1.0 for d in result["densities"].values())
    assert result["mode"] == "one-shot" and any("one-shot" in n for n in result["notes"])
    assert result["retries"] == len(result["attempts"]) - 1
    # the written file is the model that was measured: same digest and width, and it exports and runs
    from edgec.onnx.export import export

    model = load_checkpoint(out)
    assert model.digest() == result["digest"]
    assert model.param_count() == result["params"]
    data, record = export(model)
    assert record["checks"]["ort_parity"]["passed"]
    assert measure(data, _feed(model), 1)["median_ms"] > 0


def test_provenance_records_estimated_and_measured_latency_and_replays(one_shot, resnet_ckpt):
    from edgec.onnx.export import export

    result, out = one_shot
    model = load_checkpoint(out)  # replays prune.channels on fresh weights, then loads strictly
    assert [p["pass"] for p in model.passes] == ["prune.channels"]
    rec = model.provenance[-1]
    assert rec["pass"] == "prune.alcs"
    m = rec["metrics"]
    # what was decided is recorded; what was measured (differs run to run) is only in the result
    assert m["estimated_table_ms"] == result["estimated_table_ms"] and m["densities"] == result["densities"]
    assert m["attempt"] == len(result["attempts"]) and "measured_ms" not in m and "dense_ms" not in m
    assert rec["checks"]["latency"] == {"budget": "0.85 x dense measured side by side", "passed": True}
    assert rec["params"]["table"]["digest"] == tab.table_digest(cache.cached(model_dense(resnet_ckpt), 1, None,
                                                                             units="groups", densities=GRID))
    assert rec["params"]["table"]["arch"] == "resnet" and rec["params"]["pattern"] == "channel"
    assert rec["input_digest"] == load_checkpoint(resnet_ckpt).digest()
    assert rec["output_digest"] == model.digest() == result["digest"]
    data, record = export(model)
    assert record["checks"]["ort_parity"]["passed"]
    assert len(data) > 0


def test_prune_with_admm_on_a_tiny_dataset(resnet_ckpt, tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (48,), generator=g)
    x = torch.randn(48, 1, 32, 32, generator=g) * 0.5
    x[:, 0, :4, :] += y[:, None, None].float() / 5
    torch.save({"inputs": x, "targets": y}, tmp_path / "tiny.pt")
    out = tmp_path / "admm.pt"
    result = prune_file(resnet_ckpt, out, PruneOptions(data=str(tmp_path / "tiny.pt"), admm_epochs=2,
                                                       finetune_epochs=1, batch_size=16, **E2E)).to_dict()
    assert result["mode"] == "admm" and result["measured_ms"] <= result["local_budget_ms"]
    assert len(result["admm"]["rounds"]) == 2
    model = load_checkpoint(out)
    assert [r["pass"] for r in model.provenance][-3:] == ["prune.channels", "finetune", "prune.alcs"]
    assert model.provenance[-1]["metrics"]["admm"][0]["round"] == 1


def test_infeasible_budget_is_refused_before_any_work(resnet_ckpt, tmp_path, monkeypatch):
    import edgec.prune.alcs as alcs_mod

    def boom(*a, **k):
        raise AssertionError("allocation must not run for an infeasible budget")

    monkeypatch.setattr(alcs_mod, "allocate", boom)
    out = tmp_path / "never.pt"
    with pytest.raises(EdgecError) as exc:
        prune_file(resnet_ckpt, out, PruneOptions(latency_ms=1e-4, densities=GRID))
    assert exc.value.exit_code == alcs.EXIT_INFEASIBLE == 4
    assert "infeasible" in str(exc.value) and "ms" in str(exc.value)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_budget_missed_after_retries_writes_nothing(resnet_ckpt, tmp_path, monkeypatch):
    import edgec.prune.run as run_mod

    real = run_mod.measure_against
    calls = []

    def slow(dense_bytes, onnx_bytes, feed, threads, options=None):  # every pruned model measures "10x slower"
        dense, cand = real(dense_bytes, onnx_bytes, feed, threads, options)
        calls.append(cand["median_ms"])
        return dense, dict(cand, median_ms=dense["median_ms"] * 10)

    monkeypatch.setattr(run_mod, "measure_against", slow)
    out = tmp_path / "missed.pt"
    # a budget well inside what the table reaches (0.8 sat within noise of its floor on a loaded machine and was
    # refused as infeasible instead); the patched measurement is what misses it
    with pytest.raises(EdgecError) as exc:
        prune_file(resnet_ckpt, out, PruneOptions(latency_ratio=0.95, max_retries=1, densities=GRID, search=False))
    assert exc.value.exit_code == alcs.EXIT_BUDGET_MISSED == 5
    assert "best pruned model measured" in str(exc.value) and "--margin" in str(exc.value)
    assert len(calls) == 2  # two attempts, each measured side by side with the dense model
    assert not out.exists()


def model_dense(path):
    return load_checkpoint(path)


def test_same_table_same_seed_gives_byte_identical_files(one_shot, resnet_ckpt, tmp_path):
    """With a given table the allocation never depends on this run's measurements: two runs write the same
    checkpoint bytes and export the same ONNX bytes (the measured numbers are only in the results)."""
    from edgec.onnx.export import export

    table = cache.cached(model_dense(resnet_ckpt), 1, None, units="groups", densities=GRID)
    tab.save_table(table, tmp_path / "table.json")
    # a wide margin: byte-identity holds when the same attempt passes in both runs, so the first must pass
    # clearly (a budget within noise of the measurement may pass on a different attempt: documented)
    opts = PruneOptions(latency_ratio=0.95, margin=0.2, table=str(tmp_path / "table.json"), search=False,
                        measure_options={"repeats": 15, "min_seconds": 0.1})  # the check, not the subject here
    runs = [prune_file(resnet_ckpt, tmp_path / f"p{i}.pt", opts).to_dict() for i in range(2)]
    assert runs[0]["densities"] == runs[1]["densities"] and runs[0]["digest"] == runs[1]["digest"]
    assert (tmp_path / "p0.pt").read_bytes() == (tmp_path / "p1.pt").read_bytes()
    onnx = [export(load_checkpoint(tmp_path / f"p{i}.pt"))[0] for i in range(2)]
    assert onnx[0] == onnx[1]
    # the allocation aims at the table's dense latency, not at this run's measurement
    target = max(0.95 * 0.8 * table["dense"]["median_ms"], lat.LatencyModel(table).min_latency(["channel"]))
    assert runs[0]["estimated_table_ms"] <= target + 1e-9


def test_budget_under_the_clamped_floor_is_exit_4_before_any_work(one_shot, resnet_ckpt, tmp_path, monkeypatch):
    """A table whose calibrated remainder is negative used to make sub-floor budgets look feasible (and then
    ran for minutes before exit 5). The remainder is clamped to the run overhead; the floor rises with it."""
    import edgec.prune.alcs as alcs_mod

    table = cache.cached(model_dense(resnet_ckpt), 1, None, units="groups", densities=GRID)
    units_sum = table["units_dense_sum_ms"]  # the layers timed alone add up to more than the whole model:
    table = dict(table, dense=dict(table["dense"], median_ms=0.6 * units_sum), remainder_ms=-0.4 * units_sum,
                 run_overhead_ms=0.001)
    tab.save_table(table, tmp_path / "neg.json")
    lm = lat.LatencyModel(table)
    assert lm.clamped and lm.remainder == 0.001
    floor = lm.min_latency(["channel"])
    raw = -0.4 * units_sum + sum(min(c["channel"][1]) for c in lm.curves.values()) / lm.clamped["unit_scale"]
    assert raw < floor  # the unclamped sum would have accepted budgets below the floor

    def boom(*a, **k):
        raise AssertionError("allocation must not run for an infeasible budget")

    monkeypatch.setattr(alcs_mod, "allocate", boom)
    # a budget between the two that is far enough below the floor (< FLOOR_MEASURE_FROM x it) to be refused
    # without measuring the fastest configuration
    budget = min(max(raw, 0.0) + 0.5 * (floor - max(raw, 0.0)), 0.9 * run_mod.FLOOR_MEASURE_FROM * floor)
    with pytest.raises(EdgecError) as exc:
        prune_file(resnet_ckpt, tmp_path / "never.pt", PruneOptions(latency_ms=budget, table=str(tmp_path / "neg.json")))
    assert exc.value.exit_code == 4 and "infeasible" in str(exc.value)
    assert not (tmp_path / "never.pt").exists()


def test_bad_arguments_are_one_line_errors(resnet_ckpt, tmp_path):
    with pytest.raises(EdgecError, match="exactly one"):
        prune_file(resnet_ckpt, tmp_path / "x.pt", PruneOptions())
    with pytest.raises(EdgecError, match="latency-ratio"):
        prune_file(resnet_ckpt, tmp_path / "x.pt", PruneOptions(latency_ratio=1.5))
    with pytest.raises(EdgecError, match="pattern"):
        prune_file(resnet_ckpt, tmp_path / "x.pt", PruneOptions(latency_ms=1.0, pattern="blocks"))
    assert not (tmp_path / "x.pt").exists()


def test_a_table_from_another_device_sets_the_budget_in_its_milliseconds(one_shot, resnet_ckpt, tmp_path):
    import json

    model = load_checkpoint(resnet_ckpt)
    table = cache.cached(model, 1, None, batch=1, units="groups", densities=GRID)
    assert table["_cache"]["hit"]  # profiled once by the one-shot run
    device = json.loads(tab.dumps(table))
    device["key"]["cpu"] = "Slow Device CPU @ 1 GHz"  # measured elsewhere, 3x slower
    for unit in device["units"]:
        unit["dense_ms"] *= 3
        for curve in unit["patterns"].values():
            for k in ("median_ms", "p10_ms", "p90_ms"):
                curve[k] = [3 * v for v in curve[k]]
    for k in ("median_ms", "p10_ms", "p90_ms"):
        device["dense"][k] *= 3
    device["dense"]["runs_ms"] = [3 * v for v in device["dense"]["runs_ms"]]
    for inter in device["interactions"]:
        inter["slope_ms"] *= 3
    device["units_dense_sum_ms"] *= 3
    device["remainder_ms"] *= 3
    tab.save_table(device, tmp_path / "device.json")
    budget = 0.9 * device["dense"]["median_ms"]
    result = prune_file(resnet_ckpt, tmp_path / "dev.pt",
                        PruneOptions(latency_ms=budget, table=tmp_path / "device.json", margin=0.05)).to_dict()
    assert result["table_foreign"] and any("measured elsewhere" in n for n in result["notes"])
    assert result["budget_ms"] == pytest.approx(budget)
    # the check here is the same relative budget: 0.9 x the dense latency measured here, side by side
    chosen = result["attempts"][-1]
    assert result["local_budget_ms"] == pytest.approx(0.9 * chosen["dense_side_by_side_ms"]) == chosen["budget_ms"]
    assert result["measured_ms"] <= result["local_budget_ms"]
    assert result["table"]["source"] == "file:device.json"
