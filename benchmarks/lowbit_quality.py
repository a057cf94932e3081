"""Quality of ternary training vs post-training ternary rounding, mean ± std over seeds (issue: low-bit).

    python benchmarks/lowbit_quality.py [--seeds 0 1 2] [--epochs 15] [--tasks digits speech]

* digits (scikit-learn's bundled 8×8 digits) with the zoo ResNet: fp32 trained from scratch; STTN with
  ternary weights AND activations, fine-tuned from the fp32 model by pure logits distillation from it
  (STTN's reference recipe); post-training ternary rounding of the fp32 model (TWN threshold, per-channel
  scale, no training).
* speech fixture (espeak-ng, held-out speakers) with the zoo Conformer: fp32; DLT ternary weights
  (group 64) fine-tuned with the task loss; the same with OFF feature distillation from the fp32 model
  (λ = 1, every block output); post-training TWN rounding.

All ternary variants keep the first layer and the classifier in full precision (the methods' reference
setting). Every number is the one `edgec eval` reports on the test split of the folded model.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fold(model):
    from edgec.app.api import fold_passes
    from edgec.core.pass_manager import PassManager, get_pass

    return PassManager([get_pass(n)() for n in fold_passes()])(model)[0]


def scaffold(model, name, **params):
    from edgec.core.pass_manager import PassManager, get_pass

    return PassManager([get_pass(name)(**params)])(model)[0]


def score(model, bundle, key):
    from edgec.evaluation import evaluate_model

    return evaluate_model(model, bundle, split="test", latency=False)["metrics"][key]


def digits_variants(seed, bundle, epochs):
    from edgec.models.checkpoint import new_model
    from edgec.train import finetune

    fp, _ = finetune(new_model("resnet", seed=seed), bundle, epochs=epochs, lr=3e-3, seed=seed)
    sttn = scaffold(fp, "scaffold.sttn", activations="ternary", seed=seed)
    sttn, _ = finetune(sttn, bundle, epochs=epochs, lr=1e-3, seed=seed, teacher=fp, distill="logits", kd_weight=1.0)
    ptq = fold(scaffold(fp, "scaffold.dlt", group_size=0))
    return {"fp32": score(fp, bundle, "accuracy"), "STTN W2A2 + logits KD": score(fold(sttn), bundle, "accuracy"),
            "PTQ ternary (TWN), no training": score(ptq, bundle, "accuracy")}


def speech_variants(seed, bundle, epochs):
    from edgec.models.checkpoint import new_model
    from edgec.train import finetune

    fp, _ = finetune(new_model("conformer", seed=seed), bundle, epochs=epochs, lr=2e-3, seed=seed)
    dlt = scaffold(fp, "scaffold.dlt", group_size=64)
    plain, _ = finetune(dlt, bundle, epochs=epochs, lr=1e-3, seed=seed)
    off, _ = finetune(dlt, bundle, epochs=epochs, lr=1e-3, seed=seed, teacher=fp, distill="off", off_weight=1.0)
    ptq = fold(scaffold(fp, "scaffold.dlt", group_size=64))
    return {"fp32": score(fp, bundle, "uar"), "DLT W2 (task loss)": score(fold(plain), bundle, "uar"),
            "DLT W2 + OFF": score(fold(off), bundle, "uar"),
            "PTQ ternary (TWN), no training": score(ptq, bundle, "uar")}


def table(title, metric, rows_by_seed):
    print(f"\n{title}\n")
    print(f"| variant | {metric} (mean ± std) | per seed |")
    print("|---|---|---|")
    for name in rows_by_seed[0]:
        xs = [r[name] for r in rows_by_seed]
        std = statistics.stdev(xs) if len(xs) > 1 else 0.0
        print(f"| {name} | {statistics.mean(xs):.3f} ± {std:.3f} | {', '.join(f'{x:.3f}' for x in xs)} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--tasks", nargs="+", default=["digits", "speech"])
    ap.add_argument("--speech", default=str(ROOT / "fixtures" / "speech"))
    args = ap.parse_args()
    from edgec.data import load_data

    if "digits" in args.tasks:
        path = Path(tempfile.mkdtemp()) / "digits.npz"
        subprocess.run([sys.executable, str(ROOT / "fixtures" / "make_digits.py"), "--out", str(path)], check=True,
                       stdout=subprocess.DEVNULL)
        bundle = load_data(str(path))
        rows = [digits_variants(s, bundle, args.epochs) for s in args.seeds]
        table(f"digits, ResNet (zoo default), test accuracy, {len(args.seeds)} seeds, {args.epochs} epochs each stage",
              "accuracy", rows)
    if "speech" in args.tasks:
        bundle = load_data(args.speech)
        rows = [speech_variants(s, bundle, args.epochs) for s in args.seeds]
        table(f"speech fixture, Conformer (zoo default), test UAR on held-out speakers, {len(args.seeds)} seeds, "
              f"{args.epochs} epochs each stage", "UAR", rows)


if __name__ == "__main__":
    main()
