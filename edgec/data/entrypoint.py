"""Python entry points: ``package.module:function``.

The function is called with no arguments and returns one of
* a ``torch.utils.data.Dataset`` -> split into train/val with ``val_fraction`` and ``seed``;
* a dict ``{"train": Dataset, "val": Dataset, "test": Dataset}`` (train required), optionally with
  ``"classes"`` (list of str) and ``"task"`` ("classification" | "regression");
* an ``edgec.data.DataBundle``, returned unchanged.
Class names may also come from a ``classes`` attribute of the (train) dataset. Items must be
``(input, target)``; integer targets mean classification, floating targets regression. The current
directory is importable (like ``python -m``). The digest hashes every item's bytes, so loading
iterates the whole dataset once (fine for the small sets edgec fine-tunes on).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import sys

import numpy as np
import torch
from torch.utils.data import Dataset

from edgec.data.bundle import DataBundle, TargetCastDataset, split_dataset
from edgec.core.errors import EdgecError

ENTRY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def is_entry_point(source: str) -> bool:
    return bool(ENTRY_RE.match(source))


def _resolve(source: str):
    mod_name, fn_name = source.split(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:
        raise EdgecError(f"data entry point {source}: cannot import '{mod_name}' ({type(e).__name__}: {e})".splitlines()[0]) from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise EdgecError(f"data entry point {source}: module '{mod_name}' has no attribute '{fn_name}'")
    if not callable(fn):
        raise EdgecError(f"data entry point {source}: '{fn_name}' is a {type(fn).__name__}, not a function")
    return fn


def _item_target(source: str, split: str, i: int, item):
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise EdgecError(f"data entry point {source}: {split} item {i} is a {type(item).__name__}, expected (input, target)")
    x, y = item
    try:
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
    except Exception as e:
        raise EdgecError(f"data entry point {source}: {split} item {i} is not tensor-like ({type(e).__name__}: {e})".splitlines()[0]) from None
    return x, y


def load_entry_point(source: str, *, val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    fn = _resolve(source)
    try:
        result = fn()
    except EdgecError:
        raise
    except Exception as e:
        raise EdgecError(f"data entry point {source} raised {type(e).__name__}: {e}".splitlines()[0]) from None
    if isinstance(result, DataBundle):
        return result

    classes = None
    task = None
    notes = []
    if isinstance(result, Dataset):
        if not hasattr(result, "__len__"):
            raise EdgecError(f"data entry point {source}: the dataset has no __len__ (iterable datasets are not supported)")
        classes = getattr(result, "classes", None)
        raw_splits = split_dataset(result, val_fraction, seed)
        if "val" in raw_splits:
            notes.append(f"val: random {val_fraction:g} of the dataset (seed {seed})")
    elif isinstance(result, dict):
        extra = set(result) - {"train", "val", "test", "classes", "task"}
        if extra:
            raise EdgecError(f"data entry point {source}: unexpected keys {sorted(extra)} (expected train, val, test, classes, task)")
        if "train" not in result:
            raise EdgecError(f"data entry point {source}: the returned dict has no 'train' dataset")
        raw_splits = {}
        for k in ("train", "val", "test"):
            if k in result:
                ds = result[k]
                if not isinstance(ds, Dataset) or not hasattr(ds, "__len__"):
                    raise EdgecError(f"data entry point {source}: '{k}' is a {type(ds).__name__}, not a map-style torch Dataset")
                raw_splits[k] = ds
        if "val" not in raw_splits:
            raw_splits.update(split_dataset(raw_splits["train"], val_fraction, seed))
            if "val" in raw_splits:
                notes.append(f"val: random {val_fraction:g} of train (seed {seed})")
        classes = result.get("classes", getattr(result["train"], "classes", None))
        task = result.get("task")
    else:
        raise EdgecError(
            f"data entry point {source} returned a {type(result).__name__}; expected a torch Dataset or a dict of Datasets"
        )
    if classes is not None:
        classes = list(classes)
        if not classes or not all(isinstance(c, str) for c in classes):
            raise EdgecError(f"data entry point {source}: 'classes' must be a non-empty list of strings")

    # one pass over every item: check, infer the task, hash.
    h = hashlib.sha256()
    h.update(b"edgec-data/entry/v1\0" + source.encode())
    h.update(json.dumps({"val_fraction": val_fraction, "seed": seed}).encode())
    is_float = None
    top = -1
    shape = None
    target_dim = 1
    for split, ds in raw_splits.items():
        if len(ds) == 0:
            raise EdgecError(f"data entry point {source}: the {split} split is empty")
        h.update(f"\0{split}:{len(ds)}".encode())
        for i in range(len(ds)):
            x, y = _item_target(source, split, i, ds[i])
            if shape is None:
                shape = tuple(x.shape)
            elif tuple(x.shape) != shape:
                raise EdgecError(f"data entry point {source}: {split} item {i} has input shape {tuple(x.shape)}, the first had {shape}")
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise EdgecError(f"data entry point {source}: {split} item {i} has NaN/Inf inputs")
            fl = y.is_floating_point()
            if is_float is None:
                is_float = fl
                target_dim = 1 if y.ndim == 0 else int(y.numel())
            elif fl != is_float:
                raise EdgecError(f"data entry point {source}: {split} item {i} target is {y.dtype}, earlier targets were {'float' if is_float else 'integer'}")
            if not fl:
                if y.ndim != 0:
                    raise EdgecError(f"data entry point {source}: {split} item {i} class target must be a scalar, found shape {tuple(y.shape)}")
                if int(y) < 0:
                    raise EdgecError(f"data entry point {source}: {split} item {i} has a negative class id {int(y)}")
                top = max(top, int(y))
            elif not bool(torch.isfinite(y).all()):
                raise EdgecError(f"data entry point {source}: {split} item {i} has a NaN/Inf target")
            h.update(np.ascontiguousarray(x.detach().cpu().numpy()).tobytes())
            h.update(np.ascontiguousarray(y.detach().cpu().numpy()).tobytes())

    inferred = "regression" if is_float else "classification"
    if task is None:
        task = inferred
    elif task not in ("classification", "regression"):
        raise EdgecError(f"data entry point {source}: task must be 'classification' or 'regression', not {task!r}")
    elif task == "classification" and is_float:
        raise EdgecError(f"data entry point {source}: task is classification but targets are floating point")
    if task == "classification":
        if classes is None:
            classes = [str(i) for i in range(top + 1)]
        elif top >= len(classes):
            raise EdgecError(f"data entry point {source}: class id {top} is out of range for {len(classes)} classes")
        num_classes = len(classes)
    else:
        classes, num_classes = None, None
    splits = {k: TargetCastDataset(v, task) for k, v in raw_splits.items()}
    return DataBundle(
        task=task,
        classes=classes,
        num_classes=num_classes,
        splits=splits,
        digest=h.hexdigest(),
        source=source,
        kind="entry point",
        meta={"target_dim": target_dim, "notes": notes},
    )
