"""HRF vs plain training on the speech fixture task, same budget, several seeds (issue: HRF end to end).

    python benchmarks/hrf.py [--models conformer convtransformer hafformer] [--seeds 0 1 2] [--epochs 15]

For each model and seed: the zoo model trained plainly, and the same model with an HRF scaffold (K=4,
default init) in front of every FFN, trained with the identical budget (epochs, batch, AdamW, warm-up +
cosine schedule, seed); the HRF model is then folded (deHRF + BatchNorm) and both are exported to
verified ONNX and scored with the one evaluation protocol of `edgec eval` on the held-out speakers (test
split). Prints a markdown table: UAR and WA mean ± std, deployed parameter count (identical by
construction, checked), ONNX latency (batch 1, 1 thread, median), and training seconds per epoch.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_one(arch: str, hrf: bool, seed: int, bundle, epochs: int, lr: float):
    from edgec.app.api import fold_passes
    from edgec.core.pass_manager import PassManager, get_pass
    from edgec.evaluation import evaluate_model
    from edgec.models.checkpoint import new_model
    from edgec.onnx.export import export
    from edgec.train import finetune

    model = new_model(arch, seed=seed)
    if hrf:
        model, _ = PassManager([get_pass("scaffold.hrf")(expand=4, init="default", seed=seed)])(model)
    trained, report = finetune(model, bundle, epochs=epochs, lr=lr, seed=seed, batch_size=32)
    deployed, _ = PassManager([get_pass(n)() for n in fold_passes()])(trained)
    data, _ = export(deployed)
    res = evaluate_model(data, bundle, split="test", threads=1, latency_batch=1)
    return {"uar": res["metrics"]["uar"], "wa": res["metrics"]["accuracy"], "params": deployed.param_count(),
            "latency_ms": res["latency"]["median_ms"], "s_per_epoch": report["seconds"] / epochs,
            "best_epoch": report["best_epoch"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["conformer", "convtransformer", "hafformer"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--data", default=str(ROOT / "fixtures" / "speech"))
    args = ap.parse_args()
    from edgec.data import load_data

    bundle = load_data(args.data)
    rows = []
    for arch in args.models:
        for hrf in (False, True):
            runs = []
            for seed in args.seeds:
                runs.append(run_one(arch, hrf, seed, bundle, args.epochs, args.lr))
                r = runs[-1]
                print(f"# {arch} {'HRF' if hrf else 'plain'} seed {seed}: UAR {r['uar']:.3f} WA {r['wa']:.3f} "
                      f"best epoch {r['best_epoch']} {r['s_per_epoch']:.2f} s/epoch", flush=True)
            rows.append((arch, hrf, runs))
    print(f"\nspeech fixture, test split (held-out speakers), {len(args.seeds)} seeds, {args.epochs} epochs, "
          f"lr {args.lr}, batch 32\n")
    print("| model | training | UAR (mean ± std) | WA (mean ± std) | deployed params | ONNX latency ms | "
          "train s/epoch | train time vs plain |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    plain_time = {}
    for arch, hrf, runs in rows:
        uar, wa = mean_std([r["uar"] for r in runs]), mean_std([r["wa"] for r in runs])
        params = {r["params"] for r in runs}
        spe = statistics.median(r["s_per_epoch"] for r in runs)
        lat = statistics.median(r["latency_ms"] for r in runs)
        if not hrf:
            plain_time[arch] = (spe, params)
        else:
            assert params == plain_time[arch][1], f"{arch}: deployed parameter count differs with HRF"
        ratio = spe / plain_time[arch][0]
        print(f"| {arch} | {'HRF K=4 → folded' if hrf else 'plain'} | {uar[0]:.3f} ± {uar[1]:.3f} | "
              f"{wa[0]:.3f} ± {wa[1]:.3f} | {', '.join(f'{p:,}' for p in sorted(params))} | {lat:.3f} | "
              f"{spe:.2f} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
