"""benchmarks/prune.py's helpers without running the benchmark: NetAdapt's search on a toy latency, uniform keep
counts, aggregation over seeds, the budget check, and resuming from the JSON rows."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bp():
    spec = importlib.util.spec_from_file_location("bench_prune", ROOT / "benchmarks" / "prune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uniform_counts_and_allowed_counts(bp):
    assert bp.uniform_counts({"a": 256, "b": 4, "c": 3}, 0.5) == {"a": 128, "b": 2, "c": 2}
    assert bp.uniform_counts({"a": 10, "b": 4}, 0.01) == {"a": 1, "b": 1}  # at least one unit
    assert bp.uniform_counts({"a": 10}, 1.0) == {"a": 10}
    assert bp.allowed_counts(64, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert bp.allowed_counts(20, 8) == list(range(1, 21))  # below 4 x align: any count
    assert bp.allowed_counts(36, 8)[-2:] == [32, 36]  # the full size stays reachable


@pytest.mark.parametrize("threshold", [0, 1, 5, 17, 30, 63])
@pytest.mark.parametrize("guess", [None, 1, 40, 200])
def test_shrink_group_finds_the_largest_feasible_count(bp, threshold, guess):
    calls = []

    def feasible(n):
        calls.append(n)
        return n <= threshold

    allowed = list(range(1, 65))
    n, used = bp.shrink_group(64, allowed, feasible, guess)
    assert n == (threshold if threshold >= 1 else None)
    assert used == len(calls) == len(set(calls))  # each count measured at most once
    assert used <= 2 * 7 + 2  # exponential + binary search, not a scan


def test_shrink_group_with_a_good_guess_measures_twice(bp):
    calls = []
    n, used = bp.shrink_group(256, bp.allowed_counts(256, 8), lambda k: calls.append(k) or k <= 200, guess=200)
    assert (n, used) == (200, 2) and calls == [200, 208]
    assert bp.shrink_group(8, [8], lambda k: True) == (None, 0)  # nothing below the current count


def _toy_latency(sizes, cost):
    """Ratio to dense: fixed 0.2 + 0.8 x the cost-weighted share of kept units."""
    total = sum(cost[g] * s for g, s in sizes.items())
    return lambda counts: 0.2 + 0.8 * sum(cost[g] * counts[g] for g in counts) / total


def test_netadapt_search_reaches_every_budget_greedily(bp):
    sizes = {"cheap": 64, "dear": 64, "tiny": 4}
    cost = {"cheap": 1.0, "dear": 3.0, "tiny": 0.1}
    measure = _toy_latency(sizes, cost)
    measured = []

    def counting(counts):
        measured.append(dict(counts))
        return measure(counts)

    # score: the toy's "accuracy" prefers keeping 'dear' (pruning it costs more accuracy per unit)
    score = lambda c: -(2.0 * (64 - c["dear"]) + 0.5 * (64 - c["cheap"]) + 5.0 * (4 - c["tiny"]))  # noqa: E731
    budgets = [0.9, 0.7, 0.5]
    snaps, history = bp.netadapt_search(sizes, counting, score, budgets, step=0.05, align=8)
    assert set(snaps) == set(budgets)
    for b, s in snaps.items():
        assert s["ratio"] <= b and measure(s["counts"]) == pytest.approx(s["ratio"])
    ratios = [h["ratio"] for h in history]
    assert all(b < a for a, b in zip([1.0] + ratios, ratios))  # every step lowers the latency
    assert all(a - b >= 0.05 - 1e-9 for a, b in zip([1.0] + ratios, ratios))  # by at least the step
    assert history[-1]["ratio"] <= 0.5 and history[-2]["ratio"] > 0.5  # stops at the lowest budget
    # each step shrinks one group only, to a multiple of 8 (64-unit groups), 'tiny' never helps enough alone
    assert all(h["group"] in ("cheap", "dear") and h["kept"] % 8 == 0 for h in history)
    # the first budget's snapshot is the first step below it
    first = next(h for h in history if h["ratio"] <= 0.9)
    assert snaps[0.9]["step"] == first["step"]
    assert len(measured) < 20 * len(history)


def test_netadapt_search_stops_when_stuck(bp):
    sizes = {"a": 8}
    snaps, history = bp.netadapt_search(sizes, lambda c: 0.9 + 0.1 * c["a"] / 8, lambda c: 0.0, [0.5], step=0.04)
    # 0.95; 0.91 unreachable -> step halved to 0.02: 0.925; then 0.01: 0.9125; 0.9025 needs a < 1: stuck
    assert snaps == {} and [h["kept"] for h in history] == [4, 2, 1]


def _row(budget, method, seed, metric, ratio, **kw):
    return {"task": "keywords", "arch": "conformer", "budget": budget, "method": method, "seed": seed,
            "finetune_epochs": 2, "dense_epochs": 12, "metric": metric, "ratio": ratio, "ms": ratio * 2.0,
            "params": 1000, **kw}


def test_aggregate_mean_std_budget_met_and_gain(bp):
    rows = [_row(0.5, "taylor", s, m, r) for s, m, r in [(0, 0.80, 0.49), (1, 0.82, 0.50), (2, 0.84, 0.48)]]
    rows += [_row(0.5, "uniform", s, m, r) for s, m, r in [(0, 0.78, 0.49), (1, 0.80, 0.51)]]
    rows += [{k: v for k, v in _row(0.5, "uniform", 2, 0, 0).items() if k not in ("metric", "ratio", "ms")}
             | {"error": "boom"}]
    agg = {a["method"]: a for a in bp.aggregate(rows)}
    t, u = agg["taylor"], agg["uniform"]
    assert t["n"] == 3 and t["metric_mean"] == pytest.approx(0.82) and t["metric_std"] == pytest.approx(0.02)
    assert t["met"] == 3 and t["met_all"] is True and t["ratio_mean"] == pytest.approx(0.49)
    assert u["n"] == 2 and u["met"] == 1 and u["met_all"] is False and u["errors"] == ["boom"]
    assert bp.gain(bp.aggregate(rows), "keywords", "conformer", 0.5) == pytest.approx(0.82 - 0.79)
    assert bp.gain(bp.aggregate(rows), "keywords", "conformer", 0.4) is None
    assert bp.budget_met(0.5, 0.5) and not bp.budget_met(0.5001, 0.5) and not bp.budget_met(None, 0.5)
    assert bp.mean_std([1.0]) == (1.0, 0.0) and bp.mean_std([]) == (None, None)
    # the peers' target: the Taylor rows' mean ratio, capped at the budget
    assert bp.peer_target(rows, "keywords", "conformer", 0.5) == pytest.approx(0.49)
    assert bp.peer_target(rows, "keywords", "conformer", 0.4) == 0.4


def test_json_resume_skips_done_rows(bp, tmp_path):
    path = tmp_path / "rows.json"
    assert bp.load_rows(path) == []
    done = [_row(0.5, "taylor", 0, 0.8, 0.49), _row(0.5, "uniform", 0, 0.7, 0.5) | {"error": "x"}]
    bp.save_rows(path, done, {"note": "m"})
    back = bp.load_rows(path)
    assert sorted(map(bp.row_key, back)) == sorted(map(bp.row_key, done))
    wanted = [bp.row_key(_row(0.5, m, s, 0, 0)) for m in ("taylor", "uniform") for s in (0, 1)]
    assert bp.pending(back, wanted) == [wanted[1], wanted[3]]
    assert bp.pending(back, wanted, redo_errors=True) == [wanted[1], wanted[2], wanted[3]]
    # another fine-tune budget is another row
    assert bp.row_key(_row(0.5, "taylor", 0, 0, 0) | {"finetune_epochs": 3}) not in {bp.row_key(r) for r in back}
    bp.save_rows(path, list(reversed(back)), {"note": "m"})
    assert path.read_text() == (bp.save_rows(tmp_path / "again.json", back, {"note": "m"}) or
                                (tmp_path / "again.json").read_text())  # row order does not change the file


def test_plan_puts_taylor_first_and_cuts_speech_budgets_by_default(bp):
    args = bp.argparse.Namespace(tasks=["keywords", "speech"], models=["conformer"], budgets=list(bp.BUDGETS),
                                 all_budgets=False, quick=False, methods=["uniform", "taylor"], seeds=[0, 1])
    p = bp.plan(args)
    assert [m for _, m, _ in p[("keywords", "conformer")][:4]] == ["taylor", "taylor", "uniform", "uniform"]
    assert sorted({b for b, _, _ in p[("keywords", "conformer")]}) == sorted(bp.BUDGETS)
    assert sorted({b for b, _, _ in p[("speech", "conformer")]}) == sorted(bp.DEFAULTS["speech_budgets"])
    args.all_budgets = True
    assert sorted({b for b, _, _ in bp.plan(args)[("speech", "conformer")]}) == sorted(bp.BUDGETS)


def test_netadapt_search_trusts_the_confirming_measurement(bp):
    sizes = {"a": 64, "b": 64}
    true = _toy_latency(sizes, {"a": 1.0, "b": 1.0})
    noisy = lambda c: true(c) - 0.3  # noqa: E731 - a fast reading that is far too optimistic
    snaps, history = bp.netadapt_search(sizes, noisy, lambda c: 0.0, [0.5], step=0.05, align=8, confirm=true)
    assert all(h["ratio"] == pytest.approx(true(h["counts"])) for h in history)
    assert snaps[0.5]["ratio"] <= 0.5 and true(snaps[0.5]["counts"]) <= 0.5
    alone, _ = bp.netadapt_search(sizes, noisy, lambda c: 0.0, [0.5], step=0.05, align=8)
    assert true(alone[0.5]["counts"]) > 0.5  # without confirmation the search stops over budget
