"""Default-session runtime of edgec's low-bit artifacts vs fp32, and the toolchain's cost vs model size (issue 10).

    python benchmarks/runtime.py [--quick] [--models conformer resnet ...] [--sizes default,large,xl]
                                 [--batches 1,32] [--threads 1,2] [--repeats 7] [--min-seconds 0.3]
                                 [--max-seconds 25] [--plot benchmarks/runtime.png] [--json out.json]
                                 [--no-runtime | --no-toolchain]

Benchmark-only dependency: ``matplotlib`` for the PNG (``pip install matplotlib``; without it the plot is skipped
with a note).

**Runtime** (sizes ``default`` and ``large``). Each zoo model, freshly initialised (seed 0), at its zoo default
config and at a ``large`` config of >= 25 M parameters (``SIZES``; the parameter count is printed). Variants:

* ``fp32``: the plain export (``weights="fp32"``);
* ``ternary``: the DLT scaffold (``scaffold.dlt`` defaults: per-group scale and shift, group size 128, first layer
  and classifier kept fp32; ``shift_init="mean"`` so the shifts are non-zero as after training) folded, and
  ``binary``: the binary scaffold (``scaffold.binary``) folded; each exported with every entry of ``FORMS``:
  ``cast``, ``dq``, ``matmulnbits`` (activation precision fp32 and int8) and ``auto`` (fp32 and int8);
* ``ORT int8 dynamic``: ``onnxruntime.quantization.quantize_dynamic`` (QInt8, per channel) of the fp32 export.

No fine-tuning: a runtime benchmark needs the graph and the storage, not trained weights (their values do not
change which kernels onnxruntime runs). Quality is in ``benchmarks/lowbit.py`` and ``benchmarks/lowbit_quality.py``.
Exports go through ``edgec.onnx.export.export`` (verified, as the CLI); the torch trace of a module is reused across
its forms (``reuse_traces``: the files are byte-identical, only this script's export time shrinks).

Per variant: the per-layer forms written, file size and its ratio to the fp32 file, and the latency ratio to fp32 at
each batch (default 1 and 32) and thread count (default 1 and 2) in a *default* ``onnxruntime.InferenceSession``:
``SessionOptions()`` with only ``intra_op_num_threads`` set (no session config entries; onnxruntime's default
optimisation level is ``ORT_ENABLE_ALL``). All variants of a model are timed side by side: one session each, one
run of each in turn, round after round (after up to ``--warmup`` untimed runs each), so load from other processes
falls on all alike; the ratio is the median over rounds of (variant ms / fp32 ms of the same round); the fp32 row
shows its median ms. Rounds: at least 3, and at least ``--repeats`` and ``--min-seconds`` per variant unless
``--max-seconds`` per configuration have passed. Files whose graphs are identical (``auto`` choosing ``cast``
everywhere, ``matmulnbits`` on a Conv-only model) are timed once and marked ``(= variant)``.

**Toolchain** (sizes ``default``, ``large`` and ``xl``; ``xl`` is a ~100 M-parameter conformer, toolchain only).
The ternary scaffolded checkpoint (from the runtime step, else written in-process; not timed) goes through
``edgec fold`` and then ``edgec export`` (default options), each a separate process of the venv's ``edgec``; each
one's wall time and peak RSS (``ru_maxrss`` of that process, via a small launcher: see ``LAUNCHER``) are reported
with the parameter count and checkpoint size; ``--plot`` draws them against the parameter count.

``--quick``: conformer and resnet at the default size, batches 1 and 32, 1 thread, fewer rounds, with their toolchain
rows (2-4 minutes). The full default matrix (every zoo model, default and large, batches 1 and 32, threads 1 and 2,
toolchain up to xl) is sized for about 20 minutes on an idle 2-core machine, most of it exports; the run prints its
own wall time and the load average at start and end. Numbers from a loaded machine are noisy (ratios measured side
by side much less than absolute times; 2-thread ratios most).
"""
from __future__ import annotations

import argparse
import contextlib
import copy as copy_module
import gc
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDGEC = Path(sys.executable).with_name("edgec")

# Low-bit forms: (forms, activation_precision) per exported variant. A constant so forms slot in as they land.
FORMS = (("cast", "fp32"), ("dq", "fp32"), ("matmulnbits", "fp32"), ("matmulnbits", "int8"),
         ("auto", "fp32"), ("auto", "int8"))
LOWBIT = {
    "ternary": ("scaffold.dlt", {"shift_init": "mean"}),
    "binary": ("scaffold.binary", {}),
}
# Per architecture: config overrides of each size ("default": the zoo default). large >= 25 M parameters with
# moderate compute per example (so batch 32 stays measurable); xl ~100 M, for the toolchain rows only.
SIZES = {
    "conformer": {"large": {"d_model": 384, "num_layers": 8, "ffn_dim": 1536, "num_heads": 6},
                  "xl": {"d_model": 768, "num_layers": 7, "ffn_dim": 3072, "num_heads": 12}},
    "convtransformer": {"large": {"d_model": 512, "num_layers": 8, "ffn_dim": 2048, "num_heads": 8,
                                  "num_strided": 2}},
    "hafformer": {"large": {"dims": [384, 640, 896], "depths": [2, 2, 3]}},
    "speechformer": {"large": {"dims": [256, 384, 512, 640], "depths": [2, 2, 4, 4], "num_heads": 8, "ffn_mult": 4.0}},
    "resnet": {"large": {"base_width": 96}},
    "mobilenet": {"large": {"width": 32, "stage_channels": [32, 128, 384, 768], "blocks_per_stage": [1, 2, 3, 4],
                            "strides": [2, 2, 2, 2], "expand_ratio": 6, "last_channels": 2048}},
    "bert": {"large": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                       "intermediate_size": 2048}},
    "llama": {"large": {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
                        "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512}},
    "lwdetr": {"large": {"image_size": 256, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6,
                         "mlp_ratio": 4.0, "global_blocks": [2, 5, 8, 11], "out_indices": [2, 5, 8, 11],
                         "c2f_blocks": 3, "dim": 256, "decoder_heads": 8, "decoder_ffn": 2048, "num_queries": 100,
                         "groups": 13}},
}
ORT_INT8 = "ORT int8 dynamic"


def size_config(arch: str, size: str) -> dict | None:
    """The config overrides of ``arch`` at ``size`` ({} for default), None where the size is not defined."""
    if size == "default":
        return {}
    return SIZES.get(arch, {}).get(size)


def parse_list(text: str, cast=str) -> list:
    """``"1,32"`` -> [1, 32] (comma- or space-separated)."""
    items = [x for x in text.replace(",", " ").split() if x]
    if not items:
        raise argparse.ArgumentTypeError(f"empty list: {text!r}")
    return [cast(x) for x in items]


def variant_name(kind: str, forms: str, precision: str) -> str:
    return f"{kind} {forms}" + (f" act-{precision}" if forms in ("matmulnbits", "auto") else "")


def graph_key(data: bytes) -> str:
    """Digest of what onnxruntime runs: the graph and opset imports, not the metadata (provenance differs)."""
    import onnx

    proto = onnx.load_from_string(data)
    h = hashlib.sha256(proto.graph.SerializeToString(deterministic=True))
    for o in proto.opset_import:
        h.update(f"{o.domain}:{o.version};".encode())
    return h.hexdigest()


def form_counts(record: dict) -> str:
    layers = (record.get("lowbit") or {}).get("layers") or []
    counts: dict = {}
    for layer in layers:
        counts[layer.get("form", "?")] = counts.get(layer.get("form", "?"), 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "-"


def paired_ratio(times: list[float], ref: list[float]) -> float:
    """Median over rounds of times[i] / ref[i] (paired: both measured in the same round)."""
    return statistics.median(t / r for t, r in zip(times, ref))


# --------------------------------------------------------------------------------------------- building

def module_digest(gm) -> str:
    import torch

    h = hashlib.sha256(gm.code.encode() if hasattr(gm, "code") else repr(gm).encode())
    for name, t in gm.state_dict().items():
        h.update(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def reuse_traces(enabled: bool = True):
    """Trace each module once in this process: every low-bit form's export of one folded model runs the same
    ``torch.onnx.export`` (edgec then rewrites the exporter's graph, unoptimised, per form), so the unoptimised
    program is cached by the module's code and weights and each call gets a copy. The files are byte-identical
    to uncached exports (``--no-reuse-traces`` turns it off); only the benchmark's own export time shrinks, which
    it does not report (the toolchain rows run the real CLI)."""
    import torch

    if not enabled:
        yield
        return
    import onnx_ir as ir

    real = torch.onnx.export
    cache: dict = {}

    def export(model, args=(), *rest, **kwargs):
        if rest or not isinstance(model, torch.nn.Module):
            return real(model, args, *rest, **kwargs)
        optimize = kwargs.pop("optimize", True)
        key = (module_digest(model), repr(args), repr(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in cache:
            cache.clear()  # one module at a time: the copies of a large model are big
            cache[key] = real(model, args, optimize=False, **kwargs)
        program = cache[key]
        copy = ir.serde.deserialize_model(ir.serde.serialize_model(program.model))
        # the exporter's node/value name counters, so names edgec's rewrite adds are the ones a fresh trace gets
        copy.graph._name_authority = copy_module.deepcopy(program.model.graph._name_authority)
        result = torch.onnx.ONNXProgram(copy, program.exported_program)
        if optimize:
            result.optimize()
        return result

    torch.onnx.export = export
    try:
        yield
    finally:
        torch.onnx.export = real

def run_passes(model, name: str, params: dict):
    from edgec.core.pass_manager import PassManager, get_pass

    return PassManager([get_pass(name)(**params)])(model)[0]


def ort_int8(data: bytes) -> bytes:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        src.write_bytes(data)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # "consider pre-processing" advice on every call
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            root.setLevel(level)
        return onnx.load(str(dst)).SerializeToString()


def build_variants(arch: str, config: dict, log, save_ternary: Path | None = None) -> tuple:
    """(model, [{name, data | error, forms, export_s}]) for one model at one size; ``save_ternary``: also write
    the ternary scaffolded checkpoint there (the toolchain rows' input)."""
    from edgec.app.api import fold_model
    from edgec.models.checkpoint import new_model, save_checkpoint
    from edgec.onnx.export import export

    model = new_model(arch, config, seed=0)
    variants = []

    def add(name, fn):
        t0 = time.perf_counter()
        try:
            data, record = fn()
            variants.append({"name": name, "data": data, "forms": form_counts(record),
                             "export_s": time.perf_counter() - t0})
        except Exception as exc:  # noqa: BLE001 - a failed variant is a row, not the end of the run
            msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            variants.append({"name": name, "error": f"{type(exc).__name__}: {msg}"})
            if os.environ.get("EDGEC_BENCH_DEBUG"):
                traceback.print_exc()
        log(f"  {name}: {time.perf_counter() - t0:.1f} s" + (f" ({variants[-1]['error']})" if "error" in
                                                               variants[-1] else ""))

    add("fp32", lambda: export(model, weights="fp32"))
    fp32 = variants[0].get("data")
    for kind, (scaffold, params) in LOWBIT.items():
        t0 = time.perf_counter()
        scaffolded = run_passes(model, scaffold, params)
        if kind == "ternary" and save_ternary is not None:
            save_checkpoint(scaffolded, save_ternary)
        folded = fold_model(scaffolded)[0]
        del scaffolded
        log(f"  {kind} scaffold + fold: {time.perf_counter() - t0:.1f} s")
        for forms, precision in FORMS:
            add(variant_name(kind, forms, precision),
                lambda m=folded, f=forms, p=precision: export(m, weights="int2", forms=f, activation_precision=p))
        del folded
        gc.collect()
    if fp32 is not None:
        add(ORT_INT8, lambda: (ort_int8(fp32), {}))
    return model, variants


# --------------------------------------------------------------------------------------------- timing

def default_session(data: bytes, threads: int):
    """A default onnxruntime session: only the thread count set (and the log level, which does not change what
    runs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def measure_side_by_side(datas: list[bytes], feed: dict, threads: int, warmup: int = 2, repeats: int = 7,
                         min_seconds: float = 0.3, max_seconds: float = 30.0, max_rounds: int = 500,
                         sessions=None) -> list[list[float]]:
    """Per model, the ms of each timed round (one run of each model per round, models in turn). Rounds: at
    least 3; then until both ``repeats`` rounds and ``min_seconds`` per model have passed, or ``max_seconds``
    in all, or ``max_rounds``."""
    sessions = sessions or [default_session(d, threads) for d in datas]
    feeds = []
    for s in sessions:
        names = {i.name for i in s.get_inputs()}
        feeds.append({k: v for k, v in feed.items() if k in names})
    for s, f in zip(sessions, feeds):
        for _ in range(warmup):
            t0 = time.perf_counter()
            s.run(None, f)
            if time.perf_counter() - t0 > 0.5:  # a heavy run: one warm-up is enough
                break
    times = [[] for _ in sessions]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        clock = time.perf_counter
        started, rounds = clock(), 0
        while rounds < max_rounds:
            elapsed = clock() - started
            if rounds >= 3 and (elapsed >= max_seconds or (rounds >= repeats and elapsed >= min_seconds * len(sessions))):
                break
            for s, f, ts in zip(sessions, feeds, times):
                t0 = clock()
                s.run(None, f)
                ts.append((clock() - t0) * 1e3)
            rounds += 1
    finally:
        if was_enabled:
            gc.enable()
    return times


def time_variants(model, variants: list[dict], batches: list[int], threads_list: list[int], args, log) -> None:
    """Fill each variant's ``latency``: {"b{batch} t{threads}": ratio vs fp32} (fp32: its median ms)."""
    from edgec.onnx.session import sample_inputs

    ok = [v for v in variants if "data" in v]
    if not ok or ok[0]["name"] != "fp32":
        return
    unique: dict = {}  # graph digest -> (index into the timed list, first variant with that graph)
    timed, owner = [], {}
    for v in ok:
        key = graph_key(v["data"])
        if key not in unique:
            unique[key] = (len(timed), v["name"])
            timed.append(v["data"])
        owner[v["name"]], v["same_graph_as"] = unique[key]
    for threads in threads_list:
        try:
            sessions = [default_session(d, threads) for d in timed]
        except Exception as exc:  # noqa: BLE001
            log(f"  threads {threads}: session failed: {exc}")
            continue
        for batch in batches:
            col = f"b{batch} t{threads}"
            feed = sample_inputs(model.spec, batch=batch)
            t0 = time.perf_counter()
            try:
                times = measure_side_by_side(timed, feed, threads, args.warmup, args.repeats, args.min_seconds,
                                             args.max_seconds, sessions=sessions)
            except Exception as exc:  # noqa: BLE001
                log(f"  {col}: run failed: {str(exc).strip()[:200]}")
                continue
            ref = times[0]
            for v in ok:
                ts = times[owner[v["name"]]]
                v.setdefault("latency", {})[col] = statistics.median(ts) if v["name"] == "fp32" \
                    else paired_ratio(ts, ref)
                v.setdefault("rounds", {})[col] = len(ts)
            log(f"  {col}: {len(timed)} graphs x {len(ref)} rounds, {time.perf_counter() - t0:.1f} s")
        del sessions
        gc.collect()


def runtime_table(arch: str, size: str, params: int, variants: list[dict], cols: list[str]) -> str:
    fp32 = next((v for v in variants if v["name"] == "fp32" and "data" in v), None)
    lines = [f"\n### {arch} {size} ({params:,} params)\n",
             "| variant | low-bit forms | file | vs fp32 file | " + " | ".join(f"{c} vs fp32" for c in cols) + " |",
             "|---|---|---:|---:|" + "---:|" * len(cols)]
    for v in variants:
        if "error" in v:
            lines.append(f"| {v['name']} | failed: {v['error']} |" + " |" * (len(cols) + 2))
            continue
        size_ratio = len(v["data"]) / len(fp32["data"]) if fp32 else float("nan")
        cells = []
        for c in cols:
            x = v.get("latency", {}).get(c)
            if x is None:
                cells.append("-")
            elif v["name"] == "fp32":
                cells.append(f"{x:.3g} ms")
            else:
                cells.append(f"{x:.2f}x")
        forms = v.get("forms", "-")
        if v.get("same_graph_as") not in (None, v["name"]):
            forms += f" (= {v['same_graph_as']})"
        lines.append(f"| {v['name']} | {forms} | {len(v['data']) / 2**20:.2f} MiB | {size_ratio:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- toolchain

# Runs argv[1:] with stdout/stderr to argv[0] and prints {"wall_s", "maxrss_kb", "rc"}. A small launcher process:
# on Linux a child's ru_maxrss starts from the RSS of the process it was forked from (the old memory map is
# counted at exec), so children forked straight from this benchmark, which holds models, would report its size.
LAUNCHER = """
import json, os, subprocess, sys, time
with open(sys.argv[1], "wb") as out:
    t0 = time.perf_counter()
    proc = subprocess.Popen(sys.argv[2:], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "maxrss_kb": usage.ru_maxrss, "rc": os.waitstatus_to_exitcode(status)}))
"""


def run_child(argv: list[str], log_path: Path) -> dict:
    """Run ``argv`` (through ``LAUNCHER``); its wall time and its own peak RSS (``ru_maxrss`` from ``os.wait4``)."""
    out = subprocess.run([sys.executable, "-c", LAUNCHER, str(log_path), *argv], capture_output=True, text=True,
                         check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    result = {"wall_s": got["wall_s"], "peak_rss_mb": got["maxrss_kb"] / 1024, "rc": got["rc"]}
    if result["rc"] != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        result["error"] = tail[0][:200]
    return result


def toolchain(arch: str, size: str, config: dict, ckpt: Path, log) -> dict:
    """``edgec fold`` then ``edgec export`` of the ternary checkpoint ``ckpt`` (written here if missing)."""
    from edgec.models.checkpoint import new_model, save_checkpoint

    d = ckpt.parent
    model = new_model(arch, config, seed=0)
    params = model.param_count()
    if not ckpt.exists():
        t0 = time.perf_counter()
        save_checkpoint(run_passes(model, *LOWBIT["ternary"]), ckpt)
        log(f"  {arch} {size}: ternary checkpoint written in {time.perf_counter() - t0:.1f} s (not timed below)")
    del model
    gc.collect()
    row = {"arch": arch, "size": size, "params": params, "config": config}
    steps = [("fold", ["fold", str(ckpt), "-o", str(d / "f.pt")]),
             ("export", ["export", str(d / "f.pt"), "-o", str(d / "f.onnx")])]
    for step, argv in steps:
        r = run_child([str(EDGEC), *argv], d / f"{step}.log")
        row[step] = r
        log(f"  {arch} {size} {step}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB"
            + (f" (FAILED: {r['error']})" if "error" in r else ""))
        if "error" in r:
            break
    row["checkpoint_mb"] = ckpt.stat().st_size / 2**20
    row["folded_mb"] = (d / "f.pt").stat().st_size / 2**20 if (d / "f.pt").exists() else None
    row["onnx_mb"] = (d / "f.onnx").stat().st_size / 2**20 if (d / "f.onnx").exists() else None
    return row


def toolchain_table(rows: list[dict]) -> str:
    lines = ["\n### toolchain: ternary (DLT) checkpoint -> `edgec fold` -> `edgec export` (separate processes)\n",
             "| model | size | params | checkpoint | fold s | fold peak RSS | export s | export peak RSS "
             "| fold + export s | max RSS / checkpoint | ONNX |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(r, step, key, fmt):
        x = r.get(step)
        if x is None:
            return "-"
        if "error" in x:
            return "failed"
        return fmt.format(x[key])

    for r in rows:
        rss = [r[s]["peak_rss_mb"] for s in ("fold", "export") if s in r and "error" not in r[s]]
        ratio = f"{max(rss) / r['checkpoint_mb']:.1f}x" if rss and r.get("checkpoint_mb") else "-"
        ck = f"{r['checkpoint_mb']:.1f} MB" if r.get("checkpoint_mb") else "-"
        onnx_mb = f"{r['onnx_mb']:.1f} MB" if r.get("onnx_mb") else "-"
        ok = all(s in r and "error" not in r[s] for s in ("fold", "export"))
        total = f"{r['fold']['wall_s'] + r['export']['wall_s']:.1f}" if ok else "-"
        lines.append(f"| {r['arch']} | {r['size']} | {r['params']:,} | {ck} | "
                     f"{cell(r, 'fold', 'wall_s', '{:.1f}')} | {cell(r, 'fold', 'peak_rss_mb', '{:.0f} MB')} | "
                     f"{cell(r, 'export', 'wall_s', '{:.1f}')} | {cell(r, 'export', 'peak_rss_mb', '{:.0f} MB')} | "
                     f"{total} | {ratio} | {onnx_mb} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for step, marker in (("fold", "o"), ("export", "s")):
        pts = sorted((r["params"] / 1e6, r[step]["wall_s"], r[step]["peak_rss_mb"] / 1024, r["arch"])
                     for r in rows if step in r and "error" not in r[step])
        if not pts:
            continue
        ax_t.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"edgec {step}")
        ax_m.scatter([p[0] for p in pts], [p[2] for p in pts], marker=marker, label=f"edgec {step}")
        for x, t, m, arch in pts:
            ax_t.annotate(arch, (x, t), fontsize=6, alpha=0.6)
            ax_m.annotate(arch, (x, m), fontsize=6, alpha=0.6)
    total = sorted((r["params"] / 1e6, r["fold"]["wall_s"] + r["export"]["wall_s"]) for r in rows
                   if all(s in r and "error" not in r[s] for s in ("fold", "export")))
    if total:
        ax_t.scatter([t[0] for t in total], [t[1] for t in total], marker="^", color="grey", label="fold + export")
    ax_t.scatter([25, 100], [15, 60], marker="x", color="red", label="issue 10 goal (fold + export)")
    ck = sorted((r["params"] / 1e6, 3 * r["checkpoint_mb"] / 1024) for r in rows if r.get("checkpoint_mb"))
    if ck:
        ax_m.plot([c[0] for c in ck], [c[1] for c in ck], "k:", lw=1, label="3 x checkpoint size")
    for ax, label in ((ax_t, "wall time (s)"), (ax_m, "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("edgec fold / export cost vs model size (ternary DLT checkpoint, one process each)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


# --------------------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    from edgec import models

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=None, help="zoo models (default: all of `edgec zoo list`)")
    ap.add_argument("--sizes", type=parse_list, default=None, help="default,large,xl (xl: toolchain only)")
    ap.add_argument("--batches", type=lambda s: parse_list(s, int), default=None)
    ap.add_argument("--threads", type=lambda s: parse_list(s, int), default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration, at least (>= 3)")
    ap.add_argument("--min-seconds", type=float, default=None,
                    help="and at least this many timed seconds per variant (short models get more rounds)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop a configuration after this many seconds once it has 3 rounds (heavy models)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-runtime", action="store_true", help="only the toolchain rows")
    ap.add_argument("--no-toolchain", action="store_true", help="only the runtime tables")
    ap.add_argument("--no-reuse-traces", action="store_true",
                    help="trace every export afresh (same files, several times slower)")
    ap.add_argument("--quick", action="store_true", help="a small matrix (~2 minutes)")
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "runtime.png"))
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = ap.parse_args(argv)
    quick = args.quick
    names = args.models or (["conformer", "resnet"] if quick else list(models.ZOO))
    unknown = [n for n in names if n not in models.ZOO]
    if unknown:
        ap.error(f"unknown zoo model(s) {unknown}; choose from {list(models.ZOO)}")
    sizes = args.sizes or (["default"] if quick else ["default", "large", "xl"])
    bad = [s for s in sizes if s not in ("default", "large", "xl")]
    if bad:
        ap.error(f"unknown size(s) {bad}; choose from default, large, xl")
    batches = args.batches or [1, 32]
    threads_list = args.threads or ([1] if quick else [1, 2])
    args.repeats = max(3, args.repeats or (5 if quick else 7))
    args.min_seconds = args.min_seconds if args.min_seconds is not None else (0.2 if quick else 0.3)
    args.max_seconds = args.max_seconds if args.max_seconds is not None else (10.0 if quick else 25.0)
    if not EDGEC.exists():
        ap.error(f"{EDGEC} not found: run with the venv's python")

    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:6.0f}s] {msg}", file=sys.stderr, flush=True)

    import onnxruntime as ort

    from edgec.onnx.session import cpu_model

    header = (f"onnxruntime {ort.__version__}, {cpu_model()}, {os.cpu_count()} cores; load average at start "
              f"{os.getloadavg()[0]:.2f}")
    cols = [f"b{b} t{t}" for t in threads_list for b in batches]
    results = {"machine": header, "runtime": [], "toolchain": []}
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgec-runtime-") as tmp:
        for arch in names:
            for size in sizes:
                config = size_config(arch, size)
                if config is None:
                    continue
                workdir = Path(tmp) / f"{arch}-{size}"
                workdir.mkdir()
                ckpt = workdir / "ternary.pt"
                if not args.no_runtime and size != "xl":
                    log(f"{arch} {size}: exporting")
                    with reuse_traces(not args.no_reuse_traces):
                        model, variants = build_variants(arch, config, log,
                                                         None if args.no_toolchain else ckpt)
                    time_variants(model, variants, batches, threads_list, args, log)
                    print(runtime_table(arch, size, model.param_count(), variants, cols), flush=True)
                    results["runtime"].append({
                        "arch": arch, "size": size, "params": model.param_count(), "config": config,
                        "variants": [{k: (len(v) if k == "data" else v) for k, v in var.items()}
                                     for var in variants]})
                    del model, variants
                    gc.collect()
                if not args.no_toolchain:
                    log(f"{arch} {size}: toolchain")
                    rows.append(toolchain(arch, size, config, ckpt, log))
                shutil.rmtree(workdir, ignore_errors=True)
    results["toolchain"] = rows
    if rows:
        print(toolchain_table(rows), flush=True)
    elapsed = time.perf_counter() - started
    results["elapsed_s"] = elapsed
    notes = []
    if rows and args.plot:
        notes.append(plot(rows, args.plot))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
        notes.append(f"json: {args.json}")
    print(f"\n{header}; load average at end {os.getloadavg()[0]:.2f}. Latency: default session, ratio = median "
          f"over side-by-side rounds of variant / fp32 (fp32 row: its median ms); >= {args.repeats} rounds and "
          f">= {args.min_seconds} s per variant, or {args.max_seconds} s per configuration (>= 3 rounds); "
          f"{args.warmup} warm-up runs each. Total wall time {elapsed / 60:.1f} min.")
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
