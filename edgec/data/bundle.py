"""The DataBundle every loader returns, and the small datasets and split helpers they share."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, Subset

from edgec.core.errors import EdgecError

SPLIT_NAMES = ("train", "val", "test")


class TensorPairDataset(Dataset):
    """Items ``(inputs[i], targets[i])`` from two aligned tensors."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        if len(inputs) != len(targets):
            raise ValueError("inputs and targets differ in length")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.inputs[i], self.targets[i]


class TargetCastDataset(Dataset):
    """Wraps a user dataset so targets come out as int64 (classification) or float32 (regression) tensors."""

    def __init__(self, base: Dataset, task: str):
        self.base = base
        self.task = task

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        x = torch.as_tensor(x)
        dtype = torch.int64 if self.task == "classification" else torch.float32
        return x, torch.as_tensor(y).to(dtype)


def random_split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) index lists; val gets round(n * val_fraction) items (at least 1, and
    train keeps at least 1) when val_fraction > 0 and n >= 2, else nothing."""
    if not 0.0 <= val_fraction < 1.0:
        raise EdgecError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g).tolist()
    val = sorted(perm[:n_val])
    train = sorted(perm[n_val:])
    return train, val


def split_dataset(ds: Dataset, val_fraction: float, seed: int) -> dict[str, Dataset]:
    train, val = random_split_indices(len(ds), val_fraction, seed)
    out = {"train": Subset(ds, train)}
    if val:
        out["val"] = Subset(ds, val)
    return out


@dataclass
class DataBundle:
    """What `load_data` returns.

    task: "classification" | "regression"; classes: class names (classification) else None;
    num_classes: len(classes) for classification, None for regression (see `output_dim`);
    splits: {"train"|"val"|"test": Dataset of (input_tensor, target)}; digest: sha256 hex of the data
    (file contents + feature params + split params); meta: plain-data details for provenance.
    """

    task: str
    classes: list[str] | None
    num_classes: int | None
    splits: dict[str, Dataset]
    digest: str
    source: str = ""
    kind: str = ""
    meta: dict = field(default_factory=dict)

    def split(self, name: str) -> Dataset:
        if name not in SPLIT_NAMES:
            raise EdgecError(f"unknown split '{name}' (expected one of {', '.join(SPLIT_NAMES)})")
        ds = self.splits.get(name)
        have = ", ".join(f"{k} ({len(v)})" for k, v in self.splits.items()) or "none"
        if ds is None:
            raise EdgecError(f"data {self.source} has no '{name}' split (it has: {have})")
        if len(ds) == 0:
            raise EdgecError(f"data {self.source}: the '{name}' split is empty (it has: {have})")
        return ds

    def has_split(self, name: str) -> bool:
        return name in self.splits and len(self.splits[name]) > 0

    @property
    def output_dim(self) -> int:
        """Width of the model output: num_classes, or the target width for regression."""
        if self.task == "classification":
            return int(self.num_classes)
        return int(self.meta.get("target_dim", 1))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input (no batch axis), from the first non-empty split."""
        for ds in self.splits.values():
            if len(ds):
                return tuple(torch.as_tensor(ds[0][0]).shape)
        return ()

    @property
    def input_dtype(self) -> torch.dtype | None:
        for ds in self.splits.values():
            if len(ds):
                return torch.as_tensor(ds[0][0]).dtype
        return None

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        dtype = str(self.input_dtype).replace("torch.", "") if self.input_dtype is not None else "?"
        if self.task == "classification":
            names = self.classes or []
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            task = f"classification, {self.num_classes} classes [{shown}]"
        else:
            task = f"regression, {self.output_dim} target(s)"
        lines = [
            f"{self.kind or 'data'} {self.source}: {task}",
            f"  splits: {sizes}",
            f"  input: {tuple(self.input_shape)} {dtype}",
        ]
        for note in self.meta.get("notes", []):
            lines.append(f"  {note}")
        lines.append(f"  digest: {self.digest[:16]}")
        return "\n".join(lines)
