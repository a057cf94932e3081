"""Zoo table: parameters, ONNX size, export time and ORT parity for every zoo model (default config).

    python benchmarks/zoo.py [--repeats 3]

Export time is the median over repeats of the full verified export (dynamo export + ORT parity at two
shapes); latency is the median ORT latency at batch 1, one thread.
"""
from __future__ import annotations

import argparse
import statistics
import time

from edgec import models
from edgec.models.checkpoint import new_model
from edgec.onnx.export import export


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from edgec.onnx.session import measure_onnx

    rows = []
    for arch in models.ZOO:
        model = new_model(arch, seed=0)
        times, data, record = [], None, None
        for _ in range(args.repeats):
            start = time.perf_counter()
            data, record = export(model)
            times.append(time.perf_counter() - start)
        parity = record["checks"]["ort_parity"]["parity"]
        inputs = {t.name: x.numpy() for t, x in zip(model.spec.inputs, model.spec.sample(seed=0, batch=1))}
        lat = measure_onnx(data, inputs, threads=1)
        rows.append((arch, model.param_count(), len(data), statistics.median(times),
                     parity["traced_shape"]["max_abs_error"], parity["alt_shape"]["max_abs_error"],
                     lat["median_ms"], "x".join(map(str, next(iter(inputs.values())).shape))))
    print("| model | params | ONNX size | export+verify s (median) | max abs err traced | max abs err alt shape "
          "| ORT latency ms (batch 1, 1 thread) | latency input |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for arch, params, size, secs, e1, e2, ms, shape in rows:
        print(f"| {arch} | {params:,} | {size / 1024:.0f} KiB | {secs:.1f} | {e1:.1e} | {e2:.1e} | {ms:.2f} | {shape} |")


if __name__ == "__main__":
    main()
