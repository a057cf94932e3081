"""Wall-clock latency of an ONNX model in onnxruntime, measured the same way everywhere.

Protocol (used by ``edgec eval``, by latency lookup tables and by the final check against a budget):

* one ``InferenceSession`` on the CPU execution provider with ``intra_op_num_threads = threads``,
  ``inter_op_num_threads = 1``, sequential execution and all graph optimisations (``ORT_ENABLE_ALL``);
* ``warmup`` untimed runs (the first runs allocate memory and pick kernels);
* then at least ``repeats`` timed runs, continuing until ``min_seconds`` of timed runs have elapsed
  (short models get many more samples) and never more than ``max_repeats``;
* each run is timed with ``time.perf_counter`` around ``session.run`` alone (inputs are prepared once,
  outside the timer); Python's garbage collector is paused while timing;
* the result reports the median (the number to use), the 10th/90th percentiles (spread), mean and min.

``machine_key(threads)`` says what the numbers depend on (runtime version, threads, CPU model), so
tables measured on one machine are never applied to another.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgec.core.errors import EdgecError

DEFAULT_WARMUP = 5
DEFAULT_REPEATS = 30
DEFAULT_MIN_SECONDS = 0.2
DEFAULT_MAX_REPEATS = 10000

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def session_options(threads: int = 1, config: dict | None = None):
    """The session options of the protocol (also used for predictions, so they run what is timed)."""
    if int(threads) < 1:
        raise EdgecError(f"threads must be >= 1, got {threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    for key, value in (config or {}).items():
        opts.add_session_config_entry(str(key), str(value))
    return opts


def create_session(model, threads: int = 1, config: dict | None = None):
    """An InferenceSession from ONNX bytes, a path, or an ``onnx.ModelProto``, with the protocol's options."""
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise EdgecError(f"no such file: {path}")
        model = path.read_bytes()
    if not isinstance(model, (bytes, bytearray)):
        raise EdgecError(f"expected ONNX bytes or a path, got {type(model).__name__}")
    try:
        return ort.InferenceSession(bytes(model), session_options(threads, config), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise EdgecError(f"onnxruntime cannot load the model: {msg}") from None


def _as_feed(session, inputs) -> dict:
    """Validate ``inputs`` against the session's inputs; accept a dict, or a sequence in input order."""
    names = [i.name for i in session.get_inputs()]
    if not isinstance(inputs, dict):
        inputs = list(inputs)
        if len(inputs) != len(names):
            raise EdgecError(f"the model takes {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}")
        inputs = dict(zip(names, inputs))
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names]
    if missing or extra:
        raise EdgecError(f"inputs do not match the model: missing {missing or 'none'}, unexpected {extra or 'none'} "
                         f"(model inputs: {', '.join(names)})")
    feed = {}
    for info in session.get_inputs():
        value = inputs[info.name]
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        value = np.ascontiguousarray(value)
        want = _ORT_TYPES.get(info.type)
        if want is not None and value.dtype != want:
            value = value.astype(want)
        feed[info.name] = value
    return feed


def measure_session(session, inputs, *, threads: int | None = None, warmup: int = DEFAULT_WARMUP,
                    repeats: int = DEFAULT_REPEATS, min_seconds: float = DEFAULT_MIN_SECONDS,
                    max_repeats: int = DEFAULT_MAX_REPEATS) -> dict:
    """Time ``session.run`` on ``inputs`` (see the module docstring). ``threads`` is only recorded."""
    if repeats < 1 or warmup < 0 or max_repeats < repeats:
        raise EdgecError(f"need repeats >= 1, warmup >= 0 and max_repeats >= repeats "
                         f"(got repeats={repeats}, warmup={warmup}, max_repeats={max_repeats})")
    feed = _as_feed(session, inputs)
    try:
        for _ in range(warmup):
            session.run(None, feed)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise EdgecError(f"onnxruntime failed to run the model: {msg}") from None
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        run = session.run
        clock = time.perf_counter
        started = clock()
        while len(times) < max_repeats and (len(times) < repeats or clock() - started < min_seconds):
            t0 = clock()
            run(None, feed)
            times.append(clock() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return _stats(np.asarray(times, dtype=np.float64) * 1e3, warmup, threads)


def measure_onnx(data, inputs, *, threads: int = 1, warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS,
                 min_seconds: float = DEFAULT_MIN_SECONDS, max_repeats: int = DEFAULT_MAX_REPEATS,
                 config: dict | None = None) -> dict:
    """Median latency (ms) of one ``session.run`` of an ONNX model (bytes, path or ModelProto) on ``inputs``.

    ``inputs``: ``{input name: array}`` (numpy or torch), or a sequence in the model's input order.
    ``config``: extra onnxruntime session config entries (e.g. ``session.qdq_matmulnbits_accuracy_level``).
    Returns ``{median_ms, p10_ms, p90_ms, mean_ms, min_ms, repeats, warmup, threads}``.
    """
    session = create_session(data, threads, config)
    return measure_session(session, inputs, threads=threads, warmup=warmup, repeats=repeats,
                           min_seconds=min_seconds, max_repeats=max_repeats)


def measure_interleaved(models: list, inputs, *, threads: int = 1, warmup: int = DEFAULT_WARMUP,
                        repeats: int = DEFAULT_REPEATS, min_seconds: float = DEFAULT_MIN_SECONDS,
                        max_repeats: int = DEFAULT_MAX_REPEATS, config: dict | None = None) -> list[dict]:
    """Time several ONNX models side by side: one run of each in turn, round after round, so interference
    from other processes falls on all of them alike and their *ratio* is stable even on a busy machine.
    Same stopping rule as :func:`measure_session` (counted in rounds); returns one stats dict per model.
    ``config``: session config entries for every session."""
    sessions = [create_session(m, threads, config) for m in models]
    feeds = [_as_feed(s, inputs) for s in sessions]
    try:
        for s, f in zip(sessions, feeds):
            for _ in range(warmup):
                s.run(None, f)
    except Exception as exc:
        raise EdgecError(f"onnxruntime failed to run the model: {str(exc).strip()[:300] or type(exc).__name__}") \
            from None
    times = [[] for _ in sessions]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        clock, started, rounds = time.perf_counter, time.perf_counter(), 0
        while rounds < max_repeats and (rounds < repeats or clock() - started < min_seconds * len(sessions)):
            for s, f, ts in zip(sessions, feeds, times):
                t0 = clock()
                s.run(None, f)
                ts.append(clock() - t0)
            rounds += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return [_stats(np.asarray(ts, dtype=np.float64) * 1e3, warmup, threads) for ts in times]


def _stats(ms, warmup: int, threads) -> dict:
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "repeats": int(len(ms)), "warmup": int(warmup), "threads": int(threads) if threads is not None else None}


def sample_inputs(spec, batch: int = 1, seed: int = 0, alt: bool = False) -> dict:
    """``{input name: numpy array}`` from an ``InputSpec`` at the traced shape with batch size ``batch``."""
    if int(batch) < 1:
        raise EdgecError(f"batch must be >= 1, got {batch}")
    tensors = spec.sample(seed=seed, alt=alt, batch=int(batch))
    return {t.name: x.numpy() for t, x in zip(spec.inputs, tensors)}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_key(threads: int = 1) -> dict:
    """What a latency number depends on: runtime and version, threads, CPU model and core count."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return {
        "runtime": "onnxruntime",
        "runtime_version": ort.__version__,
        "provider": "CPUExecutionProvider",
        "threads": int(threads),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count() or 1,
        "usable_cores": usable,
    }


def machine_id(key: dict) -> str:
    """A short stable id of a machine key (for naming latency tables); excludes ``usable_cores``."""
    fields = {k: v for k, v in key.items() if k != "usable_cores"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
