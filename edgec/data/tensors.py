"""Tensor files: ``.pt`` (loaded weights-only), ``.npz`` (no pickles) and ``.safetensors``.

Keys ``inputs``/``targets`` (train), optional ``val_*``/``test_*`` and ``classes``; the target dtype decides the
task (integer: classification, floating: regression). See docs/architecture.md#data-and-imports.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct

import numpy as np
import torch
from safetensors.torch import load as st_load

from edgec.core.errors import EdgecError
from edgec.core.limits import load_json
from edgec.data.bundle import (
    DataBundle,
    TensorPairDataset,
    check_class_ids,
    check_plain_tensor,
    random_split_indices,
)

TENSOR_SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")
KNOWN_KEYS = {"inputs", "targets", "val_inputs", "val_targets", "test_inputs", "test_targets", "classes"}
PREFIX = {"train": "", "val": "val_", "test": "test_"}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own header limit


def _unpickle_reason(msg: str) -> str:
    for line in msg.splitlines():
        line = line.strip()
        if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line:
            return line.rstrip(".")
    return msg.strip().splitlines()[0] if msg.strip() else "unreadable"


def _read_pt(path: str, raw: bytes) -> tuple[dict, list | None]:
    try:
        obj = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        reason = _unpickle_reason(str(e))
        if "GLOBAL" in reason:
            raise EdgecError(
                f"{path}: refused to load an unsafe pickle ({reason}); a data file may hold only "
                "tensors, numbers, strings and plain containers"
            ) from None
        raise EdgecError(f"{path}: not a readable torch.save file ({reason})") from None
    except Exception as e:  # truncated zip, empty file, ...
        raise EdgecError(f"{path}: not a readable torch.save file ({type(e).__name__}: {e})".splitlines()[0]) from None
    if not isinstance(obj, dict):
        raise EdgecError(f"{path}: expected a dict with 'inputs' and 'targets' (or 'input_ids_train'), found a {type(obj).__name__}")
    classes = obj.get("classes")
    tensors = {}
    for k, v in obj.items():
        if k == "classes":
            continue
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        tensors[k] = v
    return tensors, classes


def _read_npz(path: str, raw: bytes) -> tuple[dict, list | None]:
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise EdgecError(
                f"{path}: refused to load an unsafe pickled (object) array; store numbers and fixed-width strings only"
            ) from None
        raise EdgecError(f"{path}: not a readable .npz file ({e})".splitlines()[0]) from None
    except Exception as e:
        raise EdgecError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})".splitlines()[0]) from None
    classes = None
    if "classes" in arrays:
        c = arrays.pop("classes")
        if not isinstance(c, np.ndarray):
            raise EdgecError(f"{path}: member 'classes' is not a .npy array (a pickle or other bytes)")
        if c.dtype.kind not in "US" or c.ndim != 1:
            raise EdgecError(f"{path}: 'classes' must be a 1-D string array, found dtype {c.dtype} shape {c.shape}")
        classes = [x.decode() if isinstance(x, bytes) else str(x) for x in c.tolist()]
    tensors = {}
    for k, a in arrays.items():
        if not isinstance(a, np.ndarray):  # np.load hands back the raw bytes of a member that is not .npy
            raise EdgecError(f"{path}: member '{k}' is not a .npy array (a pickle or other bytes); store arrays only")
        if a.dtype.kind not in "biuf":
            raise EdgecError(f"{path}: array '{k}' has unsupported dtype {a.dtype}")
        tensors[k] = torch.from_numpy(np.ascontiguousarray(a))
    return tensors, classes


def _read_safetensors(path: str, raw: bytes) -> tuple[dict, list | None]:
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = load_json(raw[8 : 8 + n], f"{path}: the safetensors header", max_bytes=MAX_HEADER)
        if not isinstance(header, dict):
            raise EdgecError(f"{path}: the safetensors header is not a JSON object")
        tensors = dict(st_load(raw))
    except EdgecError:
        raise
    except Exception as e:
        raise EdgecError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})".splitlines()[0]) from None
    classes = None
    meta = header.get("__metadata__") or {}
    if "classes" in meta:
        text = meta["classes"]
        if not isinstance(text, str):
            raise EdgecError(f"{path}: metadata 'classes' must be a string (a JSON list or comma-separated names)")
        try:
            classes = load_json(text, f"{path}: metadata 'classes'") if text.lstrip().startswith("[") else None
        except EdgecError:
            classes = None
        if classes is None:
            classes = [c.strip() for c in text.split(",")]
    return tensors, classes


def _check_classes(path: str, classes) -> list[str] | None:
    if classes is None:
        return None
    if isinstance(classes, tuple):
        classes = list(classes)
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or not classes:
        raise EdgecError(f"{path}: 'classes' must be a non-empty list of strings")
    if len(set(classes)) != len(classes):
        raise EdgecError(f"{path}: 'classes' has duplicate names")
    return classes


def _widen_unsigned(t: torch.Tensor, where: str) -> torch.Tensor:
    """uint16/32/64 as int64 (torch has few kernels for them; ids and labels fit int64 or are not ids)."""
    if t.dtype not in (torch.uint16, torch.uint32, torch.uint64):
        return t
    a = t.numpy()
    if a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise EdgecError(f"{where} holds {t.dtype} values beyond the int64 range (max {int(a.max())})")
    return torch.from_numpy(a.astype(np.int64))


def _split_tensors(path: str, tensors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    for k, v in list(tensors.items()):
        if k in KNOWN_KEYS and not isinstance(v, torch.Tensor):
            raise EdgecError(f"{path}: '{k}' must be a tensor, found {type(v).__name__}")
        if k in KNOWN_KEYS:
            check_plain_tensor(v, f"{path}: '{k}'")
            tensors[k] = _widen_unsigned(v, f"{path}: '{k}'")
    if "inputs" not in tensors or "targets" not in tensors:
        found = ", ".join(sorted(tensors)) or "nothing"
        raise EdgecError(f"{path}: needs 'inputs' and 'targets' (found: {found})")
    out = {}
    for split, p in PREFIX.items():
        xi, yi = f"{p}inputs", f"{p}targets"
        if (xi in tensors) != (yi in tensors):
            have, miss = (xi, yi) if xi in tensors else (yi, xi)
            raise EdgecError(f"{path}: has '{have}' but not '{miss}'")
        if xi not in tensors:
            continue
        x, y = tensors[xi], tensors[yi]
        if x.ndim == 0 or y.ndim == 0:
            raise EdgecError(f"{path}: '{xi}' and '{yi}' need a leading example axis (found scalars)")
        if len(x) != len(y):
            raise EdgecError(f"{path}: '{xi}' has {len(x)} examples but '{yi}' has {len(y)}")
        if len(x) == 0:
            raise EdgecError(f"{path}: the {split} split ('{xi}') is empty")
        if x.dtype == torch.bool or x.is_complex():
            raise EdgecError(f"{path}: '{xi}' has unsupported dtype {x.dtype}")
        if x.is_floating_point():
            bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise EdgecError(f"{path}: '{xi}' has NaN/Inf values (first in example {i}, {int(bad.sum())} examples in all)")
            x = x.to(torch.float32)
        if y.dtype == torch.bool or y.is_complex():
            raise EdgecError(f"{path}: '{yi}' has unsupported dtype {y.dtype} (use int64 class ids or float values)")
        out[split] = (x.contiguous(), y.contiguous())
    shapes = {s: tuple(x.shape[1:]) for s, (x, _) in out.items()}
    if len(set(shapes.values())) > 1:
        raise EdgecError(f"{path}: input shapes differ between splits: {shapes}")
    kinds = {s: y.is_floating_point() for s, (_, y) in out.items()}
    if len(set(kinds.values())) > 1:
        desc = ", ".join(f"{s} {out[s][1].dtype}" for s in out)
        raise EdgecError(f"{path}: target dtypes mix integer and float across splits ({desc})")
    return out


def read_tensor_file(path: str) -> tuple[dict, list | None, bytes]:
    """``(tensors by key, the 'classes' entry or None, the file's bytes)`` of a .pt (weights-only), .npz (no
    pickles) or .safetensors file; values are checked by the loader that uses them."""
    if not os.path.isfile(path):
        raise EdgecError(f"{path}: no such data file")
    suffix = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        raw = f.read()
    if suffix in (".pt", ".pth"):
        tensors, classes = _read_pt(path, raw)
    elif suffix == ".npz":
        tensors, classes = _read_npz(path, raw)
    elif suffix == ".safetensors":
        tensors, classes = _read_safetensors(path, raw)
    else:
        raise EdgecError(f"{path}: unknown tensor file type '{suffix}' (expected {', '.join(TENSOR_SUFFIXES)})")
    return tensors, classes, raw


def load_tensor_file(path: str, *, val_fraction: float = 0.2, seed: int = 0, loaded: tuple | None = None) -> DataBundle:
    """The bundle of a tensor file; ``loaded``: what ``read_tensor_file(path)`` returned (not read again)."""
    tensors, classes, raw = loaded if loaded is not None else read_tensor_file(path)
    suffix = os.path.splitext(path)[1].lower()
    classes = _check_classes(path, classes)
    parts = _split_tensors(path, tensors)

    regression = parts["train"][1].is_floating_point()
    notes = []
    if regression:
        task = "regression"
        for s, (x, y) in parts.items():
            if y.ndim > 2:
                raise EdgecError(f"{path}: regression targets must be (N,) or (N, k), '{PREFIX[s]}targets' is {tuple(y.shape)}")
            if not bool(torch.isfinite(y).all()):
                raise EdgecError(f"{path}: '{PREFIX[s]}targets' has NaN/Inf values")
            parts[s] = (x, y.to(torch.float32))
        target_dim = 1 if parts["train"][1].ndim == 1 else int(parts["train"][1].shape[1])
        if classes is not None:
            raise EdgecError(f"{path}: has 'classes' but float (regression) targets; use integer class ids")
        num_classes = None
    else:
        task = "classification"
        target_dim = 1
        for s, (x, y) in parts.items():
            if y.ndim != 1:
                raise EdgecError(f"{path}: class targets must be 1-D, '{PREFIX[s]}targets' is {tuple(y.shape)}")
            if int(y.min()) < 0:
                raise EdgecError(f"{path}: '{PREFIX[s]}targets' has negative class ids (min {int(y.min())})")
            parts[s] = (x, y.to(torch.int64))
        top = max(int(y.max()) for _, y in parts.values())
        if classes is None:
            check_class_ids(top, path)
        if classes is not None:
            if top >= len(classes):
                raise EdgecError(f"{path}: class id {top} is out of range for the {len(classes)} names in 'classes'")
        else:
            classes = [str(i) for i in range(top + 1)]
        num_classes = len(classes)

    h = hashlib.sha256()
    h.update(b"edgec-data/tensors/v1\0")
    h.update(raw)
    splits = {}
    x, y = parts["train"]
    if "val" in parts:
        splits["train"] = TensorPairDataset(x, y)
        splits["val"] = TensorPairDataset(*parts["val"])
    else:
        tr, va = random_split_indices(len(y), val_fraction, seed)
        h.update(json.dumps({"val_fraction": val_fraction, "seed": seed}).encode())
        splits["train"] = TensorPairDataset(x[tr], y[tr])
        if va:
            splits["val"] = TensorPairDataset(x[va], y[va])
            notes.append(f"val: random {val_fraction:g} of train (seed {seed})")
    if "test" in parts:
        splits["test"] = TensorPairDataset(*parts["test"])
    ignored = sorted(set(tensors) - KNOWN_KEYS)
    if ignored:
        notes.append(f"ignored keys: {', '.join(ignored)}")
    return DataBundle(
        task=task,
        classes=classes if task == "classification" else None,
        num_classes=num_classes,
        splits=splits,
        digest=h.hexdigest(),
        source=path,
        kind="tensor file",
        meta={"format": suffix.lstrip("."), "target_dim": target_dim, "notes": notes},
    )
