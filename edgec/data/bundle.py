"""The DataBundle every loader returns, and the small datasets and split helpers they share."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, Subset

from edgec.core.errors import EdgecError

SPLIT_NAMES = ("train", "val", "test")
# Without class names a classifier has max id + 1 classes: an id beyond this is a corrupt label, and naming
# every class up to it would allocate a list that long.
MAX_CLASSES = 1_000_000


def check_class_ids(top: int, where: str) -> None:
    """Refuse a class id too large to be one (see MAX_CLASSES)."""
    if top >= MAX_CLASSES:
        raise EdgecError(f"{where}: class id {top} is not plausible (more than {MAX_CLASSES} classes); "
                         "targets must be class ids 0..C-1")


def check_plain_tensor(t: torch.Tensor, where: str) -> None:
    """Data tensors are dense and hold their values: a sparse, quantized or meta tensor (no data), or an
    expanded view claiming more elements than its storage holds, is refused."""
    if t.layout != torch.strided:
        raise EdgecError(f"{where} is a {str(t.layout).replace('torch.', '')} tensor; store a dense tensor")
    if t.is_meta or t.device.type != "cpu":
        raise EdgecError(f"{where} is on device '{t.device.type}' (no data); store a CPU tensor")
    if t.is_quantized:
        raise EdgecError(f"{where} is a quantized tensor; store plain numbers")
    stored = t.untyped_storage().nbytes() // max(t.element_size(), 1)
    if t.numel() > stored:  # an expanded view (stride 0): copying it would allocate every repeated element
        raise EdgecError(f"{where} is a view of {t.numel()} elements over a storage of {stored}; store the values")


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
    """Wraps a user dataset so targets come out as int64 (classification) or float32 (regression) tensors, and
    for causal LMs inputs and targets both as int64 token ids."""

    def __init__(self, base: Dataset, task: str):
        self.base = base
        self.task = task

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        x = torch.as_tensor(x)
        if self.task == "causal_lm":
            return x.to(torch.int64), torch.as_tensor(y).to(torch.int64)
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

    task: "classification" | "regression" | "causal_lm" | "detection"; classes: class names (classification) else None;
    num_classes: len(classes) for classification and detection, else None (see `output_dim`);
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
        """Width of the model output: num_classes, the vocabulary for causal LMs, or the target width for
        regression."""
        if self.task in ("classification", "detection"):
            return int(self.num_classes)
        if self.task == "causal_lm":
            return int(self.meta["vocab_size"])
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
        elif self.task == "causal_lm":
            task = f"causal language modelling, vocabulary {self.meta.get('vocab_size', '?')}, blocks of " \
                   f"{self.meta.get('block_size', '?')} tokens"
            tokens, nbytes = self.meta.get("tokens", {}), self.meta.get("bytes", {})
            sizes = ", ".join(f"{k} {len(v)} blocks ({tokens.get(k, '?'):,} tokens"
                              + (f", {nbytes[k]:,} bytes" if k in nbytes else "") + ")" for k, v in self.splits.items())
        elif self.task == "detection":
            task = f"detection, {self.num_classes} classes [{', '.join((self.classes or [])[:8])}" \
                   f"{', ...' if len(self.classes or []) > 8 else ''}], at most {self.meta.get('max_objects', '?')} " \
                   "objects per image"
            objects = self.meta.get("objects", {})
            sizes = ", ".join(f"{k} {len(v)} images ({objects.get(k, '?')} objects)" for k, v in self.splits.items())
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


def check_fits(bundle: DataBundle, spec, who: str = "the model") -> None:
    """Refuse data whose items cannot feed the first input of ``spec`` (an ``edgec.core.spec.InputSpec``), by
    the rule ``edgec eval`` applies: the same number of axes after the batch axis, every fixed size equal,
    every dynamic size within its bounds, and integer data for token-id inputs. A model that happens to run on
    other sizes (adaptive pooling) would train on data its export refuses."""
    if not spec.inputs:
        return
    first = spec.inputs[0]
    dims, shape = list(first.dims)[1:], tuple(int(s) for s in bundle.input_shape)
    want = "[" + ", ".join(str(d) if isinstance(d, int) else f"{d.name}" for d in first.dims) + "]"
    where = f"data {bundle.source} does not fit {who}: each item has shape {list(shape)} but its input " \
            f"'{first.name}' is {want}"
    if len(shape) != len(dims):
        raise EdgecError(f"{where} ({len(dims)} axes after the batch axis, the data has {len(shape)})")
    for axis, (got, dim) in enumerate(zip(shape, dims), start=1):
        if isinstance(dim, int) and got != dim:
            raise EdgecError(f"{where} (axis {axis}: the data has {got}, the model needs {dim})")
        if not isinstance(dim, int) and bundle.task == "causal_lm" and got > dim.max:
            raise EdgecError(f"data {bundle.source} has blocks of {got} tokens but {who} takes at most {dim.max} "
                             f"positions (its max_position_embeddings); use a block size of at most {dim.max}")
        if not isinstance(dim, int) and not dim.min <= got <= dim.max:
            raise EdgecError(f"{where} (axis {axis} '{dim.name}' must be in [{dim.min}, {dim.max}], the data has {got})")
    dtype = bundle.input_dtype
    if str(first.dtype).startswith("int") and dtype is not None and (dtype.is_floating_point or dtype.is_complex):
        raise EdgecError(f"data {bundle.source} does not fit {who}: its input '{first.name}' takes {first.dtype} "
                         f"token ids but the data items are {str(dtype).replace('torch.', '')}")
