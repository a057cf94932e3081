"""Does a pruned width's alignment matter on this CPU? Why ``edgec prune --align 8`` is the default.

    python benchmarks/widths.py [--threads 1] [--repeats 40]

Each row is one small block exported to ONNX at several widths N of its middle layer and timed side by side
(interleaved runs, ``edgec.onnx.session.measure_interleaved``, median µs per run, batch 1) in onnxruntime's
default CPU session. A pruned width that is not a multiple of 8 can be slower than a wider aligned one: the
convolution kernels work on channel blocks, and a ragged last block costs a lot.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cases():
    import torch
    from torch import nn

    def linear(n):
        return nn.Sequential(nn.Linear(256, n), nn.ReLU(), nn.Linear(n, 256))

    def conv(n):
        return nn.Sequential(nn.Conv2d(32, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, 32, 3, padding=1))

    def inverted_residual(n):
        return nn.Sequential(nn.Conv2d(32, n, 1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1, groups=n),
                             nn.Conv2d(n, 32, 1))

    return [
        ("Linear 256→N→256, 50 frames", torch.randn(1, 50, 256), linear, [56, 57, 60, 63, 64]),
        ("Linear 256→N→256, 50 frames", torch.randn(1, 50, 256), linear, [240, 241, 244, 252, 255, 256]),
        ("Conv3×3 32→N→32, 24×24", torch.randn(1, 32, 24, 24), conv, [24, 25, 28, 31, 32]),
        ("1×1 32→N, depthwise 3×3, 1×1 N→32, 24×24", torch.randn(1, 32, 24, 24), inverted_residual,
         [88, 89, 92, 95, 96]),
    ]


def onnx_bytes(module, x) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    import torch

    from edgec.onnx.session import measure_interleaved

    torch.manual_seed(0)
    print("| block | " + " | ".join(["N: median µs (× the aligned width below or equal)"]) + " |")
    print("|---|---|")
    for label, x, make, widths in cases():
        runs = measure_interleaved([onnx_bytes(make(n), x) for n in widths], {"x": x.numpy()}, threads=args.threads,
                                   repeats=args.repeats, min_seconds=0.3)
        us = {n: r["median_ms"] * 1000 for n, r in zip(widths, runs)}
        cells = []
        for n in widths:
            base = max(w for w in widths if w % 8 == 0 and w <= n) if any(w % 8 == 0 and w <= n for w in widths) else n
            cells.append(f"{n}: {us[n]:.0f}" + ("" if base == n else f" ({us[n] / us[base]:.2f}×)"))
        print(f"| {label} | " + ", ".join(cells) + " |")


if __name__ == "__main__":
    main()
