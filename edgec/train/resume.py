"""The resume file: everything a fine-tuning run needs to continue exactly where it stopped (weights,
optimizer, schedule, history, keep-best, every rank's RNG). Written atomically after each epoch; accepted
only when its fingerprint matches the new run. Format and exactness: docs/architecture.md#checkpoints.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from edgec.core.errors import EdgecError
from edgec.core.fileio import atomic_write, read_data, serialize

FORMAT = "edgec.resume/1"
REQUIRED = ("fingerprint", "epoch", "step", "state_dict", "best", "optimizer", "scheduler", "history", "rng")


# ------------------------------------------------------------------------------------------------ RNG
def rng_state(device: torch.device | None = None) -> dict:
    np_state = np.random.get_state(legacy=False)
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
        "has_gauss": int(n["has_gauss"]),
        "gauss": float(n["gauss"]),
    })


def _as_tuple(x):
    if isinstance(x, (list, tuple)):
        return tuple(_as_tuple(v) for v in x)
    return x


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# ------------------------------------------------------------------------------------------------ file
def save_resume(path: str | Path, state: dict) -> None:
    atomic_write(path, serialize({"format": FORMAT, "torch": str(torch.__version__), **state}))


def load_resume(path: str | Path, fingerprint: dict) -> dict:
    """Read and check a resume file; raise EdgecError when it is missing, damaged or from another run."""
    path = Path(path)
    if not path.exists():
        raise EdgecError(f"cannot resume: no resume file at {path} (run without --resume to start from the beginning)")
    obj = read_data(path, what="resume")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise EdgecError(f"{path} is not an edgec resume file (format {found!r}, expected {FORMAT})")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise EdgecError(f"{path} is a damaged resume file (missing {', '.join(missing)})")
    diffs = fingerprint_diff(obj["fingerprint"], fingerprint)
    if diffs:
        raise EdgecError(
            f"cannot resume from {path}: it was written by a different run ({'; '.join(diffs)}); "
            "rerun with the original model, data and options, or without --resume to start over"
        )
    return obj


def fingerprint_diff(saved: dict, now: dict) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a != b:
            out.append(f"{key}: {_short(a)} in the file, {_short(b)} now")
    return out


def _short(v) -> str:
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12] + "…"
    return repr(v)
