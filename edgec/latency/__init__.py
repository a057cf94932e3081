"""Latency on the target runtime: per-unit profiling, latency tables (schema, I/O, cache) and the
piecewise-linear latency model that pruning optimises against."""
