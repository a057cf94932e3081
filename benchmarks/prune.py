"""Accuracy at a measured latency budget: edgec ALCS (Taylor and L2 importance) vs uniform channel pruning vs
Torch-Pruning vs a NetAdapt-style greedy search (issue 13, item 5).

    python benchmarks/prune.py [--tasks keywords speech] [--models conformer mobilenet]
                               [--budgets 0.9 0.75 0.6 0.5 0.4] [--seeds 0 1 2]
                               [--methods taylor l2 uniform tp netadapt] [--finetune-epochs F] [--dense-epochs E]
                               [--workdir .cache/bench-prune] [--json PATH] [--plot benchmarks/prune.png] [--quick]

Benchmark-only dependencies: ``torch-pruning`` and ``matplotlib`` (not runtime dependencies of edgec). The
keyword task needs ``make keywords`` (fixtures/keywords) first.

Tasks: ``keywords`` (fixtures/keywords, espeak-ng keyword spotting, speaker-disjoint, metric accuracy) and
``speech`` (fixtures/speech, held-out speakers, metric UAR); both as 40 log-mel features. Models: the zoo
``conformer`` and ``mobilenet`` at their default widths (``num_classes`` from the data).

Protocol.

* **Dense model** per (task, arch): trained once from scratch (seed 0, ``--dense-epochs``, lr ``DENSE_LR``,
  batch 32, keep-best-on-val) and cached under ``--workdir`` (checkpoint + its ONNX export), so reruns skip it.
  Every method × budget × seed starts from it.
* **Latency** is the median of onnxruntime runs (1 thread, batch 1, the model's default input shape), measured
  side by side with the dense model (interleaved runs, the protocol of ``edgec.prune.run.measure_against``), and
  reported as ms and as the ratio to the dense model measured in the same interleaved session. A budget ``b`` is
  *met* when that ratio is <= b. The final latency of every row comes from the verified edgec export
  (``torch.onnx`` dynamo); the peers' searches, which need many measurements, use a *proxy*: the TorchScript
  ONNX export of the same module (~40x faster to export), again as a ratio to the dense model's proxy export
  measured side by side (a short protocol). Latency depends on the structure only, so a structure's final
  measurement is shared by its seeds.
* **Fine-tune**, the same for every method: ``edgec.train.finetune`` with F = ``--finetune-epochs`` epochs,
  lr ``--lr``, batch 32, seed s (keep-best-on-val). Accuracy is the test metric of the fine-tuned model.

Methods, for every budget b (a fraction of the dense latency) and seed s:

(taylor) **edgec ALCS, Taylor importance**: ``prune_model(dense, PruneOptions(latency_ratio=b, data=...,
    importance="taylor", admm_epochs=0, finetune_epochs=0, seed=s))`` (Taylor batches drawn with seed s), then
    the common F-epoch fine-tune with seed s. This is what ``prune_file(..., finetune_epochs=F)`` does
    (``_attempt`` fine-tunes the shrunk model with the same ``finetune`` call; the latency check and retries
    depend on the structure only), with the fine-tune moved out so that all methods share one code path.
(l2) **edgec ALCS, L2 importance** (``importance="l2"``): the same; its allocation does not depend on the seed.
    The ``alloc`` column of the JSON rows holds both allocations (per-group densities) to compare them.
(uniform) **uniform channel pruning**: every prunable channel group keeps the same fraction
    (``uniform_counts``: ``max(1, round(fraction x size))``, units ranked by L2 importance); the fraction is
    bisected (proxy latency) to the *target*: the mean over seeds of the Taylor ALCS model's measured ratio at
    that budget (capped at b; b itself when the Taylor rows are missing), preferring candidates within the
    budget; then the common fine-tune.
(tp) **Torch-Pruning** ``MagnitudePruner`` (L2, global ranking, classifier ignored) on the eager zoo module with the
    dense weights, its global ratio bisected to the same target, traced back into an edgec Model, fine-tuned.
    Where Torch-Pruning mis-handles a model, a fallback that leaves the failing layers unpruned is tried
    (``TP_FALLBACK``); a failure is reported as the row's error.
(netadapt) **NetAdapt-style greedy search on measured latency** (Yang et al. 2018): start dense; each step, for
    every prunable channel group, shrink that group alone (units ranked by L2 importance,
    ``edgec.analysis.groups.keep_from_counts``; counts multiples of ``--align`` in groups >= 4 x align) just
    enough that the measured (proxy) latency ratio drops by ``--netadapt-step`` of the dense latency
    (``shrink_group``: exponential then binary search over counts, started at a guess from the group's
    last measured slope); score each candidate on a fixed held-out batch of the val split (accuracy, then loss)
    *without fine-tuning* -- NetAdapt's short-term fine-tune of every candidate is skipped for cost, so this is
    weaker than the paper's search -- and keep the best candidate; repeat until the ratio <= the lowest budget.
    The search does not depend on the seed: one greedy trajectory per (task, arch) gives every budget's structure
    (the first step at or below it), fine-tuned with each seed.

Reported per (task, arch, budget, method): test metric mean +- std over seeds (sample std), measured latency mean
(ms, and ratio to dense), budget met (k/n seeds), parameters; per (task, arch) a summary line: Taylor ALCS minus
uniform at the 0.5 and 0.4 budgets (mean over seeds; issue 13's goal is >= +1 point on the keyword task).
Markdown tables go to stdout, every row to ``--json`` (rewritten after each finished row, so an interrupted run
loses at most the row in progress; rows already there are skipped on rerun), the accuracy-vs-latency PNG (one
panel per task x arch, mean +- std) to ``--plot``.

Cost (2 cores, ``DEFAULTS`` below): see ``estimate_seconds`` and README's benchmark section; ``--quick`` is a
smoke run (budget 0.5, seed 0, 1 epoch each, a coarse NetAdapt step).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")

TASKS = {"keywords": ("fixtures/keywords", "accuracy"), "speech": ("fixtures/speech", "uar")}
FRAMES = {"keywords": 100, "speech": 200}  # 1 s keyword clips (98 frames); the speech fixture's loader default
MODELS = ("conformer", "mobilenet")
METHODS = ("taylor", "l2", "uniform", "tp", "netadapt")
LABELS = {"taylor": "edgec ALCS (taylor)", "l2": "edgec ALCS (l2)", "uniform": "uniform",
          "tp": "Torch-Pruning", "netadapt": "NetAdapt (greedy, measured)"}
BUDGETS = (0.9, 0.75, 0.6, 0.5, 0.4)
DENSE_LR = {"conformer": 2e-3, "mobilenet": 3e-3}
N_MELS = 40
BATCH = 32
# the default run (fits ~60 min on 2 idle cores, see estimate_seconds); --all-budgets lifts the speech cut
DEFAULTS = {"finetune_epochs": 1, "dense_epochs": {"keywords": 12, "speech": 15},
            "speech_budgets": (0.5, 0.4)}
QUICK = {"budgets": [0.5], "seeds": [0], "finetune_epochs": 1, "dense_epochs": 1, "netadapt_step": 0.1}
PROXY_MEASURE = {"warmup": 3, "repeats": 20, "min_seconds": 0.15}  # a search's many candidate readings
CONFIRM_MEASURE = {"warmup": 5, "repeats": 60, "min_seconds": 0.5}  # a chosen step / a bisection's pick
MAX_CORRECTIONS = 2  # a peer's structure measured over budget by the final protocol: pick a faster one
EVAL_BATCH = 128  # NetAdapt's candidate scoring: a fixed batch of the val split


# ------------------------------------------------------------------------------------------- pure helpers

def uniform_counts(sizes: dict[str, int], fraction: float) -> dict[str, int]:
    """Every group keeps ``max(1, round(fraction x size))`` units."""
    return {name: max(1, min(size, round(fraction * size))) for name, size in sizes.items()}


def allowed_counts(size: int, align: int) -> list[int]:
    """Kept counts a search may pick for a group of ``size`` units, ascending: multiples of ``align`` in groups
    of at least 4 x align units (edgec's ``--align`` rule), else any count; ``size`` itself always."""
    if align > 1 and size >= 4 * align:
        return sorted({*range(align, size, align), size})
    return list(range(1, size + 1))


def shrink_group(current: int, allowed: list[int], feasible, guess: int | None = None):
    """The largest count ``n < current`` in ``allowed`` with ``feasible(n)`` true, assuming feasibility is
    monotone (true below some count, false above). Exponential search from ``guess`` (default: the middle
    option), then bisection. ``feasible`` is called at most once per count. Returns ``(n, calls)``, n None when
    even the smallest count is infeasible."""
    opts = [n for n in allowed if n < current]
    if not opts:
        return None, 0
    memo: dict[int, bool] = {}

    def ok(i):
        if i not in memo:
            memo[i] = bool(feasible(opts[i]))
        return memo[i]

    i = len(opts) // 2 if guess is None else min(range(len(opts)), key=lambda k: (abs(opts[k] - guess), -k))
    lo, hi = -1, len(opts)  # ok(lo) true (or none), ok(hi) false (or beyond the options)
    step = 1
    if ok(i):
        lo = i
        while lo + step < len(opts) and ok(lo + step):
            lo, step = lo + step, step * 2
        hi = min(lo + step, len(opts))
    else:
        hi = i
        while hi - step >= 0 and not ok(hi - step):
            hi, step = hi - step, step * 2
        lo = hi - step if hi - step >= 0 else -1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return (opts[lo] if lo >= 0 else None), len(memo)


def netadapt_search(sizes: dict[str, int], measure, score, budgets, step: float, align: int = 1,
                    max_steps: int = 100, say=None, confirm=None, min_step: float | None = None):
    """NetAdapt's greedy loop on ``counts = {group: kept units}`` (start: ``sizes``, dense).

    ``measure(counts) -> latency ratio to dense`` (measured); ``score(counts) -> comparable value, higher is
    better`` (a held-out score without fine-tuning). Each step the target is ``current - step`` (``step`` halved,
    down to ``min_step``, default step / 4, when no group alone reaches it); every group is
    shrunk alone just enough to reach it (:func:`shrink_group`, guess from the group's last measured slope) and
    the best-scoring candidate is kept, its ratio re-measured by ``confirm(counts)`` (default ``measure``; a
    longer protocol, so that one fast-but-noisy reading does not end the search early). Stops when the ratio <=
    ``min(budgets)``, or when no group alone reaches the target (stuck). Returns ``(snapshots, history)``:
    ``snapshots[b] = {"counts", "ratio", "step"}`` for every budget reached (the first step at or below it),
    ``history`` one dict per step (with its ``counts``)."""
    say = say or (lambda _m: None)
    confirm = confirm or measure
    min_step = step / 4 if min_step is None else min_step
    counts = dict(sizes)
    current = 1.0  # the dense model, by definition
    goal = min(budgets)
    snapshots, history, slope = {}, [], {}
    for b in budgets:
        if current <= b:
            snapshots[b] = {"counts": dict(counts), "ratio": current, "step": 0}
    for k in range(1, max_steps + 1):
        if current <= goal:
            break
        target = current - step
        candidates = []
        for name in sorted(sizes):
            seen = {}

            def feasible(n, name=name, seen=seen, counts=counts, target=target):
                r = measure({**counts, name: n})
                seen[n] = r
                return r <= target

            guess = None
            if slope.get(name, 0) > 0:
                guess = counts[name] - math.ceil(step / slope[name])
            n, _ = shrink_group(counts[name], allowed_counts(sizes[name], align), feasible, guess)
            for m, r in seen.items():  # ratio saved per unit removed, for the next step's guess
                if current - r > 0:
                    slope[name] = (current - r) / (counts[name] - m)
                    break
            if n is not None:
                cand = {**counts, name: n}
                candidates.append((score(cand), -seen[n], name, cand, seen[n]))
        if not candidates:
            if step > min_step:  # NetAdapt's decaying reduction schedule: ask for less
                step = max(min_step, step / 2)
                say(f"  netadapt: no group alone reaches {target:.3f}; step halved to {step:.3f}")
                continue
            say(f"  netadapt: stuck at ratio {current:.3f} (no group alone reaches {target:.3f})")
            break
        best = max(candidates, key=lambda c: (c[0], c[1], c[2]))
        counts = best[3]
        current = confirm(counts) if confirm is not measure else best[4]
        history.append({"step": k, "group": best[2], "kept": counts[best[2]], "ratio": current,
                        "score": best[0], "candidates": len(candidates), "counts": dict(counts)})
        say(f"  netadapt step {k}: {best[2]} -> {counts[best[2]]}, ratio {current:.3f}, score {best[0]}")
        for b in budgets:
            if b not in snapshots and current <= b:
                snapshots[b] = {"counts": dict(counts), "ratio": current, "step": k}
    return snapshots, history


def mean_std(values):
    """(mean, sample std) of the values; std 0 for one value; (None, None) for none."""
    v = [float(x) for x in values]
    if not v:
        return None, None
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def budget_met(ratio, budget: float) -> bool:
    """The measured latency ratio (to the dense model, measured side by side) is within the budget."""
    return ratio is not None and ratio <= budget + 1e-12


def row_key(row: dict) -> tuple:
    return (row["task"], row["arch"], round(float(row["budget"]), 6), row["method"], int(row["seed"]),
            int(row["finetune_epochs"]), int(row["dense_epochs"]))


def load_rows(path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return list(json.loads(p.read_text())["rows"])


def save_rows(path, rows: list[dict], meta: dict | None = None) -> None:
    """Rewrite the JSON atomically (rows sorted by key, so a resumed run writes the same file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta or {}, "rows": sorted(rows, key=row_key)}, indent=1, default=float))
    os.replace(tmp, p)


def pending(rows: list[dict], wanted: list[tuple], redo_errors: bool = False) -> list[tuple]:
    """The wanted row keys not in ``rows`` (error rows count as done unless ``redo_errors``)."""
    done = {row_key(r) for r in rows if redo_errors is False or "error" not in r}
    return [k for k in wanted if k not in done]


def aggregate(rows: list[dict]) -> list[dict]:
    """One dict per (task, arch, budget, method): n, metric mean/std, ms and ratio means, budget met (k of n),
    params mean, errors."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["arch"], float(r["budget"]), r["method"]), []).append(r)
    out = []
    for (task, arch, budget, method), rs in cells.items():
        ok = [r for r in rs if "error" not in r]
        m, s = mean_std([r["metric"] for r in ok])
        out.append({"task": task, "arch": arch, "budget": budget, "method": method, "n": len(ok),
                    "metric_mean": m, "metric_std": s, "ms_mean": mean_std([r["ms"] for r in ok])[0],
                    "ratio_mean": mean_std([r["ratio"] for r in ok])[0],
                    "met": sum(budget_met(r["ratio"], budget) for r in ok),
                    "met_all": bool(ok) and len(ok) == len(rs) and all(budget_met(r["ratio"], budget) for r in ok),
                    "params_mean": mean_std([r["params"] for r in ok])[0],
                    "errors": sorted({r["error"] for r in rs if "error" in r})})
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(out, key=lambda a: (a["task"], a["arch"], -a["budget"], order.get(a["method"], 99)))


def gain(agg: list[dict], task: str, arch: str, budget: float, a: str = "taylor", b: str = "uniform"):
    """Mean metric of method ``a`` minus method ``b`` at ``budget`` (None when either is missing)."""
    cell = {(x["method"]): x for x in agg if x["task"] == task and x["arch"] == arch
            and abs(x["budget"] - budget) < 1e-9}
    if a not in cell or b not in cell or cell[a]["metric_mean"] is None or cell[b]["metric_mean"] is None:
        return None
    return cell[a]["metric_mean"] - cell[b]["metric_mean"]


def peer_target(rows: list[dict], task: str, arch: str, budget: float) -> float:
    """The ratio the peers are bisected to: the mean measured ratio of the Taylor ALCS rows at this budget,
    capped at the budget; the budget when there are none."""
    r = [x["ratio"] for x in rows if x["task"] == task and x["arch"] == arch and x["method"] == "taylor"
         and abs(float(x["budget"]) - budget) < 1e-9 and "error" not in x]
    return min(budget, sum(r) / len(r)) if r else budget


def estimate_seconds(n_rows_by_combo: dict, cost: dict) -> float:
    """Rough wall time: ``cost[(task, arch)]`` = {"dense": s, "row": s per (method x budget x seed) row,
    "structure": s per (peer method x budget), "netadapt": s per search}; ``n_rows_by_combo[(task, arch)]`` =
    {"rows", "structures", "dense": bool, "netadapt": bool}."""
    total = 0.0
    for combo, n in n_rows_by_combo.items():
        c = cost[combo]
        total += n["rows"] * c["row"] + n["structures"] * c["structure"]
        total += c["dense"] * bool(n.get("dense")) + c["netadapt"] * bool(n.get("netadapt"))
    return total


# ------------------------------------------------------------------------------------------- measurement

def say(msg):
    print(msg, file=sys.stderr, flush=True)


def proxy_bytes(model, feed) -> bytes:
    """TorchScript ONNX export (fast; for the searches' many measurements only)."""
    import torch

    buf = io.BytesIO()
    gm = copy.deepcopy(model.gm).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(gm, tuple(torch.from_numpy(v) for v in feed.values()), buf, dynamo=False,
                          opset_version=17, input_names=list(feed))
    return buf.getvalue()


def structure_key(model) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in model.gm.state_dict().items())


class Combo:
    """One (task, arch): data, the dense model, its exports and measurements, caches."""

    def __init__(self, task, arch, args):
        self.task, self.arch, self.args = task, arch, args
        self.metric = TASKS[task][1]
        self.dense_epochs = args.dense_epochs if args.dense_epochs is not None else DEFAULTS["dense_epochs"][task]
        self.dir = Path(args.workdir) / f"{task}-{arch}"
        self.final_cache: dict[tuple, dict] = {}
        self.structures: dict[tuple, object] = {}  # (method, budget) -> pruned model before fine-tune, or error

    def load(self):
        from edgec.analysis.groups import analyse
        from edgec.data import load_data
        from edgec.latency.shapes import make_inputs, resolve_shapes
        from edgec.models.checkpoint import load_checkpoint
        from edgec.onnx.export import to_onnx
        from edgec.prune.run import macs

        path = self.args.data.get(self.task) or str(ROOT / TASKS[self.task][0])
        if not (Path(path) / "labels.csv").exists():
            raise SystemExit(f"{self.task}: no data at {path} (run `make {self.task}` first)")
        self.bundle = load_data(path, n_mels=N_MELS, frames=FRAMES[self.task])
        ckpt = self.dir / f"dense-e{self.dense_epochs}.pt"
        meta_path = ckpt.with_suffix(".json")
        if ckpt.exists() and meta_path.exists():
            self.model = load_checkpoint(ckpt)
            self.meta = json.loads(meta_path.read_text())
            say(f"{self.task}/{self.arch}: dense model from {ckpt}")
        else:
            self.model, self.meta = self.train_dense(ckpt, meta_path)
        self.model.gm.eval()
        self.shapes = resolve_shapes(self.model.spec, {"features": (1, FRAMES[self.task], N_MELS)}, 1)
        self.feed = make_inputs(self.model.spec, self.shapes, seed=0)
        onnx_path = ckpt.with_suffix(".onnx")
        if not onnx_path.exists():
            onnx_path.write_bytes(to_onnx(self.model).SerializeToString())
        self.dense_bytes = onnx_path.read_bytes()
        self.dense_proxy = proxy_bytes(self.model, self.feed)
        self.analysis = analyse(self.model)
        self.sizes = {g.name: g.size for g in self.analysis.prunable}
        self.macs = macs(self.model, self.shapes)
        self.eval_batch = self.val_batch()

    def train_dense(self, ckpt, meta_path):
        from edgec.evaluation import evaluate_model
        from edgec.models.checkpoint import new_model, save_checkpoint
        from edgec.train import finetune

        t = time.perf_counter()
        lr = DENSE_LR[self.arch]
        model = new_model(self.arch, {"num_classes": self.bundle.num_classes, "n_mels": N_MELS}, seed=0)
        model, _ = finetune(model, self.bundle, epochs=self.dense_epochs, lr=lr, batch_size=BATCH, seed=0)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, ckpt)
        test = evaluate_model(model, self.bundle, split="test", latency=False)["metrics"][self.metric]
        meta = {"epochs": self.dense_epochs, "lr": lr, "seed": 0, "test_metric": float(test),
                "params": model.param_count(), "train_seconds": time.perf_counter() - t}
        meta_path.write_text(json.dumps(meta, indent=1))
        say(f"{self.task}/{self.arch}: dense trained {self.dense_epochs} epochs in {meta['train_seconds']:.0f} s, "
            f"test {self.metric} {test:.3f}")
        return model, meta

    def val_batch(self):
        from edgec.train.loop import collate

        ds = self.bundle.split("val") if self.bundle.has_split("val") else self.bundle.split("train")
        idx = list(range(0, len(ds), max(1, len(ds) // EVAL_BATCH)))[:EVAL_BATCH]
        return collate(ds, idx)

    # --- latency
    def proxy_ratio(self, model, protocol=None) -> float:
        from edgec.prune.run import measure_against

        dense, cand = measure_against(self.dense_proxy, proxy_bytes(model, self.feed), self.feed, 1,
                                      protocol or PROXY_MEASURE)
        return cand["median_ms"] / dense["median_ms"]

    def final(self, model) -> dict:
        """Measured ms / ratio of the verified export (side by side with the dense export); cached per structure."""
        from edgec.onnx.export import export
        from edgec.prune.run import measure_against

        key = structure_key(model)
        if key not in self.final_cache:
            onnx_bytes = export(model)[0]
            dense, cand = measure_against(self.dense_bytes, onnx_bytes, self.feed, 1)
            self.final_cache[key] = {"ms": cand["median_ms"], "dense_ms": dense["median_ms"],
                                     "ratio": cand["median_ms"] / dense["median_ms"]}
        return self.final_cache[key]

    # --- training and scoring
    def tune(self, model, seed):
        from edgec.train import finetune

        if self.args.finetune_epochs <= 0:
            return model
        return finetune(model, self.bundle, epochs=self.args.finetune_epochs, lr=self.args.lr, batch_size=BATCH,
                        seed=seed)[0]

    def test_metric(self, model) -> float:
        from edgec.evaluation import evaluate_model

        return float(evaluate_model(model, self.bundle, split="test", latency=False)["metrics"][self.metric])

    def val_score(self, model) -> tuple:
        import torch

        from edgec.train.losses import first_output, task_loss

        x, y = self.eval_batch
        with torch.no_grad():
            out = first_output(model.gm.eval()(x))
        acc = float((out.argmax(-1) == y).float().mean())
        return round(acc, 6), -round(float(task_loss(out, y, self.bundle.task)), 6)

    def counts_model(self, counts):
        from edgec.analysis.groups import keep_from_counts
        from edgec.passes.prune_channels import apply_keep

        keep = keep_from_counts(self.model, {g: n for g, n in counts.items() if n < self.sizes[g]}, self.analysis)
        model = self.model.clone()
        apply_keep(model, keep)
        return model


# ------------------------------------------------------------------------------------------- methods

def edgec_structure(c: Combo, budget, importance, seed):
    from edgec.core.errors import EdgecError
    from edgec.core.options import PruneOptions
    from edgec.prune.run import prune_model

    opts = PruneOptions(latency_ratio=budget, data=c.bundle, importance=importance, admm_epochs=0,
                        finetune_epochs=0, lr=c.args.lr, batch_size=BATCH, seed=seed, align=c.args.align,
                        input_shape=[f"features=1x{FRAMES[c.task]}x{N_MELS}"])
    try:
        pruned, res = prune_model(c.model, opts)
    except EdgecError as e:
        return None, {"error": f"exit {e.exit_code}: {e}"}
    best = next(a for a in res.attempts if a["measured_ms"] == res.measured_ms)
    dense_side = best.get("dense_side_by_side_ms") or res.dense_ms
    info = {"ms": res.measured_ms, "dense_ms": dense_side, "ratio": res.measured_ms / dense_side,
            "alloc": {k: round(v, 4) for k, v in res.densities.items()}, "retries": res.retries,
            "est_err": res.model_error, "floor_check": getattr(res, "floor_check", None)}
    c.final_cache[structure_key(pruned)] = {k: info[k] for k in ("ms", "dense_ms", "ratio")}
    return pruned, info


def bisect(c: Combo, build, target, budget, lo=0.0, hi=0.95, label=""):
    """``build(x)`` -> pruned model, latency decreasing in x. Bisects x to the proxy ratio ``target``; keeps the
    closest candidate, preferring ones within ``budget``. Returns (x, model, steps)."""
    best, steps = None, []
    for _ in range(c.args.max_bisect):
        x = 0.5 * (lo + hi)
        model = build(x)
        r = c.proxy_ratio(model)
        steps.append((round(x, 4), round(r, 4)))
        rank = (r > budget, abs(r - target))
        if best is None or rank < best[0]:
            best = (rank, x, model)
        if abs(r - target) <= c.args.tol * target and r <= budget:
            break
        lo, hi = (x, hi) if r > target else (lo, x)
    say(f"  {label}: bisection {steps} -> x={best[1]:.4f}")
    return best[1], best[2], steps


def uniform_structure(c: Combo, budget, target):
    def build(prune_frac):
        return c.counts_model(uniform_counts(c.sizes, 1.0 - prune_frac))

    x, model, steps = bisect(c, build, target, budget, label=f"uniform b={budget}")
    return model, {"knob": f"keep {1 - x:.3f}", "bisect": steps}


def tp_prune(c: Combo, ratio, also_ignore=()):
    """Torch-Pruning MagnitudePruner at global ``ratio`` on the eager zoo module; returns an edgec Model."""
    import torch
    import torch_pruning as tp

    from edgec import models
    from edgec.models.checkpoint import model_from_module

    module = models.build(c.arch, c.model.config)
    own = module.state_dict()  # the GraphModule may carry extra traced constants
    module.load_state_dict({k: v for k, v in c.model.gm.state_dict().items() if k in own})
    module.eval()
    example = tuple(torch.from_numpy(v) for v in c.feed.values())
    ignored = [m for m in module.modules() if isinstance(m, torch.nn.Linear) and m.out_features == c.bundle.num_classes]
    ignored += [module.get_submodule(n) for n in also_ignore]
    pruner = tp.pruner.MagnitudePruner(module, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, global_pruning=True, ignored_layers=ignored,
                                       max_pruning_ratio=0.95)
    pruner.step()
    with torch.no_grad():
        module(*example)  # fails here when the pruned module is inconsistent
    return model_from_module(module, c.arch, copy.deepcopy(c.model.config))


# Torch-Pruning 1.6 on the zoo Conformer: (1) Conv2dSubsampling's transpose(1, 2).flatten(2) interleaves (channel,
# freq) before the Linear and Torch-Pruning removes one Linear input per pruned channel instead of one per
# (channel, freq) pair; (2) the hand-written attention reshapes to the constant (heads, head_dim), so pruning
# q/k/v outputs or the residual width breaks it; (3) GLU halves its input, which Torch-Pruning does not pair.
# Fallback: leave those layers unpruned (it prunes the FFN hidden widths and the first subsampling conv only).
TP_FALLBACK = {
    "conformer": ["subsampling.conv.2", "subsampling.out"] + [
        f"blocks.{i}.{n}" for i in range(2) for n in (
            "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "ffn1.linear2", "ffn2.linear2",
            "conv.pointwise1", "conv.depthwise", "conv.pointwise2")],
}


def _msg(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def tp_structure(c: Combo, budget, target):
    variants = [("", ())]
    if c.arch in TP_FALLBACK:
        variants.append((" (fallback: FFN hidden + 1st conv only)", tuple(TP_FALLBACK[c.arch])))
    errors = []
    for label, also in variants:
        try:
            tp_prune(c, 0.05, also)  # probe: does Torch-Pruning handle this model at all?
            x, model, steps = bisect(c, lambda r, also=also: tp_prune(c, r, also), target, budget,
                                     label=f"TP{label} b={budget}")
            c.proxy_ratio(model)  # the exporter must take it too
        except Exception as e:  # noqa: BLE001 - the failure is the result
            say(f"  Torch-Pruning{label} failed on {c.arch}: {_msg(e)}\n{traceback.format_exc(limit=3)}")
            errors.append(f"Torch-Pruning{label}: {_msg(e)}")
            continue
        return model, {"knob": f"global {x:.3f}{label}", "bisect": steps}
    return None, {"error": "; ".join(errors)}


def netadapt_structures(c: Combo, budgets):
    """One greedy trajectory down to the lowest budget; {budget: (model, info)}: the first step whose confirmed
    proxy ratio is within the budget, or a later one when the final protocol measures it over budget."""
    t = time.perf_counter()
    calls = [0]

    def measure(counts, protocol=None):
        calls[0] += 1
        return c.proxy_ratio(c.counts_model(counts), protocol)

    snaps, history = netadapt_search(c.sizes, measure, lambda counts: c.val_score(c.counts_model(counts)),
                                     sorted(budgets, reverse=True), c.args.netadapt_step, c.args.align, say=say,
                                     confirm=lambda counts: measure(counts, CONFIRM_MEASURE))
    seconds = time.perf_counter() - t
    say(f"  netadapt: {len(history)} steps, {calls[0]} measurements, {seconds:.0f} s")
    out = {}
    for b in budgets:
        if b not in snaps:
            last = history[-1]["ratio"] if history else 1.0
            out[b] = (None, {"error": f"NetAdapt stuck at proxy ratio {last:.3f} (step {len(history)}) above the "
                                      "budget"})
            continue
        k = snaps[b]["step"]
        states = [h for h in history if h["step"] >= k][:1 + MAX_CORRECTIONS]
        for h in states:
            model = c.counts_model(h["counts"])
            if budget_met(c.final(model)["ratio"], b) or h is states[-1]:
                break
        out[b] = (model, {"knob": f"step {h['step']} (first within budget: {k}), proxy ratio {h['ratio']:.3f}",
                          "search_seconds": seconds, "search_measurements": calls[0]})
    return out


# ------------------------------------------------------------------------------------------- driver

def structure(c: Combo, method, budget, seed, rows, budgets):
    """(pruned model before fine-tune, info) for one row; the seed-independent ones are cached."""
    if method == "taylor":
        return edgec_structure(c, budget, "taylor", seed)
    key = (method, budget)
    if key not in c.structures:
        t = time.perf_counter()
        if method == "l2":
            c.structures[key] = edgec_structure(c, budget, "l2", 0)
        elif method == "netadapt":
            for b, v in netadapt_structures(c, list(budgets)).items():
                c.structures[("netadapt", b)] = v
        else:
            target = aim = peer_target(rows, c.task, c.arch, budget)
            fn = uniform_structure if method == "uniform" else tp_structure
            for k in range(MAX_CORRECTIONS + 1):
                model, info = fn(c, budget, aim)
                final = None if model is None else c.final(model)["ratio"]
                if final is None or budget_met(final, budget) or k == MAX_CORRECTIONS:
                    break
                aim *= min(budget, target) / final * 0.99  # the proxy read it lower than the final protocol
                say(f"  {method}: final ratio {final:.3f} over the budget; bisecting again to proxy {aim:.3f}")
            c.structures[key] = (model, {**info, "target_ratio": target, "corrections": k})
        c.structures[key][1]["structure_seconds"] = time.perf_counter() - t
    return c.structures[key]


def run_row(c: Combo, method, budget, seed, rows, budgets) -> dict:
    from edgec.prune.run import macs

    t = time.perf_counter()
    base = {"task": c.task, "arch": c.arch, "budget": budget, "method": method, "seed": seed,
            "finetune_epochs": c.args.finetune_epochs, "dense_epochs": c.dense_epochs}
    try:
        model, info = structure(c, method, budget, seed, rows, budgets)
    except Exception as e:  # noqa: BLE001 - a failing method is a result, not the end of the run
        say(traceback.format_exc(limit=5))
        return {**base, "error": _msg(e), "seconds": time.perf_counter() - t}
    info = {k: v for k, v in info.items() if k != "bisect" or c.args.verbose}
    if model is None:
        return {**base, **info, "seconds": time.perf_counter() - t}
    lat = c.final(model)
    tuned = c.tune(model, seed)
    return {**base, **info, "metric": c.test_metric(tuned), "ms": lat["ms"], "dense_ms": lat["dense_ms"],
            "ratio": lat["ratio"], "met": budget_met(lat["ratio"], budget), "params": tuned.param_count(),
            "macs": macs(tuned, c.shapes), "seconds": time.perf_counter() - t}


def fmt(x, spec, empty="—"):
    return empty if x is None else format(x, spec)


def print_tables(rows, combos, args):
    agg = aggregate(rows)
    for c in combos:
        cells = [a for a in agg if a["task"] == c.task and a["arch"] == c.arch]
        dense_ms = [r["dense_ms"] for r in rows if r["task"] == c.task and r["arch"] == c.arch and "dense_ms" in r]
        print(f"\n### {c.task} / {c.arch}: dense test {c.metric} {c.meta['test_metric']:.3f} ({c.meta['params'] / 1e3:.1f} k "
              f"params, {c.meta['epochs']} epochs lr {c.meta['lr']:g}), dense {fmt(mean_std(dense_ms)[0], '.4g')} ms "
              f"(ORT 1 thread, batch 1, {', '.join(f'{k} {list(v)}' for k, v in c.shapes.items())}); fine-tune "
              f"{args.finetune_epochs} epoch(s) lr {args.lr:g} batch {BATCH} for every method\n")
        print(f"| budget | method | test {c.metric} (mean ± std) | seeds | ms (mean) | × dense | met | params |")
        print("|---|---|---|---|---|---|---|---|")
        for a in cells:
            if a["n"] == 0:
                print(f"| {a['budget']:.0%} | {LABELS[a['method']]} | {'; '.join(a['errors'])[:200]} | 0 | | | | |")
                continue
            err = f" ({len(a['errors'])} error)" if a["errors"] else ""
            print(f"| {a['budget']:.0%} | {LABELS[a['method']]} | {a['metric_mean']:.3f} ± {a['metric_std']:.3f}"
                  f"{err} | {a['n']} | {a['ms_mean']:.4g} | {a['ratio_mean']:.3f} | {a['met']}/{a['n']} | "
                  f"{a['params_mean'] / 1e3:.1f} k |")
        parts = []
        for b in (0.5, 0.4):
            for other in ("uniform", "l2"):
                g = gain(agg, c.task, c.arch, b, "taylor", other)
                if g is not None:
                    parts.append(f"taylor − {other} @ {b:.0%}: {g * 100:+.1f} points")
        print(f"\n**{c.task} / {c.arch}**: " + ("; ".join(parts) if parts else "no taylor/uniform pair at 50 %/40 %"))


def plot(rows, combos, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    fig, axes = plt.subplots(1, len(combos), figsize=(5.5 * len(combos), 4.3), squeeze=False)
    for ax, c in zip(axes[0], combos):
        cells = [a for a in agg if a["task"] == c.task and a["arch"] == c.arch and a["n"]]
        for method in METHODS:
            # x: latency over the dense model's measured side by side (absolute ms drift with machine load)
            pts = sorted((a["ratio_mean"], a["metric_mean"], a["metric_std"]) for a in cells if a["method"] == method)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=LABELS[method])
        ax.scatter([1.0], [c.meta["test_metric"]], marker="*", s=150, color="k", label="dense", zorder=5)
        ax.set_xlabel("measured latency × dense (side by side; onnxruntime, 1 thread, batch 1)")
        ax.set_ylabel(f"test {c.metric} (mean ± std over seeds)")
        ax.set_title(f"{c.task} / {c.arch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def plan(args) -> dict:
    """{(task, arch): [(budget, method, seed), ...]} in run order: per budget, Taylor first (the peers' target)."""
    out = {}
    for task in args.tasks:
        budgets = args.budgets
        if task == "speech" and not args.all_budgets and not args.quick and args.budgets == list(BUDGETS):
            budgets = list(DEFAULTS["speech_budgets"])
        for arch in args.models:
            order = [m for m in METHODS if m in args.methods]
            out[(task, arch)] = [(b, m, s) for b in budgets for m in order for s in args.seeds]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    ap.add_argument("--all-budgets", action="store_true",
                    help=f"speech fixture at every budget too (default: {list(DEFAULTS['speech_budgets'])} only)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--finetune-epochs", type=int, default=DEFAULTS["finetune_epochs"])
    ap.add_argument("--dense-epochs", type=int, default=None,
                    help=f"default per task: {DEFAULTS['dense_epochs']}")
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tune learning rate (every method)")
    ap.add_argument("--align", type=int, default=8, help="edgec --align; NetAdapt's count granularity")
    ap.add_argument("--netadapt-step", type=float, default=0.05, help="latency ratio removed per NetAdapt step")
    ap.add_argument("--tol", type=float, default=0.02, help="relative latency match for the peers' bisection")
    ap.add_argument("--max-bisect", type=int, default=7)
    ap.add_argument("--keywords", default=None, help="keyword data (default fixtures/keywords)")
    ap.add_argument("--speech", default=None, help="speech data (default fixtures/speech)")
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "bench-prune"))
    ap.add_argument("--json", default=None, help="rows (resumable; default WORKDIR/prune.json)")
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "prune.png"))
    ap.add_argument("--redo-errors", action="store_true", help="rerun rows that failed before")
    ap.add_argument("--train-threads", type=int, default=1, help="torch threads (latency is always 1 ORT thread)")
    ap.add_argument("--quick", action="store_true", help="smoke run: budget 0.5, seed 0, 1 epoch each")
    ap.add_argument("--verbose", action="store_true", help="keep the bisection steps in the rows")
    args = ap.parse_args(argv)
    if args.quick:
        args.budgets, args.seeds = QUICK["budgets"], QUICK["seeds"]
        args.finetune_epochs = args.dense_epochs = QUICK["finetune_epochs"]
        args.netadapt_step = QUICK["netadapt_step"]
    args.data = {"keywords": args.keywords, "speech": args.speech}
    json_path = Path(args.json or Path(args.workdir) / "prune.json")

    import torch

    torch.set_num_threads(args.train_threads)
    t0 = time.perf_counter()
    rows = load_rows(json_path)
    if args.redo_errors:
        rows = [r for r in rows if "error" not in r]
    meta = {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
            "finetune_epochs": args.finetune_epochs, "lr": args.lr, "batch_size": BATCH, "align": args.align,
            "netadapt_step": args.netadapt_step}
    combos = []
    for (task, arch), todo in plan(args).items():
        c = Combo(task, arch, args)
        wanted = [row_key({"task": task, "arch": arch, "budget": b, "method": m, "seed": s,
                           "finetune_epochs": args.finetune_epochs, "dense_epochs": c.dense_epochs})
                  for b, m, s in todo]
        left = set(pending(rows, wanted))
        c.load()
        combos.append(c)
        meta[f"dense {task}/{arch}"] = c.meta
        say(f"{task}/{arch}: {len(wanted) - len(left)} of {len(wanted)} rows done")
        budgets = sorted({b for b, _, _ in todo}, reverse=True)
        for (b, m, s), key in zip(todo, wanted):
            if key not in left:
                continue
            say(f"{task}/{arch} budget {b:.0%} {m} seed {s}")
            row = run_row(c, m, b, s, rows, budgets)
            say(f"  -> {({k: v for k, v in row.items() if k not in ('alloc', 'bisect')})}")
            rows.append(row)
            save_rows(json_path, rows, meta)
    print_tables([r for r in rows if any(r["task"] == c.task and r["arch"] == c.arch for c in combos)], combos, args)
    if args.plot:
        plot(rows, combos, args.plot)
    print(f"\nrows: {json_path}; plot: {args.plot}; this run {time.perf_counter() - t0:.0f} s; torch {torch.__version__}, "
          f"onnxruntime {meta['onnxruntime']}")


if __name__ == "__main__":
    main()
