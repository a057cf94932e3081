"""Latency-budget pruning, side by side: edgec ALCS vs uniform-ratio channel pruning vs Torch-Pruning (issue 5, item 7).

    python benchmarks/prune.py [--models conformer resnet] [--ratios 0.9 0.75 0.6 0.5] [--finetune-epochs 3]
                               [--admm-epochs 0] [--plot benchmarks/prune.png]

Benchmark-only dependencies: ``torch-pruning`` and ``matplotlib`` (``pip install torch-pruning matplotlib
torch==<installed>``; neither is a runtime dependency of edgec).

Tasks (seed 0, one seed):

* conformer (zoo default) on the speech fixture (held-out speakers, metric UAR), fp32 trained from scratch
  (``--conformer-epochs``, lr 2e-3);
* resnet (zoo default widths, ``image_size=32``) on scikit-learn's digits upsampled bilinearly to 32×32 (the 8×8
  model's 0.03 ms is dominated by the per-run overhead), fp32 trained (``--resnet-epochs``, lr 3e-3).

Protocol. The dense model is exported and its median latency measured in onnxruntime (1 thread, batch 1, the
protocol of ``edgec.prune.run.measure``). For every budget r × dense:

(a) **edgec ALCS**: ``prune_file(latency_ratio=r, data=..., admm_epochs=A, finetune_epochs=F)``. With the default
    ``A = 0`` the allocation is table-driven and the kept channels are chosen by importance, then the same F-epoch
    fine-tune as the peers: an equal training budget. ``--admm-epochs A > 0`` adds A ADMM epochs (extra training
    the peers do not get; the table then says so).
(b) **uniform**: every prunable channel group keeps the same fraction (``PruneChannels.from_fraction``, importance
    ranking); the fraction is bisected until the *measured* latency is within ``--tol`` of the ALCS model's
    measured latency (the closest point is kept when bisection stalls); then F epochs of fine-tuning.
(c) **Torch-Pruning** ``MagnitudePruner`` (L2 magnitude, global ranking, classifier ignored) on the eager zoo module
    carrying the trained weights (Torch-Pruning needs an eager module); the global ratio is bisected to the ALCS
    model's measured latency, the pruned module is traced back into an edgec Model and fine-tuned F epochs. If
    Torch-Pruning fails, the row carries the failure message.

Fine-tune for all methods: ``edgec.train.finetune`` with the same epochs, lr (``--lr``), batch size 32, seed 0 and
keep-best-on-val. Reported per row: measured median latency (final exported model), the latency model's error
(ALCS only: (estimated − measured) / measured), speedup = dense / measured, FLOP reduction = MACs before / after
(``edgec.prune.run.macs``: Linear/Conv layers), their quotient (> 1: the latency fell more than the MACs, i.e. the
removed MACs were the expensive ones), and the test metric. A PNG of metric vs measured latency is written to
``--plot``.
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")


# ------------------------------------------------------------------------------------------- data

def digits32(tmp: Path) -> Path:
    import numpy as np
    import torch
    import torch.nn.functional as F

    npz = tmp / "digits8.npz"
    subprocess.run([sys.executable, str(ROOT / "fixtures" / "make_digits.py"), "--out", str(npz)], check=True,
                   stdout=subprocess.DEVNULL)
    z = np.load(npz, allow_pickle=False)
    out = {}
    for k in z.files:
        a = z[k]
        if k.endswith("inputs"):
            t = torch.from_numpy(a.astype("float32"))
            out[k] = F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False).contiguous()
        elif k == "classes":
            out[k] = [str(c) for c in a.tolist()]
        else:
            out[k] = torch.from_numpy(a)
    path = tmp / "digits32.pt"
    torch.save(out, path)
    return path


# ------------------------------------------------------------------------------------------- helpers

class Ctx:
    """Per-model state: the trained fp32 model, its data, the measurement feed and shapes."""

    def __init__(self, arch, model, ckpt, bundle, metric, args):
        from edgec.latency.shapes import make_inputs, resolve_shapes

        self.arch, self.model, self.ckpt, self.bundle, self.metric, self.args = arch, model, ckpt, bundle, metric, args
        self.shapes = resolve_shapes(model.spec, None, 1)
        self.feed = make_inputs(model.spec, self.shapes, seed=0)


def measure_model(ctx, model, verified=False):
    from edgec.onnx.export import export, to_onnx
    from edgec.prune.run import measure

    data = export(model)[0] if verified else to_onnx(model).SerializeToString()
    return measure(data, ctx.feed, 1)["median_ms"], data


def score(ctx, model_or_bytes):
    from edgec.evaluation import evaluate_model

    return float(evaluate_model(model_or_bytes, ctx.bundle, split="test", latency=False)["metrics"][ctx.metric])


def tune(ctx, model):
    from edgec.train import finetune

    if ctx.args.finetune_epochs <= 0:
        return model
    tuned, _ = finetune(model, ctx.bundle, epochs=ctx.args.finetune_epochs, lr=ctx.args.lr, batch_size=32, seed=0)
    return tuned


def bisect(ctx, build, target_ms, lo, hi, label):
    """``build(x)`` -> pruned Model, latency decreasing in x on [lo, hi]. Returns (x, model, ms, steps)."""
    best = None
    steps = []
    for _ in range(ctx.args.max_bisect):
        x = 0.5 * (lo + hi)
        model = build(x)
        ms, _ = measure_model(ctx, model)
        steps.append((round(x, 4), round(ms, 4)))
        err = (ms - target_ms) / target_ms
        if best is None or abs(err) < abs(best[3]):
            best = (x, model, ms, err)
        if abs(err) <= ctx.args.tol:
            break
        if ms > target_ms:
            lo = x
        else:
            hi = x
    say(f"  {label}: bisection {steps} -> x={best[0]:.4f} ({best[3]:+.1%})")
    if abs(best[3]) > ctx.args.tol:
        steps.append(f"missed the {target_ms:.3g} ms target by {best[3]:+.1%}")
    return best[0], best[1], best[2], steps


def _knob(text, steps):
    return text + (f"; bisection {steps[-1]}" if steps and isinstance(steps[-1], str) else "")


def finish(ctx, method, model, ratio, extra=None):
    """Fine-tune, export (verified), measure, score; return a table row."""
    from edgec.prune.run import macs

    t = time.perf_counter()
    tuned = tune(ctx, model)
    ms, onnx_bytes = measure_model(ctx, tuned, verified=True)
    acc = score(ctx, onnx_bytes)
    m_after = macs(tuned, ctx.shapes)
    row = {"method": method, "ratio": ratio, "measured_ms": ms, "est_err": None,
           "speedup": ctx.dense_ms / ms, "flop_red": ctx.macs_dense / m_after, "metric": acc,
           "params": tuned.param_count(), "seconds": time.perf_counter() - t}
    row.update(extra or {})
    return row


def say(msg):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- methods

def run_alcs(ctx, ratio, tmp, admm_epochs, label):
    from edgec.core.errors import EdgecError
    from edgec.core.options import PruneOptions
    from edgec.models.checkpoint import load_checkpoint
    from edgec.prune.run import prune_file

    out = tmp / f"{ctx.arch}_alcs_{ratio}_{admm_epochs}.pt"
    t = time.perf_counter()
    try:
        res = prune_file(ctx.ckpt, out, PruneOptions(latency_ratio=ratio, data=ctx.bundle, admm_epochs=admm_epochs,
                                                     finetune_epochs=ctx.args.finetune_epochs, lr=ctx.args.lr,
                                                     batch_size=32, seed=0)).to_dict()
    except EdgecError as e:
        return {"method": label, "ratio": ratio, "error": f"exit {e.exit_code}: {e}"}
    pruned = load_checkpoint(out)
    ms, onnx_bytes = measure_model(ctx, pruned, verified=True)  # re-measured, as the peers' final models
    return {"method": label, "ratio": ratio, "measured_ms": ms, "prune_file_ms": res["measured_ms"],
            "est_err": (res["estimated_ms"] - res["measured_ms"]) / res["measured_ms"],
            "speedup": ctx.dense_ms / ms, "flop_red": res["flop_reduction"], "metric": score(ctx, onnx_bytes),
            "params": res["params"], "retries": res["retries"], "seconds": time.perf_counter() - t}


def run_uniform(ctx, ratio, target_ms):
    from edgec.core.pass_manager import PassManager
    from edgec.passes.prune_channels import PruneChannels

    def build(prune_frac):
        keep = 1.0 - prune_frac
        return PassManager([PruneChannels.from_fraction(ctx.model, keep)])(ctx.model)[0]

    t = time.perf_counter()
    x, model, _, steps = bisect(ctx, build, target_ms, 0.0, 0.95, f"uniform r={ratio}")
    row = finish(ctx, "uniform", model, ratio, {"knob": _knob(f"prune {x:.3f}", steps), "bisect": len(steps)})
    row["seconds"] += 0  # bisection time not counted in fine-tune seconds
    row["total_seconds"] = time.perf_counter() - t
    return row


def tp_prune(ctx, ratio, also_ignore=()):
    """Torch-Pruning MagnitudePruner at global ``ratio`` on the eager zoo module; returns an edgec Model."""
    import torch
    import torch_pruning as tp

    from edgec import models
    from edgec.core.graph import Model
    from edgec.models.checkpoint import trace_or_error

    module = models.build(ctx.arch, ctx.model.config)
    own = module.state_dict()  # the GraphModule may carry extra traced constants (e.g. _tensor_constant0)
    module.load_state_dict({k: v for k, v in ctx.model.gm.state_dict().items() if k in own})
    module.eval()
    example = tuple(torch.from_numpy(v) for v in ctx.feed.values())
    ignored = [m for n, m in module.named_modules() if n.split(".")[-1] in ("classifier", "fc", "head")
               and isinstance(m, torch.nn.Linear)]
    ignored += [module.get_submodule(n) for n in also_ignore]
    pruner = tp.pruner.MagnitudePruner(module, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, global_pruning=True, ignored_layers=ignored,
                                       max_pruning_ratio=0.95)
    pruner.step()
    with torch.no_grad():
        module(*example)  # fails here when the pruned module is inconsistent
    return Model(trace_or_error(module, ctx.arch), ctx.arch, copy.deepcopy(ctx.model.config), module.input_spec())


# Torch-Pruning fallbacks when it mis-handles a model: layers to leave unpruned (the failing dependency)
TP_FALLBACK = {
    # Torch-Pruning 1.6 on the zoo Conformer: (1) Conv2dSubsampling's transpose(1, 2).flatten(2) interleaves
    # (channel, freq) before the Linear and Torch-Pruning removes one Linear input per pruned channel instead of
    # one per (channel, freq) pair; (2) the hand-written attention reshapes to the constant (heads, head_dim), so
    # pruning q/k/v outputs or the residual width breaks it (and the sinusoidal positional table is d_model wide);
    # (3) GLU halves its input, which Torch-Pruning does not pair. Fallback: leave all of those layers unpruned, so
    # it prunes the FFN hidden widths and the first subsampling conv only.
    "conformer": ["subsampling.conv.2", "subsampling.out"] + [
        f"blocks.{i}.{n}" for i in range(2) for n in (
            "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "ffn1.linear2", "ffn2.linear2",
            "conv.pointwise1", "conv.depthwise", "conv.pointwise2")],
}


def _msg(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def run_tp(ctx, ratio, target_ms):
    rows = []
    variants = [("Torch-Pruning", ())]
    if ctx.arch in TP_FALLBACK:
        variants.append(("Torch-Pruning (fallback: FFN hidden + 1st conv only)", tuple(TP_FALLBACK[ctx.arch])))
    for label, also in variants:
        t = time.perf_counter()
        try:
            tp_prune(ctx, 0.05, also)  # probe: does Torch-Pruning handle this model at all?
        except Exception as e:  # noqa: BLE001 - the failure is the result
            say(f"  {label} failed on {ctx.arch}: {_msg(e)}\n{traceback.format_exc(limit=3)}")
            rows.append({"method": label, "ratio": ratio, "error": f"failed: {_msg(e)}"})
            continue
        try:
            x, model, _, steps = bisect(ctx, lambda r, also=also: tp_prune(ctx, r, also), target_ms, 0.0, 0.95,
                                        f"{label} r={ratio}")
            row = finish(ctx, label, model, ratio, {"knob": _knob(f"global {x:.3f}", steps), "bisect": len(steps)})
        except Exception as e:  # noqa: BLE001
            say(traceback.format_exc(limit=4))
            rows.append({"method": label, "ratio": ratio, "error": f"after pruning: {_msg(e)}"})
            continue
        row["total_seconds"] = time.perf_counter() - t
        rows.append(row)
        break  # the plain variant worked: no fallback needed
    return rows


# ------------------------------------------------------------------------------------------- driver

def prepare(arch, args, tmp):
    import torch

    from edgec.data import load_data
    from edgec.models.checkpoint import new_model, save_checkpoint
    from edgec.prune.run import macs
    from edgec.train import finetune

    t = time.perf_counter()
    if arch == "conformer":
        bundle = load_data(args.speech, n_mels=40)
        model = new_model("conformer", seed=0)
        epochs, lr, metric = args.conformer_epochs, 2e-3, "uar"
    else:
        bundle = load_data(str(digits32(tmp)))
        model = new_model("resnet", {"image_size": 32}, seed=0)
        epochs, lr, metric = args.resnet_epochs, 3e-3, "accuracy"
    torch.manual_seed(0)
    model, _ = finetune(model, bundle, epochs=epochs, lr=lr, seed=0)
    ckpt = tmp / f"{arch}_fp32.pt"
    save_checkpoint(model, ckpt)
    ctx = Ctx(arch, model, ckpt, bundle, metric, args)
    ctx.dense_ms, onnx_bytes = measure_model(ctx, model, verified=True)
    ctx.macs_dense = macs(model, ctx.shapes)
    ctx.dense_metric = score(ctx, onnx_bytes)
    ctx.train_epochs, ctx.train_lr = epochs, lr
    say(f"{arch}: fp32 trained {epochs} epochs in {time.perf_counter() - t:.0f} s; dense {ctx.dense_ms:.4g} ms, "
        f"{metric} {ctx.dense_metric:.3f}, {ctx.macs_dense / 1e6:.2f} MMACs")
    return ctx


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def print_table(ctx, rows, args):
    print(f"\n### {ctx.arch} — dense {ctx.dense_ms:.4g} ms (ORT 1 thread, batch 1, inputs "
          f"{', '.join(f'{k} {list(v)}' for k, v in ctx.shapes.items())}), {ctx.macs_dense / 1e6:.2f} MMACs, test "
          f"{ctx.metric} {ctx.dense_metric:.3f} (fp32, {ctx.train_epochs} epochs lr {ctx.train_lr:g}); seed 0, one seed; "
          f"fine-tune {args.finetune_epochs} epochs lr {args.lr:g} for every method\n")
    print(f"| budget | method | measured ms | est. error | speedup | FLOP red. | speedup ÷ FLOP red. | "
          f"test {ctx.metric} | params | knob |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        budget = f"{r['ratio']:.0%} ({r['ratio'] * ctx.dense_ms:.3g} ms)"
        if "error" in r:
            print(f"| {budget} | {r['method']} | {r['error']} | | | | | | | |")
            continue
        est = f"{r['est_err']:+.1%}" if r.get("est_err") is not None else "—"
        knob = r.get("knob") or (f"retries {r['retries']}" if "retries" in r else "")
        print(f"| {budget} | {r['method']} | {r['measured_ms']:.4g} | {est} | {r['speedup']:.2f}× | "
              f"{r['flop_red']:.2f}× | {r['speedup'] / r['flop_red']:.2f} | {r['metric']:.3f} | "
              f"{r['params'] / 1e3:.1f} k | {knob} |")


def plot(ctxs, all_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ctxs), figsize=(6 * len(ctxs), 4.5), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs):
        rows = [r for r in all_rows[ctx.arch] if "error" not in r]
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["measured_ms"], r["metric"]) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.scatter([ctx.dense_ms], [ctx.dense_metric], marker="*", s=150, color="k", label="dense fp32", zorder=5)
        ax.set_xlabel("measured latency, ms (onnxruntime, 1 thread, batch 1)")
        ax.set_ylabel(f"test {ctx.metric}")
        ax.set_title(ctx.arch)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["conformer", "resnet"], choices=["conformer", "resnet"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.9, 0.75, 0.6, 0.5])
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--admm-epochs", type=int, default=0,
                    help="ADMM epochs for ALCS (0: equal training budget with the peers)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--conformer-epochs", type=int, default=10)
    ap.add_argument("--resnet-epochs", type=int, default=5)
    ap.add_argument("--tol", type=float, default=0.03, help="relative latency match for the peers' bisection")
    ap.add_argument("--max-bisect", type=int, default=6)
    ap.add_argument("--methods", nargs="+", default=["alcs", "uniform", "tp"], choices=["alcs", "uniform", "tp"])
    ap.add_argument("--speech", default=str(ROOT / "fixtures" / "speech"))
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "prune.png"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="edgec-prune-bench-"))
    ctxs, all_rows = [], {}
    for arch in args.models:
        ctx = prepare(arch, args, tmp)
        ctxs.append(ctx)
        rows = all_rows[arch] = []
        alcs_label = "edgec ALCS" + (f" (+{args.admm_epochs} ADMM ep.)" if args.admm_epochs else "")
        for ratio in args.ratios:
            say(f"{arch} @ {ratio:.0%}")
            target = ratio * ctx.dense_ms
            if "alcs" in args.methods:
                r = run_alcs(ctx, ratio, tmp, args.admm_epochs, alcs_label)
                rows.append(r)
                say(f"  ALCS: {r}")
                if "error" not in r:
                    target = r["measured_ms"]  # the peers match the ALCS model's measured latency
            if "uniform" in args.methods:
                rows.append(run_uniform(ctx, ratio, target))
                say(f"  uniform: {rows[-1]}")
            if "tp" in args.methods:
                for r in run_tp(ctx, ratio, target):
                    rows.append(r)
                    say(f"  TP: {r}")
        print_table(ctx, rows, args)
        sys.stdout.flush()
    plot(ctxs, all_rows, args.plot)
    print(f"\nplot: {args.plot}; total {time.perf_counter() - t0:.0f} s; "
          f"{torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, seed 0 (one seed)")


if __name__ == "__main__":
    main()
