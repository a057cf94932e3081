"""`edgec eval`: one evaluation protocol for every artifact. Checkpoints at any pipeline stage and exported
ONNX files are scored on the same split, in the same batches, with the same metrics (``edgec.core.metrics``)
and the same onnxruntime latency measurement, so their rows compare fairly. The protocol's rules:
docs/methods.md#metrics.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from edgec.core.detection_metrics import detection_metrics, postprocess, targets_from_items
from edgec.core.errors import EdgecError
from edgec.core.graph import Model
from edgec.core.metrics import classification_metrics, regression_metrics
from edgec.data import load_data
from edgec.data.bundle import TensorPairDataset
from edgec.models.checkpoint import load_checkpoint
from edgec.onnx.export import read_provenance, to_onnx
from edgec.onnx.reader import parse_onnx, read_onnx
from edgec.onnx.session import create_session, machine_key, measure_session

DEFAULT_BATCH_SIZE = 64


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class InputInfo:
    """One model input as eval sees it: name, dims (int = static, str = named dynamic axis), dtype and
    (for inputs other than the first) how to fill it."""

    name: str
    dims: list  # int | str | None per axis
    dtype: str = "float32"
    fill: str | None = None  # "ones" | "zeros" | None (not fillable)
    bounds: list = field(default_factory=list)  # (min, max) per axis for dynamic axes, None when unknown


def _fill_for(name: str, ones_flag: bool = False) -> str | None:
    lower = name.lower()
    if ones_flag or "mask" in lower:
        return "ones"
    if lower == "position_ids":  # a KV-cache decoder (edgec export --kv-cache): positions 0..S-1, empty past
        return "positions"
    if lower.startswith(("past_key_values", "past_key", "past_value")):
        return "empty"
    if "token_type" in lower or "segment" in lower:
        return "zeros"
    return None


def inputs_from_spec(spec) -> list[InputInfo]:
    out = []
    for t in spec.inputs:
        dims = [d if isinstance(d, int) else d.name for d in t.dims]
        bounds = [None if isinstance(d, int) else (d.min, d.max) for d in t.dims]
        out.append(InputInfo(t.name, dims, t.dtype, _fill_for(t.name, t.ones), bounds))
    return out


def inputs_from_onnx(proto, provenance: dict | None) -> list[InputInfo]:
    """Graph inputs (minus initializers); dim names from the edgec provenance spec when present."""
    initializers = {t.name for t in proto.graph.initializer}
    spec_inputs = {i["name"]: i for i in ((provenance or {}).get("spec") or {}).get("inputs", [])
                   if isinstance(i, dict) and "name" in i}
    out = []
    for vi in proto.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        dims = []
        for d in tt.shape.dim:
            dims.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None))
        known = spec_inputs.get(vi.name)
        if known and len(known.get("shape", [])) == len(dims):
            dims = [d if isinstance(d, int) else s for d, s in zip(dims, known["shape"])]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "float32"
        out.append(InputInfo(vi.name, dims, dtype, _fill_for(vi.name), [None] * len(dims)))
    return out


def _fmt_dims(dims) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"


def check_data_fits(inputs: list[InputInfo], item_shape: tuple, item_dtype: str, hints: dict | None = None) -> None:
    """Raise a one-line EdgecError when one data item (no batch axis) cannot feed the model's first input."""
    if not inputs:
        raise EdgecError("the model declares no inputs")
    first = inputs[0]
    model_dims = first.dims[1:]  # axis 0 is the batch
    bounds = first.bounds[1:] if first.bounds else [None] * len(model_dims)
    where = f"the model's input '{first.name}' is {_fmt_dims(first.dims)}"
    shape = tuple(int(s) for s in item_shape)
    if len(shape) != len(model_dims):
        raise EdgecError(f"data does not fit the model: each data item has shape {shape} ({len(shape)} axes) but "
                         f"{where}, i.e. {len(model_dims)} axes after the batch axis")
    for axis, (got, want, bound) in enumerate(zip(shape, model_dims, bounds), start=1):
        if isinstance(want, int) and got != want:
            hint = _hint(first, axis, want, hints or {})
            raise EdgecError(f"data does not fit the model: each data item has shape {shape} but {where} "
                             f"(axis {axis}: data has {got}, the model needs {want}){hint}")
        if not isinstance(want, int) and bound is not None and not bound[0] <= got <= bound[1]:
            raise EdgecError(f"data does not fit the model: each data item has shape {shape} but {where} "
                             f"(axis {axis} '{want}' must be in [{bound[0]}, {bound[1]}], data has {got})")
    model_int = first.dtype.startswith("int")
    data_int = item_dtype.startswith(("int", "uint")) or item_dtype == "bool"
    if model_int and not data_int:
        raise EdgecError(f"data does not fit the model: its input '{first.name}' takes {first.dtype} "
                         f"(token ids) but the data items are {item_dtype}")


def _hint(first: InputInfo, axis: int, want: int, hints: dict) -> str:
    n_mels = hints.get("n_mels")
    if n_mels is not None and want == n_mels and axis == len(first.dims) - 1:
        return f"; the model takes {want} mel bins: featurise the audio with n_mels={want} (--n-mels {want})"
    image = hints.get("image_size")
    if image is not None and axis >= len(first.dims) - 2:
        return f" (the model was built for {image}x{image} images)"
    if axis == 1 and len(first.dims) == 4:
        return " (input channels)"
    return ""


def build_feed(inputs: list[InputInfo], x: np.ndarray) -> dict[str, np.ndarray]:
    """``{name: array}`` for a batch ``x`` of the first input; other inputs filled from their fill rule."""
    first = inputs[0]
    feed = {first.name: np.ascontiguousarray(x.astype(first.dtype, copy=False))}
    named = {d: x.shape[i] for i, d in enumerate(first.dims) if isinstance(d, str)}
    named.setdefault("batch", x.shape[0])
    for info in inputs[1:]:
        if info.fill is None:
            raise EdgecError(f"the model takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); eval "
                             f"feeds the data to '{first.name}' and cannot make up '{info.name}'")
        if info.fill == "positions" and x.ndim == 2 and len(info.dims) == 2:
            feed[info.name] = np.ascontiguousarray(np.broadcast_to(np.arange(x.shape[1], dtype=info.dtype), x.shape))
            continue
        shape = []
        for i, d in enumerate(info.dims):
            if isinstance(d, int):
                shape.append(d)
            elif d in named:
                shape.append(named[d])
            elif info.fill == "empty" and d is not None and "past" in d:
                shape.append(0)  # no cached positions: the whole block is one prefill
            elif i < x.ndim and (i == 0 or len(info.dims) == x.ndim):
                shape.append(x.shape[i])  # unnamed/renamed dynamic axis: assume it follows the first input
            else:
                raise EdgecError(f"cannot tell the shape of the model's input '{info.name}' {_fmt_dims(info.dims)}")
        maker = np.ones if info.fill == "ones" else np.zeros
        feed[info.name] = maker(shape, dtype=info.dtype)
    return feed


# ---------------------------------------------------------------------------------------------- runners
class _TorchRunner:
    by = "torch"

    def __init__(self, model):
        self.model = model
        self.inputs = inputs_from_spec(model.spec)

    def __call__(self, feed: dict) -> np.ndarray:
        args = tuple(torch.from_numpy(feed[i.name]) for i in self.inputs)
        return self.model.run(args)[0].numpy()

    def detection(self, feed: dict) -> tuple[np.ndarray, np.ndarray]:
        """(logits, boxes): a detection model's two outputs."""
        args = tuple(torch.from_numpy(feed[i.name]) for i in self.inputs)
        out = self.model.run(args)
        if len(out) < 2:
            raise EdgecError(f"a detection model must output logits and boxes; {self.model.arch} outputs "
                             f"{len(out)} tensor(s)")
        return out[0].numpy(), out[1].numpy()


class _OrtRunner:
    by = "onnxruntime"

    def __init__(self, session, inputs: list[InputInfo]):
        self.session = session
        self.inputs = inputs
        outputs = [o.name for o in session.get_outputs()]
        self.output = "logits" if "logits" in outputs else outputs[0]

    def __call__(self, feed: dict) -> np.ndarray:
        return self._run([self.output], feed)[0]

    def detection(self, feed: dict) -> tuple[np.ndarray, np.ndarray]:
        """(logits, boxes): the outputs so named, else the first two."""
        names = [o.name for o in self.session.get_outputs()]
        if len(names) < 2:
            raise EdgecError(f"a detection model must output logits and boxes; the ONNX file has {len(names)} "
                             "output(s)")
        wanted = ["logits", "boxes"] if {"logits", "boxes"} <= set(names) else names[:2]
        logits, boxes = self._run(wanted, feed)
        return logits, boxes

    def _run(self, names: list, feed: dict) -> list:
        try:
            return self.session.run(names, feed)
        except Exception as exc:  # onnxruntime's own exception types
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise EdgecError(f"onnxruntime failed on the data: {msg}") from None


# ---------------------------------------------------------------------------------------------- data
def _item_dtype(x) -> str:
    return str(x.dtype).replace("torch.", "")


def iter_batches(dataset, batch_size: int):
    """Yield ``(inputs ndarray, targets ndarray)`` in dataset order."""
    if batch_size < 1:
        raise EdgecError(f"batch size must be >= 1, got {batch_size}")
    n = len(dataset)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        if isinstance(dataset, TensorPairDataset):
            x, y = dataset.inputs[start:stop], dataset.targets[start:stop]
        else:
            items = [dataset[i] for i in range(start, stop)]
            xs = [torch.as_tensor(a) for a, _ in items]
            if any(t.shape != xs[0].shape for t in xs):
                raise EdgecError("data items differ in shape; eval needs fixed-size inputs (e.g. --frames for audio)")
            x = torch.stack(xs)
            y = torch.stack([torch.as_tensor(b) for _, b in items])
        x = x.numpy() if x.dtype != torch.float64 else x.to(torch.float32).numpy()
        yield x, y.numpy()


def predict(runner, dataset, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """All outputs (first output, float64) and all targets for a dataset, in order."""
    outs, targets = [], []
    for x, y in iter_batches(dataset, batch_size):
        out = np.asarray(runner(build_feed(runner.inputs, x)))
        if out.shape[0] != x.shape[0]:
            raise EdgecError(f"the model returned {out.shape[0]} rows for a batch of {x.shape[0]}")
        outs.append(out.astype(np.float64))
        targets.append(y)
    return np.concatenate(outs), np.concatenate(targets)


def score(outputs: np.ndarray, targets: np.ndarray, task: str, num_classes: int | None,
          notes: list | None = None) -> tuple[dict, list]:
    """Metrics (``edgec.core.metrics``) plus mean loss; returns (metrics, predictions as plain values).

    A classifier with more outputs than the data has classes is scored over its own classes (the
    extra ones count as errors when predicted, and a note says so); fewer outputs is an error.
    """
    if task == "classification":
        if outputs.ndim != 2:
            raise EdgecError(f"a classifier must output (batch, classes) scores; the model outputs shape "
                             f"{list(outputs.shape)}")
        width = outputs.shape[1]
        if num_classes is not None and width < num_classes:
            raise EdgecError(f"the model outputs {width} class scores but the data has {num_classes} classes")
        if num_classes is not None and width > num_classes and notes is not None:
            notes.append(f"the model outputs {width} class scores but the data has {num_classes} classes; "
                         f"predicting class ids {num_classes}..{width - 1} counts as an error")
        if not np.all(np.isfinite(outputs)):
            raise EdgecError("the model produced NaN/Inf outputs on the data")
        pred = outputs.argmax(axis=1)
        m = classification_metrics(targets, pred, width)
        z = outputs - outputs.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = float(-logp[np.arange(len(targets)), targets.astype(np.int64)].mean())
        metrics = {"accuracy": m["accuracy"], "uar": m["uar"], "macro_f1": m["macro_f1"], "loss": loss}
        return metrics, pred.astype(int).tolist()
    t = targets.astype(np.float64)
    t2 = t.reshape(len(t), -1)
    if outputs.reshape(len(outputs), -1).shape[1] != t2.shape[1]:
        raise EdgecError(f"the model outputs {outputs.reshape(len(outputs), -1).shape[1]} value(s) per item but "
                         f"the data has {t2.shape[1]} regression target(s)")
    p = outputs.reshape(t.shape)
    m = regression_metrics(t, p)
    metrics = {"ccc": m["ccc"], "mae": m["mae"], "rmse": m["rmse"], "loss": float(((t - p) ** 2).mean())}
    return metrics, p.tolist()


def score_detection(runner, dataset, batch_size: int, num_classes: int | None, notes: list,
                    return_predictions: bool = False) -> tuple[dict, list]:
    """COCO-style box mAP (``edgec.core.detection_metrics``): each image's top-100 (query, class) pairs by sigmoid
    score against its ground-truth boxes; returns (metrics, per-image predictions as plain values)."""
    preds, gts, width = [], [], None
    for x, y in iter_batches(dataset, batch_size):
        logits, boxes = runner.detection(build_feed(runner.inputs, x))
        if logits.shape[0] != x.shape[0]:
            raise EdgecError(f"the model returned {logits.shape[0]} rows for a batch of {x.shape[0]}")
        width = int(logits.shape[-1])
        if num_classes is not None and width < num_classes:
            raise EdgecError(f"the model outputs {width} class scores but the data has {num_classes} classes "
                             "(build it with num_classes matching the data)")
        preds += postprocess(logits.astype(np.float64), boxes.astype(np.float64))
        gts += targets_from_items(y)
    if num_classes is not None and width is not None and width > num_classes:
        notes.append(f"the model outputs {width} class scores but the data has {num_classes} classes; detections "
                     f"of class ids {num_classes}..{width - 1} match no ground truth and are not scored")
    m = detection_metrics(preds, gts)
    metrics = {"map": m["map"], "map50": m["map50"], "map75": m["map75"], "objects": m["objects"]}
    out = [{"boxes": p["boxes"].tolist(), "scores": p["scores"].tolist(), "labels": p["labels"].tolist()}
           for p in preds] if return_predictions else []
    return metrics, out


def score_lm(runner, dataset, batch_size: int, meta: dict, split: str, notes: list,
             return_predictions: bool = False) -> dict:
    """Causal-LM scores over every token of a split, streamed batch by batch (docs/methods.md#metrics).

    NLL = Σ over positions of ``logsumexp(logits) − logits[next token]`` (float64); ``loss`` = NLL / tokens,
    ``perplexity`` = exp(loss), ``accuracy`` = next-token top-1, ``bits_per_byte`` = NLL / ln 2 / bytes, where
    bytes = the split's UTF-8 bytes (``meta["bytes"][split]``) times the fraction of its tokens that are
    scored (``tokens_scored / meta["tokens"][split]``: packing drops the first token and the last partial
    block); absent (with a note) when the data does not know its bytes. Returns ``{"metrics", "predictions"
    (argmax ids per item, only with return_predictions), "tokens", "text_bytes"}``."""
    nll, hits, count, preds = 0.0, 0, 0, []
    for x, y in iter_batches(dataset, batch_size):
        out = np.asarray(runner(build_feed(runner.inputs, x)))
        if out.ndim != 3 or out.shape[:2] != y.shape:
            raise EdgecError(f"a causal LM must output logits [batch, seq, vocab]; for token blocks {list(y.shape)} "
                             f"the model outputs shape {list(out.shape)}")
        targets = y.astype(np.int64)
        if targets.size and (targets.min() < 0 or targets.max() >= out.shape[-1]):
            raise EdgecError(f"the data holds token id {int(targets.max() if targets.min() >= 0 else targets.min())} "
                             f"but the model outputs {out.shape[-1]} logits per position (ids 0..{out.shape[-1] - 1})")
        if not np.all(np.isfinite(out)):
            raise EdgecError("the model produced NaN/Inf logits on the data")
        for logits, target in zip(out, targets):  # one item at a time: a float64 [T, V] copy, not [B, T, V]
            z = logits.astype(np.float64)
            z -= z.max(axis=-1, keepdims=True)
            logz = np.log(np.exp(z).sum(axis=-1))
            nll += float((logz - z[np.arange(len(target)), target]).sum())
            top = logits.argmax(axis=-1)
            hits += int((top == target).sum())
            count += int(target.size)
            if return_predictions:
                preds.append(top.astype(int).tolist())
    loss = nll / max(1, count)
    metrics = {"perplexity": math.exp(loss) if loss < 709.0 else math.inf}
    text_bytes = _scored_bytes(meta, split, count, notes)
    if text_bytes is not None:
        metrics["bits_per_byte"] = nll / math.log(2) / text_bytes
    metrics |= {"accuracy": hits / max(1, count), "loss": loss}
    return {"metrics": metrics, "predictions": preds, "tokens": count, "text_bytes": text_bytes}


def _scored_bytes(meta: dict, split: str, scored: int, notes: list) -> float | None:
    """The UTF-8 bytes the scored tokens stand for (see :func:`score_lm`); None, with a note, when unknown."""
    meta = meta if isinstance(meta, dict) else {}
    total = (meta.get("bytes") or {}).get(split) if isinstance(meta.get("bytes"), dict) else None
    if not isinstance(total, (int, float)) or isinstance(total, bool) or not total > 0:
        notes.append(f"bits per byte unavailable: the data does not record the text bytes of its {split} split")
        return None
    if split in (meta.get("bytes_estimated") or []):
        notes.append(f"bits per byte: the {split} split's text bytes are estimated pro rata from its tokens")
    tokens = (meta.get("tokens") or {}).get(split) if isinstance(meta.get("tokens"), dict) else None
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 and tokens != scored:
        return float(total) * scored / tokens
    return float(total)


def choose_split(bundle, split: str | None) -> tuple[str, str | None]:
    """``test`` (the default) falls back to ``val``; anything else is taken as asked."""
    if split in (None, "test"):
        if bundle.has_split("test"):
            return "test", None
        if bundle.has_split("val"):
            return "val", "the data has no test split; evaluated on val"
        have = ", ".join(f"{k} ({len(v)})" for k, v in bundle.splits.items()) or "none"
        raise EdgecError(f"data {_name(bundle.source)} has neither a test nor a val split (it has: {have}); "
                         "give --split explicitly")
    bundle.split(split)  # raises a clear error if absent or empty
    return split, None


def _latency_batch(dataset, batch: int) -> np.ndarray:
    """The first ``batch`` items of the split (cycled if the split is smaller)."""
    x = next(iter_batches(dataset, min(batch, len(dataset))))[0]
    if x.shape[0] < batch:
        x = np.concatenate([x] * math.ceil(batch / x.shape[0]))[:batch]
    return x


# ---------------------------------------------------------------------------------------------- loading
def _name(source) -> str:
    s = os.fspath(source)
    if os.path.exists(s):
        p = Path(s)
        return p.name or p.resolve().name
    return s  # an entry point (package.module:function)


def _onnx_file(path: Path):
    """``(bytes, proto)``, checked by edgec.onnx.reader; eval also needs at least one node."""
    data, proto = read_onnx(path)
    if not proto.graph.node:
        raise EdgecError(f"{path} is not a readable ONNX file (empty graph)")
    return data, proto


def onnx_params(proto) -> int:
    """Number of weight elements: the sum of the initializers' sizes."""
    total = 0
    for t in proto.graph.initializer:
        total += int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    return total


def _say(progress, message: str) -> None:
    if progress is not None:
        progress(message)


def is_onnx_file(path: Path) -> bool:
    """``.onnx`` by name; any other existing file that is not a zip (torch.save) but parses as ONNX."""
    if path.suffix.lower() == ".onnx":
        return True
    if path.suffix.lower() in (".pt", ".pth") or not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" or not head:
        return False
    try:
        proto = onnx.load_model_from_string(path.read_bytes())
    except Exception:
        return False
    return bool(proto.graph.node) and bool(proto.graph.output)


def _pass_names(records) -> list[str]:
    return [r.get("pass", "?") for r in records or [] if isinstance(r, dict)]


# ---------------------------------------------------------------------------------------------- API
def evaluate(path, data_source, *, split: str | None = "test", batch_size: int = DEFAULT_BATCH_SIZE,
             threads: int = 1, latency_batch: int = 1, latency: bool = True, arch: str | None = None,
             sample_rate: int = 16000, n_mels: int | None = None, frames: int | None = None, val_fraction: float = 0.2,
             seed: int = 0, cache_dir: str | None = None, normalize: str = "utterance",
             ort_config: dict | None = None, warmup: int = 5, repeats: int = 30, min_seconds: float = 0.2,
             return_predictions: bool = False, progress=None, block_size: int | None = None) -> dict:
    """Evaluate a checkpoint or ONNX file on a data split with the one protocol (docs/methods.md#metrics).

    ``n_mels=None``: the model's own n_mels (audio folders only). ``ort_config``: onnxruntime session
    config entries for the ONNX predictions and the latency session. ``return_predictions`` adds
    ``predictions`` (class ids, or regression values) to the result. ``progress``: optional callable
    taking one short status string per stage (for a spinner).
    """
    path = Path(path)
    is_onnx = is_onnx_file(path)
    _say(progress, f"loading {path.name}")
    target, config, records = _load_target(path, is_onnx, arch)
    _say(progress, f"loading data {_name(data_source)}")
    bundle, n_mels, frames = load_eval_data(data_source, config, records, n_mels=n_mels, frames=frames,
                                            sample_rate=sample_rate, val_fraction=val_fraction, seed=seed,
                                            cache_dir=cache_dir, normalize=normalize, block_size=block_size)
    result = evaluate_model(target, bundle, split=split, batch_size=batch_size, threads=threads,
                            latency_batch=latency_batch, latency=latency, ort_config=ort_config, warmup=warmup,
                            repeats=repeats, min_seconds=min_seconds, return_predictions=return_predictions,
                            progress=progress)
    result = {"input": path.name, "file_bytes": path.stat().st_size, **result}
    if bundle.kind == "audio folder":
        result["data_features"] = {"n_mels": n_mels, "frames": frames, "sample_rate": sample_rate,
                                   "normalize": normalize}
    return result


def load_eval_data(data_source, config: dict, records: list, *, n_mels: int | None = None,
                   frames: int | None = None, sample_rate: int = 16000, val_fraction: float = 0.2, seed: int = 0,
                   cache_dir: str | None = None, normalize: str = "utterance", block_size: int | None = None) -> tuple:
    """``(bundle, n_mels, frames)``: the data featurised the way the model was fine-tuned (its last ``finetune``
    record's data options, else its config's ``n_mels`` and 200 frames) unless told otherwise; text packed in
    blocks of the fine-tuned block_size, else 128 capped at the config's ``max_position_embeddings``. One protocol:
    ``edgec eval`` and the quality gates (edgec.app.gates) score the same items."""
    trained = next((r.get("params", {}).get("data_options") or {} for r in reversed(records)
                    if isinstance(r, dict) and r.get("pass") == "finetune"), {})
    if n_mels is None:
        n_mels = trained.get("n_mels") or (config.get("n_mels") if isinstance(config.get("n_mels"), int) else 40)
    if frames is None:
        frames = trained.get("frames") or 200
    if block_size is None:
        block_size = trained.get("block_size")
    max_seq = config.get("max_position_embeddings")
    image_size = config.get("image_size")  # detection folders: images resized to the model's S x S
    bundle = load_data(os.fspath(data_source), sample_rate=sample_rate, n_mels=n_mels, frames=frames,
                       val_fraction=val_fraction, seed=seed, cache_dir=cache_dir, normalize=normalize,
                       block_size=block_size, max_block_size=max_seq if isinstance(max_seq, int) else None,
                       image_size=image_size if isinstance(image_size, int) and not isinstance(image_size, bool)
                       else None)
    return bundle, n_mels, frames


def _load_target(path: Path, is_onnx: bool, arch: str | None) -> tuple[object, dict, list]:
    """``(target for evaluate_model, model config, provenance records)`` of a checkpoint or ONNX file."""
    if is_onnx:
        data, proto = _onnx_file(path)
        prov = read_provenance(proto, str(path))
        return (data, proto), (prov or {}).get("config") or {}, (prov or {}).get("passes") or []
    model = load_checkpoint(path, arch)  # arch: a str or SourceOptions
    config = model.config or {}
    spec_n_mels = model.spec.extra.get("n_mels") if isinstance(model.spec.extra, dict) else None
    config = {"n_mels": spec_n_mels, **config} if spec_n_mels is not None else config
    spec_size = model.spec.extra.get("image_size") if isinstance(model.spec.extra, dict) else None
    config = {"image_size": spec_size, **config} if spec_size is not None else config
    return model, config, model.provenance


@dataclass
class _Prepared:
    """A target made ready for the protocol: its inputs, what the result reports about it, the runner that
    predicts, the onnxruntime session to time (None: no latency) and the ONNX bytes."""

    inputs: list[InputInfo]
    info: dict
    runner: object
    session: object = None
    onnx_bytes: bytes | None = None
    latency_note: str | None = None


def evaluate_model(target, bundle, *, split: str | None = "test", batch_size: int = DEFAULT_BATCH_SIZE,
                   threads: int = 1, latency_batch: int = 1, latency: bool = True, ort_config: dict | None = None,
                   warmup: int = 5, repeats: int = 30, min_seconds: float = 0.2,
                   return_predictions: bool = False, progress=None) -> dict:
    """The protocol on an already loaded target: an ``edgec.core.graph.Model``, ONNX bytes, or ``(bytes, ModelProto)``.

    Reusable by training/pruning code that wants the same numbers as ``edgec eval`` without files.
    """
    if int(threads) < 1:
        raise EdgecError(f"threads must be >= 1, got {threads}")
    if int(latency_batch) < 1:
        raise EdgecError(f"latency batch must be >= 1, got {latency_batch}")
    split_used, split_note = choose_split(bundle, split)
    dataset = bundle.split(split_used)
    first_item = torch.as_tensor(dataset[0][0])
    notes = []
    if isinstance(target, Model):
        prep = _prepare_checkpoint(target, first_item, latency, threads, ort_config, progress)
    else:
        prep = _prepare_onnx(target, first_item, latency, threads, ort_config, notes)

    _say(progress, f"predicting {len(dataset)} items ({split_used}) with {prep.runner.by}")
    lm = None
    if bundle.task == "causal_lm":
        lm = score_lm(prep.runner, dataset, batch_size, bundle.meta, split_used, notes, return_predictions)
        metrics, predictions = lm.pop("metrics"), lm.pop("predictions")
    elif bundle.task == "detection":
        metrics, predictions = score_detection(prep.runner, dataset, batch_size, bundle.num_classes, notes,
                                               return_predictions)
    else:
        outputs, targets = predict(prep.runner, dataset, batch_size)
        metrics, predictions = score(outputs, targets, bundle.task, bundle.num_classes, notes)
    lat = None
    if latency and prep.session is not None:
        _say(progress, f"timing onnxruntime ({threads} thread(s), batch {latency_batch})")
        lat = _measure_latency(prep, dataset, int(latency_batch), threads, warmup, repeats, min_seconds)

    result = {
        **prep.info,
        "onnx_bytes": len(prep.onnx_bytes) if prep.onnx_bytes is not None else None,
        "predictions_by": prep.runner.by,
        "data": _name(bundle.source),
        "data_kind": bundle.kind,
        "data_digest": bundle.digest,
        "task": bundle.task,
        "split": split_used,
        "split_note": split_note,
        "n": int(len(dataset)),
        "classes": list(bundle.classes) if bundle.classes is not None else None,
        "input_shape": list(first_item.shape),
        "batch_size": int(batch_size),
        "metrics": metrics,
        "latency": lat,
        "latency_note": prep.latency_note,
        "machine": machine_key(threads),
        "notes": notes,
    }
    if lm is not None:
        result |= lm  # tokens, text_bytes
    if return_predictions:
        result["predictions"] = predictions
    return result


def _prepare_checkpoint(model: Model, first_item, latency: bool, threads: int, ort_config: dict | None,
                        progress) -> _Prepared:
    """Predictions in torch; latency from an in-memory ONNX export, when the model can be exported."""
    inputs = inputs_from_spec(model.spec)
    hints = {"n_mels": model.spec.extra.get("n_mels", model.config.get("n_mels")),
             "image_size": model.spec.extra.get("image_size")}
    if model.spec.task == "features":
        raise EdgecError(f"the model ({model.arch}) outputs features ({', '.join(model.spec.outputs)}), not "
                         "predictions; it needs a classification/regression head to be evaluated")
    info = {"kind": "checkpoint", "arch": model.arch, "provenance_passes": _pass_names(model.provenance),
            "params": model.param_count(), "checkpoint_digest": model.digest()}
    check_data_fits(inputs, tuple(first_item.shape), _item_dtype(first_item), hints)
    prep = _Prepared(inputs, info, _TorchRunner(model))
    scaffolds = model.scaffolds()
    if not latency:
        prep.latency_note = "latency not measured (disabled)"
    elif scaffolds:
        prep.latency_note = (f"not exportable: {len(scaffolds)} unfolded training scaffold(s) "
                             f"({', '.join(sorted({m.kind for _, m in scaffolds}))}); run `edgec fold` first")
    else:
        _say(progress, "exporting to ONNX in memory for latency")
        try:
            prep.onnx_bytes = to_onnx(model).SerializeToString(deterministic=True)
        except EdgecError as exc:
            prep.latency_note = f"not exportable: {exc}"
    if prep.onnx_bytes is not None:
        try:
            prep.session = create_session(prep.onnx_bytes, threads, ort_config)
        except EdgecError as exc:
            prep.latency_note, prep.onnx_bytes = f"not measurable: {exc}", None
    return prep


def _prepare_onnx(target, first_item, latency: bool, threads: int, ort_config: dict | None,
                  notes: list) -> _Prepared:
    """Predictions and latency in one onnxruntime session; model facts from the edgec provenance metadata."""
    if isinstance(target, (bytes, bytearray)):
        data, proto = bytes(target), parse_onnx(bytes(target))
    else:
        data, proto = target
    prov = read_provenance(proto) or {}  # malformed metadata: an EdgecError naming the field
    if not prov:
        notes.append("no edgec provenance in the file: arch unknown")
    config = prov.get("config") or {}
    if (prov.get("spec") or {}).get("task") == "features":
        raise EdgecError("the model outputs features, not predictions; it needs a classification/regression "
                         "head to be evaluated")
    inputs = inputs_from_onnx(proto, prov)
    hints = {"n_mels": config.get("n_mels"), "image_size": config.get("image_size")}
    info = {"kind": "onnx", "arch": prov.get("arch"), "provenance_passes": _pass_names(prov.get("passes")),
            "params": onnx_params(proto), "checkpoint_digest": prov.get("checkpoint_digest")}
    check_data_fits(inputs, tuple(first_item.shape), _item_dtype(first_item), hints)
    session = create_session(data, threads, ort_config)
    prep = _Prepared(inputs, info, _OrtRunner(session, inputs), session, data)
    if not latency:
        prep.latency_note = "latency not measured (disabled)"
    return prep


def _measure_latency(prep: _Prepared, dataset, latency_batch: int, threads: int, warmup: int, repeats: int,
                     min_seconds: float) -> dict:
    """onnxruntime timing (``edgec.onnx.session.measure_session``) on the first ``latency_batch`` items."""
    x = _latency_batch(dataset, latency_batch)
    feed = build_feed(prep.inputs, x)
    lat = measure_session(prep.session, feed, threads=threads, warmup=warmup, repeats=repeats,
                          min_seconds=min_seconds)
    lat["batch"] = int(latency_batch)
    lat["input_shape"] = list(x.shape)
    lat["inputs"] = {k: list(v.shape) for k, v in feed.items()}
    return lat
