"""ParaLBench-style table (Liu et al. 2024, arXiv 2411.09349): every speech model of the zoo x every edgec
compression, on a categorical and a dimensional paralinguistic task, under one protocol (issue 14, item 5).

    python benchmarks/paralbench.py [--models convtransformer conformer hafformer speechformer]
                                    [--tasks speech arousal] [--variants fp32 hrf ternary pruned]
                                    [--seeds 0 1 2] [--epochs E] [--ft-epochs F] [--admm-epochs A]
                                    [--export-seeds 0] [--workdir .cache/bench-paralbench] [--json PATH]
                                    [--quick] [--report]

ParaLBench's point is the protocol: the same splits, the same head, the same training recipe and the same
metrics for every model, so the numbers compare. Here:

* **Tasks** (one fixture, two targets, the same clips, splits and held-out speakers): ``speech``
  (fixtures/speech/labels.csv: 4 prosody classes; UAR = unweighted average recall, WA = accuracy) and
  ``arousal`` (fixtures/speech/arousal.csv, its dimensional variant: a continuous arousal value per clip; CCC =
  Lin's concordance correlation coefficient, MAE). 40 log-mel x 200 frames, train 8 speakers, val 2, test 3.
* **Head**: every model's own utterance head (mean over time -> Linear) with ``num_classes`` outputs (4), or
  one output for arousal (``num_classes=1``: the zoo's regression spec; MSE loss, keep-best by val CCC).
* **Recipe**: ``edgec.train.finetune`` (AdamW, warm-up + cosine, batch 32, clipping 1, keep-best on val).
* **Variants**, per (task, model, seed s):
  - ``fp32``: the zoo model (default size, seed s) trained from scratch for E epochs, lr ``LR``.
  - ``hrf``: the same initialisation with an HRF scaffold (K=4, default init) in front of every FFN, trained
    with the identical recipe, then folded (deHRF + BatchNorm): the deployed graph has fp32's shapes.
  - ``ternary``: DLT scaffold (per-channel scale and shift; first layer and head fp32) on the trained fp32
    model, fine-tuned F epochs (lr ``FT_LR``), folded, exported with INT2 weights.
  - ``pruned``: ``edgec prune`` on the trained fp32 model to 0.6 x its measured latency
    (``prune_model(PruneOptions(latency_ratio=0.6, data=..., admm_epochs=A, finetune_epochs=F, lr=FT_LR,
    seed=s, search=False, max_retries=1))``: latency table, Taylor importance, A ADMM rounds, physical shrink,
    F fine-tune epochs, exported and measured against the dense model; one tighter retry when over budget).
    Where 0.6 is below what the latency table can reach (exit 4: e.g. a model whose only prunable groups are
    its FFNs) or was missed when measured (exit 5), the next budget of ``BUDGETS`` is used and the table's
    variant label says so.
  Every variant is scored on the test split (held-out speakers) by ``edgec.evaluation.evaluate_model``. For the
  ``--export-seeds`` (default: seed 0) it is exported with the verified exporter (ONNX vs torch at two shapes)
  and scored from its ONNX file, i.e. what would be deployed; the other seeds are scored from the folded graph
  in torch (the same structure's export was verified on the export seed) -- the dynamo export is the
  benchmark's largest fixed cost on 2 cores.
* **Size and speed**: parameters of the deployed graph (every seed), ONNX file size and onnxruntime latency
  (1 thread, batch 1, 200 frames; export seeds): the median of repeated runs, with every ONNX file of the run
  measured *side by side* at the end (``measure_interleaved``: one run of each in turn, round after round), so
  load on the machine falls on all rows alike; the ratio to the fp32 model of the same task and seed is
  reported too. For every seed's pruned model the JSON also keeps prune's own measurement (``prune``:
  dense_ms, measured_ms).

Reported per (model, variant): metric mean +- sample std over seeds (UAR, WA on speech; CCC, MAE on arousal),
params, ONNX size and latency (means over seeds; the categorical task's models, the arousal models in brackets
where they differ by more than 2 %: only the pruned ones do). Markdown to stdout, every row to ``--json``
(rewritten after each finished cell; a rerun with the same settings skips the cells already there and reuses
the checkpoints and ONNX files under ``--workdir``, so an interrupted run loses at most one cell).

The loop runs seeds outermost, so an interrupted run has every model and variant for its first seeds;
``--report`` prints the table of the rows so far (timing the ONNX files side by side first if the run did
not get to it). Seeds may run in separate processes (``--seeds 1 2 --json other.json``: nothing exported
there), and ``--report --json main.json --merge other.json`` puts them in one table.

Cost: 4 variants x 2 tasks x models x seeds trainings (96 for 4 models and 3 seeds). The defaults
(``DEFAULTS``: 3 epochs from scratch, 1 fine-tune epoch, 1 ADMM round; the fixture's train split is 10 steps
of 32 clips per epoch) are sized for about 35 min on 2 idle cores; measured under load on 2 cores: one epoch
takes 5-13 s per model, one verified export 13-65 s (speechformer the slowest), a prune 1-2 min. The output
states the epochs, the number of trainings, the wall time and the load average. ``--quick``: 1 model (hafformer), 1 seed,
1 epoch of everything, no ADMM, both tasks (a smoke run of the whole pipeline, ~4 min on a loaded machine;
no test runs it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")

MODELS = ("convtransformer", "conformer", "hafformer", "speechformer")
TASKS = {"speech": ("fixtures/speech", ("uar", "accuracy")), "arousal": ("fixtures/speech/arousal.csv", ("ccc", "mae"))}
METRIC_LABELS = {"uar": "UAR", "accuracy": "WA", "ccc": "CCC", "mae": "MAE"}
VARIANTS = ("fp32", "hrf", "ternary", "pruned")
VARIANT_LABELS = {"fp32": "fp32", "hrf": "HRF -> folded", "ternary": "ternary DLT (INT2)", "pruned": "pruned 0.6x latency"}
LR = 2e-3  # from-scratch training (fp32, hrf), as benchmarks/hrf.py
FT_LR = 1e-3  # fine-tuning from the trained fp32 model (ternary, pruned)
BATCH = 32
BUDGETS = (0.6, 0.75, 0.9)  # pruning: 0.6 x the dense model's measured latency; the next one where 0.6 is unreachable
N_MELS, FRAMES = 40, 200
DEFAULTS = {"epochs": 3, "ft_epochs": 1, "admm_epochs": 1, "export_seeds": [0]}
QUICK = {"epochs": 1, "ft_epochs": 1, "admm_epochs": 0, "seeds": [0], "models": ["hafformer"], "export_seeds": [0]}
MEASURE = {"warmup": 5, "repeats": 50, "min_seconds": 0.3}  # per ONNX file, in the interleaved session


# ------------------------------------------------------------------------------------------- pure helpers

def mean_std(values):
    """(mean, sample std) of the values; std 0 for one value; (None, None) for none."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def cell_key(row: dict) -> tuple:
    return (row["task"], row["arch"], row["variant"], int(row["seed"]), int(row["epochs"]),
            int(row["ft_epochs"]), int(row["admm_epochs"]))


def aggregate(rows: list[dict]) -> list[dict]:
    """One dict per (task, arch, variant): n (rows without error), each metric's mean/std over seeds, params,
    size, latency and latency ratio means, errors."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["arch"], r["variant"]), []).append(r)
    out = []
    for (task, arch, variant), rs in cells.items():
        ok = [r for r in rs if "error" not in r]
        agg = {"task": task, "arch": arch, "variant": variant, "n": len(ok), "failed": len(rs) - len(ok),
               "errors": sorted({r["error"] for r in rs if "error" in r})}
        for name in TASKS[task][1]:
            agg[f"{name}_mean"], agg[f"{name}_std"] = mean_std([r["metrics"][name] for r in ok])
        for name in ("params", "onnx_bytes", "latency_ms", "latency_ratio"):
            agg[name] = mean_std([r.get(name) for r in ok])[0]
        agg["budgets"] = sorted({r["budget"] for r in ok if r.get("budget") is not None})
        agg["budget_counts"] = {b: sum(r.get("budget") == b for r in ok) for b in agg["budgets"]}
        # pruning's own measurement (dense and pruned side by side, in prune) for every seed
        agg["prune_ratio"] = mean_std([r["prune"]["measured_ms"] / r["prune"]["dense_ms"] for r in ok
                                       if r.get("prune", {}).get("dense_ms")])[0]
        out.append(agg)
    return sorted(out, key=lambda a: (list(TASKS).index(a["task"]), _order(MODELS, a["arch"]),
                                      _order(VARIANTS, a["variant"])))


def _order(seq, item) -> int:
    return seq.index(item) if item in seq else len(seq)


def fmt_metric(mean, std) -> str:
    return "–" if mean is None else f"{mean:.3f} ± {std:.3f}"


def _both(a, b, fmt) -> str:
    """``a``, or ``a (b)`` when ``b`` differs from ``a`` by more than 2 %."""
    if a is None:
        return "–" if b is None else f"– ({fmt(b)})"
    if b is None or abs(a - b) <= 0.02 * abs(a):
        return fmt(a)
    return f"{fmt(a)} ({fmt(b)})"


def table(rows: list[dict]) -> str:
    """The ParaLBench-style markdown table: one line per (model, variant), the two tasks' metrics side by side."""
    agg = {(a["task"], a["arch"], a["variant"]): a for a in aggregate(rows)}
    archs = sorted({k[1] for k in agg}, key=lambda a: _order(MODELS, a))
    variants = sorted({k[2] for k in agg}, key=lambda v: _order(VARIANTS, v))
    tasks = [t for t in TASKS if any(k[0] == t for k in agg)]
    head = ["model", "variant", "params", "ONNX KiB", "latency ms", "× fp32"]
    for t in tasks:
        head += [f"{t} {METRIC_LABELS[m]}" for m in TASKS[t][1]]
    head.append("seeds")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for arch in archs:
        for v in variants:
            cells = [agg.get((t, arch, v)) for t in tasks]
            if not any(cells):
                continue
            first, second = (cells + [None])[:2]

            def pick(name, first=first, second=second):
                return (first or {}).get(name), (second or {}).get(name)

            counts: dict = {}
            for c in cells:
                for b, k in (c or {}).get("budget_counts", {}).items():
                    counts[b] = counts.get(b, 0) + k
            label = VARIANT_LABELS.get(v, v)
            looser = {b: k for b, k in counts.items() if b != BUDGETS[0]}
            if looser:
                label += " (" + ", ".join(f"{b:g}x in {k} of {sum(counts.values())} runs" for b, k in sorted(looser.items())) \
                    + f": {BUDGETS[0]:g}x unreachable or missed)"
            line = [arch, label,
                    _both(*pick("params"), lambda x: f"{x / 1e3:.1f} k"),
                    _both(*pick("onnx_bytes"), lambda x: f"{x / 1024:.0f}"),
                    _both(*pick("latency_ms"), lambda x: f"{x:.3f}"),
                    _both(*pick("latency_ratio"), lambda x: f"{x:.2f}")]
            for t, c in zip(tasks, cells):
                for m in TASKS[t][1]:
                    line.append(fmt_metric(c.get(f"{m}_mean"), c.get(f"{m}_std")) if c else "–")
            errs = sorted({e for c in cells if c for e in c["errors"]})
            nfail = sum(c["failed"] for c in cells if c)
            line.append("/".join(str(c["n"]) if c else "0" for c in cells)
                        + (f" ({nfail} failed: {errs[0][:60]})" if errs else ""))
            lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def load_rows(path) -> list[dict]:
    p = Path(path)
    return list(json.loads(p.read_text())["rows"]) if p.exists() else []


def save_rows(path, rows: list[dict], meta: dict) -> None:
    """Rewrite the JSON atomically, rows sorted by key."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": sorted(rows, key=cell_key)}, indent=1, default=float))
    os.replace(tmp, p)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------- the pipeline

def passes(model, *names_params):
    from edgec.core.pass_manager import PassManager, get_pass

    return PassManager([get_pass(n)(**p) for n, p in names_params])(model)[0]


def folded(model):
    from edgec.app.api import fold_passes

    return passes(model, *[(n, {}) for n in fold_passes()])


class Cell:
    """One (task, arch, seed): trains the fp32 model once (cached in the workdir) and builds each variant."""

    def __init__(self, task, arch, seed, bundle, args):
        self.task, self.arch, self.seed, self.bundle, self.args = task, arch, seed, bundle, args
        self.dir = Path(args.workdir) / f"e{args.epochs}-f{args.ft_epochs}-a{args.admm_epochs}" / f"{task}-{arch}-s{seed}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fp32 = None

    def config(self) -> dict:
        return {"num_classes": 1 if self.bundle.task == "regression" else self.bundle.num_classes, "n_mels": N_MELS}

    def fp32(self):
        """The trained fp32 model (checkpoint in the workdir, reused by the ternary and pruned variants)."""
        from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
        from edgec.train import finetune

        if self._fp32 is None:
            path = self.dir / "fp32.pt"
            if path.exists():
                self._fp32 = load_checkpoint(path)
            else:
                model = new_model(self.arch, self.config(), seed=self.seed)
                self._fp32, _ = finetune(model, self.bundle, epochs=self.args.epochs, lr=LR, batch_size=BATCH,
                                         seed=self.seed)
                save_checkpoint(self._fp32, path)
        return self._fp32

    def build(self, variant: str):
        """The deployable (folded) model of one variant, and notes."""
        from edgec.core.errors import EdgecError
        from edgec.core.options import PruneOptions
        from edgec.models.checkpoint import new_model
        from edgec.prune.alcs import EXIT_BUDGET_MISSED, EXIT_INFEASIBLE
        from edgec.prune.run import prune_model
        from edgec.train import finetune

        a = self.args
        if variant == "fp32":
            return folded(self.fp32()), {}
        if variant == "hrf":
            model = passes(new_model(self.arch, self.config(), seed=self.seed),
                           ("scaffold.hrf", {"expand": 4, "init": "default", "seed": self.seed}))
            trained, _ = finetune(model, self.bundle, epochs=a.epochs, lr=LR, batch_size=BATCH, seed=self.seed)
            return folded(trained), {}
        if variant == "ternary":
            student = passes(self.fp32(), ("scaffold.dlt", {"group_size": 0, "shift_init": "mean"}))
            trained, _ = finetune(student, self.bundle, epochs=a.ft_epochs, lr=FT_LR, batch_size=BATCH,
                                  seed=self.seed)
            return folded(trained), {}
        if variant == "pruned":
            unreachable = []
            for budget in BUDGETS:
                opts = PruneOptions(latency_ratio=budget, data=self.bundle, admm_epochs=a.admm_epochs,
                                    finetune_epochs=a.ft_epochs, lr=FT_LR, seed=self.seed, batch_size=BATCH,
                                    n_mels=N_MELS, frames=FRAMES, search=False, max_retries=1)
                try:
                    pruned, result = prune_model(self.fp32(), opts, progress=lambda m: say(f"    prune: {m}"))
                except EdgecError as exc:
                    if exc.exit_code not in (EXIT_INFEASIBLE, EXIT_BUDGET_MISSED) or budget == BUDGETS[-1]:
                        raise
                    unreachable.append(budget)
                    say(f"    prune: {budget} x dense is unreachable or missed for {self.arch} (exit "
                        f"{exc.exit_code}); trying the next budget")
                    continue
                r = result.to_dict()
                keep = ("dense_ms", "measured_ms", "budget_ms", "speedup", "retries", "params", "before")
                return folded(pruned), {"budget": budget, "unreachable_budgets": unreachable,
                                        "prune": {k: r[k] for k in keep if k in r}}
        raise ValueError(f"unknown variant {variant}")

    def run(self, variant: str) -> dict:
        """Build, (for an export seed) export with verification and score the ONNX file, else score the folded
        graph in torch (the export of the same structure was verified against torch on the export seed)."""
        from edgec.evaluation import evaluate_model
        from edgec.onnx.export import export

        t0 = time.perf_counter()
        model, notes = self.build(variant)
        out = {}
        target = model
        if self.seed in self.args.export_seeds:
            data, record = export(model, weights="int2" if variant == "ternary" else "auto")
            onnx_path = self.dir / f"{variant}.onnx"
            tmp = onnx_path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, onnx_path)
            out = {"onnx_bytes": len(data), "onnx": str(onnx_path)}
            target = data
        res = evaluate_model(target, self.bundle, split="test", latency=False)
        names = TASKS[self.task][1]
        return {"metrics": {m: float(res["metrics"][m]) for m in names}, "params": model.param_count(),
                "scored": "onnx" if out else "torch", **out, "seconds": time.perf_counter() - t0, **notes}


def measure_all(rows: list[dict], say_=say) -> None:
    """Every row's ONNX file timed side by side in one interleaved session (1 thread, batch 1); sets
    ``latency_ms`` and ``latency_ratio`` (to the fp32 row of the same task, arch and seed)."""
    from edgec.onnx.session import measure_interleaved

    ok = [r for r in rows if "error" not in r and r.get("onnx") and Path(r["onnx"]).exists()]
    if not ok:
        return
    feed = {"features": _features()}
    say_(f"timing {len(ok)} ONNX files side by side (1 thread, batch 1, {FRAMES} frames)")
    stats = measure_interleaved([Path(r["onnx"]).read_bytes() for r in ok], feed, threads=1, **MEASURE)
    for r, s in zip(ok, stats):
        r["latency_ms"], r["latency_p10_ms"], r["latency_p90_ms"] = s["median_ms"], s["p10_ms"], s["p90_ms"]
        r["latency_repeats"] = s["repeats"]
    base = {(r["task"], r["arch"], r["seed"]): r["latency_ms"] for r in ok if r["variant"] == "fp32"}
    for r in ok:
        b = base.get((r["task"], r["arch"], r["seed"]))
        r["latency_ratio"] = r["latency_ms"] / b if b else None


def _features():
    import numpy as np

    return np.random.default_rng(0).standard_normal((1, FRAMES, N_MELS)).astype(np.float32)


# ------------------------------------------------------------------------------------------- main

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help=f"default: the zoo's speech models ({', '.join(MODELS)})")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2")
    ap.add_argument("--epochs", type=int, default=None, help=f"from-scratch epochs (default {DEFAULTS['epochs']})")
    ap.add_argument("--ft-epochs", type=int, default=None,
                    help=f"fine-tune epochs of ternary and pruned (default {DEFAULTS['ft_epochs']})")
    ap.add_argument("--admm-epochs", type=int, default=None, help=f"ADMM rounds (default {DEFAULTS['admm_epochs']})")
    ap.add_argument("--export-seeds", nargs="+", type=int, default=None,
                    help="seeds whose models are exported (verified), timed and scored from ONNX; the others are "
                         "scored in torch (default 0)")
    ap.add_argument("--speech", default=str(ROOT / TASKS["speech"][0]))
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "bench-paralbench"))
    ap.add_argument("--json", default=None, help="default: <workdir>/paralbench.json")
    ap.add_argument("--quick", action="store_true", help="1 model, 1 seed, 1 epoch of everything (smoke run)")
    ap.add_argument("--redo-errors", action="store_true", help="run again the cells whose row is an error")
    ap.add_argument("--report", action="store_true",
                    help="only print the table of the rows already in --json (no training; times the ONNX files "
                         "side by side if the run did not)")
    ap.add_argument("--remeasure", action="store_true", help="with --report: time the ONNX files again (side by side)")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="with --report: add the rows of these JSON files (more seeds, same settings)")
    args = ap.parse_args(argv)
    base = dict(DEFAULTS, seeds=[0, 1, 2], models=None) | (QUICK if args.quick else {})
    for name in ("epochs", "ft_epochs", "admm_epochs", "seeds", "models", "export_seeds"):
        if getattr(args, name) is None:
            setattr(args, name, base[name])
    if args.json is None:
        args.json = str(Path(args.workdir) / ("paralbench-quick.json" if args.quick else "paralbench.json"))
    return args


def report(args) -> None:
    """The table and budget line of a finished (or interrupted) run, from its JSON, plus the rows of ``--merge``
    files (other seeds of the same settings run in another process)."""
    doc = json.loads(Path(args.json).read_text())
    meta, rows = doc["meta"], doc["rows"]
    s = meta["settings"]
    keep = [r for r in rows if all(r[k] == v for k, v in s.items())]
    if args.remeasure or any(r.get("onnx") and r.get("latency_ms") is None for r in keep if "error" not in r):
        measure_all(keep)  # an interrupted run: time the ONNX files it wrote, side by side, now
        meta["load_average_end"] = load_average()
        save_rows(args.json, [r for r in rows if r not in keep] + keep, meta)
    seen = {cell_key(r) for r in keep}
    for other in args.merge or []:
        more = [r for r in load_rows(other) if all(r[k] == v for k, v in s.items()) and cell_key(r) not in seen]
        seen |= {cell_key(r) for r in more}
        keep += more
    print(table(keep))
    seeds = sorted({r["seed"] for r in keep})
    print(f"\nBudget: {len(keep)} trainings (seeds {seeds}, {sum('error' in r for r in keep)} failed); {s['epochs']} "
          f"epochs from scratch (fp32, HRF), {s['ft_epochs']} fine-tune epochs (ternary, pruned), "
          f"{s['admm_epochs']} ADMM round(s). Latency: every ONNX file side by side in one session, load average "
          f"{meta.get('load_average_end')} when timed.")


def main(argv=None) -> None:
    args = parse(argv)
    if args.report:
        report(args)
        return
    import torch

    from edgec import models
    from edgec.data import load_data

    torch.set_num_threads(1)
    archs = args.models or [m for m in MODELS if m in models.ZOO]
    missing = [m for m in MODELS if m not in models.ZOO]
    speech = Path(args.speech)
    if not (speech / "labels.csv").exists() or not (speech / "arousal.csv").exists():
        raise SystemExit(f"no speech fixture at {speech} (run `make speech`, or `python fixtures/make_speech.py "
                         f"--csv-only` for arousal.csv)")
    bundles = {"speech": load_data(str(speech), n_mels=N_MELS, frames=FRAMES),
               "arousal": load_data(str(speech / "arousal.csv"), n_mels=N_MELS, frames=FRAMES)}
    rows = load_rows(args.json)
    done = {cell_key(r) for r in rows if not (args.redo_errors and "error" in r)}
    settings = {"epochs": args.epochs, "ft_epochs": args.ft_epochs, "admm_epochs": args.admm_epochs}
    n_train = len(args.tasks) * len(archs) * len(args.seeds) * len(args.variants)
    meta = {"settings": settings, "seeds": args.seeds, "models": archs, "tasks": args.tasks,
            "variants": args.variants, "missing_models": missing, "trainings": n_train, "lr": LR, "ft_lr": FT_LR,
            "batch": BATCH, "prune_budgets": BUDGETS, "export_seeds": args.export_seeds, "features": f"log-mel {N_MELS} x {FRAMES}",
            "measure": MEASURE, "machine": {"cpus": os.cpu_count(), "platform": platform.machine(),
                                            "torch_threads": 1}, "load_average_start": load_average()}
    say(f"paralbench: {', '.join(archs)} x {', '.join(args.variants)} x {', '.join(args.tasks)} x seeds {args.seeds}: "
        f"{n_train} trainings; {settings}; load average {meta['load_average_start']}")
    t_start = time.perf_counter()
    for seed in args.seeds:  # seeds outermost: an interrupted run still has every model and variant
        for task in args.tasks:
            for arch in archs:
                cell = Cell(task, arch, seed, bundles[task], args)
                for variant in args.variants:
                    key = {"task": task, "arch": arch, "variant": variant, "seed": seed, **settings}
                    if cell_key(key) in done:
                        continue
                    say(f"{task}/{arch}/seed {seed}: {variant} ({time.perf_counter() - t_start:.0f} s)")
                    try:
                        row = dict(key, **cell.run(variant))
                        say(f"  {row['metrics']} params {row['params']:,} ({row['seconds']:.0f} s)")
                    except Exception as exc:  # a failing model/variant is a row of the table, not the end of the run
                        row = dict(key, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
                        say(f"  failed: {row['error']}")
                    rows = [r for r in rows if cell_key(r) != cell_key(row)] + [row]
                    save_rows(args.json, rows, meta)
    # every row of these settings in the JSON (also those of earlier invocations, e.g. --redo-errors of one
    # cell), so that all latencies come from one side-by-side session
    wanted = [r for r in rows if all(r[k] == v for k, v in settings.items())]
    measure_all(wanted)
    meta.update(wall_seconds=round(time.perf_counter() - t_start, 1), load_average_end=load_average())
    save_rows(args.json, rows, meta)
    print(f"\nParaLBench-style table: {', '.join(archs)}; seeds {args.seeds}; test split (held-out speakers). "
          f"Metric = mean ± sample std over seeds; params / ONNX size / latency = means over seeds of the speech "
          f"(categorical) models, the arousal models' in brackets where they differ by more than 2 %.\n")
    print(table(wanted))
    print(f"\nBudget: {n_train} trainings ({args.epochs} epochs from scratch for fp32 and HRF, {args.ft_epochs} "
          f"fine-tune epochs for ternary and pruned, {args.admm_epochs} ADMM round(s)), batch {BATCH}; wall time "
          f"{meta['wall_seconds'] / 60:.1f} min on {os.cpu_count()} cores, load average "
          f"{meta['load_average_start']} at the start and {meta['load_average_end']} at the end. Latency: median of "
          f">= {MEASURE['repeats']} onnxruntime runs (1 thread, batch 1, {FRAMES} frames), every file side by side in "
          f"one interleaved session; × fp32 = ratio to the same task's and seed's fp32 model.")
    if missing:
        print(f"Not in this edgec's zoo (left out): {', '.join(missing)}.")
    print(f"Rows: {args.json}")


if __name__ == "__main__":
    main()
