"""Latency on the target runtime: measurement protocol (``measure``), later lookup tables and models."""
from edgec.latency.measure import (
    create_session,
    machine_id,
    machine_key,
    measure_onnx,
    measure_session,
    sample_inputs,
    session_options,
)

__all__ = ["create_session", "machine_id", "machine_key", "measure_onnx", "measure_session", "sample_inputs",
           "session_options"]
