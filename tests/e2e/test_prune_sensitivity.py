"""Accuracy-aware allocation (Taylor sensitivity), aligned widths and measured feasibility of latency budgets."""
import numpy as np
import pytest
import torch
from torch import nn

from edgec.analysis.groups import analyse
from edgec.core.errors import EdgecError
from edgec.core.graph import Model, trace
from edgec.core.options import PruneOptions
from edgec.core.pass_manager import PassManager
from edgec.core.spec import Dim, InputSpec, TensorSpec
from edgec.data import load_data
from edgec.latency import model as lat
from edgec.latency import shapes as shapes_mod
from edgec.latency import table as tab
from edgec.onnx.export import to_onnx
from edgec.passes.prune_channels import PruneChannels
from edgec.prune import alcs
from edgec.prune import run as run_mod
from edgec.prune import search as search_mod
from edgec.prune.run import measure_against, prune_model
from edgec.prune.search import search_target
from edgec.prune.sensitivity import taylor_scores

# --- a model and data where one layer's units matter far more than their weight norm says -------------


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 64)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def mlp_model(seed=0):
    torch.manual_seed(seed)
    spec = InputSpec(inputs=(TensorSpec("x", (Dim("batch", 2, 3, 1, 256), 12)),), task="classification")
    return Model(trace(Mlp().eval()), "tests.sens:Mlp", {}, spec)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 12, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    path = tmp_path_factory.mktemp("sens") / "d.pt"
    torch.save({"inputs": x, "targets": y}, path)
    return load_data(str(path))


def test_taylor_scores_equal_the_hand_computed_group_sensitivity(data):
    """One batch: I_u = (Σ θ·∂L/∂θ over fc1 row u, fc1 bias u and fc2 column u)²."""
    model = mlp_model()
    analysis = analyse(model)
    group = analysis.group("fc1")
    got = taylor_scores(model, data, analysis, [group], seed=3, batches=1, batch_size=32)["fc1"]

    ds = data.split("val")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(3)).tolist()[:32]
    x = torch.stack([ds[i][0] for i in order])
    y = torch.stack([ds[i][1] for i in order])
    m = Mlp()
    m.load_state_dict({k.replace("gm.", ""): v for k, v in model.gm.state_dict().items()})
    m.eval()
    nn.functional.cross_entropy(m(x), y).backward()
    w1, b1, w2 = m.fc1.weight, m.fc1.bias, m.fc2.weight
    want = ((w1 * w1.grad).sum(1) + b1 * b1.grad + (w2 * w2.grad).sum(0)).double() ** 2
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-6, atol=1e-12)
    assert (got > 0).sum() > 32  # a real signal, not zeros


def test_taylor_scores_are_deterministic_in_their_seed_and_leave_the_model_alone(data):
    model = mlp_model()
    digest = model.digest()
    analysis = analyse(model)
    groups = [analysis.group("fc1")]
    a, b = (taylor_scores(model, data, analysis, groups, seed=1)["fc1"] for _ in range(2))
    c = taylor_scores(model, data, analysis, groups, seed=2, batches=1, batch_size=16)["fc1"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert model.digest() == digest


def _table(model):
    """A synthetic table: fc1's latency is linear in its density."""
    from edgec.latency import profiling as prof

    shapes = shapes_mod.resolve_shapes(model.spec)
    units = prof.group_units(model)
    entries = []
    for u in units:
        dens = [1.0, 0.75, 0.5, 0.25, 0.125]
        kept = [max(1, round(u.width * d)) for d in dens]
        ms = [0.1 + d for d in dens]
        curve = {"density": dens, "kept": kept, "median_ms": ms, "p10_ms": ms, "p90_ms": ms}
        entries.append(u.to_json() | {"patterns": {"channel": curve}, "dense_ms": ms[0], "untimed": [],
                                      "layer_info": {}})
    total = sum(e["dense_ms"] for e in entries)
    dense = {"median_ms": total + 0.2, "p10_ms": total + 0.2, "p90_ms": total + 0.2, "runs_ms": [total + 0.2] * 2}
    return tab.make_table(key=tab.table_key(model, 1, shapes), request=tab.table_request(units, dens, ["channel"]),
                          model=model, units=entries, dense=dense, units_sum=total, overhead=0.01,
                          inputs=tab.inputs_json(model.spec, shapes), protocol={"synthetic": True}, interactions=[])


def test_taylor_allocation_keeps_the_units_the_loss_needs(data):
    """Units 0..7 get large weights but feed nothing (fc2 columns zero): ‖v‖² keeps them, Taylor drops them."""
    model = mlp_model()
    with torch.no_grad():
        model.gm.fc1.weight[:8] *= 20
        model.gm.fc2.weight[:, :8] = 0
    analysis = analyse(model)
    lm = lat.LatencyModel(_table(model))
    target = lm.estimate({"fc1": 0.75})
    scores = taylor_scores(model, data, analysis, [analysis.group("fc1")], seed=0)
    by_l2 = alcs.allocate(lm, model, target, analysis=analysis)
    by_taylor = alcs.allocate(lm, model, target, analysis=analysis, scores=scores)
    assert set(range(8)) <= set(by_l2.keep["fc1"])
    assert not set(range(8)) & set(by_taylor.keep["fc1"])
    assert by_taylor.estimated_ms <= target + 1e-9


def test_aligned_counts_prefer_multiples_of_eight():
    assert alcs.aligned_counts(64, 8, 8) == [64, 56, 48, 40, 32, 24, 16, 8]
    assert alcs.aligned_counts(70, 5, 8) == [70, 64, 56, 48, 40, 32, 24, 16, 8, 5]
    assert alcs.aligned_counts(24, 3, 8) == list(range(24, 2, -1))  # narrow groups: every count
    model = mlp_model()
    analysis = analyse(model)
    lm = lat.LatencyModel(_table(model))
    alloc = alcs.allocate(lm, model, lm.estimate({"fc1": 0.6}), analysis=analysis, align=8)
    assert len(alloc.keep["fc1"]) % 8 == 0


def test_prune_options_check_importance_and_align():
    with pytest.raises(EdgecError, match="importance taylor needs --data"):
        PruneOptions(latency_ratio=0.5, importance="taylor").validate()
    with pytest.raises(EdgecError, match="importance must be"):
        PruneOptions(latency_ratio=0.5, importance="fisher").validate()
    with pytest.raises(EdgecError, match="align must be"):
        PruneOptions(latency_ratio=0.5, align=0).validate()


# --- feasibility: a budget uniform pruning reaches is accepted ----------------------------------------


class Wide(nn.Module):
    """Enough work per run that pruning is measurably faster than the per-run overhead."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(256, 512)
        self.a1 = nn.ReLU()
        self.l2 = nn.Linear(512, 512)
        self.a2 = nn.ReLU()
        self.head = nn.Linear(512, 4)

    def forward(self, x):
        return self.head(self.a2(self.l2(self.a1(self.l1(x)))).mean(1))


def wide_model():
    torch.manual_seed(0)
    spec = InputSpec(inputs=(TensorSpec("x", (Dim("batch", 2, 3, 1, 64), Dim("time", 32, 17, 4, 256), 256)),),
                     task="classification")
    return Model(trace(Wide().eval()), "tests.sens:Wide", {}, spec)


FAST = {"profile_options": {"repeats": 8, "min_seconds": 0.02, "rounds": 1, "dense_repeats": 15,
                            "dense_min_seconds": 0.1},
        "measure_options": {"warmup": 3, "repeats": 20, "min_seconds": 0.1}}


def test_a_budget_uniform_pruning_reaches_is_accepted_even_below_the_tables_floor_estimate(monkeypatch):
    """Uniform pruning to the grid's lowest density is measured side by side with the dense model; a budget a
    little above that is accepted (the table's floor estimate is inflated here so that it says 'infeasible'),
    and the result meets it as measured."""
    model = wide_model()
    grid = [1.0, 0.5, 0.25]
    uniform, _ = PassManager([PruneChannels(keep={g.name: list(range(g.size // 4))
                                                  for g in analyse(model).prunable})])(model)
    shapes = shapes_mod.resolve_shapes(model.spec, None, 1)
    feed = shapes_mod.make_inputs(model.spec, shapes, seed=0)
    dense, cand = measure_against(to_onnx(model).SerializeToString(), to_onnx(uniform).SerializeToString(), feed, 1,
                                  FAST["measure_options"])
    ratio = min(1.0, 1.6 * cand["median_ms"] / dense["median_ms"])  # room for noise: the floor is this structure

    real = lat.LatencyModel.min_latency

    def inflated(self, patterns=None, floor=None):  # the model overestimates its floor: above the budget
        return max(real(self, patterns, floor), 1.02 * ratio * self.dense)

    monkeypatch.setattr(lat.LatencyModel, "min_latency", inflated)
    pruned, result = prune_model(model, PruneOptions(latency_ratio=ratio, densities=grid, margin=0.05,
                                                     max_retries=3, **FAST))
    r = result.to_dict()
    assert r["floor_check"] is not None and r["floor_check"]["measured_ms"] <= r["floor_check"]["budget_ms"]
    assert any("reachable" in n for n in r["notes"])
    assert r["measured_ms"] <= r["local_budget_ms"] and pruned.param_count() < model.param_count()


def test_a_budget_below_the_measured_floor_is_refused_with_both_figures(monkeypatch):
    """The table's floor estimate is inflated to the dense latency; at a 0.9 lowest density the measured floor
    (~0.9 x dense) is over a 0.72 budget: refused after measuring, naming both figures. A budget far below the
    estimate is refused without measuring."""
    model = wide_model()
    real = lat.LatencyModel.min_latency
    monkeypatch.setattr(lat.LatencyModel, "min_latency", lambda self, p=None, floor=None: max(real(self, p, floor),
                                                                                            self.dense))
    with pytest.raises(EdgecError) as exc:
        prune_model(model, PruneOptions(latency_ratio=0.72, densities=[1.0, 0.9], **FAST))
    assert exc.value.exit_code == alcs.EXIT_INFEASIBLE
    assert "infeasible" in str(exc.value) and "estimates" in str(exc.value) and "and measured" in str(exc.value)

    calls = []
    monkeypatch.setattr(run_mod, "measure_against", lambda *a, **k: calls.append(a))
    with pytest.raises(EdgecError) as exc:
        prune_model(model, PruneOptions(latency_ratio=0.05, densities=[1.0, 0.5], **FAST))
    assert exc.value.exit_code == alcs.EXIT_INFEASIBLE and "and measured" not in str(exc.value)
    assert not calls


# --- the measured search of the allocation target -----------------------------------------------------

@pytest.mark.parametrize("gain", [2.0, 0.8])
def test_search_finds_the_loosest_target_that_measures_within_the_aim(gain):
    """The table's savings are off by ``gain`` (measured saving = gain x table saving): the search lands within
    its tolerance of the exact answer, on the passing side, in a few probes."""
    dense, aim = 10.0, 0.5
    calls = []

    def probe(t):
        calls.append(t)
        return max(0.05, 1.0 - gain * (dense - t) / dense)

    exact = dense * (1 - (1 - aim) / gain)
    found, rows = search_target(5.0, 1.0, dense, aim, probe)
    assert found is not None and probe(found) <= aim
    assert exact - search_mod.TOLERANCE * dense <= found <= exact + 1e-9
    assert len(rows) <= search_mod.MAX_PROBES and all(r["passed"] == (r["measured_fraction"] <= aim) for r in rows)


def test_search_reports_none_when_even_the_floor_misses():
    found, rows = search_target(5.0, 2.0, 10.0, 0.1, lambda t: 0.6)
    assert found is None and rows and not any(r["passed"] for r in rows)
    assert min(r["target_table_ms"] for r in rows) >= 2.0  # never below the floor


def test_prune_search_uses_the_budget_the_table_underestimates(monkeypatch):
    """On the wide MLP the table's floor is far above the measured one: without the search the first attempt
    prunes for the table's target; with it the structure is loosened to what the budget allows (fewer
    channels removed), and the result still meets the budget as measured."""
    model = wide_model()
    opts = dict(latency_ratio=0.6, densities=[1.0, 0.75, 0.5, 0.25], margin=0.05, max_retries=3, **FAST)
    _, plain = prune_model(model, PruneOptions(search=False, **opts))
    _, searched = prune_model(model, PruneOptions(**opts))
    s = searched.to_dict()
    assert s["search"] and s["measured_ms"] <= s["local_budget_ms"]
    assert plain.to_dict()["search"] is None
    assert searched.params >= plain.params


def test_a_second_run_reuses_the_cached_search_and_gives_the_same_model():
    model = wide_model()
    opts = PruneOptions(latency_ratio=0.7, densities=[1.0, 0.75, 0.5, 0.25], margin=0.2, max_retries=3, **FAST)
    first_model, first = prune_model(model, opts)
    again_model, again = prune_model(model, opts)
    assert first.search and again.search == first.search
    assert not any("cached search" in n for n in first.notes) and any("cached search" in n for n in again.notes)
    assert again.densities == first.densities and again_model.digest() == first_model.digest()
