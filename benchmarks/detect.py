"""LW-DETR on the synthetic shapes fixture: fp32 vs ternary vs pruned, COCO mAP against measured latency.

    python benchmarks/detect.py [--out out/detect] [--epochs 4] [--train-images 800] [--image-size 64]

Needs ``make detection`` (fixtures/detection). One run, all on this machine:

* **fp32**: the zoo ``lwdetr`` (its default config, ``num_classes`` 5 and ``image_size`` from the options) trained
  from scratch for ``--epochs`` on the first ``--train-images`` train images (Group DETR, Hungarian matching,
  IA-BCE loss: ``edgec.train``), keep-best on val mAP;
* **ternary**: DLT scaffold on the fp32 model (per-channel scale and shift; first layer and heads stay fp32),
  fine-tuned ``--ternary-epochs``, folded, exported with INT2 weights;
* **pruned**: ``edgec.prune.run.prune_model`` of the fp32 model to ``--prune-ratio`` of its measured latency
  (ALCS with ADMM and fine-tuning on the same images, ``--prune-epochs`` each), exported in fp32. The default
  ratio is 0.75: window attention's residual streams, the C2f projector and the deformable-attention heads are
  not prunable (see the prune skips), so on the small model 0.6 is below the reachable floor.

Reported per variant: test-split mAP@[.5:.95] and mAP50 (COCO protocol, ``edgec eval``'s), parameters,
ONNX file size, and the median onnxruntime latency at batch 1 on 1 thread, measured side by side: the
variants' sessions are timed in turn, ``--rounds`` times, and the median of the rounds' medians is reported.
Writes ``<out>/detect.md`` (the table), ``<out>/detect.json``, ``<out>/detect.png`` (mAP vs latency) and the
three ONNX files (``<out>/<variant>.onnx``). The
default budget (about 20 minutes on 2 busy cores) trains far less than the paper's detectors, so absolute mAP
is low; the table compares the variants under one budget.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def passes(model, *names_params):
    from edgec.core.pass_manager import PassManager, get_pass

    return PassManager([get_pass(n)(**p) for n, p in names_params])(model)[0]


def folded(model):
    from edgec.app.api import fold_passes

    return passes(model, *[(n, {}) for n in fold_passes()])


def subset(bundle, train: int, val: int):
    """The bundle with its first ``train`` train and ``val`` val images (test untouched)."""
    from torch.utils.data import Subset

    splits = dict(bundle.splits)
    splits["train"] = Subset(splits["train"], range(min(train, len(splits["train"]))))
    splits["val"] = Subset(splits["val"], range(min(val, len(splits["val"]))))
    return replace(bundle, splits=splits)


def say(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)


def variants(args, bundle, t0: float) -> list[dict]:
    """[{name, model, onnx, notes}] in the table's order; a variant that fails is kept with its error."""
    from edgec.core.options import PruneOptions
    from edgec.models.checkpoint import new_model
    from edgec.onnx.export import export
    from edgec.prune.run import prune_model
    from edgec.train import finetune

    out = []
    cfg = {"num_classes": bundle.num_classes, "image_size": args.image_size}
    say(f"fp32: training lwdetr {cfg} for {args.epochs} epochs", t0)
    fp, _ = finetune(new_model("lwdetr", cfg, seed=0), bundle, epochs=args.epochs, lr=args.lr, seed=0,
                     batch_size=args.batch_size)
    fp32, _ = export(fp, weights="fp32")
    out.append({"name": "fp32", "model": fp, "onnx": fp32, "notes": f"{args.epochs} epochs from scratch"})

    say(f"ternary: DLT scaffold, fine-tuning {args.ternary_epochs} epochs, fold, INT2 export", t0)
    try:
        student = passes(fp, ("scaffold.dlt", {"group_size": 0, "shift_init": "mean"}))
        student, _ = finetune(student, bundle, epochs=args.ternary_epochs, lr=args.lr / 2, seed=0,
                              batch_size=args.batch_size)
        tern = folded(student)
        data, record = export(tern, weights="int2")
        kept = ", ".join(x["layer"] for x in record["lowbit"]["fp32_layers"])
        out.append({"name": "ternary (DLT, INT2)", "model": tern, "onnx": data,
                    "notes": f"+{args.ternary_epochs} epochs; fp32 layers: {kept}"})
    except Exception as exc:  # noqa: BLE001 - reported in the table, the other variants still run
        out.append({"name": "ternary (DLT, INT2)", "error": f"{type(exc).__name__}: {exc}"})

    say(f"pruned: ALCS to {args.prune_ratio:.0%} of the dense latency", t0)
    try:
        opts = PruneOptions(latency_ratio=args.prune_ratio, data=bundle, admm_epochs=args.prune_epochs,
                            finetune_epochs=args.prune_epochs, lr=args.lr / 2, batch_size=args.batch_size, seed=0)
        pruned, res = prune_model(fp, opts, input_label="fp32")
        data, _ = export(pruned, weights="fp32")
        r = res.to_dict()
        out.append({"name": f"pruned ({args.prune_ratio:.0%} latency)", "model": pruned, "onnx": data,
                    "notes": f"ADMM {args.prune_epochs} + fine-tune {args.prune_epochs} epochs; prune measured "
                             f"{r.get('measured_ms', float('nan')):.3f} ms vs dense {r.get('dense_ms', float('nan')):.3f}"})
    except Exception as exc:  # noqa: BLE001 - reported in the table
        out.append({"name": f"pruned ({args.prune_ratio:.0%} latency)", "error": f"{type(exc).__name__}: {exc}"})
    return out


def measure_side_by_side(rows: list[dict], spec, rounds: int) -> None:
    """``latency_ms`` per row: the median over ``rounds`` of each session's median, sessions timed in turn."""
    from edgec.onnx.session import create_session, measure_session, sample_inputs

    feed = sample_inputs(spec, batch=1)
    live = [r for r in rows if "onnx" in r]
    sessions = [create_session(r["onnx"], 1) for r in live]
    runs = [[] for _ in live]
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            runs[i].append(measure_session(s, feed, threads=1, warmup=5, repeats=30, min_seconds=0.2)["median_ms"])
    for r, ms in zip(live, runs):
        r["latency_ms"] = statistics.median(ms)
        r["latency_rounds_ms"] = [round(x, 4) for x in ms]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        if "latency_ms" not in r:
            continue
        ax.scatter(r["latency_ms"], r["map"], s=40)
        ax.annotate(f"{r['name']}\n{r['file_bytes'] / 1024:.0f} KiB", (r["latency_ms"], r["map"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("onnxruntime latency, batch 1, 1 thread (ms, median)")
    ax.set_ylabel("test mAP@[.5:.95]")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    top = max((r["map"] for r in rows if "latency_ms" in r), default=0.0)
    ax.set_xlim(left=0, right=max((r["latency_ms"] for r in rows if "latency_ms" in r), default=1) * 1.4)
    ax.set_ylim(bottom=0, top=max(top * 1.3, 1e-3))
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "fixtures" / "detection"))
    ap.add_argument("--out", default=str(ROOT / "out" / "detect"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--train-images", type=int, default=800)
    ap.add_argument("--val-images", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--ternary-epochs", type=int, default=2)
    ap.add_argument("--prune-epochs", type=int, default=1)
    ap.add_argument("--prune-ratio", type=float, default=0.75)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training")
    args = ap.parse_args(argv)
    if not (Path(args.data) / "train.json").is_file():
        print(f"detect: error: {args.data} has no train.json; run `make detection` first", file=sys.stderr)
        return 2
    import torch

    from edgec.core.fileio import atomic_write
    from edgec.data import load_data
    from edgec.evaluation import evaluate_model

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bundle = subset(load_data(args.data, image_size=args.image_size), args.train_images, args.val_images)
    say(bundle.describe().splitlines()[0], t0)
    rows = variants(args, bundle, t0)
    for r in rows:
        if "onnx" not in r:
            continue
        say(f"scoring {r['name']} on the test split", t0)
        m = evaluate_model(r["onnx"], bundle, split="test", latency=False)["metrics"]
        r |= {"map": m["map"], "map50": m["map50"], "map75": m["map75"], "params": r["model"].param_count(),
              "file_bytes": len(r["onnx"])}
    say(f"timing {sum('onnx' in r for r in rows)} ONNX files side by side ({args.rounds} rounds)", t0)
    measure_side_by_side(rows, rows[0]["model"].spec, args.rounds)
    seconds = time.perf_counter() - t0

    budget = (f"lwdetr default config at {args.image_size} px, {len(bundle.split('train'))} train / "
              f"{len(bundle.split('val'))} val images, batch {args.batch_size}, lr {args.lr}, fp32 {args.epochs} "
              f"epochs, ternary +{args.ternary_epochs}, pruned ADMM {args.prune_epochs} + {args.prune_epochs}; "
              f"{torch.get_num_threads()} torch threads; whole run {seconds / 60:.1f} min")
    lines = [f"Budget: {budget}.", "", "| variant | test mAP | mAP50 | params | ONNX size | latency ms (b1, 1 thread) | notes |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "onnx" not in r:
            lines.append(f"| {r['name']} | - | - | - | - | - | failed: {r['error'][:200]} |")
            continue
        lines.append(f"| {r['name']} | {r['map']:.4f} | {r['map50']:.4f} | {r['params']:,} | "
                     f"{r['file_bytes'] / 1024:.0f} KiB | {r['latency_ms']:.3f} | {r['notes']} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "detect.md", (table + "\n").encode())
    keep = ("name", "map", "map50", "map75", "params", "file_bytes", "latency_ms", "latency_rounds_ms", "notes", "error")
    doc = {"budget": budget, "rows": [{k: r[k] for k in keep if k in r} for r in rows]}
    atomic_write(out / "detect.json", (json.dumps(doc, indent=1) + "\n").encode())
    for r in rows:
        if "onnx" in r:
            atomic_write(out / f"{r['name'].split()[0]}.onnx", r["onnx"])
    plot(rows, out / "detect.png", f"LW-DETR on synthetic shapes ({args.image_size} px, {args.epochs} epochs)")
    print(f"\nwrote {out / 'detect.md'}, {out / 'detect.json'}, {out / 'detect.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
