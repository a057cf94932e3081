"""Python entry points: ``package.module:function`` returning a Dataset, a dict of splits or a ``DataBundle``.

Lets users feed their own data without writing files. Accepted return values and how splits, classes and
the task are derived: see docs/architecture.md#data-and-imports.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import sys

import numpy as np
import torch
from torch.utils.data import Dataset

from edgec.core.errors import EdgecError
from edgec.data.bundle import DataBundle, TargetCastDataset, check_class_ids, check_plain_tensor, split_dataset

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
    except (Exception, SystemExit) as e:  # a module that calls exit() on import is bad input, not our exit
        raise EdgecError(f"data entry point {source}: cannot import '{mod_name}' ({type(e).__name__}: {e})".splitlines()[0]) from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise EdgecError(f"data entry point {source}: module '{mod_name}' has no attribute '{fn_name}'")
    if not (inspect.isfunction(fn) or inspect.ismethod(fn) or (isinstance(fn, type) and issubclass(fn, Dataset))):
        # builtins and other callables (exit, input, print) are not data functions: calling them would exit,
        # block or print rather than return data
        raise EdgecError(f"data entry point {source}: '{fn_name}' is a {type(fn).__name__}, not a function "
                         "returning data (builtins such as exit or input are refused)")
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
    check_plain_tensor(x, f"data entry point {source}: {split} item {i} input")
    check_plain_tensor(y, f"data entry point {source}: {split} item {i} target")
    return x, y


def _call(source: str):
    fn = _resolve(source)
    try:
        return fn()
    except EdgecError:
        raise
    except (Exception, SystemExit) as e:
        raise EdgecError(f"data entry point {source} raised {type(e).__name__}: {e}".splitlines()[0]) from None


def _dataset_splits(result: Dataset, val_fraction: float, seed: int, notes: list) -> dict:
    raw_splits = split_dataset(result, val_fraction, seed)
    if "val" in raw_splits:
        notes.append(f"val: random {val_fraction:g} of the dataset (seed {seed})")
    return raw_splits


def _dict_splits(source: str, result: dict, val_fraction: float, seed: int, notes: list) -> dict:
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
    return raw_splits


def _splits_classes_task(source: str, result, val_fraction: float, seed: int, notes: list) -> tuple[dict, list | None, str | None]:
    """The returned dataset(s) as ``(splits, classes, task)`` (class names and task when given)."""
    if isinstance(result, Dataset):
        if not hasattr(result, "__len__"):
            raise EdgecError(f"data entry point {source}: the dataset has no __len__ (iterable datasets are not supported)")
        classes, task = getattr(result, "classes", None), None
        raw_splits = _dataset_splits(result, val_fraction, seed, notes)
    elif isinstance(result, dict):
        raw_splits = _dict_splits(source, result, val_fraction, seed, notes)
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
    return raw_splits, classes, task


class _Scan:
    """One pass over every item: check it, infer the task (float targets: regression), and hash it."""

    def __init__(self, source: str, val_fraction: float, seed: int):
        self.source = source
        self.h = hashlib.sha256()
        self.h.update(b"edgec-data/entry/v1\0" + source.encode())
        self.h.update(json.dumps({"val_fraction": val_fraction, "seed": seed}).encode())
        self.is_float = None
        self.top = -1
        self.shape = None
        self.target_dim = 1

    def split(self, split: str, ds) -> None:
        if len(ds) == 0:
            raise EdgecError(f"data entry point {self.source}: the {split} split is empty")
        self.h.update(f"\0{split}:{len(ds)}".encode())
        for i in range(len(ds)):
            x, y = _item_target(self.source, split, i, ds[i])
            self._check_input(split, i, x)
            self._check_target(split, i, y)
            self.h.update(np.ascontiguousarray(x.detach().cpu().numpy()).tobytes())
            self.h.update(np.ascontiguousarray(y.detach().cpu().numpy()).tobytes())

    def _check_input(self, split: str, i: int, x: torch.Tensor) -> None:
        source = self.source
        if self.shape is None:
            self.shape = tuple(x.shape)
        elif tuple(x.shape) != self.shape:
            raise EdgecError(f"data entry point {source}: {split} item {i} has input shape {tuple(x.shape)}, the first had {self.shape}")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise EdgecError(f"data entry point {source}: {split} item {i} has NaN/Inf inputs")

    def _check_target(self, split: str, i: int, y: torch.Tensor) -> None:
        source = self.source
        fl = y.is_floating_point()
        if self.is_float is None:
            self.is_float = fl
            self.target_dim = 1 if y.ndim == 0 else int(y.numel())
        elif fl != self.is_float:
            raise EdgecError(f"data entry point {source}: {split} item {i} target is {y.dtype}, earlier targets were {'float' if self.is_float else 'integer'}")
        if not fl:
            if y.ndim != 0:
                raise EdgecError(f"data entry point {source}: {split} item {i} class target must be a scalar, found shape {tuple(y.shape)}")
            if int(y) < 0:
                raise EdgecError(f"data entry point {source}: {split} item {i} has a negative class id {int(y)}")
            self.top = max(self.top, int(y))
        elif not bool(torch.isfinite(y).all()):
            raise EdgecError(f"data entry point {source}: {split} item {i} has a NaN/Inf target")


def _task_and_classes(source: str, task: str | None, classes: list | None, scan: _Scan) -> tuple[str, list | None, int | None]:
    """``(task, classes, num_classes)``: the given task checked against the targets, else the inferred one."""
    inferred = "regression" if scan.is_float else "classification"
    if task is None:
        task = inferred
    elif task not in ("classification", "regression"):
        raise EdgecError(f"data entry point {source}: task must be 'classification' or 'regression', not {task!r}")
    elif task == "classification" and scan.is_float:
        raise EdgecError(f"data entry point {source}: task is classification but targets are floating point")
    if task != "classification":
        return task, None, None
    if classes is None:
        check_class_ids(scan.top, f"data entry point {source}")
        classes = [str(i) for i in range(scan.top + 1)]
    elif scan.top >= len(classes):
        raise EdgecError(f"data entry point {source}: class id {scan.top} is out of range for {len(classes)} classes")
    return task, classes, len(classes)


def load_entry_point(source: str, *, val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    result = _call(source)
    if isinstance(result, DataBundle):
        return result
    notes = []
    raw_splits, classes, task = _splits_classes_task(source, result, val_fraction, seed, notes)
    scan = _Scan(source, val_fraction, seed)
    for split, ds in raw_splits.items():
        scan.split(split, ds)
    task, classes, num_classes = _task_and_classes(source, task, classes, scan)
    splits = {k: TargetCastDataset(v, task) for k, v in raw_splits.items()}
    return DataBundle(
        task=task,
        classes=classes,
        num_classes=num_classes,
        splits=splits,
        digest=scan.h.hexdigest(),
        source=source,
        kind="entry point",
        meta={"target_dim": scan.target_dim, "notes": notes},
    )
